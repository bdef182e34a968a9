"""The attention processor and the hooks, on the tiny UNet's real attention modules."""

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from tokenflow.attention import TokenFlowAttnProcessor, TokenFlowState
from tokenflow.config import EditConfig
from tokenflow.correspondence import propagation_plan
from tokenflow.injection import resolve_layers, tokenflow_hooks

from conftest import step_inputs

LAYER = "up_blocks.3.attentions.0.transformer_blocks.0.attn1"


def _attn(pipe):
    return dict(pipe.unet.named_modules())[LAYER]


def _tokens(n, length=24, seed=0, dim=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, dim, generator=g)


def _reference_attention(attn, q_in, kv_in):
    """softmax(q k^T * scale) v with explicit matmuls, heads split by hand (the official way)."""
    h = attn.heads
    q, k, v = attn.to_q(q_in), attn.to_k(kv_in), attn.to_v(kv_in)
    d = q.shape[-1] // h
    q = q.view(q.shape[0], -1, h, d).transpose(1, 2)
    k = k.view(k.shape[0], -1, h, d).transpose(1, 2)
    v = v.view(v.shape[0], -1, h, d).transpose(1, 2)
    out = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1) @ v
    return attn.to_out[0](out.transpose(1, 2).reshape(q_in.shape[0], -1, h * d))



@torch.no_grad()
def test_extended_attention_with_one_keyframe_equals_plain_attention(tiny_pipe):
    attn = _attn(tiny_pipe)
    x = _tokens(3, dim=attn.to_q.in_features)  # 3 branches x 1 keyframe
    state = TokenFlowState(mode="keyframe")
    ours = TokenFlowAttnProcessor(LAYER, state)(attn, x)
    plain = AttnProcessor2_0()(attn, x)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_extended_attention_attends_to_all_keyframes_of_the_branch(tiny_pipe):
    attn = _attn(tiny_pipe)
    k = 3
    x = _tokens(3 * k, dim=attn.to_q.in_features, seed=1)
    state = TokenFlowState(mode="keyframe")
    out = TokenFlowAttnProcessor(LAYER, state)(attn, x)
    src, unc, con = x.chunk(3)
    # source branch: per frame; edit branches: every frame attends to the keys of all frames
    torch.testing.assert_close(out[:k], _reference_attention(attn, src, src), rtol=1e-5, atol=1e-6)
    for i, branch in ((1, unc), (2, con)):
        joint = branch.reshape(1, -1, branch.shape[-1]).expand(k, -1, -1)
        torch.testing.assert_close(out[i * k:(i + 1) * k], _reference_attention(attn, branch, joint),
                                   rtol=1e-5, atol=1e-6)
    # the layer keeps the source tokens and the outputs of the keyframes
    cache = state.caches.layers[LAYER]
    assert torch.equal(cache.source_tokens, src)
    assert torch.equal(cache.outputs.reshape(3 * k, *out.shape[1:]), out)


@torch.no_grad()
def test_qk_injection_uses_source_queries_and_keys_with_own_values(tiny_pipe):
    attn = _attn(tiny_pipe)
    x = _tokens(3, dim=attn.to_q.in_features, seed=2)
    state = TokenFlowState(mode="keyframe", qk_injection=True)
    out = TokenFlowAttnProcessor(LAYER, state, inject_qk=True)(attn, x)
    src, _, con = x.chunk(3)
    h = attn.heads
    q, k, v = attn.to_q(src), attn.to_k(src), attn.to_v(con)
    d = q.shape[-1] // h
    split = lambda t: t.view(1, -1, h, d).transpose(1, 2)  # noqa: E731
    ref = torch.softmax(split(q) @ split(k).transpose(-1, -2) * attn.scale, -1) @ split(v)
    ref = attn.to_out[0](ref.transpose(1, 2).reshape(1, -1, h * d))
    torch.testing.assert_close(out[2:], ref, rtol=1e-5, atol=1e-6)
    # a layer that is not an injection layer ignores the flag
    plain = TokenFlowAttnProcessor(LAYER, TokenFlowState(mode="keyframe"))(attn, x)
    assert torch.equal(TokenFlowAttnProcessor(LAYER, state, inject_qk=False)(attn, x), plain)


@torch.no_grad()
def test_propagation_when_every_frame_is_a_keyframe_returns_keyframe_outputs(tiny_pipe):
    attn = _attn(tiny_pipe)
    k = 4
    x = _tokens(3 * k, dim=attn.to_q.in_features, seed=3)
    state = TokenFlowState(mode="keyframe")
    proc = TokenFlowAttnProcessor(LAYER, state)
    kf_out = proc(attn, x)
    state.set_mode("propagate")
    frames = torch.arange(k)
    state.slots, state.weights = propagation_plan(frames, frames, 1, "paper")
    torch.testing.assert_close(proc(attn, x), kf_out, rtol=0, atol=0)


