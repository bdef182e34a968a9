"""Bounded memory: split keyframe pass, offloaded caches, long videos in one run, compile/offload options."""

import numpy as np
import pytest
import torch

from tokenflow import EditConfig, TokenFlowPipeline
from tokenflow.attention import TokenFlowState
from tokenflow.injection import tokenflow_hooks

from conftest import moving_frames, step_inputs


@torch.no_grad()
def _step(pipe, x, source, text, scheduler, t, keyframes, config, qk=True, feat=True):
    state = TokenFlowState()
    with tokenflow_hooks(pipe.unet, state, pipe.layers):
        return pipe.denoise_step(x, t, source, keyframes, state, scheduler, text, config, qk, feat)


@pytest.mark.parametrize("policy", ["original", "paper"])
@pytest.mark.parametrize("qk, feat", [(True, True), (False, False)])
def test_split_keyframe_pass_equals_the_joint_one(tiny_pipe, policy, qk, feat):
    """One UNet call per branch (source first, its Q/K and features kept for the edit branches)
    computes what one call on all three branches computes."""
    x, source, text, scheduler, t = step_inputs(tiny_pipe, 12)
    config = EditConfig(prompt="x", batch_size=4, propagation=policy)
    keyframes = torch.tensor([1, 6, 11])
    try:
        tiny_pipe.split_keyframe_pass = False
        joint = _step(tiny_pipe, x, source, text, scheduler, t, keyframes, config, qk, feat)
        tiny_pipe.split_keyframe_pass = True
        split = _step(tiny_pipe, x, source, text, scheduler, t, keyframes, config, qk, feat)
    finally:
        tiny_pipe.split_keyframe_pass = None
    torch.testing.assert_close(split, joint, rtol=1e-5, atol=1e-5)
    # and the injection did act: without it the step differs
    if qk:
        plain = _step(tiny_pipe, x, source, text, scheduler, t, keyframes, config, False, False)
        assert (plain - joint).abs().max() > 1e-4


def test_offloaded_caches_give_the_same_step(tiny_pipe):
    """Caches on the cache device with only each batch's keyframe rows brought back (slots renumbered)."""
    x, source, text, scheduler, t = step_inputs(tiny_pipe, 12, seed=8)
    config = EditConfig(prompt="x", batch_size=4, propagation="paper")
    keyframes = torch.tensor([0, 5, 10])
    try:
        tiny_pipe.offload_cache = False
        resident = _step(tiny_pipe, x, source, text, scheduler, t, keyframes, config)
        tiny_pipe.offload_cache = True
        offloaded = _step(tiny_pipe, x, source, text, scheduler, t, keyframes, config)
    finally:
        tiny_pipe.offload_cache = None
    assert torch.equal(offloaded, resident)


