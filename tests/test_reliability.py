"""Never lose the user's data or work: real-world media, outputs that would overwrite inputs,
full disks, bad settings caught before the model loads, out-of-memory retries, interrupted
runs that resume bit-identically."""

from __future__ import annotations

import errno
import glob
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tokenflow import runs
from tokenflow.config import EditConfig
from tokenflow.errors import OutOfMemory
from tokenflow.video import image_to_rgb8, probe_video, read_video, write_video

from conftest import moving_frames, run_cli, write_clip

FAST = ["--steps", "2", "--inversion-steps", "2", "--height", "32", "--width", "48", "-q"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    def refuse(run):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(runs, "load_pipeline", refuse)


def one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenflow: error:"), err
    assert "Traceback" not in err and len(lines[0]) < 500
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------- outputs that are inputs
def test_outputs_that_would_overwrite_an_input_are_refused(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48))
    original = open(clip, "rb").read()
    os.symlink(clip, tmp_path / "link.mp4")
    os.link(clip, tmp_path / "hard.mp4")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, f in enumerate(moving_frames(3, 32, 48)):
        Image.fromarray(f).save(frames / f"{i:05d}.png")
    (tmp_path / "conf.yaml").write_text("steps: 2\ninversion_steps: 2\n")
    cases = [
        (["edit", clip, "-p", "x", "-o", clip], "is the input"),
        (["edit", "clip.mp4", "-p", "x", "-o", "./sub/../clip.mp4"], "is the input"),
        (["edit", clip, "-p", "x", "-o", "link.mp4"], "is the input"),
        (["edit", clip, "-p", "x", "-o", "hard.mp4"], "is the input"),
        (["edit", frames, "-p", "x", "-o", "o.mp4", "--frames-dir", frames], "holds the input"),
        (["edit", frames, "-p", "x", "-o", "o.mp4", "--frames-dir", tmp_path], "holds other files"),
        # the settings file written beside the output (conf.yaml) is the config read
        (["edit", clip, "-p", "x", "-o", "conf.mp4", "--config", "conf.yaml"], "is the input"),
        (["edit", clip, "-p", "x", "-o", "out/o.mp4", "--frames-dir", "out"], "holds the output"),
    ]
    (tmp_path / "sub").mkdir()
    (tmp_path / "out").mkdir()
    for argv, needle in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        one_error_line(err, needle)
    assert open(clip, "rb").read() == original
    assert sorted(os.listdir(frames)) == ["00000.png", "00001.png", "00002.png"]
    assert (tmp_path / "conf.yaml").read_text() == "steps: 2\ninversion_steps: 2\n"


