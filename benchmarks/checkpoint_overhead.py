#!/usr/bin/env python3
"""What resume checkpoints cost: time spent writing them against the editing steps' time.

    python benchmarks/checkpoint_overhead.py --frames 40 --height 64 --width 64
    python benchmarks/checkpoint_overhead.py --full-size --frames 16 --height 128 --width 192 --steps 10

One edit with checkpoints on (as the command runs it), with the checkpoint writes timed from the
inside: the share of the editing time they took, how many were written, and the size of one. The
interval adapts so that writes stay under 2% of the steps' time; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from tokenflow import EditConfig, TokenFlowPipeline
from tokenflow import checkpoints


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=os.path.join(os.path.dirname(__file__), "..", "src", "tokenflow", "data",
                                                    "demo.mp4"))
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--full-size", action="store_true", help="SD 2.1-base widths (random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the figures as JSON")
    args = ap.parse_args()

    pipe = TokenFlowPipeline.from_tiny(seed=0, device=args.device, full_size=args.full_size)
    config = EditConfig(prompt="a robot", steps=args.steps, inversion_steps=args.steps, max_frames=args.frames,
                        height=args.height, width=args.width, batch_size=args.batch_size)
    saves, sizes = [], []
    real_save = checkpoints.CheckpointStore.save

    def timed_save(self, name, *a, **k):
        started = time.perf_counter()
        path = real_save(self, name, *a, **k)
        if name.startswith("edit-"):
            saves.append(time.perf_counter() - started)
            sizes.append(os.path.getsize(path))
        return path

    checkpoints.CheckpointStore.save = timed_save
    with tempfile.TemporaryDirectory() as cache:
        result = pipe.edit(args.input, config=config, cache_dir=cache, use_cache=False, checkpoint=True,
                           progress=False)
        result.discard_checkpoint()
    editing = result.seconds["editing"]
    figures = {"frames": result.frames.shape[0], "size": list(result.frames.shape[-2:]), "steps": args.steps,
               "editing_s": round(editing, 3), "checkpoints_written": len(saves),
               "checkpoint_write_s_total": round(sum(saves), 4),
               "checkpoint_write_ms_mean": round(1000 * sum(saves) / max(1, len(saves)), 2),
               "checkpoint_mb": round(max(sizes or [0]) / 2 ** 20, 3),
               "overhead_share": round(sum(saves) / editing, 4),
               "device": str(pipe.device), "threads": torch.get_num_threads(),
               "interval_limit": checkpoints.EditCheckpoints.OVERHEAD}
    for k, v in figures.items():
        print(f"{k:>26}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
