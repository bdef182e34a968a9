#!/usr/bin/env python3
"""How far a bfloat16 (or float16) edit drifts from the float32 one, and how long each takes.

    python benchmarks/dtype_drift.py --frames 8 --height 64 --width 64 --steps 4
    python benchmarks/dtype_drift.py --full-size --frames 8 --height 64 --width 64 --steps 4

The same SD-2.1-shaped random model (``--full-size``: the real widths) edits the same frames with the
same settings twice: in float32 and in ``--dtype`` (each inverting in its own dtype, as a run would).
It prints the per-pixel difference of the edited frames on the 0-255 scale (max, mean, and the share
of pixels that differ by more than 8 levels) and both edits' times. ``--kernels`` first times the two
kinds of work the UNet is made of, a square GEMM and a 3x3 convolution, in both dtypes: where the CPU
computes bfloat16 no faster than float32 (AVX512-BF16 without AMX), only memory-bound sizes gain.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tokenflow import EditConfig, TokenFlowPipeline


def time_kernels(other: str) -> dict:
    """GFLOP/s of a 2048x2048 GEMM and of a 3x3 convolution (8x320x16x24, the UNet's first stage at
    192x128) in float32 and ``other``, each the best of 5 after a warm-up."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    x, w = torch.randn(8, 320, 16, 24, generator=g), torch.randn(320, 320, 3, 3, generator=g)
    work = {"gemm": 2 * 2048 ** 3, "conv3x3": 2 * 8 * 320 * 320 * 9 * 16 * 24}
    out = {}
    for name, flops in work.items():
        for dtype in ("float32", other):
            d = getattr(torch, dtype)
            args = (a.to(d), b.to(d)) if name == "gemm" else (x.to(d), w.to(d))
            op = (lambda p, q: p @ q) if name == "gemm" else (lambda p, q: F.conv2d(p, q, padding=1))
            op(*args)
            best = min(_timed(op, *args) for _ in range(5))
            out[f"{name}_{dtype}_gflops"] = round(flops / best / 1e9, 1)
        print(f"{name}: float32 {out[f'{name}_float32_gflops']} GFLOP/s, {other} {out[f'{name}_{other}_gflops']} "
              f"GFLOP/s ({out[f'{name}_{other}_gflops'] / out[f'{name}_float32_gflops']:.2f}x)", flush=True)
    return out


def _timed(op, *args) -> float:
    started = time.perf_counter()
    op(*args)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="time a GEMM and a convolution in both dtypes first")
    parser.add_argument("--json")
    args = parser.parse_args()
    kernels = time_kernels(args.dtype) if args.kernels else {}
    frames = torch.rand(args.frames, 3, args.height, args.width, generator=torch.Generator().manual_seed(0))
    config = EditConfig(prompt="a robot", steps=args.steps, inversion_steps=args.steps, height=args.height,
                        width=args.width, batch_size=args.batch_size)
    results, seconds = {}, {}
    for dtype in ("float32", args.dtype):
        pipe = TokenFlowPipeline.from_tiny(seed=0, full_size=args.full_size, dtype=dtype)
        started = time.perf_counter()
        results[dtype] = pipe.edit(frames, config=config, use_cache=False, progress=False).uint8().astype(int)
        seconds[dtype] = time.perf_counter() - started
        del pipe
    diff = abs(results["float32"] - results[args.dtype])
    figures = {"max": int(diff.max()), "mean": float(diff.mean()), "over_8": float((diff > 8).mean()),
               "seconds": seconds, "kernels": kernels}
    print(f"{args.frames} frames at {args.width}x{args.height}, {args.steps} steps, "
          f"{'full-size' if args.full_size else 'tiny'} model, {torch.get_num_threads()} threads")
    print(f"{args.dtype} vs float32, per pixel on 0-255: max {figures['max']}, mean {figures['mean']:.2f}, "
          f"{100 * figures['over_8']:.2f}% of pixels off by more than 8")
    print(f"edit time: float32 {seconds['float32']:.1f} s, {args.dtype} {seconds[args.dtype]:.1f} s "
          f"({seconds[args.dtype] / seconds['float32']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **figures}, f, indent=1)


if __name__ == "__main__":
    main()
