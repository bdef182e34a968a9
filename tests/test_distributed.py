"""One edit split across ranks (torch.distributed, gloo on the CPU) equals the one-process edit.

The ranks are real processes (``spawn``) talking over loopback; each runs several edits in a row so
that the start-up (importing torch, building the tiny model) is paid once per launch.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time

import numpy as np
import pytest
import torch

from tokenflow import EditConfig, TokenFlowPipeline
from tokenflow.distributed import Group, ShardPlan

from conftest import moving_frames

FRAMES = 21  # batches of 4: 5 full and one of a single frame; does not split evenly over 2 or 4 ranks
CASES = {  # name -> (settings, frames)
    "pnp-original": (dict(editor="pnp", propagation="original"), FRAMES),
    "pnp-paper": (dict(editor="pnp", propagation="paper"), FRAMES),
    "sdedit-paper": (dict(editor="sdedit", propagation="paper", sdedit_start=1.0, sdedit_noise="random"), FRAMES),
    "sdedit-original": (dict(editor="sdedit", propagation="original", sdedit_start=1.0), FRAMES),
    "split-keyframe-pass": (dict(editor="pnp", propagation="paper"), FRAMES),  # one UNet call per branch
    "more-ranks-than-batches": (dict(editor="pnp", propagation="paper"), 7),  # 2 batches
    # bounded keyframe pass (6 keyframes): W=2, anchors 1 and 4 on either rank, groups [0] [2, 3] [5];
    # W=1 one call per branch: the one anchor (3) on rank 1, rank 0 joins the anchors' collectives with none
    "keyframe-window": (dict(editor="pnp", propagation="paper", keyframe_window=2), FRAMES),
    "keyframe-window-1-split": (dict(editor="sdedit", propagation="original", sdedit_start=1.0,
                                     keyframe_window=1), FRAMES),
    # a long clip with a small window: 60 keyframes, 4 anchors, 15 windows of 4 dealt to the ranks whole;
    # the bounded pass propagates as its groups come and exchanges the boundary keyframes between groups
    "long-clip-window": (dict(editor="pnp", propagation="original", keyframe_window=4), 240),
}
BASE = dict(prompt="a robot", steps=3, inversion_steps=3, height=32, width=48, batch_size=4, seed=3)


def _video(n: int) -> torch.Tensor:
    return torch.from_numpy(moving_frames(n, 32, 48)).permute(0, 3, 1, 2).float() / 255


def _edit(pipe: TokenFlowPipeline, name: str, cache_dir=None):
    settings, n = CASES[name]
    before = pipe.split_keyframe_pass
    pipe.split_keyframe_pass = True if name.endswith("split-keyframe-pass") or name.endswith("-split") else None
    try:
        return pipe.edit(_video(n), config=EditConfig(**BASE, **settings), use_cache=cache_dir is not None,
                         cache_dir=cache_dir, progress=False, return_latents=True)
    finally:  # the session's shared pipeline goes back as it was, for the tests that follow
        pipe.split_keyframe_pass = before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, names: list[str], out_dir: str, fail_rank: int) -> None:
    """One rank: join the group, run the edits, rank 0 saves what it got."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    pipe = TokenFlowPipeline.from_tiny(seed=0).distribute(Group(rank, world))
    record = {}
    try:
        if rank == fail_rank and "fail" in names:  # this rank dies in its second editing step, after the rest
            names = [n for n in names if n != "fail"] + ["fail"]
        if rank == fail_rank:
            from tokenflow import pipeline

            real, calls = pipeline.TokenFlowPipeline.denoise_step, []

            def failing(self, *a, **k):
                calls.append(1)
                if failing.armed and len(calls) == 2:
                    raise RuntimeError("injected failure on this rank")
                return real(self, *a, **k)

            failing.armed = False
            pipeline.TokenFlowPipeline.denoise_step = failing
        if "resume" in names:  # every rank interrupted in step 2, then the same edit again
            from tokenflow import pipeline

            real, calls = pipeline.TokenFlowPipeline.denoise_step, []

            def interrupted(self, *a, **k):
                calls.append(1)
                if len(calls) == 2:
                    raise KeyboardInterrupt
                return real(self, *a, **k)

            config = EditConfig(**{**BASE, "steps": 4, "inversion_steps": 4})
            cache = os.path.join(out_dir, "resume-cache")
            pipeline.TokenFlowPipeline.denoise_step = interrupted
            try:
                pipe.edit(_video(FRAMES), config=config, cache_dir=cache, progress=False, checkpoint=True)
            except KeyboardInterrupt:
                pass
            pipeline.TokenFlowPipeline.denoise_step = real
            result = pipe.edit(_video(FRAMES), config=config, cache_dir=cache, progress=False, checkpoint=True)
            record["resume"] = {"resumed_from": result.resumed_from, "frames": result.frames,
                                "keyframes": result.keyframes}
            names = [name for name in names if name != "resume"]
            # gathering in pieces of 3 rows: 7 and 8 rows, uneven, several collectives
            rows = torch.arange(7 + rank, dtype=torch.float32)[:, None].repeat(1, 2) + 100 * rank
            record["gathered"] = pipe.group.gather_rows(rows, [7, 8], rows_per_call=3)
        for name in names:
            if name == "fail":  # every rank runs it; the failing rank raises in its second step
                if rank == fail_rank:
                    from tokenflow import pipeline

                    calls.clear()
                    pipeline.TokenFlowPipeline.denoise_step.armed = True
                record["started_failing_edit"] = time.time()
                _edit(pipe, "pnp-original")
                continue
            result = _edit(pipe, name, os.path.join(out_dir, "cache") if name == "pnp-paper" else None)
            record[name] = None if result.frames is None else {
                "latents": result.latents, "keyframes": result.keyframes, "frames": result.frames}
            assert (result.frames is None) == (rank != 0)
    except Exception as e:  # the failure test reads what each rank saw and when
        record["error"] = f"{type(e).__name__}: {e}"
        record["when"] = time.time()
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    if "error" not in record:
        from tokenflow.distributed import shutdown

        shutdown(pipe.group)


