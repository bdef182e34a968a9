"""Several prompts in one run: the source branch and the keyframes once, each prompt's result equal to
its single-prompt edit, 1 + 2P UNet image-forwards per frame and step."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tokenflow import EditConfig

from conftest import moving_frames, run_cli, write_clip

PROMPTS = ["a robot", "a marble statue", "a watercolor painting of a fox"]


def _video(n: int = 10) -> torch.Tensor:
    return torch.from_numpy(moving_frames(n, 32, 48)).permute(0, 3, 1, 2).float() / 255


def _count_forwards(pipe, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = pipe._predict

    def predict(latents, *a, **k):
        calls.append(len(latents))
        return real(latents, *a, **k)

    monkeypatch.setattr(pipe, "_predict", predict)
    return calls


@pytest.mark.parametrize("settings", [dict(editor="pnp", propagation="paper"),
                                      dict(editor="sdedit", propagation="original", sdedit_start=1.0,
                                           sdedit_noise="random")])
def test_each_prompt_of_one_run_equals_its_own_edit(tiny_pipe, monkeypatch, settings):
    video = _video()
    config = EditConfig(steps=3, inversion_steps=3, height=32, width=48, batch_size=4, seed=5, **settings)
    inversion = tiny_pipe.invert(video, "", 3, 3, use_cache=False, progress=False)
    calls = _count_forwards(tiny_pipe, monkeypatch)
    together = tiny_pipe.edit(video, config=config, prompts=PROMPTS, inversion=inversion, progress=False,
                              return_latents=True)
    joint = list(calls)
    calls.clear()
    alone = [tiny_pipe.edit(video, p, config=config, inversion=inversion, progress=False, return_latents=True)
             for p in PROMPTS]
    assert [r.config.prompt for r in together] == PROMPTS
    for got, want in zip(together, alone):
        assert got.keyframes == want.keyframes  # drawn once, the same draws as alone
        # The UNet batch holds 7 images per frame instead of 3, and oneDNN's convolutions round
        # differently at another batch size: up to about 2e-5 after the DDIM steps (measured)
        for a, b in zip(got.latents, want.latents):
            torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-5)
        torch.testing.assert_close(got.frames, want.frames, atol=1e-4, rtol=1e-4)
    # the work: 10 frames, 3 keyframes per step, 3 steps (SDEdit here runs 2); under the paper's policy
    # the keyframes' propagation passes reuse their keyframe-pass predictions
    n_steps = len(alone[0].timesteps)
    per_step = 10 + 3 - (3 if settings["propagation"] == "paper" else 0)
    assert sum(joint) == (1 + 2 * len(PROMPTS)) * per_step * n_steps  # 7 x 13 per step
    assert sum(calls) == 3 * len(PROMPTS) * per_step * n_steps        # 9 x 13 per step


def test_prompts_are_checked(tiny_pipe):
    from tokenflow.errors import TokenFlowError

    for bad in ([], "a robot", ["a robot", "bad\x00prompt"]):
        with pytest.raises(TokenFlowError):
            tiny_pipe.edit(_video(4), prompts=bad, steps=2, inversion_steps=2, height=32, width=48, progress=False)


def test_several_prompts_on_the_command_line_write_one_output_each(tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(6, 32, 48), audio=True)
    common = ["--model", "tiny", "--steps", "2", "--inversion-steps", "2", "--height", "32", "--width", "48",
              "--cache-dir", tmp_path / "cache", "-q"]
    code, out, err = run_cli(capsys, "edit", clip, "-p", "a robot", "-p", "a statue", "-o", tmp_path / "out.mp4",
                             "--frames-dir", tmp_path / "frames", *common)
    assert code == 0, err
    assert out.count("edited 6 frames") == 2
    for i, prompt in ((1, "a robot"), (2, "a statue")):
        assert (tmp_path / f"out-{i}.mp4").exists() and len(list((tmp_path / "frames" / str(i)).iterdir())) == 6
        assert yaml.safe_load((tmp_path / f"out-{i}.yaml").read_text())["prompt"] == prompt
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "cache" / "checkpoints").exists()
    # the settings of the second output reproduce it alone, with one prompt
    code, _, err = run_cli(capsys, "edit", clip, "--config", tmp_path / "out-2.yaml", "-o", tmp_path / "again.mp4",
                           "--frames-dir", tmp_path / "again", "-q")
    assert code == 0, err
    for name in sorted((tmp_path / "again").iterdir()):
        a = np.asarray(Image.open(name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "frames" / "2" / name.name)).astype(int)
        assert np.abs(a - b).max() <= 1, name.name
    # a frames "folder" that is a file is refused before any work
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "edit", clip, "-p", "a", "-p", "b", "--frames-dir", tmp_path / "file", *common)
    assert code == 2 and "is a file" in err


def test_several_prompts_whose_output_is_refused_create_nothing(tmp_path, capsys, monkeypatch):
    from test_reliability import one_error_line
    from tokenflow import runs

    monkeypatch.setattr(runs, "load_pipeline", lambda run: pytest.fail("the model loaded before the check"))
    clip = write_clip(tmp_path / "o-2.mp4", moving_frames(3, 32, 48))  # the second prompt's output name
    before = open(clip, "rb").read()
    code, _, err = run_cli(capsys, "edit", clip, "-p", "a robot", "-p", "a statue", "-o", tmp_path / "o.mp4",
                           "--frames-dir", tmp_path / "frames", "--model", "tiny")
    assert code == 2
    one_error_line(err, "o-2.mp4' is the input")
    assert sorted(os.listdir(tmp_path)) == ["o-2.mp4"] and open(clip, "rb").read() == before


@pytest.mark.parametrize("split", [False, True])
def test_keyframes_reuse_their_keyframe_pass_prediction_under_the_paper_policy(tiny_pipe, monkeypatch, split):
    """A keyframe blends its own outputs with weight 1 at its own tokens, so its propagation pass would
    recompute its keyframe-pass prediction: reusing it leaves the edit unchanged and saves 3K forwards."""
    video = _video(10)
    config = EditConfig(prompt="a robot", steps=3, inversion_steps=3, height=32, width=48, batch_size=4,
                        propagation="paper", seed=2)
    inversion = tiny_pipe.invert(video, "", 3, 3, use_cache=False, progress=False)
    calls = _count_forwards(tiny_pipe, monkeypatch)
    results = {}
    try:
        tiny_pipe.split_keyframe_pass = split
        for reuse in (False, True):
            tiny_pipe.reuse_keyframe_outputs = reuse
            calls.clear()
            results[reuse] = (tiny_pipe.edit(video, config=config, inversion=inversion, progress=False,
                                             return_latents=True), sum(calls))
    finally:
        tiny_pipe.reuse_keyframe_outputs, tiny_pipe.split_keyframe_pass = True, None
    (full, full_forwards), (reused, reused_forwards) = results[False], results[True]
    assert reused.keyframes == full.keyframes
    for a, b in zip(reused.latents, full.latents):  # other UNet batches: float rounding only
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-5)
    assert full_forwards - reused_forwards == 3 * 3 * 3  # 3 branches x 3 keyframes x 3 steps saved
    # the edit did move the latents: the comparison above is not between two untouched inputs
    assert (reused.latents[-1] - reused.latents[0]).abs().max() > 1e-3


def test_a_prompt_longer_than_the_text_encoder_reads_is_reported_once(tiny_pipe, tmp_path, caplog, monkeypatch):
    """CLIP reads 77 tokens (75 of the prompt's): what is cut off is one warning, from the library (logging)
    and on the command line, however often the prompt is encoded."""
    import logging

    words = " ".join(f"a robot number {i}" for i in range(40))  # far more than 75 tokens
    n_tokens = len(tiny_pipe.tokenizer(words, add_special_tokens=False, verbose=False).input_ids)
    with caplog.at_level(logging.WARNING, logger="tokenflow"):
        tiny_pipe.edit(_video(3), words, steps=2, inversion_steps=2, height=32, width=48, use_cache=False,
                       progress=False, inversion_prompt=words)  # encoded as the inversion and the edit prompt
    dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 1, caplog.text
    assert f"is {n_tokens} tokens long and the text encoder reads 75: the last {n_tokens - 75} tokens" in \
        dropped[0].getMessage()
    assert "Token indices sequence length" not in caplog.text  # transformers' own notice is not shown as well
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="tokenflow"):
        m.setenv("WORLD_SIZE", "2")
        m.setenv("RANK", "1")  # under torchrun the other ranks leave it to rank 0
        tiny_pipe.prompt_embeds("a statue " * 60)
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    # the command, as a person runs it: the warning once on stderr (-q keeps warnings)
    clip = write_clip(tmp_path / "c.mp4", moving_frames(3, 32, 48))
    long_prompt = "a marble statue " * 30
    proc = subprocess.run([sys.executable, "-m", "tokenflow", "edit", clip, "-p", long_prompt, "--inversion-prompt",
                           long_prompt, "--model", "tiny", "-o", str(tmp_path / "o.mp4"), "--steps", "2",
                           "--inversion-steps", "2", "--height", "32", "--width", "48", "--no-cache", "-q"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "tokens are dropped" in line]
    assert len(lines) == 1 and lines[0].startswith("tokenflow: the prompt 'a marble statue"), proc.stderr
    assert "Token indices sequence length" not in proc.stderr
