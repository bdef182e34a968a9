#!/usr/bin/env python3
"""Peak host memory and time per frame of whole edits as the video grows (issue: any length).

    python benchmarks/long_video.py                         # 100, 200, 400 frames
    python benchmarks/long_video.py --frames 1000 10000     # the long-video targets (hours on 2 CPU cores)

Per length it writes a clip (a random texture scrolling one pixel per frame, ``--size`` square, 12 fps,
encoded a batch at a time), then runs ``tokenflow edit`` on the tiny model (``--steps`` editing and
inversion steps, ``--batch-size``, a fresh inversion cache per length, so the inversion is written to disk
while it runs and the edit reads it back by rows; ``--no-cache``: held in memory) in a fresh process, and
reports that process's peak RSS
(``os.wait4``), its wall time, seconds per frame, and the output's frame count and fps (which must be the
input's). The last columns are the ratios to the first length: the targets are peak RSS at 10,000 frames
at most 1.25x the peak at 1,000, and seconds per frame at most 1.1x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from tokenflow.video import VideoEncoder, probe_video  # noqa: E402


def write_texture_clip(path: str, n: int, size: int, fps: int = 12, batch: int = 64) -> None:
    """A smooth random texture (coarse noise upsampled) scrolling one pixel per frame, never whole in memory."""
    rng = np.random.default_rng(0)
    coarse = rng.random((size // 8 + 1, size // 8 + 1, 3))
    texture = np.kron(coarse, np.ones((8, 8, 1)))[:size, :size]
    texture = (texture * 255).astype(np.uint8)
    with VideoEncoder(path, fps) as encoder:
        for start in range(0, n, batch):
            encoder.write(np.stack([np.roll(texture, i, axis=1) for i in range(start, min(start + batch, n))]))


def run_edit(clip: str, out: str, cache: str, args) -> dict:
    command = [sys.executable, "-m", "tokenflow", "edit", clip, "-p", "a marble texture", "--model", "tiny",
               "--steps", str(args.steps), "--inversion-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--height", str(args.size), "--width", str(args.size), "-q", "-o", out,
               *(["--no-cache"] if args.no_cache else ["--cache-dir", cache])]
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the edit failed: {err.strip()[-500:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-cache", action="store_true", help="edit with --no-cache (the inversion in memory)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.frames:
            clip, out = os.path.join(tmp, f"clip{n}.mp4"), os.path.join(tmp, f"out{n}.mp4")
            write_texture_clip(clip, n, args.size)
            row = {"frames": n, **run_edit(clip, out, os.path.join(tmp, f"cache{n}"), args)}
            info = probe_video(out)
            row.update(out_frames=info.n_frames, out_fps=float(info.fps), s_per_frame=row["seconds"] / n)
            rows.append(row)
            first = rows[0]
            print(f"{n:>7} frames: peak RSS {row['peak_rss_mb']:8.0f} MB ({row['peak_rss_mb'] / first['peak_rss_mb']:.2f}x), "
                  f"{row['seconds']:8.1f} s, {row['s_per_frame']:.3f} s/frame "
                  f"({row['s_per_frame'] / first['s_per_frame']:.2f}x); output {row['out_frames']} frames at "
                  f"{row['out_fps']:g} fps", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