def test_a_long_video_is_edited_in_one_run_with_bounded_unet_batches(tiny_pipe):
    """304 frames: one global set of keyframes per step (38 of them, no chunks), and no UNet call
    holds all three branches of the keyframes: the biggest call is a propagation batch
    (3 x batch_size images) or one branch of the keyframes, never 3 x 38 images."""
    n, batch = 304, 8
    frames = moving_frames(n, 64, 64, seed=3)
    sizes = []
    handle = tiny_pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append(int((args[0] if args else kwargs["sample"]).shape[0])),
        with_kwargs=True)
    try:
        r = tiny_pipe.edit(frames, "a robot", steps=2, inversion_steps=2, batch_size=batch, height=64,
                           width=64, use_cache=False, progress=False)
    finally:
        handle.remove()
    assert r.frames.shape == (n, 3, 64, 64) and torch.isfinite(r.frames).all()
    for kf in r.keyframes:  # one keyframe in every interval of the whole video, every step
        assert len(kf) == n // batch and [k // batch for k in kf] == list(range(n // batch))
    assert max(sizes) == max(3 * batch, n // batch)
    assert sizes.count(n // batch) == 3 * len(r.keyframes)  # the split keyframe pass: one call per branch


def test_compiled_blocks_compute_the_same_edit(frames_small):
    pipe = TokenFlowPipeline.from_tiny(seed=0)
    kwargs = dict(steps=2, inversion_steps=2, batch_size=4, use_cache=False, progress=False, height=48, width=64)
    eager = pipe.edit(frames_small, "a robot", **kwargs)
    pipe.compile(backend="eager")  # the plumbing (hooks and processors through compiled blocks)
    compiled = pipe.edit(frames_small, "a robot", **kwargs)
    torch.testing.assert_close(compiled.frames, eager.frames, rtol=0, atol=1e-6)


def test_offload_slicing_and_tiling_switches(frames_small):
    pipe = TokenFlowPipeline.from_tiny(seed=0)
    kwargs = dict(steps=2, inversion_steps=2, batch_size=4, use_cache=False, progress=False, height=48, width=64)
    ref = pipe.edit(frames_small, "a robot", **kwargs)
    pipe.enable_offload().enable_vae_slicing()
    assert pipe.offload and pipe.vae_batch_size == 1
    assert all(p.device.type == "cpu" for m in pipe._modules() for p in m.parameters())
    again = pipe.edit(frames_small, "a robot", **kwargs)
    torch.testing.assert_close(again.frames, ref.frames, rtol=0, atol=1e-4)  # VAE batch 1 vs 10: round-off
    pipe.enable_vae_tiling()
    assert pipe.vae.use_tiling
    # tiles smaller than the frame: the tiled VAE still gives frames of the right size
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 32, 4
    tiled = pipe.edit(frames_small, "a robot", **kwargs)
    assert tiled.frames.shape == ref.frames.shape and torch.isfinite(tiled.frames).all()
    assert not torch.equal(tiled.frames, ref.frames)


def test_released_text_encoder_gives_the_same_edit(frames_small):
    """The command encodes its prompts up front and frees the text encoder before the UNet runs."""
    from tokenflow.errors import TokenFlowError

    pipe = TokenFlowPipeline.from_tiny(seed=0)
    kwargs = dict(steps=2, inversion_steps=2, batch_size=4, use_cache=False, progress=False, height=48, width=64)
    ref = pipe.edit(frames_small, "a robot", **kwargs)
    config = EditConfig(prompt="a robot")
    pipe.release_text_encoders([config.inversion_prompt, config.negative_prompt, "a robot"])
    assert pipe.text_encoder is None and all(m is not pipe.text_encoder for m in pipe._modules())
    again = pipe.edit(frames_small, "a robot", **kwargs)
    assert torch.equal(again.frames, ref.frames)
    with pytest.raises(TokenFlowError, match="'a cat' was not among them"):
        pipe.edit(frames_small, "a cat", **kwargs)


@pytest.fixture(scope="module")
def frames_small():
    return moving_frames(6, 48, 64, seed=1).astype(np.uint8)


@pytest.mark.parametrize("policy, offload", [("original", False), ("paper", True)])
def test_no_host_sync_inside_the_attention_layers(tiny_pipe, monkeypatch, policy, offload):
    """On a GPU, .item(), .tolist(), .cpu(), .numpy(), .nonzero() and bool(tensor) wait for the device.
    None of them may run inside TokenFlow's per-layer code (the processors and the feature hook): a
    step's per-batch facts are computed once on the host before the UNet call."""
    from tokenflow import attention, injection

    inside, calls = [False], []

    def counting(name, real):
        def wrapper(self, *a, **k):
            if inside[0]:
                calls.append(name)
            return real(self, *a, **k)
        return wrapper

    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    real_call = attention.TokenFlowAttnProcessor.__call__

    def layer(self, *a, **k):
        inside[0] = True
        try:
            return real_call(self, *a, **k)
        finally:
            inside[0] = False

    monkeypatch.setattr(attention.TokenFlowAttnProcessor, "__call__", layer)
    real_hook = injection._feature_hook

    def feature_hook(state):
        hook = real_hook(state)

        def counted(*a):
            inside[0] = True
            try:
                return hook(*a)
            finally:
                inside[0] = False
        return counted

    monkeypatch.setattr(injection, "_feature_hook", feature_hook)
    x, source, text, scheduler, t = step_inputs(tiny_pipe, 12)
    config = EditConfig(prompt="x", batch_size=4, propagation=policy)
    try:
        tiny_pipe.offload_cache = offload
        _step(tiny_pipe, x, source, text, scheduler, t, torch.tensor([1, 6, 11]), config)
    finally:
        tiny_pipe.offload_cache = None
    layers = len(tiny_pipe.layers.self_attention)
    assert calls == [], f"{len(calls)} host syncs in {2 * layers} layer calls: {sorted(set(calls))}"