def test_layers_are_resolved_by_role(tiny_pipe):
    layers = resolve_layers(tiny_pipe.unet)
    assert len(layers.self_attention) == 16  # 6 down, 1 mid, 9 up transformer blocks
    assert layers.qk[0] == "up_blocks.1.attentions.1.transformer_blocks.0.attn1" and len(layers.qk) == 8
    assert layers.feature == "up_blocks.1.resnets.1.conv2"


@torch.no_grad()
def test_hooks_removed_leave_the_unet_bit_identical(tiny_pipe):
    unet = tiny_pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 12, generator=g)
    text = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(501)
    before = unet(x, t, encoder_hidden_states=text).sample
    processors = dict(unet.attn_processors)
    state = TokenFlowState(qk_injection=True, feature_injection=True)
    with tokenflow_hooks(unet, state):
        state.set_mode("keyframe")
        changed = unet(x, t, encoder_hidden_states=text).sample
    assert not torch.equal(before, changed)  # the hooks did act
    after = unet(x, t, encoder_hidden_states=text).sample
    assert torch.equal(before, after)
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert not unet.up_blocks[1].resnets[1].conv2._forward_hooks


@torch.no_grad()
def test_hooks_are_removed_when_the_edit_fails(tiny_pipe):
    processors = dict(tiny_pipe.unet.attn_processors)
    state = TokenFlowState()
    try:
        with tokenflow_hooks(tiny_pipe.unet, state):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(tiny_pipe.unet.attn_processors[k] is v for k, v in processors.items())


@torch.no_grad()
def test_all_keyframe_edit_step_equals_extended_attention_over_all_frames(tiny_pipe):
    """Batch size 1 + paper policy: every frame is its own keyframe, so the TokenFlow step must
    equal one UNet pass with extended attention across all frames."""
    pipe = tiny_pipe
    n = 4
    x, source, text, scheduler, t = step_inputs(pipe, n, seed=5, step=3)
    config = EditConfig(prompt="x", batch_size=1, propagation="paper")
    state = TokenFlowState()
    with tokenflow_hooks(pipe.unet, state, pipe.layers):
        ours = pipe.denoise_step(x, t, source, torch.arange(n), state, scheduler, text, config, True, True)
        state.qk_injection = state.feature_injection = True
        state.set_mode("extended")
        _, unc, con = pipe._unet(x, source, t, text).chunk(3)
    ref = scheduler.step(unc + 7.5 * (con - unc), t, x).prev_sample
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_per_call_state_is_put_back_after_the_block_whatever_happens():
    state = TokenFlowState()
    with state.during(mode="keyframe", keyframe_branch=1, anchor_role="keep"):
        assert (state.mode, state.keyframe_branch, state.anchor_role) == ("keyframe", 1, "keep")
        with state.during(keyframe_branch=2):
            assert state.keyframe_branch == 2
        assert state.keyframe_branch == 1
    assert (state.mode, state.keyframe_branch, state.anchor_role) == ("plain", None, None)
    try:
        with state.during(mode="propagate"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert state.mode == "plain"
    for bad in ({"slots": None}, {"mode": "nonsense"}):
        try:
            with state.during(**bad):
                pass
        except ValueError:
            continue
        raise AssertionError(f"during({bad}) was accepted")


@torch.no_grad()
def test_a_step_leaves_no_layer_caches_or_batch_plan_behind_even_when_it_fails(tiny_pipe):
    """The step's one reset: after a finished step and after one whose propagation pass failed (the
    keyframe pass had filled every layer's cache), nothing the layers kept survives into the next call."""
    pipe = tiny_pipe
    x, source, text, scheduler, t = step_inputs(pipe, 4, seed=7, step=3)
    config = EditConfig(prompt="x", batch_size=2, propagation="paper")
    state = TokenFlowState()

    def at_rest():
        assert state.caches.layers == {} and state.caches.anchors == {} and state.caches.features is None
        assert state.mode == "plain" and state.slots is None and state.cache_rows is None
        assert state.keyframe_branch is None and state.gather is None and state.anchor_role is None

    seen = []
    real = pipe._unet

    def failing(*args, **kwargs):  # the keyframe call goes through, the first propagation batch fails
        seen.append(len(state.caches.layers))
        if len(seen) == 2:
            raise RuntimeError("boom in the propagation pass")
        return real(*args, **kwargs)

    with tokenflow_hooks(pipe.unet, state, pipe.layers):
        pipe.denoise_step(x, t, source, torch.tensor([0, 3]), state, scheduler, text, config, True, True)
        at_rest()
        pipe._unet = failing
        try:
            pipe.denoise_step(x, t, source, torch.tensor([1, 2]), state, scheduler, text, config, True, True)
        except RuntimeError as e:
            assert "boom" in str(e)
        else:
            raise AssertionError("the failing step did not fail")
        finally:
            del pipe._unet
        assert seen[1] == len(pipe.layers.self_attention)  # the keyframe pass had filled every layer's cache
        at_rest()
