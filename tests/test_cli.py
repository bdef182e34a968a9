"""The command: bad input ends in one line and exit 2; real runs write video, settings and frames."""

import os
import subprocess
import sys

import av
import numpy as np
import pytest
import yaml
from PIL import Image


from conftest import moving_frames, run_cli, write_clip

FAST = ["--steps", "2", "--inversion-steps", "2", "--height", "32", "--width", "48", "-q"]


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    for i, f in enumerate(moving_frames(5, 32, 48)):
        Image.fromarray(f).save(d / f"{i:03d}.png")
    return d


BAD = {
    "missing input": (["edit", "{tmp}/nope.mp4", "-p", "x"], "does not exist"),
    "empty file": (["edit", "{empty}", "-p", "x"], "empty file"),
    "not a video": (["edit", "{text}", "-p", "x"], "as a video"),
    "corrupt": (["edit", "{junk}", "-p", "x"], "as a video"),
    "empty folder": (["edit", "{emptydir}", "-p", "x"], "no frames"),
    "unreadable image": (["edit", "{badframes}", "-p", "x"], "cannot read frame"),
    "size not multiple of 8": (["edit", "{clip}", "-p", "x", "--height", "60"], "multiple of 8"),
    "size not positive": (["edit", "{clip}", "-p", "x", "--width", "0"], "multiple of 8"),
    "steps < 1": (["edit", "{clip}", "-p", "x", "--steps", "0"], "steps must be"),
    "inversion steps < 1": (["edit", "{clip}", "-p", "x", "--inversion-steps", "-1"], "inversion-steps must be"),
    "frame limit < 1": (["edit", "{clip}", "-p", "x", "--max-frames", "0"], "max-frames must be"),
    "pnp attn outside": (["edit", "{clip}", "-p", "x", "--pnp-attn-t", "1.5"], "pnp-attn-t must be in"),
    "pnp f outside": (["edit", "{clip}", "-p", "x", "--pnp-f-t", "-0.1"], "pnp-f-t must be in"),
    "sdedit start 0": (["edit", "{clip}", "-p", "x", "--sdedit-start", "0"], "sdedit-start must be in"),
    "sdedit start > 1": (["edit", "{clip}", "-p", "x", "--sdedit-start", "1.2"], "sdedit-start must be in"),
    "guidance nan": (["edit", "{clip}", "-p", "x", "--guidance-scale", "nan"], "finite"),
    "guidance inf": (["edit", "{clip}", "-p", "x", "--guidance-scale", "inf"], "finite"),
    "guidance text": (["edit", "{clip}", "-p", "x", "--guidance-scale", "lots"], "invalid float"),
    "batch size < 1": (["edit", "{clip}", "-p", "x", "--batch-size", "0"], "batch-size must be"),
    "unknown editor": (["edit", "{clip}", "-p", "x", "--editor", "magic"], "unknown editor 'magic'"),
    "unknown policy": (["edit", "{clip}", "-p", "x", "--propagation", "psychic"], "unknown propagation"),
    "bad model folder": (["edit", "{clip}", "-p", "x", "--model", "{emptydir}"], "cannot load model"),
    "missing model folder": (["edit", "{clip}", "-p", "x", "--model", "./no/such/model"], "does not exist"),
    "unwritable output": (["edit", "{clip}", "-p", "x", "-o", "{text}/dir/out.mp4"], "cannot write output"),
    "output is a folder": (["edit", "{clip}", "-p", "x", "-o", "{emptydir}.mp4"], "is a folder"),
    "output extension": (["edit", "{clip}", "-p", "x", "-o", "{tmp}/out.avi"], "must end in"),
    "config missing": (["edit", "{clip}", "-p", "x", "--config", "{tmp}/none.yaml"], "cannot read config"),
    "config invalid yaml": (["edit", "{clip}", "-p", "x", "--config", "{badyaml}"], "not valid YAML"),
    "config unknown key": (["edit", "{clip}", "-p", "x", "--config", "{unknownyaml}"], "unknown key"),
    "config bad value": (["edit", "{clip}", "--config", "{badvalueyaml}"], "steps must be"),
    "no prompt": (["edit", "{clip}"], "no prompt"),
    "unknown option": (["edit", "{clip}", "-p", "x", "--frobnicate"], "unknown option --frobnicate; see 'tokenflow edit --help'"),
    "unknown device": (["edit", "{clip}", "-p", "x", "--device", "tpu", "--model", "{emptydir}"], "unknown device"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("this is not a video\n" * 50)
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptydir.mp4").mkdir()
    (tmp_path / "badframes").mkdir()
    (tmp_path / "badframes" / "0.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "bad.yaml").write_text("steps: [1, 2\nprompt: x")
    (tmp_path / "unknown.yaml").write_text("prompt: x\nsteppes: 3\n")
    (tmp_path / "badvalue.yaml").write_text("prompt: x\nsteps: 0\n")
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(3, 32, 48))
    names = dict(tmp=tmp_path, empty=tmp_path / "empty.mp4", text=tmp_path / "notes.txt",
                 junk=tmp_path / "junk.mp4", emptydir=tmp_path / "emptydir", badframes=tmp_path / "badframes",
                 clip=clip, badyaml=tmp_path / "bad.yaml", unknownyaml=tmp_path / "unknown.yaml",
                 badvalueyaml=tmp_path / "badvalue.yaml")
    argv, message = BAD[case]
    argv = [a.format(**names) for a in argv]
    before = set(os.listdir(tmp_path))
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenflow: error:"), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before  # no output, no settings, no temporary file


def test_edit_with_model_folder_writes_video_settings_and_frames(tmp_path, capsys, tiny_model_dir):
    clip = write_clip(tmp_path / "in.mp4", moving_frames(5, 32, 48), fps=15, audio=True)
    out = tmp_path / "out.mp4"
    code, stdout, err = run_cli(capsys, "edit", clip, "-p", "a robot", "-o", out, "--model", tiny_model_dir,
                                "--batch-size", "2", "--frames-dir", tmp_path / "frames",
                                "--cache-dir", tmp_path / "cache", *FAST)
    assert code == 0, err
    assert stdout.strip().startswith("edited 5 frames at 48x32") and str(out) in stdout
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == 15 and c.streams.video[0].frames in (0, 5)
        assert c.streams.audio  # the input's audio is kept
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p"
    settings = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert settings["prompt"] == "a robot" and settings["batch_size"] == 2 and settings["steps"] == 2
    assert len(os.listdir(tmp_path / "frames")) == 5
    assert os.listdir(tmp_path / "cache")  # the inversion was cached


def test_invert_fills_the_cache_and_reconstructs_only_when_asked(tmp_path, capsys, tiny_model_dir, folder):
    code, stdout, err = run_cli(capsys, "invert", folder, "--model", tiny_model_dir,
                                "--cache-dir", tmp_path / "cache", *FAST)
    assert code == 0, err
    assert "inverted 5 frames at 48x32" in stdout and "PSNR" not in stdout
    assert len(os.listdir(tmp_path / "cache")) == 1
    code, stdout, err = run_cli(capsys, "invert", folder, "--model", tiny_model_dir, "--reconstruct", "--offload",
                                "--vae-slicing", "--vae-tiling",
                                "--cache-dir", tmp_path / "cache", *FAST)
    assert code == 0, err
    assert "reconstruction PSNR" in stdout
    assert len(os.listdir(tmp_path / "cache")) == 1  # the second run read the cache


def test_official_config_keys(tmp_path, capsys, tiny_model_dir, folder):
    cfg = dict(seed=1, device="cpu", output_path="ignored", data_path=str(folder), latents_path="latents",
               n_inversion_steps=2, n_frames=4, sd_version="2.1", guidance_scale=5.0, n_timesteps=2,
               prompt="a robot", negative_prompt="ugly", batch_size=2, pnp_attn_t=0.5, pnp_f_t=0.8)
    path = tmp_path / "config_pnp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "o.mp4"
    code, stdout, err = run_cli(capsys, "edit", "--config", path, "--model", tiny_model_dir, "-o", out, "-q",
                                "--height", "32", "--width", "48", "--no-cache")
    assert code == 0, err
    settings = yaml.safe_load((tmp_path / "o.yaml").read_text())
    assert settings["editor"] == "pnp" and settings["steps"] == 2 and settings["max_frames"] == 4
    assert settings["guidance_scale"] == 5.0 and settings["negative_prompt"] == "ugly"
    assert "edited 4 frames" in stdout
    sd = dict(cfg, start=0.9, use_ddim_noise=True)
    del sd["pnp_attn_t"], sd["pnp_f_t"]
    sd["n_timesteps"] = sd["n_inversion_steps"] = 10
    path.write_text(yaml.safe_dump(sd))
    code, stdout, err = run_cli(capsys, "edit", "--config", path, "--model", tiny_model_dir, "-o", out, "-q",
                                "--height", "32", "--width", "48", "--no-cache")
    assert code == 0, err
    settings = yaml.safe_load((tmp_path / "o.yaml").read_text())
    assert settings["editor"] == "sdedit" and settings["sdedit_start"] == 0.9


def test_demo_end_to_end_in_a_subprocess(tmp_path):
    """The README's demo command, as a user runs it."""
    out = tmp_path / "demo.mp4"
    proc = subprocess.run([sys.executable, "-m", "tokenflow.cli", "demo", "-o", str(out), "-q"],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)  # a hang guard only
    assert proc.returncode == 0, proc.stderr
    assert "output is noise" in proc.stderr
    assert "demo: edited 16 frames at 224x128" in proc.stdout
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == 20 and c.streams.audio
    assert (tmp_path / "demo.yaml").exists()