def _launch(world: int, names: list[str], tmp_path, fail_rank: int = -1, limit: float = 900) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, names, str(tmp_path), fail_rank)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + limit  # guards against a hang only
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} rank(s) still running after {limit} s"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def reference(tiny_pipe):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: another thread count sums in another order
    try:
        return {name: _edit(tiny_pipe, name) for name in CASES}
    finally:
        torch.set_num_threads(threads)


def _assert_same(got: dict, want, name: str) -> None:
    assert got["keyframes"] == want.keyframes, name  # the same keyframes at every step
    assert len(got["latents"]) == len(want.latents)
    # The ranks run the same UNet batches as one process (inversion and VAE batches keep to the video's
    # grid) except in the keyframe pass: K_r keyframes per call, not K. With the same thread count
    # most cases come out bit-identical here; some UNet batch sizes take another convolution algorithm
    # (6e-7 on one UNet output for 3 vs 6 images), which the DDIM steps carry to about 2e-5.
    for a, b in zip(got["latents"], want.latents):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(got["frames"], want.frames, atol=1e-4, rtol=1e-4)


def test_sharding_plan_is_contiguous_balanced_and_covers_every_frame():
    for n, bs, world in [(21, 4, 2), (21, 4, 3), (21, 4, 4), (7, 4, 3), (8, 4, 8), (1, 4, 2), (100, 8, 7)]:
        plans = [ShardPlan(n, bs, world, r) for r in range(world)]
        frames = [f for p in plans for f in p.frames()]
        assert frames == list(range(n))  # contiguous runs in rank order
        batches = [len(p.batches()) for p in plans]
        assert max(batches) - min(batches) <= 1 and sum(batches) == -(-n // bs)
        for p in plans:  # a rank owns whole batches: its frames start at a batch boundary
            assert not len(p.frames()) or p.frames().start % bs == 0
            for policy in ("original", "paper"):
                w = p.window(policy)
                assert set(p.batches()) <= set(w) and len(w) <= len(p.batches()) + (2 if policy == "paper" else 1)


def test_two_ranks_equal_one_process_and_resume(tmp_path, reference, tiny_pipe):
    names = list(CASES)
    ranks = _launch(2, ["resume", *names], tmp_path)
    assert all(ranks[1][name] is None for name in names)  # only rank 0 holds the result
    for name in names:
        _assert_same(ranks[0][name], reference[name], name)
    # the inversion cache holds one entry for the whole video, written by rank 0 from both shares
    from tokenflow.cache import list_entries

    assert len(list_entries(str(tmp_path / "cache"))) == 1
    want_rows = torch.cat([torch.arange(7.0), torch.arange(8.0) + 100])[:, None].repeat(1, 2)
    assert torch.equal(ranks[0]["gathered"], want_rows) and ranks[1]["gathered"] is None
    # every rank interrupted in step 2 resumed from its own checkpoint, to the one-process result
    assert ranks[0]["resume"]["resumed_from"] == 1 and ranks[1]["resume"]["resumed_from"] == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = tiny_pipe.edit(_video(FRAMES), config=EditConfig(**{**BASE, "steps": 4, "inversion_steps": 4}),
                              use_cache=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert ranks[0]["resume"]["keyframes"] == want.keyframes
    torch.testing.assert_close(ranks[0]["resume"]["frames"], want.frames, atol=1e-4, rtol=1e-4)


def test_three_ranks_equal_one_process_and_a_failing_rank_ends_them_all(tmp_path, reference):
    """3 ranks: two edits against one process (one with more ranks than batches), then an edit in which
    rank 1 raises in its second step: every rank stops soon, without waiting for the 60 s timeout."""
    names = ["pnp-original", "more-ranks-than-batches"]
    ranks = _launch(3, [*names, "fail"], tmp_path, fail_rank=1, limit=600)
    for name in names:
        _assert_same(ranks[0][name], reference[name], name)
    assert ranks[1]["error"] == "RuntimeError: injected failure on this rank"
    for r in (0, 2):  # the peer's closed connection ends their collectives
        assert "error" in ranks[r], ranks[r]
        assert ranks[r]["when"] - ranks[r]["started_failing_edit"] < 45, ranks[r]


def _torchrun(tmp_path, *argv, ranks: int = 2):
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENFLOW_DIST_TIMEOUT": "120"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(ranks), "-m", "tokenflow", *map(str, argv)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)


def test_torchrun_edit_writes_what_one_process_writes(tmp_path, capsys):
    from PIL import Image

    from conftest import run_cli, write_clip
    from tokenflow.cache import list_entries

    clip = write_clip(tmp_path / "clip.mp4", moving_frames(10, 32, 48), audio=True)
    common = ["-p", "a robot", "--model", "tiny", "--steps", "2", "--inversion-steps", "4", "--height", "32",
              "--width", "48", "--batch-size", "4", "-q"]
    proc = _torchrun(tmp_path, "edit", clip, *common, "-o", tmp_path / "two.mp4", "--frames-dir", tmp_path / "two",
                     "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("edited 10 frames") == 1  # rank 0 reports
    assert (tmp_path / "two.mp4").exists() and (tmp_path / "two.yaml").exists()
    assert len(list_entries(str(tmp_path / "cache"))) == 1  # one inversion entry for the whole video
    assert not (tmp_path / "cache" / "checkpoints").exists()  # every rank's checkpoints removed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_cli(capsys, "edit", clip, *common, "-o", tmp_path / "one.mp4", "--frames-dir",
                               tmp_path / "one", "--no-cache")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two")) and len(names) == 10
    for name in names:
        a = np.asarray(Image.open(tmp_path / "one" / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "two" / name)).astype(int)
        assert np.abs(a - b).max() <= 1, name  # at most one 8-bit level of float rounding


def test_torchrun_edit_with_bad_input_is_one_line_on_every_rank(tmp_path):
    proc = _torchrun(tmp_path, "edit", tmp_path / "missing.mp4", "-p", "x", "--model", "tiny", "-q")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tokenflow: error:")]
    # each rank that gets to report says the same one line (torchrun stops the other rank once the
    # first exits, so a slower rank may be ended before it reports: then it says nothing else)
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1 and "missing.mp4" in lines[0], proc.stderr[-2000:]
    assert "exitcode: 2" in proc.stderr  # as torchrun reports the ranks' exits (its own traceback follows)
    assert "tokenflow/" not in proc.stderr  # no traceback through our code



def test_rank_environment_of_a_plain_run_is_checked_and_every_wait_is_bounded(tmp_path, capsys, monkeypatch):
    """RANK/WORLD_SIZE/LOCAL_RANK set by hand (not torchrun): bad values and a missing MASTER_ADDR are one
    line and exit 2 before the model loads; a rank whose peers never come gives up after the timeout."""
    import subprocess
    import sys

    from conftest import run_cli, write_clip
    from test_reliability import one_error_line
    from tokenflow import runs

    monkeypatch.setattr(runs, "load_pipeline", lambda run: pytest.fail("the model loaded before the check"))
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(3, 32, 48))
    edit = ["edit", clip, "-p", "x", "--model", "tiny", "-o", tmp_path / "o.mp4", "--steps", "2"]
    master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    cases = [
        ({"RANK": "7", "WORLD_SIZE": "2", **master}, "RANK=7 is out of range for WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1", **master}, "LOCAL_RANK=-1 is out of range"),
        ({"RANK": "one", "WORLD_SIZE": "2", **master}, "RANK must be an integer, got 'one'"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE must be at least 1"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not set: launch with torchrun"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"}, "MASTER_PORT must be"),
    ]
    for env, needle in cases:
        with monkeypatch.context() as m:
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                m.delenv(name, raising=False)
            for name, value in env.items():
                m.setenv(name, value)
            code, _, err = run_cli(capsys, *edit)
        assert code == 2, (env, err)
        one_error_line(err, needle)
    assert not (tmp_path / "o.mp4").exists()
    # a batch (which starts its process group before any model): out of range, and peers that never come
    (tmp_path / "jobs.yaml").write_text(f"jobs:\n  - {{input: {clip}, prompt: x, model: tiny}}\n")
    env = {**os.environ, "WORLD_SIZE": "2", **master, "TOKENFLOW_DIST_TIMEOUT": "3"}
    for rank, needle in (("7", "RANK=7 is out of range"), ("0", "rank 0 of 2 could not join the other ranks")):
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "tokenflow", "batch", "jobs.yaml", "-q"], cwd=tmp_path,
                              env={**env, "RANK": rank}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        one_error_line(proc.stderr, needle)
        assert time.monotonic() - started < 60
