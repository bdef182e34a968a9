import math

import torch

from tokenflow.correspondence import (cosine_nearest_neighbours, gather_blend, nearest_keyframe_tokens,
                                      propagation_plan)


def test_original_plan_matches_official_formula_by_hand():
    frames = torch.arange(12)
    slots, w = propagation_plan(frames, torch.tensor([1, 6, 9]), batch_size=4, policy="original")
    # batch 0 uses keyframe 0 alone
    assert slots[:4].tolist() == [[0, 0]] * 4 and w[:4].tolist() == [1.0] * 4
    # batch 1 blends keyframe 1 with keyframe 0; centres are 6 and 2
    assert slots[4:8].tolist() == [[1, 0]] * 4
    for f in range(4, 8):
        d1, d2 = abs(f - 6), abs(f - 2)
        assert math.isclose(w[f].item(), 1 / (1 + math.exp(-d2 / (d1 + d2))), rel_tol=1e-6)
    assert slots[8:].tolist() == [[2, 1]] * 4
    # the sigmoid keeps the current keyframe's weight in [0.5, 0.73]
    assert 0.5 <= w[4:].min() and w[4:].max() <= 0.7311


def test_original_plan_ignores_keyframe_positions():
    frames = torch.arange(8)
    a = propagation_plan(frames, torch.tensor([0, 4]), 4, "original")
    b = propagation_plan(frames, torch.tensor([3, 7]), 4, "original")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_paper_plan_uses_neighbouring_keyframes_by_distance():
    frames = torch.arange(12)
    slots, w = propagation_plan(frames, torch.tensor([2, 6, 9]), batch_size=4, policy="paper")
    # before the first keyframe and after the last: one keyframe with weight 1
    assert slots[0].tolist() == [0, 0] and w[0] == 1
    assert slots[11].tolist() == [2, 2] and w[11] == 1
    # a keyframe takes its own output
    assert slots[6].tolist()[0] == 1 and w[6] == 1
    # frame 4 lies halfway between keyframes 2 and 6; frame 8 is 1/3 from 9 and 2/3 from 6
    assert slots[4].tolist() == [0, 1] and math.isclose(w[4].item(), 0.5)
    assert slots[8].tolist() == [1, 2] and math.isclose(w[8].item(), 1 / 3, rel_tol=1e-6)


def test_cosine_nearest_neighbours_recovers_a_permutation_and_ignores_scale():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(50, 16, generator=g)
    perm = torch.randperm(50, generator=g)
    queries = (keys[perm] * torch.rand(50, 1, generator=g).add(0.5)).unsqueeze(0)  # (1, 50, 16)
    nn = cosine_nearest_neighbours(queries, keys)
    assert torch.equal(nn[0], perm)


def test_chunked_nearest_neighbours_equal_unchunked():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 30, 8, generator=g), torch.randn(30, 8, generator=g)
    assert torch.equal(cosine_nearest_neighbours(q, k), cosine_nearest_neighbours(q, k, max_elements=30))


def test_nearest_keyframe_tokens_per_slot():
    g = torch.Generator().manual_seed(2)
    keyframe_tokens = torch.randn(3, 20, 8, generator=g)
    # frame 0 is a copy of keyframe 2, frame 1 a copy of keyframe 0 with its tokens reversed
    source = torch.stack([keyframe_tokens[2], keyframe_tokens[0].flip(0)])
    slots = torch.tensor([[2, 2], [0, 1]])
    nn = nearest_keyframe_tokens(source, keyframe_tokens, slots)
    assert nn[0, 0].tolist() == list(range(20)) and nn[0, 1].tolist() == list(range(20))
    assert nn[1, 0].tolist() == list(range(19, -1, -1))
    assert torch.equal(nn[1, 1], cosine_nearest_neighbours(source[1:], keyframe_tokens[1])[0])


def test_gather_blend_by_hand():
    out = torch.arange(2 * 2 * 3 * 1, dtype=torch.float32).view(2, 2, 3, 1)  # (B=2, K=2, L=3, D=1)
    slots = torch.tensor([[0, 1]])
    nn = torch.tensor([[[2, 0, 1], [0, 0, 0]]])
    w = torch.tensor([0.25])
    got = gather_blend(out, slots, nn, w)
    # branch 0: keyframe 0 is [0,1,2], keyframe 1 is [3,4,5]
    expected0 = 0.25 * torch.tensor([2.0, 0, 1]) + 0.75 * torch.tensor([3.0, 3, 3])
    assert torch.allclose(got[0, 0, :, 0], expected0)
    assert torch.allclose(got[1, 0, :, 0], expected0 + 6)
    # weight 1 takes the first slot exactly
    assert torch.equal(gather_blend(out, slots, nn, torch.tensor([1.0]))[0, 0, :, 0], torch.tensor([2.0, 0, 1]))