def test_frames_folder_is_written_whole_and_never_over_foreign_files(tmp_path, capsys, tiny_model_dir):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48))
    out = tmp_path / "frames"
    out.mkdir()
    (out / "00007.png").write_bytes(b"an old frame")  # an earlier run's: replaced
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "-o", tmp_path / "o.mp4",
                           "--frames-dir", out, "--cache-dir", tmp_path / "c", *FAST)
    assert code == 0, err
    assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(4)]
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    (out / "notes.txt").write_text("mine")  # the user's own file: refused before any work
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "-o", tmp_path / "o.mp4",
                           "--frames-dir", out, *FAST)
    assert code == 2
    one_error_line(err, "holds other files")
    assert (out / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- real-world media
def marker_frames(n: int, h: int = 32, w: int = 48) -> np.ndarray:
    """Black frames with a white block at the top-left corner."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[:, :8, :8] = 255
    return frames


def write_rotated(path, frames: np.ndarray, degrees: int) -> str:
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=10)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        s.set_display_rotation(degrees)  # what a phone writes for a portrait clip
        for f in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())
    return str(path)


@pytest.mark.parametrize("degrees, corner", [(-90, (0, -1)), (90, (-1, 0)), (180, (-1, -1))])
def test_phone_rotation_is_applied_on_read(tmp_path, degrees, corner):
    clip = write_rotated(tmp_path / "r.mp4", marker_frames(3), degrees)
    v = read_video(clip)
    h, w = (48, 32) if degrees % 180 else (32, 48)
    assert v.frames.shape == (3, h, w, 3) and probe_video(clip).size == (h, w)
    # the marker (stored top-left) is where a player shows it: -90 (stored sideways, shown
    # turned clockwise) puts it top-right
    y = 4 if corner[0] == 0 else h - 4
    x = 4 if corner[1] == 0 else w - 4
    assert v.frames[0, y, x].min() > 200 and v.frames[0, h // 2, w // 2].max() < 50


def test_rotated_clip_is_edited_and_written_upright(tmp_path, capsys, tiny_model_dir):
    clip = write_rotated(tmp_path / "portrait.mp4", moving_frames(3, 32, 48), -90)
    out = tmp_path / "o.mp4"
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "-o", out, "--steps", "2",
                           "--inversion-steps", "2", "--width", "32", "-q", "--no-cache")
    assert code == 0, err
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        frame = next(c.decode(s))
        assert (frame.height, frame.width) == (48, 32) and not frame.rotation


def test_any_image_mode_becomes_8_bit_rgb(tmp_path):
    ramp = (np.arange(16 * 24).reshape(16, 24) * 170).astype(np.uint16)  # 0..65110
    expect = np.round(ramp / 65535 * 255).astype(np.uint8)
    Image.fromarray(ramp).save(tmp_path / "d16.png")
    with Image.open(tmp_path / "d16.png") as im:
        assert im.mode.startswith("I")
        assert np.array_equal(image_to_rgb8(im), np.repeat(expect[..., None], 3, 2))
    f = ramp.astype(np.float32) / 65535
    Image.fromarray(f).save(tmp_path / "f.tiff")
    with Image.open(tmp_path / "f.tiff") as im:
        assert im.mode == "F" and np.abs(image_to_rgb8(im)[..., 0].astype(int) - expect).max() <= 1
    rgb = moving_frames(1, 16, 24)[0]
    for mode in ("P", "CMYK", "LA", "RGBA", "L"):
        im = Image.fromarray(rgb).convert(mode)
        got = image_to_rgb8(im)
        assert got.shape == (16, 24, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - np.asarray(im.convert("RGB")).astype(int)).max() <= 1
    # EXIF orientation 6: stored sideways, shown turned clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "o.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "o.jpg") as im:
        assert image_to_rgb8(im).shape == (24, 16, 3)


def test_16_bit_frames_and_control_images_are_not_white(tmp_path):
    from tokenflow.conditioning import control_images

    folder = tmp_path / "depth"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.full((16, 24), 1000 * (i + 1)) + np.arange(24) * 100).astype(np.uint16)).save(
            folder / f"{i}.png")
    v = read_video(folder)
    assert v.frames.max() < 40 and v.frames.min() > 2  # 1000/257 ~ 4 to 5300/257 ~ 21
    control = control_images(str(folder), torch.zeros(3, 3, 16, 24))
    assert control.max() < 0.15


def write_shifted(path, frames: np.ndarray, offset: float, fps: int = 10) -> str:
    """A clip whose video and audio timestamps start at ``offset`` seconds, as cut clips have."""
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.height, v.width, v.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        a = out.add_stream("aac", rate=16000)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = int(round(offset * fps)) + i, Fraction(1, fps)
            out.mux(v.encode(vf))
        out.mux(v.encode())
        t = np.arange(int(16000 * len(frames) / fps)) / 16000
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        start = int(offset * 16000)
        for i in range(0, tone.shape[1], 1024):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, i:i + 1024]), format="flt", layout="mono")
            af.sample_rate, af.pts = 16000, start + i
            out.mux(a.encode(af))
        out.mux(a.encode())
    return str(path)


def audio_seconds(path) -> float:
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return 0.0
        return sum(f.samples for f in c.decode(c.streams.audio[0])) / c.streams.audio[0].sample_rate


def test_audio_is_kept_when_timestamps_do_not_start_at_zero(tmp_path):
    clip = write_shifted(tmp_path / "cut.mp4", moving_frames(20, 32, 48), offset=5.0)
    v = read_video(clip)
    assert v.start_time == pytest.approx(5.0, abs=0.05)
    out = write_video(tmp_path / "o.mp4", v.frames, v.fps, v.audio_source, audio_start=v.start_time)
    assert audio_seconds(out) == pytest.approx(2.0, abs=0.15)
    # the first 8 frames only: audio cut to match, from the first frame on
    out = write_video(tmp_path / "p.mp4", v.frames[:8], v.fps, v.audio_source, audio_start=v.start_time)
    assert audio_seconds(out) == pytest.approx(0.8, abs=0.15)


@pytest.mark.parametrize("ext, options", [("mkv", {}), ("mp4", {"movflags": "faststart"})])
def test_truncated_file_is_edited_with_a_warning(tmp_path, caplog, ext, options):
    # a download or copy that stopped midway; the header (mkv, or mp4 with its index at the
    # front) still says 30 frames. Noise frames: each frame takes its share of the bytes.
    full = tmp_path / f"full.{ext}"
    with av.open(str(full), "w", options=options) as out:
        s = out.add_stream("libx264", rate=10)
        s.height, s.width, s.pix_fmt = 64, 96, "yuv420p"
        for f in np.random.default_rng(0).integers(0, 256, (30, 64, 96, 3), dtype=np.uint8):
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())
    data = open(full, "rb").read()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[:len(data) * 6 // 10])
    with caplog.at_level("WARNING", logger="tokenflow"):
        v = read_video(cut)
    assert 0 < len(v.frames) < 30
    assert f"read {len(v.frames)} frames" in caplog.text and "declares 30" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tokenflow"):
        assert len(read_video(full).frames) == 30
        read_video(full, max_frames=5)
    assert "truncated" not in caplog.text


def write_ts(path, frames: np.ndarray, fps: int = 10) -> bytes:
    with av.open(str(path), "w", format="mpegts") as out:
        s = out.add_stream("libx264", rate=fps)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for f in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())
    return open(path, "rb").read()


def test_resolution_change_midstream_is_fitted_frame_by_frame(tmp_path, caplog):
    a = write_ts(tmp_path / "a.ts", moving_frames(4, 32, 48))
    b = write_ts(tmp_path / "b.ts", moving_frames(4, 64, 64, seed=1))
    both = tmp_path / "both.ts"
    both.write_bytes(a + b)  # what a broadcast capture or a camera switching modes gives
    with caplog.at_level("WARNING", logger="tokenflow"):
        v = read_video(both, size=(24, 40))
    assert v.frames.shape == (8, 24, 40, 3)
    assert "changes size midway" in caplog.text


def test_reading_holds_the_working_size_not_the_source_resolution(tmp_path):
    import tracemalloc

    n, h, w = 24, 256, 384
    clip = write_clip(tmp_path / "big.mp4", moving_frames(n, h, w))
    tracemalloc.start()
    v = read_video(clip, size=(32, 48))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert v.frames.shape == (n, 32, 48, 3)
    # all frames at the source size would be n*h*w*3 = 7 MB; a few decoded frames at a time is far less
    assert peak < 6 * h * w * 3, peak


# --------------------------------------------------------------------------- cache vs fresh
@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
def test_cached_and_fresh_inversions_give_bit_identical_edits(tiny_pipe, clip, tmp_path, editor):
    cfg = EditConfig(prompt="x", steps=3, inversion_steps=3, height=64, width=96, editor=editor, batch_size=4)
    fresh = tiny_pipe.edit(clip, config=cfg, cache_dir=tmp_path / "c", progress=False, return_latents=True)
    cached = tiny_pipe.edit(clip, config=cfg, cache_dir=tmp_path / "c", progress=False, return_latents=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.latents, cached.latents))
    assert np.array_equal(fresh.uint8(), cached.uint8())


# --------------------------------------------------------------------------- checks before the work
BAD = {
    "huge height": (["--height", "65536"], "at most 4096"),
    "absurd steps": (["--steps", "100000"], "steps must be an integer in [1, 1000]"),
    "negative seed": (["--seed", "-1"], "seed must be an integer in [0, 2^63 - 1]"),
    "seed too large": (["--seed", str(2 ** 64)], "seed must be"),
    "device with bad index": (["--device", "cpu:abc"], "unknown device 'cpu:abc'"),
    "missing LoRA file": (["--lora", "loras/x.safetensors"], "LoRA 'loras/x.safetensors' does not exist"),
    "missing ControlNet": (["--editor", "controlnet", "--control", "canny", "--controlnet", "cn/model.safetensors"],
                           "ControlNet 'cn/model.safetensors' does not exist"),
    "missing model file": (["--model", "models/x.safetensors"], "model 'models/x.safetensors' does not exist"),
    "steps mismatch": (["--steps", "30", "--inversion-steps", "50"], "use e.g. --inversion-steps 90"),
    "schedule missing": (["--keyframe-schedule", "none.json"], "does not exist"),
    "schedule bad json": (["--keyframe-schedule", "{bad_json}"], "cannot read keyframe schedule"),
    "schedule wrong frames": (["--keyframe-schedule", "{short_schedule}"], "keyframe schedule step 1"),
    "output name too long": (["-o", "x" * 250 + ".mp4"], "too long"),
    "yaml output type": (["--config", "{yaml_output}"], "output must be text, got 12"),
    "yaml lora type": (["--config", "{yaml_lora}"], "lora must be a path or id"),
    "yaml alias bomb": (["--config", "{yaml_bomb}"], "aliases"),
    "yaml huge value": (["--config", "{yaml_huge}"], "negative-prompt is 100000 characters long"),
    "yaml repeated key": (["--config", "{yaml_twice}"], "key 'steps' is given twice"),
    "config is a device": (["--config", "/dev/zero"], "is not a file"),
    "fps too small": (["--fps", "0.0001"], "fps must be a number in [0.01, 1000)"),
    "LoRA scale nan": (["--lora", "someone/lora:nan"], "the scale must be a number"),
    "NUL in a prompt": (["--negative-prompt", "bad\0"], "NUL"),
    "blank prompt": (["-p", "   "], "no prompt given"),
    "cache inside frames": (["--frames-dir", "fr", "--cache-dir", "fr/cache"], "holds the output"),
    "cache dir is a file": (["--cache-dir", "bad.json"], "is a file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_settings_fail_before_the_model_loads(case, tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(10, 32, 48))
    (tmp_path / "bad.json").write_text("[[0, 1")
    (tmp_path / "short.json").write_text("[[0], [1]]")
    (tmp_path / "out.yaml").write_text("output: 12\n")
    (tmp_path / "lora.yaml").write_text("lora: 5\n")
    (tmp_path / "bomb.yaml").write_text('a: &a ["x","x","x","x","x","x","x","x","x"]\n'
                                        + "".join(f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
                                                  for p, c in zip("abcdefgh", "bcdefghi")))
    (tmp_path / "huge.yaml").write_text("negative_prompt: " + "y" * 100000 + "\n")
    (tmp_path / "twice.yaml").write_text("steps: 2\nsteps: 3\n")
    subs = {"{bad_json}": "bad.json", "{short_schedule}": "short.json", "{yaml_output}": "out.yaml",
            "{yaml_lora}": "lora.yaml", "{yaml_bomb}": "bomb.yaml", "{yaml_huge}": "huge.yaml",
            "{yaml_twice}": "twice.yaml"}
    extra, needle = BAD[case]
    extra = [subs.get(a, a) for a in extra]
    base = ["edit", clip, "-p", "x", "--steps", "2", "--inversion-steps", "2", "--batch-size", "4"]
    started = time.perf_counter()
    code, _, err = run_cli(capsys, *base, *extra)
    assert code == 2, err
    one_error_line(err, needle)
    assert time.perf_counter() - started < 120  # an alias bomb would not come back at all
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".mp4") and n != "clip.mp4"]


def test_analyze_and_eval_never_write_over_their_inputs(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    an = tmp_path / "an"
    an.mkdir()
    clip = write_clip(an / "pca.mp4", moving_frames(4, 32, 48))  # named like a figure analyze writes
    original = open(clip, "rb").read()
    code, _, err = run_cli(capsys, "analyze", clip, "-o", an, "--steps", "2", "--inversion-steps", "2")
    assert code == 2
    one_error_line(err, "is the input")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, f in enumerate(moving_frames(3, 32, 48)):
        Image.fromarray(f).save(frames / f"{i:05d}.png")
    code, _, err = run_cli(capsys, "analyze", frames, "-o", frames, "--steps", "2", "--inversion-steps", "2")
    assert code == 2
    one_error_line(err, "input folder")
    before = open(frames / "00000.png", "rb").read()
    code, _, err = run_cli(capsys, "eval", "--source", frames, "--edited", frames, "--no-clip", "--plot",
                           frames / "00000.png")
    assert code == 2
    one_error_line(err, "input folder")
    code, _, err = run_cli(capsys, "eval", "--source", frames, "--edited", frames, "--no-clip", "--json",
                           frames / "r.json")
    assert code == 2
    one_error_line(err, "inside the input folder")
    assert open(frames / "00000.png", "rb").read() == before and open(clip, "rb").read() == original


def test_tiff_frame_folders_are_read(tmp_path):
    folder = tmp_path / "exr-like"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 24), 0.25 * (i + 1), np.float32)).save(folder / f"f{i}.tif")
    v = read_video(folder)
    assert v.frames.shape == (3, 16, 24, 3) and list(v.frames[:, 0, 0, 0]) == [64, 128, 191]


def test_undecodable_prompt_bytes_are_one_line(tmp_path, tiny_model_dir):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48))
    proc = subprocess.run([sys.executable, "-m", "tokenflow.cli", "edit", clip.encode(), b"-p", b"a \xff\xfe dog",
                           b"--model", tiny_model_dir.encode(), *[a.encode() for a in FAST]],
                          capture_output=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err
    one_error_line(err, "not valid UTF-8")


def test_not_enough_space_for_the_output_fails_before_the_model(tmp_path, capsys, monkeypatch, no_model):
    import shutil

    clip = write_clip(tmp_path / "clip.mp4", moving_frames(10, 32, 48))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=50_000))
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "-o", tmp_path / "o.mp4", *FAST)
    assert code == 2
    one_error_line(err, "not enough free space")


def test_ui_port_in_use_is_one_line(capsys, monkeypatch):
    import socket

    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        monkeypatch.setattr("tokenflow.pipeline.TokenFlowPipeline.from_tiny",
                            lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
        code, _, err = run_cli(capsys, "ui", "--model", "tiny", "--port", port)
    assert code == 2
    one_error_line(err, f"cannot listen on 127.0.0.1:{port}")


# --------------------------------------------------------------------------- full disks
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_the_output_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch,
                                                                            tiny_model_dir):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48))
    out = tmp_path / "out"
    out.mkdir()
    real_replace = os.replace

    def replace(src, dst):  # the cache (another folder) still works; the output's folder is full
        if os.path.dirname(os.path.abspath(dst)) == str(out):
            enospc()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "-o", out / "o.mp4",
                           "--cache-dir", tmp_path / "cache", *FAST)
    assert code == 2
    one_error_line(err, "no space left", "nothing was written")
    assert os.listdir(out) == []
    # the finished edit's checkpoint is kept: a rerun once there is space does not redo the work
    assert glob.glob(str(tmp_path / "cache" / "checkpoints" / "edit-*.safetensors"))


def test_full_disk_in_the_frames_folder_leaves_no_half_folder(tmp_path, capsys, monkeypatch, tiny_model_dir):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48))
    real_save = Image.Image.save
    calls = []

    def save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 3 and str(fp).endswith(".png"):
            enospc()
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "-o", tmp_path / "o.mp4",
                           "--frames-dir", tmp_path / "frames", "--no-cache", *FAST)
    assert code == 2
    one_error_line(err, "no space left")
    assert not (tmp_path / "frames").exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_cache_that_cannot_be_written_only_warns(tmp_path, capsys, monkeypatch, tiny_model_dir, caplog):
    import errno

    from tokenflow import checkpoints, tensorfiles

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4, 32, 48))
    monkeypatch.setattr(checkpoints, "write_safetensors", disk_full)  # the checkpoints
    monkeypatch.setattr(tensorfiles.RowFile, "append", disk_full)  # the inversion's rows, written while it runs
    with caplog.at_level("WARNING", logger="tokenflow"):
        code, out, err = run_cli(capsys, "edit", clip, "-p", "x", "--model", tiny_model_dir, "-o",
                                 tmp_path / "o.mp4", "--cache-dir", tmp_path / "cache", *FAST)
    assert code == 0, err
    assert "could not write the inversion cache" in caplog.text and "could not write a checkpoint" in caplog.text
    assert (tmp_path / "o.mp4").exists() and "edited 4 frames" in out


def test_stale_temporaries_of_killed_runs_are_cleaned(tmp_path):
    from tokenflow.atomic import atomic_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".out.{dead.pid}-0123abcd.tmp.mp4"
        live = tmp_path / f".out.{alive.pid}-89abcdef.tmp.mp4"
        other = tmp_path / f".other.{dead.pid}-0123abcd.tmp.mp4"
        for p in (stale, live, other):
            p.write_bytes(b"half a video")
        with atomic_path(tmp_path / "out.mp4") as tmp:
            open(tmp, "wb").write(b"video")
        assert not stale.exists() and live.exists() and other.exists()  # a running writer keeps its file
    finally:
        alive.kill()
        alive.wait()


# --------------------------------------------------------------------------- out of memory
def oom_above(pipe, monkeypatch, limit: int, calls: list):
    """The UNet call fails like a full GPU whenever it gets more than ``limit`` images."""
    real = pipe._predict

    def predict(latents, *a, **k):
        calls.append(len(latents))
        if len(latents) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(latents, *a, **k)

    monkeypatch.setattr(pipe, "_predict", predict)


def test_out_of_memory_retries_with_smaller_batches_and_keeps_the_result(tiny_pipe, clip, monkeypatch, caplog):
    cfg = EditConfig(prompt="x", steps=3, inversion_steps=3, height=64, width=96, batch_size=4)
    reference = tiny_pipe.edit(clip, config=cfg, use_cache=False, progress=False, return_latents=True)
    calls: list[int] = []
    oom_above(tiny_pipe, monkeypatch, 3, calls)  # 4-frame inversion batches, 3x3 keyframes, 3x4 frames fail
    with caplog.at_level("WARNING", logger="tokenflow"):
        result = tiny_pipe.edit(clip, config=cfg, use_cache=False, progress=False, return_latents=True)
    # the run lowered its own copy of the settings and says so; the pipeline's are as they were
    assert result.lowered == {"split_keyframe_pass": True, "propagation_chunk": 1}
    assert tiny_pipe.split_keyframe_pass is None and tiny_pipe.propagation_chunk is None
    assert "retrying" in caplog.text
    # what failed: the 4-frame inversion batch once, the 3x3-keyframe pass once, the 3x4 and 3x2
    # propagation chunks once each; then every call fits
    assert [c for c in calls if c > 3] == [4, 9, 12, 6]
    for a, b in zip(reference.latents, result.latents):  # other batch sizes: float rounding only
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert result.keyframes == reference.keyframes


def test_out_of_memory_that_no_smaller_batch_fixes_names_the_setting(tiny_pipe, clip, monkeypatch, capsys):
    monkeypatch.setattr(tiny_pipe, "_predict", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(OutOfMemory, match="--height/--width"):
        tiny_pipe.edit(clip, prompt="x", steps=2, inversion_steps=2, height=32, width=48, use_cache=False,
                       progress=False)
    # through the command: one line and exit 1
    from tokenflow import TokenFlowPipeline

    pipe = TokenFlowPipeline.from_tiny(seed=0)
    monkeypatch.setattr(pipe, "_predict", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA")))
    monkeypatch.setattr(runs, "load_pipeline", lambda run: pipe)
    code, _, err = run_cli(capsys, "edit", clip, "-p", "x", "-o", clip.replace("clip.mp4", "o.mp4"), "--no-cache",
                           *FAST)
    assert code == 1
    # the retries say what they try, above the bars; then the one error line
    notices = [line for line in err.strip().splitlines() if "retrying" in line]
    assert notices and all(line.startswith(("out of memory", "tokenflow: out of memory")) for line in notices)
    one_error_line("\n".join(line for line in err.splitlines() if line not in notices), "out of memory")


def test_out_of_memory_in_the_vae_halves_its_batch(tiny_pipe, clip, monkeypatch):
    from tokenflow import pipeline

    real = pipeline.decode_latents
    sizes = []

    def decode(vae, latents, batch_size=10):
        sizes.append(batch_size)
        if batch_size > 2:
            raise torch.OutOfMemoryError("out of memory")
        return real(vae, latents, batch_size)

    monkeypatch.setattr(pipeline, "decode_latents", decode)
    result = tiny_pipe.edit(clip, prompt="x", steps=2, inversion_steps=2, height=32, width=48, use_cache=False,
                            progress=False)
    assert sizes == [10, 5, 2] and result.frames.shape[0] == 10
    assert result.lowered == {"vae_batch_size": 2} and tiny_pipe.vae_batch_size == 10


# --------------------------------------------------------------------------- interrupted runs
def _as_in_a_terminal():
    """Ctrl-C reaches the run as it does from a terminal: a suite started in the background
    (``pytest &`` in a script) has SIGINT ignored, and a child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(argv, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tokenflow", *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_in_a_terminal)


def wait_for(pattern: str, proc, timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while not glob.glob(pattern):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {pattern} appeared: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {pattern} after {timeout}s")
        time.sleep(0.02)


def test_killed_and_interrupted_runs_resume_to_the_same_output(tmp_path, tiny_model_dir, capsys):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(16, 32, 48), audio=True)
    args = ["edit", clip, "-p", "a dog", "--model", tiny_model_dir, "--steps", "12", "--inversion-steps", "12",
            "--height", "32", "--width", "48", "--batch-size", "4", "-q"]
    # the uninterrupted run
    proc = start([*args, "-o", tmp_path / "ref.mp4", "--frames-dir", tmp_path / "ref", "--cache-dir",
                  tmp_path / "refcache"], tmp_path)
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err
    assert not (tmp_path / "refcache" / "checkpoints").exists()  # removed once the output was written

    cache = tmp_path / "cache"
    run = [*args, "-o", tmp_path / "out.mp4", "--frames-dir", tmp_path / "out", "--cache-dir", cache]
    # 1. SIGKILL in the middle of the inversion: its finished batches are kept
    proc = start(run, tmp_path)
    wait_for(str(cache / "checkpoints" / "inversion-*" / "frames-000000-*"), proc)
    proc.kill()
    proc.wait()
    # 2. Ctrl-C in the middle of the edit (not quiet: the log says where the inversion resumed)
    proc = start([a for a in run if a != "-q"], tmp_path)
    wait_for(str(cache / "checkpoints" / "edit-*.safetensors"), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 130, err
    assert "resuming the inversion at frame 4 of 16" in err
    assert err.strip().splitlines()[-1].startswith("tokenflow: interrupted (Ctrl-C)") and "resume" in err
    # 3. SIGTERM (timeout, a cluster's scheduler) after a few more steps
    proc = start(run, tmp_path)

    def version():  # each checkpoint is a new file renamed into place: a new inode
        st = os.stat(glob.glob(str(cache / "checkpoints" / "edit-*.safetensors"))[0])
        return st.st_ino, st.st_mtime_ns

    first = version()
    while version() == first:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.terminate()
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("tokenflow: interrupted (SIGTERM)")
    assert not [p for p in glob.glob(str(tmp_path / "**" / ".*tmp*"), recursive=True)]
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "out").exists()
    # 4. the rerun finishes from the last checkpoint, with the same frames as the uninterrupted run
    proc = start(run, tmp_path)
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err
    assert "resumed after step" in out
    for name in sorted(os.listdir(tmp_path / "ref")):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "ref" / name)),
                              np.asarray(Image.open(tmp_path / "out" / name))), name
    assert not (cache / "checkpoints").exists()
    assert audio_seconds(tmp_path / "out.mp4") > 1.0


