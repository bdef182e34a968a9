"""tokenflow batch: many edits from one YAML file, alone and dealt to ranks under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import moving_frames, run_cli, write_clip
from test_reliability import one_error_line


def jobs_file(tmp_path, model_dir, jobs, **defaults):
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"model": str(model_dir), "steps": 2, "height": 32, "width": 48, "cache_dir": str(tmp_path / "cache"),
                                                 **defaults},
                                    "jobs": jobs}))
    return path


def test_batch_runs_jobs_shares_inversions_isolates_failures_and_resumes(tmp_path, capsys, tiny_model_dir):
    clip = write_clip(tmp_path / "wolf.mp4", moving_frames(4, 32, 48))
    other = write_clip(tmp_path / "other.mp4", moving_frames(3, 32, 48, seed=1))
    out = tmp_path / "out"
    out.mkdir()
    path = jobs_file(tmp_path, tiny_model_dir, [
        {"input": clip, "prompt": "a robot wolf", "output": str(out / "robot.mp4")},
        {"input": clip, "prompt": "a marble wolf", "output": str(out / "marble.mp4"), "seed": 3,
         "frames-dir": str(out / "marble")},
        {"input": str(tmp_path / "missing.mp4"), "prompt": "x", "output": str(out / "missing.mp4")},
        {"input": other, "prompt": "a cat", "output": str(out / "cat.mp4"), "steps": 3},
    ])
    code, stdout, err = run_cli(capsys, "batch", path, "--json", tmp_path / "r.json", "-q")
    assert code == 1, err  # one job failed; the others ran
    assert "job 3 (missing.mp4) failed: input" in err and "does not exist" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["status"] for r in report["results"]] == ["done", "done", "failed", "done"]
    assert all(set(r) == {"job", "input", "output", "rank", "seconds", "status", "error"} for r in report["results"])
    assert "4 jobs: 3 done, 0 skipped, 1 failed" in stdout
    assert sorted(os.listdir(out)) == ["cat.mp4", "cat.yaml", "marble", "marble.mp4", "marble.yaml", "robot.mp4",
                                       "robot.yaml"]
    # the two jobs on wolf.mp4 shared one inversion; cat.mp4 has its own (steps 3: inversion steps chosen)
    entries = [e for e in os.listdir(tmp_path / "cache") if e != "checkpoints"]
    assert len(entries) == 2
    assert yaml.safe_load((out / "cat.yaml").read_text())["inversion_steps"] == 102
    # a rerun skips the finished jobs; a changed setting redoes its job
    marble = np.asarray(Image.open(out / "marble" / "00000.png"))
    code, stdout, _ = run_cli(capsys, "batch", path, "-q")
    assert code == 1 and "4 jobs: 0 done, 3 skipped, 1 failed" in stdout
    assert np.array_equal(marble, np.asarray(Image.open(out / "marble" / "00000.png")))
    data = yaml.safe_load(path.read_text())
    data["jobs"] = data["jobs"][:2]
    data["jobs"][0]["seed"] = 9
    path.write_text(yaml.safe_dump(data))
    code, stdout, _ = run_cli(capsys, "batch", path, "-q")
    assert code == 0 and "2 jobs: 1 done, 1 skipped, 0 failed" in stdout


def test_batch_settings_are_checked_before_any_work(tmp_path, capsys, tiny_model_dir):
    clip = write_clip(tmp_path / "a.mp4", moving_frames(3, 32, 48))
    cases = [
        ([{"input": clip, "prompt": "x", "output": str(tmp_path / "1.mp4")},
          {"input": clip, "prompt": "x", "stepz": 3}], "job 2: unknown key(s) stepz"),
        ([{"input": clip, "prompt": "x", "steps": 0}], "job 1: steps must be"),
        ([{"input": clip, "prompt": "x", "output": 12}], "job 1: output must be text"),
        ([{"input": clip}], "job 1: no prompt"),
        ([{"input": clip, "prompt": "x", "output": "o.mp4"}, {"input": clip, "prompt": "y", "output": "o.mp4"}],
         "job 2 (a.mp4): output 'o.mp4' is also job 1 (a.mp4)'s output"),
    ]
    for jobs, needle in cases:
        code, _, err = run_cli(capsys, "batch", jobs_file(tmp_path, tiny_model_dir, jobs))
        assert code == 2, err
        one_error_line(err, needle)
        assert not (tmp_path / "1.mp4").exists()
    (tmp_path / "bad.yaml").write_text("jobs: []\n")
    code, _, err = run_cli(capsys, "batch", tmp_path / "bad.yaml")
    assert code == 2 and "non-empty 'jobs:' list" in err


def test_batch_jobs_are_checked_against_each_other_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                                          tiny_model_dir):
    from tokenflow import runs

    monkeypatch.setattr(runs, "load_pipeline", lambda run: pytest.fail("the model loaded before the check"))
    wolf = write_clip(tmp_path / "wolf.mp4", moving_frames(3, 32, 48))
    cat = write_clip(tmp_path / "cat.mp4", moving_frames(3, 32, 48, seed=1))
    before = {p: open(p, "rb").read() for p in (wolf, cat)}
    out = tmp_path / "out"
    out.mkdir()
    cases = [  # (jobs, what the one line says)
        ([{"input": wolf, "prompt": "a robot", "output": cat},  # job 1 would overwrite job 2's video
          {"input": cat, "prompt": "a tiger"}],
         ["job 1 (wolf.mp4): output", "is job 2 (cat.mp4)'s input"]),
        ([{"input": wolf, "prompt": "a", "output": str(out / "a.mp4"), "frames_dir": str(out / "frames")},
          {"input": cat, "prompt": "b", "output": str(out / "b.mp4"), "frames-dir": str(out / "frames")}],
         ["job 2 (cat.mp4): frames folder", "is also job 1 (wolf.mp4)'s frames folder"]),
        ([{"input": wolf, "prompt": "a", "output": str(out / "a.mp4")},
          {"input": cat, "prompt": "b", "output": str(out / "a.mov")}],
         ["job 2 (cat.mp4): settings file", "a.yaml' is also job 1 (wolf.mp4)'s settings file"]),
        ([{"input": wolf, "prompt": "a", "output": str(out / "a.mp4"), "frames_dir": str(out / "f")},
          {"input": cat, "prompt": "b", "output": str(out / "f" / "b.mp4")}],
         ["job 1 (wolf.mp4): frames folder", "holds job 2 (cat.mp4)'s output"]),
        ([{"input": wolf, "prompt": "a", "output": str(out / "a.mp4"), "frames_dir": str(out / "f")},
          {"input": cat, "prompt": "b", "output": str(out / "b.mp4"), "frames_dir": str(out / "f" / "g")}],
         ["job 2 (cat.mp4): frames folder", "lies in job 1 (wolf.mp4)'s frames folder"]),
    ]
    for jobs, needles in cases:
        code, stdout, err = run_cli(capsys, "batch", jobs_file(tmp_path, tiny_model_dir, jobs))
        assert code == 2, err
        one_error_line(err, *needles)
        assert not stdout  # no summary: nothing ran
    assert {p: open(p, "rb").read() for p in (wolf, cat)} == before
    assert os.listdir(out) == [] and not (tmp_path / "cache").exists()


def test_batch_under_torchrun_deals_jobs_to_ranks(tmp_path, tiny_model_dir):
    clips = [write_clip(tmp_path / f"c{i}.mp4", moving_frames(3, 32, 48, seed=i)) for i in range(3)]
    path = jobs_file(tmp_path, tiny_model_dir, [
        {"input": c, "prompt": f"a robot {i}", "output": str(tmp_path / f"o{i}.mp4")} for i, c in enumerate(clips)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "tokenflow", "batch", str(path), "--json", str(tmp_path / "r.json"), "-q"],
                          capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["world_size"] == 2
    assert [(r["job"], r["rank"], r["status"]) for r in report["results"]] == [(1, 0, "done"), (2, 1, "done"),
                                                                              (3, 0, "done")]
    assert proc.stdout.count("3 jobs: 3 done") == 1  # one summary, from rank 0
    assert all((tmp_path / f"o{i}.mp4").exists() for i in range(3))
