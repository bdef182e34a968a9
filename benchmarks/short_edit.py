#!/usr/bin/env python3
"""A short edit's wall time against another checkout's, side by side (issue: any length: "a 40-frame edit
no slower than today").

    git worktree add /tmp/before 8f1ac75
    python benchmarks/short_edit.py --other /tmp/before/src      # 40 frames, a cache miss then a hit, 3 rounds

Per round, each checkout runs ``tokenflow edit`` on the tiny model in a fresh process twice with one fresh
cache folder: the first run inverts and writes the cache, the second reads it (a hit). The checkouts
alternate within a round, so a load on the machine falls on both. Reports the median wall time of each
kind of run for both and their ratio (this checkout / the other).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from long_video import write_texture_clip  # noqa: E402


def timed_edit(src: str, clip: str, out: str, cache: str, args) -> float:
    command = [sys.executable, "-m", "tokenflow", "edit", clip, "-p", "a marble texture", "--model", "tiny",
               "--steps", str(args.steps), "--inversion-steps", str(args.steps), "--batch-size", "8",
               "--height", str(args.size), "--width", str(args.size), "-q", "-o", out, "--cache-dir", cache]
    started = time.perf_counter()
    subprocess.run(command, env={**os.environ, "PYTHONPATH": src}, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="the other checkout's src folder")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sources = {"this": os.path.join(HERE, "..", "src"), "other": args.other}
    times = {(name, kind): [] for name in sources for kind in ("miss", "hit")}
    with tempfile.TemporaryDirectory() as tmp:
        clip = os.path.join(tmp, "clip.mp4")
        write_texture_clip(clip, args.frames, args.size)
        for r in range(args.rounds):
            for name, src in sources.items():
                cache = os.path.join(tmp, f"cache-{name}-{r}")
                for kind in ("miss", "hit"):
                    times[name, kind].append(timed_edit(src, clip, os.path.join(tmp, f"{name}.mp4"), cache, args))
    for kind in ("miss", "hit"):
        mine, other = (statistics.median(times[n, kind]) for n in ("this", "other"))
        print(f"{args.frames} frames, cache {kind}: this {mine:.2f} s, other {other:.2f} s, "
              f"ratio {mine / other:.3f} (runs: this {[round(t, 2) for t in times['this', kind]]}, "
              f"other {[round(t, 2) for t in times['other', kind]]})")


if __name__ == "__main__":
    main()
