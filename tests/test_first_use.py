"""What a new user tries first works: the command's defaults, settings files, help, subsets of a
clip, the cache, the Python API's diffusers conventions."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tokenflow.cli import build_parser
from tokenflow.inversion import choose_inversion_steps, missing_timesteps

from conftest import moving_frames, run_cli, write_clip
from test_reliability import audio_seconds, one_error_line

SMALL = ["--height", "32", "--width", "48", "-q"]
LOUD = SMALL[:-1]  # the notices at INFO level too (and the progress bars)


@pytest.mark.parametrize("steps", [20, 30, 7, 50, 64])
def test_inversion_steps_are_chosen_to_pass_every_editing_step(steps):
    chosen = choose_inversion_steps(steps)
    assert chosen % steps == 0 and not missing_timesteps(steps, chosen)
    assert chosen >= 50 or chosen == steps
    # the smallest such multiple
    assert all(missing_timesteps(steps, m) for m in range(max(steps, 50 // steps * steps), chosen, steps)
               if m >= 50)


def test_steps_alone_pick_inversion_steps_and_say_so(tmp_path, capsys, caplog):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48))
    with caplog.at_level("WARNING", logger="tokenflow"):
        code, out, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", "tiny", "-o", tmp_path / "o.mp4",
                                 "--steps", "3", "--max-frames", "2", "--no-cache", *SMALL)
    assert code == 0, err
    chosen = choose_inversion_steps(3)
    assert chosen == 102 and f"--inversion-steps {chosen} chosen for --steps 3" in caplog.text
    settings = yaml.safe_load((tmp_path / "o.yaml").read_text())
    assert settings["inversion_steps"] == chosen and settings["model"] == "tiny"
    # both given and disagreeing: still the error
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", "tiny", "--steps", "3",
                           "--inversion-steps", "50", *SMALL)
    assert code == 2 and f"--inversion-steps {chosen}" in err


def test_the_settings_file_written_beside_the_output_reproduces_it(tmp_path, capsys, tiny_model_dir):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(6, 32, 48), audio=True)
    code, _, err = run_cli(capsys, "edit", clip, "-p", "a cat", "--model", tiny_model_dir, "-o", tmp_path / "a.mp4",
                           "--frames-dir", tmp_path / "a", "--steps", "2", "--inversion-steps", "4", "--seed", "7",
                           "--batch-size", "3", "--no-cache", *SMALL)
    assert code == 0, err
    code, _, err = run_cli(capsys, "edit", clip, "--config", tmp_path / "a.yaml", "-o", tmp_path / "b.mp4",
                           "--frames-dir", tmp_path / "b", "--no-cache", "-q")
    assert code == 0, err
    for name in sorted(os.listdir(tmp_path / "a")):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(tmp_path / "b" / name)))
    a, b = yaml.safe_load((tmp_path / "a.yaml").read_text()), yaml.safe_load((tmp_path / "b.yaml").read_text())
    assert a == b


def test_official_config_asking_for_cuda_falls_back_on_a_machine_without(tmp_path, capsys, monkeypatch,
                                                                          tiny_model_dir, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48))
    cfg = tmp_path / "config_pnp.yaml"
    cfg.write_text(f"data_path: {clip}\nprompt: a robot\nn_timesteps: 2\nn_inversion_steps: 2\ndevice: cuda\n")
    with caplog.at_level("WARNING", logger="tokenflow"):
        code, _, err = run_cli(capsys, "edit", "--config", cfg, "--model", tiny_model_dir, "-o",
                               tmp_path / "o.mp4", "--no-cache", *SMALL)
    assert code == 0, err
    assert "asks for device 'cuda', which is not available here; using auto" in caplog.text
    code, _, err = run_cli(capsys, "edit", "--config", cfg, "--device", "cuda", "--model", tiny_model_dir, *SMALL)
    assert code == 2
    one_error_line(err, "no CUDA GPU")


def test_tiny_model_in_every_command_and_python_m(tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48))
    code, out, err = run_cli(capsys, "invert", clip, "--model", "tiny", "--steps", "2", "--inversion-steps", "2",
                             "--cache-dir", tmp_path / "c", *SMALL)
    assert code == 0 and "inverted 4 frames" in out, err
    proc = subprocess.run([sys.executable, "-m", "tokenflow", "--version"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("tokenflow ")


def test_an_unreachable_hub_fails_at_once_with_the_way_out(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from tokenflow import models

    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # loopback, nothing listens: refused at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(models, "_REACHABLE", {})
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", "someone/some-model", *SMALL)
    assert code == 2
    one_error_line(err, "cannot reach the hub (127.0.0.1)", "someone/some-model", "HF_HUB_OFFLINE=1", "--model tiny")
    code, _, err = run_cli(capsys, "eval", "--source", clip, "--edited", clip, "-p", "x")
    assert code == 2
    one_error_line(err, "cannot reach the hub", "CLIP model", "--no-clip")
    # offline mode with an id that was never downloaded: the same, without trying
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", "someone/some-model", *SMALL)
    assert code == 2
    one_error_line(err, "not in the local hub cache and HF_HUB_OFFLINE is set", "--model tiny")
    (tmp_path / "notes.mp4").write_text("these are notes, not a video\n" * 40)
    code, _, err = run_cli(capsys, "edit", tmp_path / "notes.mp4", "-p", "x", *SMALL)
    assert code == 2
    one_error_line(err, "cannot read", "as a video: it is not a video file FFmpeg knows")
    assert "Errno" not in err and "InvalidDataError" not in err


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_option_has_help_with_its_default_and_edit_starts_with_input_prompt_output():
    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, (name, action.dest)
            if action.option_strings and action.nargs != 0:  # a value-taking option says its default
                assert "default" in action.help or "required" in action.help, (name, action.dest, action.help)
    edit = _subparsers(parser)["edit"]
    dests = [a.dest for a in edit._actions if not isinstance(a, argparse._HelpAction)]
    assert dests[:3] == ["input", "prompt", "output"]
    assert "-p" in _subparsers(parser)["eval"]._option_string_actions


def test_fit_modes_and_the_aspect_note(tmp_path, capsys, tiny_model_dir):
    from tokenflow.video import aspect_note, resize_frame

    frame = np.zeros((20, 40, 3), np.uint8)
    frame[:, 10:30] = 255  # a white middle half
    assert resize_frame(frame, 16, 16, "crop").min() > 200  # the middle only
    padded = resize_frame(frame, 16, 16, "pad")
    assert padded[:4].max() == 0 and padded[-4:].max() == 0 and padded[8, 8].min() > 200
    stretched = resize_frame(frame, 16, 16, "stretch")
    assert stretched[:, :3].max() < 30 and stretched[:, 6:10].min() > 200
    assert aspect_note((20, 40), (16, 32), "stretch") == ""
    assert "stretched from 40x20; --fit crop or pad" in aspect_note((20, 40), (16, 16), "stretch")
    clip = write_clip(tmp_path / "wide.mp4", moving_frames(3, 32, 64))
    code, out, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "-o", tmp_path / "o.mp4",
                             "--steps", "2", "--inversion-steps", "2", "--height", "32", "--width", "32", "-q",
                             "--no-cache")
    assert code == 0 and "stretched from 64x32" in out, err
    code, out, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "-o", tmp_path / "o.mp4",
                             "--steps", "2", "--inversion-steps", "2", "--height", "32", "--width", "32", "-q",
                             "--no-cache", "--fit", "crop")
    assert code == 0 and "centre-cropped from 64x32" in out and "--fit" not in out, err


def test_part_of_a_clip_with_the_audio_cut_to_match(tmp_path, capsys, tiny_model_dir):
    from tokenflow.video import read_video

    frames = moving_frames(30, 32, 48)
    clip = write_clip(tmp_path / "clip.mp4", frames, fps=10, audio=True)
    full = read_video(clip).frames
    v = read_video(clip, start_frame=5, stride=3, max_frames=4)
    assert np.array_equal(v.frames, full[5::3][:4]) and v.fps == pytest.approx(10 / 3)
    assert v.start_time == pytest.approx(0.5, abs=0.01)
    t = read_video(clip, start_time=1.0)
    assert np.array_equal(t.frames, full[10:])
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames[:9]):
        Image.fromarray(f).save(folder / f"{i}.png")
    assert len(read_video(folder, stride=2).frames) == 5
    code, out, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "-o", tmp_path / "o.mp4",
                             "--start-time", "1", "--every", "2", "--max-frames", "6", "--steps", "2",
                             "--inversion-steps", "2", "--no-cache", *SMALL)
    assert code == 0 and "edited 6 frames" in out, err
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert float(c.streams.video[0].average_rate) == pytest.approx(5.0)
    assert audio_seconds(tmp_path / "o.mp4") == pytest.approx(1.2, abs=0.15)  # 6 frames at 5 fps
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--start-frame", "3", "--start-time", "1", *SMALL)
    assert code == 2 and "not both" in err
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "--start-frame", "99",
                           "--steps", "2", "--inversion-steps", "2", "--no-cache", "-o", tmp_path / "p.mp4", *SMALL)
    assert code == 2
    one_error_line(err, "none from the start asked for")


def test_cache_list_and_clear(tmp_path, capsys, tiny_model_dir):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48))
    cache = tmp_path / "cache"
    code, _, err = run_cli(capsys, "invert", clip, "--model", tiny_model_dir, "--steps", "2", "--inversion-steps",
                           "2", "--inversion-prompt", "a wolf", "--cache-dir", cache, *SMALL)
    assert code == 0, err
    code, out, _ = run_cli(capsys, "cache", "list", "--cache-dir", cache)
    assert code == 0 and "inversion" in out and "48x32" in out and "'a wolf'" in out and "1 entries" in out
    code, out, _ = run_cli(capsys, "cache", "clear", "--cache-dir", cache, "--older-than", "1")
    assert code == 0 and "removed 0 of 1" in out and len(os.listdir(cache)) == 1
    code, out, _ = run_cli(capsys, "cache", "clear", "--cache-dir", cache)
    assert code == 0 and "removed 1 of 1" in out and os.listdir(cache) == []
    code, out, _ = run_cli(capsys, "cache", "list", "--cache-dir", cache)
    assert code == 0 and "empty" in out


def test_python_api_speaks_diffusers(tiny_pipe, clip, tiny_model_dir):
    import diffusers

    from tokenflow import TokenFlowPipeline

    sd = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                           requires_safety_checker=False, local_files_only=True)
    pipe = TokenFlowPipeline.from_pipe(sd)
    assert pipe.unet is sd.unet and pipe.vae is sd.vae and pipe.model_id.startswith("folder:")
    kwargs = dict(prompt="x", steps=2, inversion_steps=2, height=32, width=48, use_cache=False, progress=False)
    seeded = pipe.edit(clip, seed=5, **kwargs)
    by_generator = pipe.edit(clip, generator=torch.Generator().manual_seed(5), **kwargs)
    assert by_generator.keyframes == seeded.keyframes and torch.equal(by_generator.frames, seeded.frames)
    other = pipe.edit(clip, generator=torch.Generator().manual_seed(6), **kwargs)
    assert other.keyframes != seeded.keyframes
    as_np = pipe.edit(clip, seed=5, output_type="np", **kwargs)
    as_pil = pipe.edit(clip, seed=5, output_type="pil", **kwargs)
    assert as_np.frames.shape == (10, 32, 48, 3) and as_np.frames.dtype == np.float32
    assert len(as_pil.frames) == 10 and as_pil.frames[0].size == (48, 32)
    assert np.array_equal(as_np.uint8(), seeded.uint8()) and np.array_equal(as_pil.uint8(), seeded.uint8())
    with pytest.raises(Exception, match="output_type"):
        pipe.edit(clip, output_type="latent", **kwargs)
    with pytest.raises(Exception, match="model .* does not exist"):
        TokenFlowPipeline.from_pretrained("./no/such/model", variant="fp16", revision="main")


def test_charts_and_pictures_are_labelled(tmp_path):
    from tokenflow.metrics import Evaluation, axis_range, nice_ticks, plot_warp_errors

    lo, hi = axis_range([0.0110, 0.0125, 0.0102])
    assert 0.0095 < lo < 0.0102 and 0.0125 < hi < 0.013  # fitted to the values, not pinned to 0
    ticks = nice_ticks(lo, hi)
    assert 3 <= len(ticks) <= 8 and all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks)
    rng = np.random.default_rng(0)
    results = [Evaluation(f"run{i}.mp4", 20, 0.011 + i * 0.001, 0.0102, None, None,
                          list(0.011 + i * 0.001 + 0.0003 * rng.standard_normal(19))) for i in range(3)]
    path = plot_warp_errors(str(tmp_path / "chart.png"), results)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    blue = (np.abs(img - np.array([31, 119, 180])).sum(-1) < 30)
    rows = np.where(blue.any(1))[0]
    # the series' legend swatch lies below the plot's frame, apart from its line inside it
    frame_bottom = np.where((img[:, 200] == 0).all(-1))[0].max()
    assert rows.max() > frame_bottom + 20 and rows.min() < frame_bottom


def _refuse_model(monkeypatch):
    from tokenflow import runs

    def refuse(run):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(runs, "load_pipeline", refuse)


def test_a_missing_output_folder_is_made_and_what_cannot_be_written_fails_before_the_model(
        tmp_path, capsys, caplog, monkeypatch):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(2, 32, 48))
    out = tmp_path / "new" / "deeper" / "o.mp4"
    with caplog.at_level("INFO", logger="tokenflow"):
        code, stdout, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", "tiny", "-o", out, "--steps", "2",
                                    "--inversion-steps", "2", "--no-cache", *LOUD)
    assert code == 0, err
    assert out.is_file() and (out.parent / "o.yaml").is_file()
    assert f"created the output folder '{out.parent}'" in caplog.text
    _refuse_model(monkeypatch)
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", "tiny", "-o", tmp_path / "afile" / "a" / "o.mp4",
                           *SMALL)
    assert code == 2
    one_error_line(err, "is a file, not a folder")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access  # the tests run as root, which a chmod does not stop: the permission is faked
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(readonly))
                        else real_access(p, mode, **kw))
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", "tiny", "-o", readonly / "sub" / "o.mp4",
                           *SMALL)
    assert code == 2
    one_error_line(err, "permission denied")
    assert not (readonly / "sub").exists()
    # batch: every job's output checked before any model loads
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(yaml.safe_dump({"defaults": {"model": "tiny", "steps": 2},
                                    "jobs": [{"input": clip, "prompt": "a", "output": str(tmp_path / "b" / "1.mp4")},
                                             {"input": clip, "prompt": "b", "output": str(readonly / "2.mp4")}]}))
    code, _, err = run_cli(capsys, "batch", jobs, "-q")
    assert code == 2
    one_error_line(err, "job 2", "permission denied")


def test_the_readme_batch_example_makes_its_output_folder(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_clip(tmp_path / "wolf.mp4", moving_frames(2, 32, 48))
    (tmp_path / "jobs.yaml").write_text(
        "defaults:\n  model: tiny\n  steps: 2\n  inversion_steps: 2\n  height: 32\n  width: 48\n  max_frames: 2\n"
        "jobs:\n  - {input: wolf.mp4, prompt: a robotic wolf, output: out/wolf-robot.mp4}\n")
    with caplog.at_level("INFO", logger="tokenflow"):
        code, out, err = run_cli(capsys, "batch", "jobs.yaml")
    assert code == 0, err
    assert (tmp_path / "out" / "wolf-robot.mp4").is_file() and "created the output folder 'out'" in caplog.text


OFFICIAL_PNP = """# general
seed: 1
device: 'cuda'
output_path: '{out}'

