"""Bounded keyframe attention (``--keyframe-window``): groups and anchors, the attention of a group,
and the edit: a window at least the keyframe count is today's edit bit for bit."""

from __future__ import annotations

import pytest
import torch

from tokenflow import EditConfig
from tokenflow.attention import TokenFlowAttnProcessor, TokenFlowState
from tokenflow.distributed import Group, ShardPlan
from tokenflow.errors import TokenFlowError
from tokenflow.keyframes import n_anchors, window_groups, windowed

from conftest import moving_frames, run_cli
from test_attention import LAYER, _attn, _reference_attention, _tokens


def test_groups_and_anchors_are_what_the_setting_says():
    # 20 keyframes, window 4, 4 anchors: the middles of 4 equal parts; groups: the chunks of 4 without them
    anchors, groups = window_groups(torch.arange(20) * 8 + 3, 4, 4)
    assert anchors == [2, 7, 12, 17]
    assert groups == [[0, 1, 3], [4, 5, 6], [8, 9, 10, 11], [13, 14, 15], [16, 18, 19]]
    # at most the window: one group of every keyframe, no anchor (the exact pass)
    assert window_groups(8, 8, 4) == ([], [list(range(8))])
    assert not windowed(8, 8) and windowed(9, 8) and not windowed(10_000, None)
    assert n_anchors(64) == 8 and n_anchors(3) == 3
    for n in range(2, 60):
        for window in range(1, n):
            for a in {1, n_anchors(window), window}:
                anchors, groups = window_groups(n, window, a)
                assert len(anchors) == a and len(set(anchors)) == a
                for i, p in enumerate(anchors):  # anchor i meets the i-th of a equal parts of the video
                    assert i * n < (p + 1) * a and p * a < (i + 1) * n
                flat = sorted(anchors + [p for g in groups for p in g])
                assert flat == list(range(n))  # every keyframe once
                for g in groups:  # at most the window, inside one chunk of the window (one rank's)
                    assert 0 < len(g) <= window and g == sorted(g) and g[0] // window == g[-1] // window
    with pytest.raises(ValueError):
        window_groups(10, 0, 1)
    with pytest.raises(ValueError):
        window_groups(10, 3, 4)  # more anchors than the window