def test_no_cache_puts_nothing_in_the_cache_folder_and_still_resumes(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """--no-cache: the resume checkpoints go beside the output (and go once it is written), none into the
    default cache folder; invert --no-cache, which has no output, keeps none."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the default cache folder lies in here
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(8, 32, 48))
    (tmp_path / "out").mkdir()
    args = ["edit", clip, "-p", "x", "--model", tiny_model_dir, "-o", tmp_path / "out" / "o.mp4", "--no-cache",
            "--steps", "4", "--inversion-steps", "4", "--height", "32", "--width", "48", "-q"]
    from tokenflow import pipeline
    from tokenflow.checkpoints import EditCheckpoints

    # a checkpoint after every step, whatever it costs (the interval adapts to the save's cost against the
    # step's, which on these tiny steps depends on the machine's load)
    monkeypatch.setattr(EditCheckpoints, "OVERHEAD", 1e9)
    real = _interrupt_at_step(monkeypatch, 3)
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and "resume" in err
    assert glob.glob(str(tmp_path / "out" / ".tokenflow-checkpoints" / "edit-*.safetensors"))
    assert not (tmp_path / "xdg").exists()
    monkeypatch.setattr(pipeline.TokenFlowPipeline, "denoise_step", real)
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "resumed after step 2" in out, err
    assert sorted(os.listdir(tmp_path / "out")) == ["o.mp4", "o.yaml"] and not (tmp_path / "xdg").exists()
    code, _, err = run_cli(capsys, "invert", clip, "--model", tiny_model_dir, "--no-cache", "--steps", "2",
                           "--inversion-steps", "2", "--height", "32", "--width", "48", "-q")
    assert code == 0, err
    assert not (tmp_path / "xdg").exists() and sorted(os.listdir(tmp_path / "out")) == ["o.mp4", "o.yaml"]


def _interrupt_at_step(monkeypatch, n: int):
    """Ctrl-C in the n-th editing step of the next edit; returns the real step, to put back."""
    from tokenflow import pipeline

    real = pipeline.TokenFlowPipeline.denoise_step
    steps = []

    def interrupt(self, *a, **k):
        steps.append(1)
        if len(steps) == n:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(pipeline.TokenFlowPipeline, "denoise_step", interrupt)
    return real


def test_no_resume_starts_over(tmp_path, tiny_model_dir, capsys, monkeypatch):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(8, 32, 48))
    args = ["edit", clip, "-p", "x", "--model", tiny_model_dir, "-o", tmp_path / "o.mp4", "--cache-dir",
            tmp_path / "c", "--steps", "4", "--inversion-steps", "4", "--height", "32", "--width", "48", "-q"]
    from tokenflow import pipeline
    from tokenflow.checkpoints import EditCheckpoints

    # a checkpoint after every step, whatever it costs (the interval adapts to the save's cost against the
    # step's, which on these tiny steps depends on the machine's load)
    monkeypatch.setattr(EditCheckpoints, "OVERHEAD", 1e9)
    real = _interrupt_at_step(monkeypatch, 3)
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and "resume" in err
    assert glob.glob(str(tmp_path / "c" / "checkpoints" / "edit-*.safetensors"))  # there was one to resume from
    monkeypatch.setattr(pipeline.TokenFlowPipeline, "denoise_step", real)
    code, out, err = run_cli(capsys, *args, "--no-resume")
    assert code == 0 and "resumed" not in out
    assert not (tmp_path / "c" / "checkpoints").exists()
