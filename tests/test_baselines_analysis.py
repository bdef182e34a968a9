"""The paper's baselines and ablations, and the feature pictures."""

import json
import os

import numpy as np
import pytest
import torch

from tokenflow.analysis import nearest_neighbour_rebuild, pca_rgb
from tokenflow.cli import main

from conftest import moving_frames, write_clip

FAST = dict(steps=3, inversion_steps=3, use_cache=False, progress=False, height=32, width=48)


@pytest.fixture(scope="module")
def frames6():
    return moving_frames(6, 32, 48, seed=4)


def test_per_frame_baseline_edits_every_frame_independently(tiny_pipe, frames6):
    """--propagation none: no keyframes, and the result does not depend on how frames are batched."""
    a = tiny_pipe.edit(frames6, "a robot", propagation="none", batch_size=2, **FAST)
    b = tiny_pipe.edit(frames6, "a robot", propagation="none", batch_size=5, **FAST)
    assert a.keyframes == [[]] * 3
    torch.testing.assert_close(a.frames, b.frames, rtol=1e-4, atol=1e-4)
    # and a frame's result does not depend on the other frames
    c = tiny_pipe.edit(frames6[:3], "a robot", propagation="none", batch_size=2, **FAST)
    torch.testing.assert_close(a.frames[:3], c.frames, rtol=1e-4, atol=1e-4)


def test_extended_attention_ablation(tiny_pipe, frames6):
    ext1 = tiny_pipe.edit(frames6, "a robot", propagation="extended", batch_size=1, **FAST)
    none = tiny_pipe.edit(frames6, "a robot", propagation="none", batch_size=1, **FAST)
    # joint attention over a batch of one frame is per-frame attention
    torch.testing.assert_close(ext1.frames, none.frames, rtol=1e-4, atol=1e-4)
    ext3 = tiny_pipe.edit(frames6, "a robot", propagation="extended", batch_size=3, **FAST)
    assert (ext3.frames - none.frames).abs().max() > 1e-3  # frames now attend to each other
    tf = tiny_pipe.edit(frames6, "a robot", propagation="original", batch_size=3, **FAST)
    assert (tf.frames - ext3.frames).abs().max() > 1e-3


def test_pca_on_hand_made_features():
    # features varying along one direction only: the first component orders the tokens
    ramp = torch.linspace(-1, 1, 20)
    feats = (ramp[:, None] * torch.tensor([1.0, 2.0, 0.0, 0.0])).reshape(2, 10, 4)
    rgb = pca_rgb(feats)
    assert rgb.shape == (2, 10, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[..., 0].reshape(-1)
    assert np.all(np.diff(first) >= 0) or np.all(np.diff(first) <= 0)


def test_nearest_neighbour_rebuild_of_a_shifted_frame():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    feats = torch.randn(1, 4, 4, 8).repeat(2, 1, 1, 1)
    feats[1] = torch.roll(feats[0], shifts=1, dims=1)  # frame 1's features are frame 0's, shifted a patch
    frames[1] = np.roll(frames[0], shift=4, axis=1)  # and so are its pixels (patch = 4 px)
    r = nearest_neighbour_rebuild(frames, feats, source=0, target=1)
    assert r["psnr_features"] == float("inf")  # the feature field finds every patch exactly
    assert r["psnr_rgb"] == float("inf")


def test_analyze_command(tmp_path, capsys, tiny_model_dir):
    clip = write_clip(tmp_path / "in.mp4", moving_frames(5, 32, 48))
    out = tmp_path / "an"
    code = main(["analyze", clip, "--model", tiny_model_dir, "-o", str(out), "--steps", "5", "--inversion-steps", "5",
                 "--height", "32", "--width", "48", "-q", "--no-cache", "--target-frame", "3"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["analysis.json", "nn_rebuild.png", "pca.mp4", "pca_frames.png", "xt_slice.png"]
    from PIL import Image

    # titled pictures: a header above the frames/PCA grid (2 x 32 px) and above the x-t slice (5 frames x reps)
    assert Image.open(out / "pca_frames.png").size[1] >= 2 * 32 + 30
    assert Image.open(out / "xt_slice.png").size[1] >= 30 + 5
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["layer"].startswith("up_blocks.3.") and summary["feature_grid"] == [4, 6]
    assert summary["timestep"] == 201 and summary["target_frame"] == 3
    assert "rebuilt from frame 0" in stdout
    code = main(["analyze", clip, "--model", tiny_model_dir, "-o", str(out), "--target-frame", "9", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "target-frame must be in [0, 4]" in err


def test_propagation_baselines_in_the_command(tmp_path, capsys, tiny_model_dir):
    clip = write_clip(tmp_path / "in.mp4", moving_frames(4, 32, 48))
    for policy in ("none", "extended"):
        code = main(["edit", clip, "-p", "a robot", "--model", tiny_model_dir, "--propagation", policy,
                     "-o", str(tmp_path / f"{policy}.mp4"), "--steps", "2", "--inversion-steps", "2",
                     "--height", "32", "--width", "48", "-q", "--no-cache", "--keyframes", "fixed"])
        assert code == 0, capsys.readouterr().err
    assert "edited 4 frames" in capsys.readouterr().out