def test_ranks_own_whole_windows_when_the_pass_is_bounded():
    for n, bs, window, world in [(100, 4, 3, 2), (100, 4, 3, 4), (21, 4, 2, 3), (800, 8, 64, 8), (9, 1, 2, 5)]:
        plans = [Group(r, world).plan(n, bs, window) for r in range(world)]
        assert [f for p in plans for f in p.frames()] == list(range(n))
        units = []
        for p in plans:
            b = p.batches()
            assert p.unit == window and b.start % window == 0 and (b.stop % window == 0 or b.stop == p.n_batches)
            units.append(-(-len(b) // window))
        assert max(units) - min(units) <= 1
        _, groups = window_groups(plans[0].n_batches, window, n_anchors(window))
        assert all(len({p.owner(b) for b in g}) == 1 for g in groups)  # a group never spans ranks
    # at most the window: today's plan, balanced to within one batch
    assert Group(1, 2).plan(64 * 8, 8, 64) == ShardPlan(512, 8, 2, 1)


@pytest.mark.parametrize("split", [False, True])
@torch.no_grad()
def test_a_group_attends_to_its_own_and_the_anchors_keys_and_values(tiny_pipe, split):
    """Anchors' call keeps their keys/values; a group's queries attend to its own + the anchors' (explicit
    softmax over the concatenation), the source branch per frame; one call or one call per branch."""
    attn = _attn(tiny_pipe)
    dim = attn.to_q.in_features
    n_anchor, n_group = 2, 3
    anchors_in = _tokens(3 * n_anchor, dim=dim, seed=5)
    group_in = _tokens(3 * n_group, dim=dim, seed=6)
    state = TokenFlowState(mode="keyframe")
    proc = TokenFlowAttnProcessor(LAYER, state)

    def call(x, frames):
        if not split:
            return proc(attn, x)
        out = []
        for branch in range(3):
            with state.during(keyframe_branch=branch):
                out.append(proc(attn, x[branch * frames:(branch + 1) * frames]))
        return torch.cat(out)

    with state.during(anchor_role="keep"):
        anchors_out = call(anchors_in, n_anchor)
    assert sorted(state.caches.anchors) == [(LAYER, 1), (LAYER, 2)]
    with state.during(anchor_role="use"):
        out = call(group_in, n_group)
    for branch in range(3):
        g = group_in[branch * n_group:(branch + 1) * n_group]
        a = anchors_in[branch * n_anchor:(branch + 1) * n_anchor]
        rows = slice(branch * n_group, (branch + 1) * n_group)
        if branch == 0:  # the source: per frame
            want = _reference_attention(attn, g, g)
        else:
            kv = torch.cat([g.reshape(-1, dim), a.reshape(-1, dim)])[None].expand(n_group, -1, -1)
            want = _reference_attention(attn, g, kv)
        torch.testing.assert_close(out[rows], want, rtol=1e-5, atol=1e-6)
        # the anchors themselves: extended attention among the anchors only
        rows_a = slice(branch * n_anchor, (branch + 1) * n_anchor)
        kv_a = a if branch == 0 else a.reshape(1, -1, dim).expand(n_anchor, -1, -1)
        torch.testing.assert_close(anchors_out[rows_a], _reference_attention(attn, a, kv_a), rtol=1e-5, atol=1e-6)
    cache = state.caches.layers[LAYER]  # the group's own cache: its source tokens and outputs
    assert torch.equal(cache.source_tokens, group_in[:n_group])
    torch.testing.assert_close(cache.outputs.reshape(-1, *out.shape[1:]), out)


def _video(n):
    return torch.from_numpy(moving_frames(n, 32, 48)).permute(0, 3, 1, 2).float() / 255


BASE = dict(prompt="a robot", steps=2, inversion_steps=2, height=32, width=48, batch_size=2, seed=3,
            editor="pnp", propagation="paper")


def test_a_window_at_least_the_keyframe_count_is_todays_edit_bit_for_bit(tiny_pipe):
    video = _video(10)  # 5 keyframes per step

    exact = tiny_pipe.edit(video, config=EditConfig(**BASE, keyframe_window=None), use_cache=False,
                           progress=False, return_latents=True)

    def edit(window):  # the same inversion
        return tiny_pipe.edit(video, config=EditConfig(**BASE, keyframe_window=window), inversion=exact.inversion,
                              progress=False, return_latents=True)

    at_count = edit(5)  # (the default, 64, takes the same path: see the settings test)
    assert at_count.keyframes == exact.keyframes
    assert all(torch.equal(a, b) for a, b in zip(at_count.latents, exact.latents))
    assert torch.equal(at_count.frames, exact.frames)
    bounded = edit(2)  # 2 anchors, groups of at most 2: another result, of the same kind
    assert bounded.keyframes == exact.keyframes and bounded.frames.shape == exact.frames.shape
    assert torch.isfinite(bounded.latents[-1]).all()
    assert not torch.equal(bounded.latents[-1], exact.latents[-1])


def test_keyframe_window_setting_is_checked(capsys, tmp_path):
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(TokenFlowError, match="keyframe-window must be an integer"):
            EditConfig(keyframe_window=bad).validate()
    assert EditConfig(keyframe_window=None).validate().keyframe_window is None
    from tokenflow.cli import build_parser, resolve_settings

    parse = build_parser().parse_args
    assert resolve_settings(parse(["edit", "x.mp4", "-p", "a"]))[0].keyframe_window == 64
    assert resolve_settings(parse(["edit", "x.mp4", "-p", "a", "--keyframe-window", "16"]))[0].keyframe_window == 16
    assert resolve_settings(parse(["edit", "x.mp4", "-p", "a", "--keyframe-window", "all"]))[0].keyframe_window is None
    settings = tmp_path / "s.yaml"
    settings.write_text("keyframe-window: 12\n")
    assert resolve_settings(parse(["edit", "x.mp4", "-p", "a", "--config", str(settings)]))[0].keyframe_window == 12
    from tokenflow.batch import load_jobs

    (tmp_path / "in.mp4").write_bytes(b"")
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"defaults: {{keyframe-window: 32}}\njobs:\n- {{input: {tmp_path / 'in.mp4'}, prompt: a}}\n"
                    f"- {{input: {tmp_path / 'in.mp4'}, prompt: b, keyframe_window: null, output: {tmp_path / 'b.mp4'}}}\n")
    assert [j.config.keyframe_window for j in load_jobs(str(jobs))] == [32, None]
    jobs.write_text(f"jobs:\n- {{input: {tmp_path / 'in.mp4'}, prompt: a, keyframe_window: 0}}\n")
    with pytest.raises(TokenFlowError, match="job 1: keyframe-window must be an integer"):
        load_jobs(str(jobs))
    code, _, err = run_cli(capsys, "edit", "x.mp4", "-p", "a", "--keyframe-window", "0")
    assert code == 2 and "--keyframe-window" in err and "positive integer or 'all'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_window_that_does_not_bound_the_edit_keeps_the_resume_key():
    """W at least the keyframe count is the exact pass bit for bit (tested above), so a run interrupted with
    the default W and resumed with `--keyframe-window all` (or another such W) finds its checkpoint; a W that
    bounds the pass is another edit."""
    from tokenflow.checkpoints import edit_key

    def key(n_frames, **settings):
        config = EditConfig(prompt="x", batch_size=4, **settings)
        return edit_key("edit", config, "tiny", torch.float32, torch.device("cpu"), None, n_frames)

    exact = key(16, keyframe_window=None)  # 4 keyframes
    assert key(16, keyframe_window=64) == key(16, keyframe_window=4) == exact
    assert key(16, keyframe_window=3) != exact  # bounded: 4 keyframes > 3
    assert key(17, keyframe_window=4) != key(17, keyframe_window=None)  # 5 keyframes
    # no TokenFlow propagation: no keyframe pass for a window to bound
    assert key(64, propagation="none", keyframe_window=2) == key(64, propagation="none", keyframe_window=None)


# recorded with the bounded pass as it was before it was interleaved with the propagation pass (every
# keyframe's caches held until the propagation pass): tiny model, 37 frames at 32x48, batch 2 (19 keyframes)
BOUNDED_CASES = {"original-w4": dict(propagation="original", keyframe_window=4),
                 "paper-w3": dict(propagation="paper", keyframe_window=3),
                 "paper-w1": dict(propagation="paper", keyframe_window=1),
                 "original-w3-4steps": dict(propagation="original", keyframe_window=3, steps=4, inversion_steps=4)}


def test_the_bounded_pass_holds_a_few_groups_and_gives_the_numbers_of_holding_every_keyframe(tiny_pipe,
                                                                                              monkeypatch):
    """The bounded pass propagates batch by batch as the groups are computed and drops the keyframes no
    batch left reads: one group, the anchors and a few neighbours are held, not the 19 keyframes; the
    final latents are the recorded ones bit for bit (both policies, keyframe reuse, several steps)."""
    import os

    from safetensors.torch import load_file

    from tokenflow import editing

    recorded = load_file(os.path.join(os.path.dirname(__file__), "data", "bounded_reference.safetensors"))
    held, add = [], editing._KeyframeRows.add

    def counting(self, positions, noise):
        add(self, positions, noise)
        held.append(len(self.rows))

    monkeypatch.setattr(editing._KeyframeRows, "add", counting)
    video = _video(37)
    for name, settings in BOUNDED_CASES.items():
        held.clear()
        config = EditConfig(**{**BASE, "editor": "pnp", **settings})
        result = tiny_pipe.edit(video, config=config, use_cache=False, progress=False, return_latents=True)
        assert torch.equal(result.latents[-1], recorded[name]), name
        window = settings["keyframe_window"]
        assert held and max(held) <= window + n_anchors(window) + 3 < 19, (name, max(held))
