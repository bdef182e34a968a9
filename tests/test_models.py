"""Model sources and kinds on tiny components built in code: single-file checkpoints, LoRA,
SDXL, SD 2 depth, ControlNet (canny, depth, given images). End to end through the command."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tokenflow import TokenFlowPipeline
from tokenflow.conditioning import canny_maps, normalise_per_frame
from tokenflow.injection import resolve_layers
from tokenflow.tiny import (build_tiny_components, build_tiny_controlnet, build_tiny_depth_estimator,
                            build_tiny_sdxl_components, save_tiny_variant)

from conftest import moving_frames
from ldm_export import write_single_file
from test_cli import run_cli

FAST = ["--steps", "2", "--inversion-steps", "2", "--batch-size", "2", "--height", "32", "--width", "48",
        "--no-cache", "-q"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    for i, f in enumerate(moving_frames(4, 32, 48, seed=2)):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    return str(folder)


def _frames(path):
    from tokenflow.video import read_video

    return read_video(path).frames.astype(np.float32)


# ------------------------------------------------------------------ dtype auto
def test_auto_dtype_takes_bfloat16_only_on_a_cpu_that_has_it(monkeypatch):
    from tokenflow import models
    from tokenflow.errors import TokenFlowError

    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    monkeypatch.delenv(models.CPU_BF16_ENV)
    for native, on_cpu in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
        assert models.resolve_dtype("auto", cpu) == on_cpu
        assert models.resolve_dtype("auto", cuda) == torch.float16
        assert models.resolve_dtype("auto", mps) == torch.float32
        assert models.resolve_dtype("float32", cpu) == torch.float32  # asked for: always kept
        assert models.resolve_dtype(torch.float16, cpu) == torch.float16
    monkeypatch.setenv(models.CPU_BF16_ENV, "1")  # forced, although the CPU lacks it (the last setattr)
    assert models.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("auto", cuda) == torch.float16
    monkeypatch.setenv(models.CPU_BF16_ENV, "yes")
    with pytest.raises(TokenFlowError, match="TOKENFLOW_CPU_BF16 must be 0, 1 or auto"):
        models.resolve_dtype("auto", cpu)


def test_the_command_edits_in_bfloat16_by_default_on_such_a_cpu(tmp_path, capsys, tiny_model_dir, clip,
                                                                  monkeypatch):
    import yaml

    from tokenflow import models

    monkeypatch.delenv(models.CPU_BF16_ENV)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    code, out, err = run_cli(capsys, "edit", clip, "-p", "a robot", "--model", tiny_model_dir, "--device", "cpu",
                             "-o", tmp_path / "auto.mp4", *FAST)
    assert code == 0, err
    assert "(cpu bfloat16;" in out  # the summary line says which
    assert yaml.safe_load((tmp_path / "auto.yaml").read_text())["dtype"] == "bfloat16"  # reruns the same
    code, out, err = run_cli(capsys, "edit", clip, "-p", "a robot", "--model", tiny_model_dir, "--device", "cpu",
                             "--dtype", "float32", "-o", tmp_path / "f32.mp4", *FAST)
    assert code == 0 and "(cpu float32;" in out, err
    drift = np.abs(_frames(tmp_path / "auto.mp4") - _frames(tmp_path / "f32.mp4"))
    assert 0 < drift.mean() < 64  # another dtype, the same edit (the tiny model drifts most: benchmarks/)
    code, out, err = run_cli(capsys, "edit", clip, "-p", "a robot", "--model", "tiny", "-o", tmp_path / "t.mp4",
                             *FAST)
    assert code == 0 and "(cpu float32;" in out, err  # the built-in tiny model stays float32 unless asked
    monkeypatch.setenv(models.CPU_BF16_ENV, "maybe")
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "--device", "cpu",
                           "-o", tmp_path / "bad.mp4", *FAST)
    assert code == 2 and "TOKENFLOW_CPU_BF16" in err and "Traceback" not in err
    assert not (tmp_path / "bad.mp4").exists()


def test_safetensors_are_read_in_pieces_into_the_target_dtype(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from tokenflow import weights

    monkeypatch.setattr(weights, "CHUNK_BYTES", 100)  # 25 float32 values a piece: most tensors take several
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 11, generator=g), "ids": torch.arange(5), "half": torch.randn(3).half(),
               "scalar": torch.tensor(2.5), "long": torch.randn(1000, generator=g), "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path)
    for dtype in (torch.bfloat16, torch.float16, None):
        got = weights.read_safetensors(path, dtype)
        assert got.keys() == tensors.keys()
        for k, t in tensors.items():
            want = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            assert got[k].dtype == want.dtype and got[k].shape == want.shape and torch.equal(got[k], want), k
    with open(path, "r+b") as f:  # cut short inside the last tensor
        f.truncate(os.path.getsize(path) - 8)
    with pytest.raises(ValueError, match="ends inside tensor"):
        weights.read_safetensors(path, torch.bfloat16)


def test_lean_loading_leaves_what_it_cannot_read_to_diffusers(tmp_path, tiny_model_dir):
    import shutil

    import diffusers
    from safetensors.torch import load_file, save_file

    from tokenflow.weights import fill_lean, lean_skeleton

    folder = tmp_path / "vae"
    shutil.copytree(os.path.join(tiny_model_dir, "vae"), folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    cls = diffusers.AutoencoderKL
    assert lean_skeleton(cls, str(folder), torch.float32) is None  # float32 into float32: memory-mapped
    skeleton = lean_skeleton(cls, str(folder), torch.bfloat16)
    assert skeleton is not None and all(p.is_meta for p in skeleton.parameters())
    fill_lean(skeleton)
    assert not any(t.is_meta for t in skeleton.state_dict().values())
    assert {p.dtype for p in skeleton.parameters()} == {torch.bfloat16}
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    save_file({**tensors, first: tensors[first].to(torch.float8_e4m3fn)}, str(path))
    assert lean_skeleton(cls, str(folder), torch.bfloat16) is None  # float8: not read here
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(path))
    assert lean_skeleton(cls, str(folder), torch.bfloat16) is None  # already bfloat16: memory-mapped


def test_loading_into_another_dtype_reads_the_weights_tensor_by_tensor(tmp_path, tiny_model_dir, monkeypatch):
    import shutil

    import diffusers
    from safetensors.torch import load_file, save_file

    from tokenflow import weights

    read = []
    original = weights.read_safetensors
    monkeypatch.setattr(weights, "read_safetensors", lambda path, dtype=None: read.append(
        os.path.basename(os.path.dirname(path))) or original(path, dtype))
    pipe = TokenFlowPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert sorted(read) == ["unet", "vae"]  # the diffusers models; transformers loads the text encoder
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16,
                                                            safety_checker=None, feature_extractor=None)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name), getattr(ref, name)
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        if name != "text_encoder":
            assert not ours.training and dict(ours.config) == dict(theirs.config)
    read.clear()
    TokenFlowPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    assert read == []  # the file's own dtype: diffusers keeps the weights memory-mapped, no copy at all
    # a VAE saved with the legacy attention names: left to diffusers, which renames them
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_model_dir, legacy)
    path = legacy / "vae" / "diffusion_pytorch_model.safetensors"
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in load_file(str(path)).items():
        for new, was in names.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{was}.")
        old[k] = v
    assert any(".query." in k for k in old)
    save_file(old, str(path))
    read.clear()
    pipe = TokenFlowPipeline.from_pretrained(str(legacy), device="cpu", dtype="bfloat16")
    assert read == ["unet"]
    a, b = pipe.vae.state_dict(), ref.vae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


# ------------------------------------------------------------------ single-file checkpoints
def test_single_file_checkpoint_loads_the_same_weights_and_edits(tmp_path, capsys, tiny_model_dir, clip):
    c = build_tiny_components(0)
    ckpt = write_single_file(tmp_path / "tiny.safetensors", c.unet, c.vae, c.text_encoder)
    pipe = TokenFlowPipeline.from_pretrained(ckpt, device="cpu", model_config=tiny_model_dir)
    for ours, ref in ((pipe.unet, c.unet), (pipe.vae, c.vae), (pipe.text_encoder, c.text_encoder)):
        a, b = ours.state_dict(), ref.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out_file, out_dir = tmp_path / "file.mp4", tmp_path / "dir.mp4"
    code, _, err = run_cli(capsys, "edit", clip, "-p", "a robot", "--model", ckpt, "--model-config",
                           tiny_model_dir, "-o", out_file, *FAST)
    assert code == 0, err
    code, _, err = run_cli(capsys, "edit", clip, "-p", "a robot", "--model", tiny_model_dir, "-o", out_dir, *FAST)
    assert code == 0, err
    assert np.array_equal(_frames(out_file), _frames(out_dir))  # same weights, same edit


def test_pickle_checkpoints_need_allow_pickle(tmp_path, capsys, clip):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", ckpt, "-o", tmp_path / "o.mp4", *FAST)
    assert code == 2 and "pickle" in err and "--allow-pickle" in err and "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()


# ------------------------------------------------------------------ LoRA
@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = build_tiny_components(0).unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return str(folder / "pytorch_lora_weights.safetensors")


def test_lora_is_fused_at_its_scale(tiny_model_dir, lora_file):
    from safetensors.torch import load_file

    base = TokenFlowPipeline.from_pretrained(tiny_model_dir, device="cpu")
    half = TokenFlowPipeline.from_pretrained(tiny_model_dir, device="cpu", loras=[f"{lora_file}:0.5"])
    zero = TokenFlowPipeline.from_pretrained(tiny_model_dir, device="cpu", loras=[f"{lora_file}:0"])
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = dict(base.unet.named_modules())[layer].weight
    w = dict(half.unet.named_modules())[layer].weight
    lora = load_file(lora_file)
    a = next(v for k, v in lora.items() if layer in k and "lora_A" in k)
    b = next(v for k, v in lora.items() if layer in k and "lora_B" in k)
    torch.testing.assert_close(w, w0 + 0.5 * (b @ a), rtol=1e-5, atol=1e-6)  # alpha/r = 1
    assert all(torch.equal(p, q) for p, q in zip(zero.unet.state_dict().values(), base.unet.state_dict().values()))
    assert not any("lora" in k for k in half.unet.state_dict())  # fused: no adapter layers left
    assert half.model_id != base.model_id  # cached inversions are not shared across LoRAs


def test_lora_through_the_command(tmp_path, capsys, tiny_model_dir, lora_file, clip):
    outs = {}
    for name, extra in (("base", []), ("lora", ["--lora", f"{lora_file}:1.5"])):
        outs[name] = tmp_path / f"{name}.mp4"
        code, _, err = run_cli(capsys, "edit", clip, "-p", "a robot", "--model", tiny_model_dir, *extra,
                               "-o", outs[name], *FAST)
        assert code == 0, err
    assert np.abs(_frames(outs["base"]) - _frames(outs["lora"])).mean() > 0.5
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "--lora",
                           str(tmp_path / "missing.safetensors"), "-o", tmp_path / "x.mp4", *FAST)
    assert code == 2 and "LoRA" in err


# ------------------------------------------------------------------ SDXL
def test_sdxl_layers_are_chosen_by_role():
    unet = build_tiny_sdxl_components(0)["unet"]
    layers = resolve_layers(unet)
    # no attention in the last (highest-resolution) up block; the first decoder attention block is skipped
    assert layers.feature == "up_blocks.0.resnets.1.conv2"
    assert all(not n.startswith("up_blocks.0.attentions.0.") for n in layers.qk)
    assert {n.rsplit(".transformer_blocks", 1)[0] for n in layers.qk} == {
        "up_blocks.0.attentions.1", "up_blocks.0.attentions.2", "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"}
    assert len(layers.qk) == 10  # every transformer layer of those blocks (two each)


@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
def test_sdxl_edits_end_to_end(tmp_path, capsys, clip, editor):
    model = save_tiny_variant(tmp_path / "sdxl", "sdxl")
    out = tmp_path / "out.mp4"
    code, stdout, err = run_cli(capsys, "edit", clip, "-p", "a robot", "--model", model, "--editor", editor,
                                "-o", out, *FAST, "--steps", "4", "--inversion-steps", "4")
    assert code == 0, err
    assert _frames(out).shape == (4, 32, 48, 3)
    pipe = TokenFlowPipeline.from_pretrained(model, device="cpu")
    assert pipe.is_sdxl and pipe.native_side == 512  # tiny: 32 x 8 -> at least 512
    embeds = pipe.prompt_embeds("a robot")
    assert embeds.embeds.shape == (1, 77, 64) and embeds.pooled.shape == (1, 32)


def test_sdxl_pooled_and_time_ids_reach_the_unet(tmp_path):
    pipe = TokenFlowPipeline(**build_tiny_sdxl_components(0))
    frames = torch.rand(2, 3, 32, 48)
    cond = pipe.prepare_conditioning(frames, __import__("tokenflow").EditConfig())
    assert cond.time_ids.tolist() == [32, 48, 0, 0, 32, 48]
    x, t = torch.randn(2, 4, 4, 6), torch.tensor(500)
    a, b = pipe.prompt_embeds("a robot"), pipe.prompt_embeds("a cat")
    base = pipe._predict(x, t, a.rows([0, 0]), torch.arange(2), cond)
    other_pool = type(a)(a.embeds, b.pooled)
    assert not torch.equal(base, pipe._predict(x, t, other_pool.rows([0, 0]), torch.arange(2), cond))
    cond.time_ids = torch.tensor([64, 96, 0, 0, 64, 96], dtype=torch.float32)
    assert not torch.equal(base, pipe._predict(x, t, a.rows([0, 0]), torch.arange(2), cond))


# ------------------------------------------------------------------ SD 2 depth
def test_depth_maps_are_scaled_per_frame():
    d = torch.stack([torch.arange(6.).reshape(1, 2, 3), 5 * torch.arange(6.).reshape(1, 2, 3) + 7])
    n = normalise_per_frame(d, -1.0, 1.0)
    assert torch.allclose(n[0], n[1]) and n.amin() == -1 and n.amax() == 1


def test_depth_model_edits_end_to_end_with_its_depth_channel(tmp_path, capsys, clip):
    model = save_tiny_variant(tmp_path / "depth", "depth")
    pipe = TokenFlowPipeline.from_pretrained(model, device="cpu")
    assert pipe.is_depth and pipe.depth_estimator is not None
    frames = torch.from_numpy(moving_frames(3, 32, 48)).permute(0, 3, 1, 2).float() / 255
    cond = pipe.prepare_conditioning(frames, __import__("tokenflow").EditConfig())
    assert cond.depth.shape == (3, 1, 4, 6) and cond.depth.amin() == -1 and cond.depth.amax() == 1
    x, t = torch.randn(3, 4, 4, 6), torch.tensor(500)
    text = pipe.prompt_embeds("a robot").rows([0] * 3)
    flipped = type(cond)(depth=-cond.depth)
    assert not torch.equal(pipe._predict(x, t, text, torch.arange(3), cond),
                           pipe._predict(x, t, text, torch.arange(3), flipped))  # the channel is used
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(capsys, "edit", clip, "-p", "a robot", "--model", model, "-o", out, *FAST)
    assert code == 0, err
    assert _frames(out).shape == (4, 32, 48, 3)


# ------------------------------------------------------------------ ControlNet
def test_canny_maps_find_the_edges_of_a_square():
    img = torch.zeros(1, 3, 32, 32)
    img[:, :, 8:24, 8:24] = 1.0
    edges = canny_maps(img)
    assert edges.shape == (1, 3, 32, 32) and set(edges.unique().tolist()) <= {0.0, 1.0}
    assert edges[0, 0, 8:24, 7:9].max() == 1 and edges[0, 0, 0:5].max() == 0 and edges[0, 0, 12:20, 12:20].max() == 0


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory, tiny_model_dir):
    unet = TokenFlowPipeline.from_pretrained(tiny_model_dir, device="cpu").unet
    folder = tmp_path_factory.mktemp("controlnet") / "canny"
    build_tiny_controlnet(unet, seed=4).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def depth_model_dir(tmp_path_factory):
    model, processor = build_tiny_depth_estimator(3)
    folder = tmp_path_factory.mktemp("dpt") / "dpt"
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return str(folder)


def test_control_scale_zero_equals_no_controlnet(tiny_model_dir, controlnet_dir):
    pipe = TokenFlowPipeline.from_pretrained(tiny_model_dir, device="cpu")
    frames = moving_frames(4, 32, 48)
    kw = dict(steps=2, inversion_steps=2, batch_size=2, height=32, width=48, use_cache=False, progress=False)
    plain = pipe.edit(frames, "a robot", **kw)
    off = pipe.edit(frames, "a robot", control="canny", controlnet=controlnet_dir, control_scale=0.0, **kw)
    on = pipe.edit(frames, "a robot", control="canny", controlnet=controlnet_dir, control_scale=1.0, **kw)
    torch.testing.assert_close(off.frames, plain.frames, rtol=0, atol=1e-6)
    assert (on.frames - plain.frames).abs().mean() > 1e-3
    # the inversion runs with the ControlNet too (as the official preprocessing does)
    assert not torch.equal(on.inversion.final, plain.inversion.final)


@pytest.mark.parametrize("control", ["canny", "depth", "images"])
def test_controlnet_editor_end_to_end(tmp_path, capsys, tiny_model_dir, controlnet_dir, depth_model_dir, clip,
                                      control):
    extra = ["--control", control]
    if control == "depth":
        extra += ["--depth-model", depth_model_dir]
    if control == "images":
        extra = ["--control", clip]  # any folder of condition images, one per frame
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(capsys, "edit", clip, "-p", "a robot", "--model", tiny_model_dir, "--editor",
                           "controlnet", "--controlnet", controlnet_dir, "--control-scale", "0.8", *extra,
                           "-o", out, *FAST)
    assert code == 0, err
    assert _frames(out).shape == (4, 32, 48, 3)


def test_controlnet_bad_input(tmp_path, capsys, tiny_model_dir, controlnet_dir, clip):
    o = tmp_path / "o.mp4"
    cases = [(["--editor", "controlnet"], "needs --control"),
             (["--control", "nowhere"], "neither"),
             (["--control", "canny"], "--controlnet"),  # no default ControlNet for the tiny family
             (["--control", "canny", "--canny-low", "300", "--canny-high", "100"], "canny-low")]
    for extra, message in cases:
        code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, *extra, "-o", o, *FAST)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
    assert not o.exists()
