"""Shared fixtures: tiny seeded components built in code, small clips made on the fly. No network."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dtype "auto" stays float32 on the CPU in every test, whatever the CPU: the suite's numbers (and the
# comparisons with float32 references) must not depend on the machine. test_models.py checks auto's
# bfloat16 choice by setting this itself.
os.environ["TOKENFLOW_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def tiny_pipe():
    from tokenflow import TokenFlowPipeline

    return TokenFlowPipeline.from_tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tokenflow.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny_sd", seed=0)


def moving_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random texture translated one pixel per frame: (n, h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    base = rng.random((height // 8 + 2, width // 8 + n + 2, 3))
    from PIL import Image

    big = np.asarray(Image.fromarray((base * 255).astype(np.uint8)).resize(
        ((width // 8 + n + 2) * 8, (height // 8 + 2) * 8), Image.Resampling.BICUBIC))
    return np.stack([big[:height, i:i + width] for i in range(n)])


def write_clip(path, frames: np.ndarray, fps: int = 12, audio: bool = False) -> str:
    """Write an H.264 clip, optionally with an AAC sine tone as long as the video."""
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.height, v.width, v.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        a = out.add_stream("aac", rate=16000) if audio else None
        for f in frames:
            out.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(v.encode())
        if a is not None:
            t = np.arange(int(16000 * len(frames) / fps)) / 16000
            tone = (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)[None]
            for i in range(0, tone.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, i:i + 1024]), format="flt", layout="mono")
                af.sample_rate = 16000
                out.mux(a.encode(af))
            out.mux(a.encode())
    return str(path)


@pytest.fixture
def clip(tmp_path):
    """A 10-frame 64x96 clip with audio."""
    return write_clip(tmp_path / "clip.mp4", moving_frames(10, 64, 96), fps=12, audio=True)


def run_cli(capsys, *argv):
    """The command in this process: (exit status, stdout, stderr)."""
    from tokenflow.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def step_inputs(pipe, n: int, seed: int = 7, step: int = 2):
    """One denoising step's inputs for ``n`` frames of 8x8 latents on the tiny UNet:
    (x, source, text rows of [source, uncond, cond], scheduler, t), seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    source = torch.randn(n, 4, 8, 8, generator=g)
    text = torch.randn(3, 77, pipe.unet.config.cross_attention_dim, generator=g)
    scheduler = pipe.new_scheduler()
    scheduler.set_timesteps(10)
    return x, source, text, scheduler, scheduler.timesteps[step]
