"""Warp error and CLIP scores: hand-computed cases and synthetic videos with known motion."""

import json

import numpy as np
import pytest
import torch

from tokenflow.cli import main
from tokenflow.metrics import (ClipScorer, SourceFlows, evaluate, visibility_mask, warp_errors)

from conftest import moving_frames, write_clip


def test_warp_error_by_hand_without_motion():
    # a static scene whose brightness steps by 0.1 every frame: zero flow, every pixel visible,
    # so the warp error is exactly 0.1^2 per pair
    base = np.full((3, 16, 16, 3), 100, np.uint8)
    base[1] += 26  # 26/255 ~ 0.102
    base[2] += 52
    flows = SourceFlows([np.zeros((16, 16, 2), np.float32)] * 2, [np.ones((16, 16), bool)] * 2)
    np.testing.assert_allclose(warp_errors(base, flows), [(26 / 255) ** 2] * 2, rtol=1e-5)
    assert warp_errors(np.repeat(base[:1], 3, 0), flows).tolist() == [0.0, 0.0]


def test_visibility_check_flags_inconsistent_flow():
    zero = np.zeros((8, 8, 2), np.float32)
    assert visibility_mask(zero, zero).all()
    fw = zero.copy()
    fw[:, :, 0] = 3  # forward says +3, backward says 0: not consistent
    assert not visibility_mask(fw, zero).any()
    bw = zero.copy()
    bw[:, :, 0] = -3  # consistent pair; pixels whose source lies outside the frame are not visible
    vis = visibility_mask(fw, bw)
    assert vis[:, 3:].all() and not vis[:, :3].any()


@pytest.fixture(scope="module")
def translating():
    return moving_frames(12, 64, 96, seed=3)  # a smooth texture moving one pixel per frame


def test_consistent_edit_is_near_the_floor_flicker_and_shuffle_are_far(translating):
    rng = np.random.default_rng(0)
    consistent = 255 - translating  # a colour inversion: an edit that follows the motion
    flicker = np.clip(translating.astype(int) + rng.integers(-40, 40, (12, 1, 1, 1)), 0, 255).astype(np.uint8)
    shuffled = translating[rng.permutation(12)]
    res = {r.name: r for r in evaluate(translating, {"consistent": consistent, "flicker": flicker,
                                                     "shuffled": shuffled})}
    floor = res["consistent"].warp_error_floor
    assert floor < 2e-3  # the flow explains the source's motion
    assert res["consistent"].warp_error < 1.5 * floor + 1e-4
    assert res["flicker"].warp_error > 5 * res["consistent"].warp_error
    assert res["shuffled"].warp_error > 5 * res["consistent"].warp_error
    assert res["consistent"].n_frames == 12 and len(res["consistent"].per_frame_warp_error) == 11


def test_warp_error_resizes_the_source_to_the_edit(translating):
    from tokenflow.video import resize_frames

    small = resize_frames(translating, 32, 48)
    r = evaluate(translating, {"small": small})[0]
    assert r.warp_error < 2 * r.warp_error_floor + 1e-4


@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from tokenflow.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(cfg)
    return ClipScorer(model, tok)


def test_clip_scores_match_a_hand_computation(tiny_clip, translating):
    frames = translating[:4]
    clip_t, clip_f = tiny_clip.scores(frames, "a wolf")
    pixels = tiny_clip.preprocess(frames)
    assert pixels.shape == (4, 3, 32, 32)
    ids = tiny_clip.tokenizer("a wolf", padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = tiny_clip.model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds[0] / out.text_embeds[0].norm()
    assert clip_t == pytest.approx(float((img @ txt).mean()), abs=1e-5)
    expected_f = np.mean([float(img[i] @ img[i + 1]) for i in range(3)])
    assert clip_f == pytest.approx(expected_f, abs=1e-5)
    # identical frames are perfectly consistent
    assert tiny_clip.scores(np.repeat(frames[:1], 3, 0), "a wolf")[1] == pytest.approx(1.0, abs=1e-5)


def test_eval_command_writes_table_json_csv_and_plot(tmp_path, capsys, translating):
    src = write_clip(tmp_path / "src.mp4", translating)
    ok = write_clip(tmp_path / "inverted.mp4", 255 - translating)
    bad = write_clip(tmp_path / "shuffled.mp4", translating[np.random.default_rng(1).permutation(12)])
    code = main(["eval", "--source", src, "--edited", ok, "--edited", bad, "--no-clip",
                 "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "warp_error" in out and "inverted.mp4" in out and "shuffled.mp4" in out
    data = json.loads((tmp_path / "r.json").read_text())
    a, b = data["results"]
    assert a["clip_t"] is None and a["n_frames"] == 12
    assert b["warp_error"] > 5 * a["warp_error"]
    assert (tmp_path / "r.csv").read_text().startswith("edited,n_frames,warp_error")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["eval", "--source", "{src}", "--edited", "{src}"], "needs --prompt"),
    (["eval", "--source", "{src}", "--edited", "{tmp}/none.mp4", "--no-clip"], "does not exist"),
    (["eval", "--source", "{src}", "--edited", "{src}", "--no-clip", "--json", "{tmp}/x.txt"], "must end in"),
    (["eval", "--source", "{src}", "--edited", "{src}", "--no-clip", "--max-frames", "1"], "at least 2"),
    (["eval", "--source", "{src}", "--edited", "{src}", "--prompt", "x", "--clip-model", "{tmp}/noclip"],
     "cannot load CLIP"),
])
def test_eval_bad_input(tmp_path, capsys, translating, argv, message):
    src = write_clip(tmp_path / "src.mp4", translating[:3])
    (tmp_path / "noclip").mkdir()
    code = main([a.format(src=src, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