# data
data_path: '{data}'
latents_path: 'latents' # should be the same as 'save_dir' arg used in preprocess
n_inversion_steps: 2 # for retrieving the latents of the inversion
n_frames: 2

# diffusion
sd_version: '2.1'
guidance_scale: 7.5
n_timesteps: 2
prompt: "a marble sculpture of a woman running, Venus de Milo"
negative_prompt: "ugly, blurry, low res, unrealistic, unaesthetic"
batch_size: 8

# pnp params -- injection thresholds
pnp_attn_t: 0.5
pnp_f_t: 0.8
"""


@pytest.mark.parametrize("exists", [True, False])
def test_official_configs_write_into_their_output_folder(tmp_path, capsys, monkeypatch, exists):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    write_clip(tmp_path / "woman-running.mp4", moving_frames(2, 32, 48))
    if exists:
        (tmp_path / "tokenflow-results").mkdir()
    (tmp_path / "config_pnp.yaml").write_text(OFFICIAL_PNP.format(out="tokenflow-results", data="woman-running.mp4"))
    sdedit = OFFICIAL_PNP.replace("pnp_attn_t: 0.5\npnp_f_t: 0.8\n", "start: 0.9\nuse_ddim_noise: True\n")
    (tmp_path / "config_sdedit.yaml").write_text(sdedit.format(out="sdedit-results", data="woman-running.mp4")
                                                 .replace("n_timesteps: 2", "n_timesteps: 3")
                                                 .replace("n_inversion_steps: 2", "n_inversion_steps: 3"))
    # the official script's flag for the config, and the tiny model for the hub's SD 2.1
    code, out, err = run_cli(capsys, "edit", "--config_path", "config_pnp.yaml", "--model", "tiny", "--no-cache", *SMALL)
    assert code == 0, err
    assert (tmp_path / "tokenflow-results" / "woman-running-tokenflow.mp4").is_file()
    code, out, err = run_cli(capsys, "edit", "--config", "config_sdedit.yaml", "--model", "tiny", "--no-cache", *SMALL)
    assert code == 0, err
    written = yaml.safe_load((tmp_path / "sdedit-results" / "woman-running-tokenflow.yaml").read_text())
    assert written["editor"] == "sdedit" and written["sdedit_start"] == 0.9


def test_official_flags_and_underscored_names_are_ours_and_unknown_options_get_the_close_one(capsys):
    parser = build_parser()
    args = parser.parse_args(["edit", "--data_path", "v.mp4", "--inversion_prompt", "a wolf", "--config_path", "c.yaml",
                              "--max_frames", "4", "--n_frames", "5", "--guidance_scale=3", "--no_cache"])
    assert (args.data_path, args.inversion_prompt, args.config, args.max_frames, args.guidance_scale,
            args.no_cache) == ("v.mp4", "a wolf", "c.yaml", 5, 3.0, True)
    assert parser.parse_args(["invert", "x.mp4", "--H", "64", "--W", "96"]).height == 64
    assert parser.parse_args(["edit", "x.mp4", "--guid", "4"]).guidance_scale == 4  # abbreviations still unique
    help_text = _subparsers(parser)["edit"].format_help()
    assert "--inversion-prompt" in help_text and "--inversion_prompt" not in help_text and "--data" not in help_text
    code, _, err = run_cli(capsys, "edit", "x.mp4", "-p", "x", "--stpes", "3")
    assert code == 2
    one_error_line(err, "unknown option --stpes (did you mean --steps?)", "see 'tokenflow edit --help'")
    code, _, err = run_cli(capsys, "eval", "--source", "a", "--edited", "b", "--noclip")
    assert code == 2
    one_error_line(err, "did you mean --no-clip?", "'tokenflow eval --help'")


def test_default_outputs_of_a_gif_and_an_mp4_differ_and_a_replaced_output_is_announced(tmp_path, capsys, caplog,
                                                                                      monkeypatch):
    from tokenflow.outputs import resolve_output

    assert resolve_output(None, "/data/wolf.mp4") == "wolf-tokenflow.mp4"
    assert resolve_output(None, "wolf.gif") == "wolf-gif-tokenflow.mp4"
    assert resolve_output(None, "frames/") == "frames-tokenflow.mp4"
    assert resolve_output(str(tmp_path) + "/", "a/wolf.mov") == os.path.join(str(tmp_path), "wolf-mov-tokenflow.mp4")
    assert resolve_output(str(tmp_path), "wolf.mp4") == os.path.join(str(tmp_path), "wolf-tokenflow.mp4")
    assert resolve_output("o.mp4", "wolf.mp4") == "o.mp4"
    monkeypatch.chdir(tmp_path)
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(2, 32, 48))
    argv = ["edit", clip, "-p", "x", "--model", "tiny", "--steps", "2", "--inversion-steps", "2", "--no-cache", *SMALL]
    with caplog.at_level("INFO", logger="tokenflow"):
        code, _, err = run_cli(capsys, *argv)
        assert code == 0 and "replaced" not in caplog.text, err
        code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert caplog.text.count("'clip-tokenflow.mp4' exists and will be replaced") == 1


def test_edit_in_python_without_a_prompt_refuses_as_the_command_does(tiny_pipe, capsys, tmp_path):
    from tokenflow.errors import TokenFlowError
    from tokenflow.flow import FlowPipeline

    frames = moving_frames(2, 32, 48)
    code, _, err = run_cli(capsys, "edit", write_clip(tmp_path / "c.mp4", frames), "--model", "tiny", *SMALL)
    assert code == 2
    message = err.strip().removeprefix("tokenflow: error: ")
    assert message.startswith("no prompt given")
    for call in (lambda: tiny_pipe.edit(frames, steps=2, inversion_steps=2, progress=False),
                 lambda: tiny_pipe.edit(frames, "  ", steps=2, inversion_steps=2, progress=False),
                 lambda: FlowPipeline.from_tiny("sd3").edit(frames, progress=False)):
        with pytest.raises(TokenFlowError) as e:
            call()
        assert str(e.value) == message
    with pytest.raises(TokenFlowError, match=r"no prompt given \(-p number 2 is blank\)"):
        tiny_pipe.edit(frames, prompts=["a", ""], steps=2, inversion_steps=2, progress=False)


def test_the_rate_counts_this_runs_work_only_and_a_long_stage_is_announced_once(monkeypatch, caplog):
    from tokenflow import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    with caplog.at_level("INFO", logger="tokenflow"):
        clock = progress.StageClock("the inversion", "fewer --inversion-steps", what="40 frames")
        clock.resumed()  # an interrupted run had done 1000 of 2000 frame-steps
        now[0] += 0.01
        assert clock.update(1000, 2000) == 0 and clock.restored
        now[0] += 10
        rate = clock.update(1010, 2000)  # 10 frame-steps in 10 s: 1/s, not 101/s
        assert not clock.restored and rate == pytest.approx(10 / 10.01)
        assert caplog.text.count("the inversion will take about 17 min more (40 frames); "  # 990 s at 1/s
                                 "fewer --inversion-steps shorten it") == 1
        now[0] += 10
        clock.update(1020, 2000)
        assert caplog.text.count("will take about") == 1  # once
        short = progress.StageClock("the edit", "--steps", already=3)  # resumed after step 3 of 5
        now[0] += 2
        assert short.update(4, 5) == pytest.approx(0.5)
    assert "the edit will take" not in caplog.text  # 2 s more: not long
    assert [progress.duration(s) for s in (42, 840, 9000)] == ["42 s", "14 min", "2.5 h"]


def test_a_resumed_inversion_is_said_once_and_named_in_the_summary(tmp_path, capsys, caplog, monkeypatch):
    from tokenflow import progress
    from tokenflow.checkpoints import Checkpointer

    clip = write_clip(tmp_path / "clip.mp4", moving_frames(6, 32, 48))
    args = ["edit", clip, "-p", "x", "--model", "tiny", "-o", tmp_path / "o.mp4", "--cache-dir", tmp_path / "c",
            "--steps", "2", "--inversion-steps", "2", "--batch-size", "2", *LOUD]
    real = Checkpointer.save_rows
    saved = []

    def stop_after_two_batches(self, *a, **k):
        real(self, *a, **k)
        saved.append(1)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save_rows", stop_after_two_batches)
    code, _, err = run_cli(capsys, *args)
    assert code == 130, err
    monkeypatch.setattr(Checkpointer, "save_rows", real)
    monkeypatch.setattr(progress, "LONG_SECONDS", -1.0)  # every stage counts as long: the notices show
    with caplog.at_level("INFO", logger="tokenflow"):
        code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert caplog.text.count("resuming the inversion at frame 4 of 6") == 1 and caplog.text.count("resuming") == 1
    assert "inversion resumed after 4 of 6 frames" in out
    assert caplog.text.count("the inversion will take about") == 1 and caplog.text.count("the edit will take") == 1
    assert "(6 frames at 48x32, 2 steps); --steps, --max-frames or --height/--width shorten it" in caplog.text


def test_diffusers_names_from_pretrained_tiny_torch_dtype_steps_call_and_to(capsys, tmp_path):
    import warnings

    from tokenflow import TokenFlowPipeline
    from tokenflow.flow import FlowPipeline
    from tokenflow.models import resolve_dtype

    frames = moving_frames(2, 32, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # none from our own calls into diffusers/transformers
        warnings.simplefilter("error", DeprecationWarning)
        pipe = TokenFlowPipeline.from_pretrained("tiny", torch_dtype=torch.float32).to("cpu")
        assert pipe.dtype == torch.float32 and pipe.device.type == "cpu" and pipe.native_side == 128
        called = pipe(frames, prompt="a robot", num_inference_steps=2, inversion_steps=2, height=32, width=48,
                      use_cache=False, progress=False)
        direct = pipe.edit(frames, "a robot", steps=2, inversion_steps=2, height=32, width=48, use_cache=False,
                           progress=False)
        assert called.config.steps == 2 and torch.equal(called.frames, direct.frames)
        sd3 = TokenFlowPipeline.from_pretrained("tiny-sd3")
        assert isinstance(sd3, FlowPipeline) and sd3.dtype == torch.float32
        assert sd3.to("cpu") is sd3 and sd3(frames, prompt="a cat", num_inference_steps=2, height=32, width=48,
                                           progress=False).frames.shape[0] == 2
    with pytest.raises(Exception, match="disagree"):
        pipe.edit(frames, "x", steps=3, num_inference_steps=2)
    with pytest.raises(Exception, match="torch_dtype"):
        pipe.to(torch.float16)
    assert [resolve_dtype(d) for d in ("fp16", "bf16", "fp32")] == [torch.float16, torch.bfloat16, torch.float32]
    clip = write_clip(tmp_path / "c.mp4", frames)
    code, out, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", "tiny", "--dtype", "bf16", "--steps", "1",
                             "--inversion-steps", "1", "--no-cache", "-o", tmp_path / "o.mp4", *SMALL)
    assert code == 0 and "cpu bfloat16" in out, err
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--dtype", "fp8", *SMALL)
    assert code == 2
    one_error_line(err, "unknown dtype 'fp8'", "fp16")


def test_the_settings_file_records_what_ran_and_reads_back(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 96), fps=12)
    code, _, err = run_cli(capsys, "edit", "clip.mp4", "-p", "a cat", "--model", "tiny", "-o", "a.mp4",
                           "--steps", "2", "--inversion-steps", "2", "--every", "2", "--no-cache", "-q")
    assert code == 0, err  # the size and the frame rate left to their defaults
    a = yaml.safe_load((tmp_path / "a.yaml").read_text())
    assert a["input"] == str(tmp_path / "clip.mp4") and a["model"] == "tiny"
    assert (a["height"], a["width"]) == (64, 192) and a["fps"] == 12  # the source's rate; the output's is 6
    assert a["dtype"] == "float32" and a["device"] == "cpu"
    os.mkdir(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")  # the absolute input reads back from any folder
    code, _, err = run_cli(capsys, "edit", "--config", tmp_path / "a.yaml", "-o", "b.mp4", "--no-cache", "-q")
    assert code == 0, err
    b = yaml.safe_load((tmp_path / "elsewhere" / "b.yaml").read_text())
    assert a == b
    with av.open(str(tmp_path / "elsewhere" / "b.mp4")) as c:
        assert float(c.streams.video[0].average_rate) == 6 and c.streams.video[0].width == 192


def test_invert_reconstruct_writes_the_reconstruction_when_asked(tmp_path, capsys):
    from tokenflow.video import read_video

    clip = write_clip(tmp_path / "clip.mp4", moving_frames(2, 32, 48))
    base = ["invert", clip, "--model", "tiny", "--steps", "2", "--inversion-steps", "2", "--no-cache", *SMALL]
    code, _, err = run_cli(capsys, *base, "-o", tmp_path / "r.mp4")
    assert code == 2
    one_error_line(err, "give --reconstruct too")
    code, out, err = run_cli(capsys, *base, "--reconstruct", "-o", tmp_path / "recon" / "r.mp4")
    assert code == 0, err
    assert "reconstruction PSNR" in out and out.strip().endswith(str(tmp_path / "recon" / "r.mp4"))
    recon = read_video(tmp_path / "recon" / "r.mp4")
    assert recon.frames.shape == (2, 32, 48, 3) and recon.fps == 12
    help_text = _subparsers(build_parser())["invert"].format_help()
    assert "Without --reconstruct nothing else is written" in " ".join(help_text.split())


def test_eval_warns_when_the_edit_does_not_match_the_source(tmp_path, capsys, caplog):
    from tokenflow.metrics import mismatch

    source = np.zeros((120, 48, 64, 3), np.uint8)
    assert mismatch("e.mp4", source, np.zeros((120, 96, 128, 3), np.uint8)) is None  # another scale: an edit
    assert "8 frames against the source's 120" in mismatch("e.mp4", source, source[:8])
    assert "64x64 against the source's 64x48" in mismatch("e.mp4", source, np.zeros((120, 64, 64, 3), np.uint8))
    src = write_clip(tmp_path / "src.mp4", moving_frames(6, 32, 48))
    other = write_clip(tmp_path / "other.mp4", moving_frames(3, 48, 48, seed=2))
    with caplog.at_level("WARNING", logger="tokenflow"):
        code, out, err = run_cli(capsys, "eval", "--source", src, "--edited", other, "--edited", src, "--no-clip")
    assert code == 0, err
    assert caplog.text.count("is it an edit of this source?") == 1  # the source itself matches
    assert f"'{other}' has 3 frames against the source's 6 (the first 3 are compared) and 48x48 against the " \
           f"source's 48x32" in caplog.text


def test_dtype_auto_on_a_cpu_is_measured_once_per_cpu_model_and_cached(tmp_path, monkeypatch):
    from tokenflow import cpu_speed, models

    calls = []

    def fake(speed):
        def measure():
            calls.append(speed)
            return speed
        return measure

    path = str(tmp_path / "c" / "cpu-dtype.json")
    assert cpu_speed.bf16_is_faster(fake({"gemm": 1.55, "conv3x3": 1.7}), path) is True  # the EPYC of issue 23
    assert cpu_speed.bf16_is_faster(fake({"gemm": 0.1, "conv3x3": 0.1}), path) is True and len(calls) == 1  # cached
    monkeypatch.setattr(cpu_speed, "cpu_model", lambda: "another CPU")
    assert cpu_speed.bf16_is_faster(fake({"gemm": 0.52, "conv3x3": 1.3}), path) is False and len(calls) == 2
    assert cpu_speed.bf16_is_faster(fake({"gemm": 1.21, "conv3x3": 1.19}), str(tmp_path / "other.json")) is False
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(models.CPU_BF16_ENV)
    monkeypatch.setattr(cpu_speed, "measure_speedups", fake({"gemm": 2.0, "conv3x3": 2.0}))
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert models.resolve_dtype("fp32", torch.device("cpu")) == torch.float32  # asked for: kept
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")  # the override (and what the parity tests run under)
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert os.path.isfile(tmp_path / "xdg" / "tokenflow" / "cpu-dtype.json")
    monkeypatch.undo()
    speed = cpu_speed.measure_speedups(reps=1)  # the real kernels: a fraction of a second
    assert set(speed) == {"gemm", "conv3x3"} and all(v > 0 for v in speed.values())


def test_what_clip_did_not_read_of_a_long_prompt_is_in_the_settings_file(tmp_path, capsys):
    clip = write_clip(tmp_path / "c.mp4", moving_frames(2, 32, 48))
    long_prompt = " ".join(["a marble statue"] * 30 + ["of a robot"])
    code, _, err = run_cli(capsys, "edit", clip, "-p", long_prompt, "--model", "tiny", "-o", tmp_path / "o.mp4",
                           "--steps", "1", "--inversion-steps", "1", "--no-cache", *SMALL)
    assert code == 0, err
    settings = yaml.safe_load((tmp_path / "o.yaml").read_text())
    dropped = settings["notes"]["prompt_dropped"]
    words = dropped.split()
    assert 0 < len(words) < 90 and long_prompt.split()[-len(words):] == words and words[-1] == "robot"
    assert set(settings["notes"]) == {"prompt_dropped"}  # the short prompts were read whole
    code, _, err = run_cli(capsys, "edit", "--config", tmp_path / "o.yaml", "-o", tmp_path / "p.mp4", "--no-cache",
                           "-q")
    assert code == 0, err  # the note does not stop the file from reading back


def test_invert_with_an_official_config_ignores_its_output_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    write_clip(tmp_path / "woman-running.mp4", moving_frames(2, 32, 48))
    (tmp_path / "config_pnp.yaml").write_text(OFFICIAL_PNP.format(out="tokenflow-results", data="woman-running.mp4"))
    code, out, err = run_cli(capsys, "invert", "--config", "config_pnp.yaml", "--model", "tiny", "--no-cache", *SMALL)
    assert code == 0 and "inverted 2 frames" in out, err
    assert not (tmp_path / "tokenflow-results").exists()
