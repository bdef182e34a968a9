#!/usr/bin/env python3
"""Several prompts in one run against one run per prompt: UNet image-forwards and time, side by side.

    python benchmarks/prompts.py --prompts 3 --frames 16 --height 64 --width 64 --steps 10
    python benchmarks/prompts.py --prompts 3 --full-size --frames 8 --height 64 --width 64 --steps 4

Both sides edit the same frames with the same settings from the same inversion (computed once first,
as the inversion cache gives every run after the first), on an SD-2.1-shaped model with random
weights built in code (``--full-size``: the real widths). One run per prompt is ``edit(prompt)`` P
times; one run for all is ``edit(prompts=[...])``. The order alternates over ``--repeats`` rounds
and the best time of each side is kept. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from tokenflow import EditConfig, TokenFlowPipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import count_forwards  # noqa: E402

PROMPTS = ["a robot", "a marble statue", "a watercolor painting", "a bronze sculpture", "a lego model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    prompts = PROMPTS[:args.prompts]
    pipe = TokenFlowPipeline.from_tiny(seed=0, full_size=args.full_size)
    config = EditConfig(steps=args.steps, inversion_steps=args.steps, height=args.height, width=args.width,
                        batch_size=args.batch_size)
    frames = torch.rand(args.frames, 3, args.height, args.width, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    inversion = pipe.invert(frames, "", args.steps, args.steps, use_cache=False, progress=False)
    inversion_s = time.perf_counter() - started

    forwards = count_forwards(pipe)

    def separate():
        for p in prompts:
            pipe.edit(frames, p, config=config, inversion=inversion, progress=False)

    def together():
        pipe.edit(frames, config=config, prompts=prompts, inversion=inversion, progress=False)

    best = {"separate": float("inf"), "together": float("inf")}
    counts = {}
    for round_ in range(args.repeats):
        for name, run in ((("separate", separate), ("together", together)) if round_ % 2 == 0 else
                          (("together", together), ("separate", separate))):
            forwards["n"] = 0
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
            counts[name] = forwards["n"]
    ratio = best["together"] / best["separate"]
    # end to end as a user runs it: P commands (inversion once, then cached) against one command
    e2e = (best["together"] + inversion_s) / (best["separate"] + inversion_s)
    print(f"{len(prompts)} prompts, {args.frames} frames at {args.width}x{args.height}, batch {args.batch_size}, "
          f"{args.steps} steps, {'full-size' if args.full_size else 'tiny'} model, "
          f"{torch.get_num_threads()} threads")
    print(f"UNet image-forwards: one run per prompt {counts['separate']}, one run for all {counts['together']} "
          f"({counts['together'] / counts['separate']:.3f})")
    print(f"editing time: one run per prompt {best['separate']:.1f} s, one run for all {best['together']:.1f} s "
          f"-> {ratio:.3f}; with the inversion ({inversion_s:.1f} s, once either way) {e2e:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds": best, "forwards": counts, "inversion_s": inversion_s,
                       "ratio": ratio, "ratio_with_inversion": e2e}, f, indent=1)


if __name__ == "__main__":
    main()
