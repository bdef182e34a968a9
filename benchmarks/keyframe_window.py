#!/usr/bin/env python3
"""The keyframe pass of long videos, exact against bounded (``--keyframe-window``).

    python benchmarks/keyframe_window.py                                  # formula + measured + difference
    python benchmarks/keyframe_window.py --frames 1000 10000 --no-measure --no-difference

Per video length (frames, at ``--batch-size`` frames per keyframe: K keyframes per step) it gives, for
SD 2.1's widths at ``--height`` x ``--width`` (512x512) and one prompt, for the exact pass (every keyframe
attends to every keyframe) and the bounded one (window W, A anchors):

- keyframe-pass UNet images per call: the largest call, and the calls per step;
- self-attention FLOPs of the keyframe pass per step: ``4 q k L^2 D`` per layer (L tokens, width D) for
  q query frames attending to k key frames (QK^T and AV, a multiply-add = 2 FLOPs), summed over SD 2.1's
  16 self-attention layers: the two edit branches attend across keyframes, the source branch per frame.

**formula**: from K, W and A alone. **measured**: the real keyframe calls (``editing._windowed_step`` with its propagation left out)
runs on the tiny model (at 32x32 pixels) with a counting hook in place of the self-attention
product (it records the query and key frames of every attention call of one layer and returns zeros,
so 100,000 frames fit in seconds); the UNet calls are counted at the model call. The FLOPs column
multiplies the measured frame pairs by SD 2.1's per-layer ``4 L^2 D``. The two must agree.

**difference**: the tiny model's edit (``--diff-frames`` frames, window ``--diff-window``: one keyframe
past the window) bounded against exact, max/mean abs over the output frames (0..1) and the final
latents, with the difference between two keyframe seeds of the exact edit for scale. On random weights
this says nothing about quality; it shows the size of the change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from distributed import self_attention_layers  # noqa: E402  (benchmarks/distributed.py)

from tokenflow.keyframes import DEFAULT_KEYFRAME_WINDOW, n_anchors, window_groups, windowed  # noqa: E402


def sd21_layers(height: int, width: int) -> list[tuple[int, int]]:
    from tokenflow.tiny import FULL_SIZE, UNET_CONFIG

    return self_attention_layers({**UNET_CONFIG, **FULL_SIZE["unet"]}, height, width)


def per_pair_flops(layers: list[tuple[int, int]]) -> int:
    """FLOPs of one query frame attending to one key frame, summed over the layers."""
    return sum(4 * L * L * D for L, D in layers)


def formula(n_frames: int, batch_size: int, window, layers) -> dict:
    """Images per call, calls and attention FLOPs per step of the keyframe pass (one prompt: 3 branches)."""
    k = -(-n_frames // batch_size)
    pair = per_pair_flops(layers)

    def images(frames: int) -> tuple[int, int]:  # (images per call, calls): one per branch past the batch
        return (frames, 3) if frames > batch_size else (3 * frames, 1)

    if not windowed(k, window):
        per_call, calls = images(k)
        pairs = 2 * k * k + k  # two edit branches across all keyframes, the source per frame
    else:
        anchors, groups = window_groups(k, window, n_anchors(window))
        a = len(anchors)
        sizes = [images(a)] + [images(len(g)) for g in groups]
        per_call, calls = max(s for s, _ in sizes), sum(c for _, c in sizes)
        pairs = 2 * (a * a + sum(len(g) * (len(g) + a) for g in groups)) + k
    return {"keyframes": k, "images_per_call": per_call, "calls": calls, "frame_pairs": pairs,
            "attention_flops": pairs * pair}


def measure(n_frames: int, batch_size: int, window, layers, pipe) -> dict:
    """The same figures counted on the tiny model's real keyframe stage (attention product stubbed)."""
    from tokenflow import editing
    from tokenflow.attention import TokenFlowAttnProcessor, TokenFlowState
    from tokenflow.conditioning import PromptEmbeds
    from tokenflow.distributed import Group, ShardPlan
    from tokenflow.injection import tokenflow_hooks
    from tokenflow.keyframes import FixedKeyframes
    from tokenflow.memory import MemoryPlan

    counted = {"pairs": 0, "calls": 0, "max_images": 0}
    first = {}
    real_attend = TokenFlowAttnProcessor.__dict__["_attend"]  # the staticmethod itself

    def counting(attn, q, k, v, n_tokens, frames_per_seq, kv_frames_per_seq=None):
        target = first.setdefault("attn", attn)
        if attn is target:
            seqs = len(q) // frames_per_seq
            counted["pairs"] += seqs * frames_per_seq * (kv_frames_per_seq or frames_per_seq)
        return q.new_zeros(q.shape)

    text = PromptEmbeds.cat([pipe.prompt_embeds(""), pipe.prompt_embeds(""), pipe.prompt_embeds("a robot")])

    def unet(x, source, t, branches=None, frames=None):
        images = (3 if branches is None else len(branches)) * x.shape[1]
        counted["calls"] += 1
        counted["max_images"] = max(counted["max_images"], images)
        return pipe._unet(x, source, t, text, branches, frames)

    h = w = 4  # 32x32 pixels: the counts do not depend on the size
    x = torch.zeros((1, n_frames, 4, h, w))
    source = torch.zeros((n_frames, 4, h, w))
    keyframes = FixedKeyframes()(0, n_frames, batch_size)
    state = TokenFlowState(n_branches=3)
    TokenFlowAttnProcessor._attend = staticmethod(counting)
    propagate_ready = editing._propagate_ready
    started = time.perf_counter()
    try:
        with torch.no_grad(), tokenflow_hooks(pipe.unet, state, pipe.layers):
            step = editing._Step(unet, x, torch.tensor(500), source, keyframes, state, batch_size,
                                 MemoryPlan.from_settings(pipe, pipe.device), ShardPlan(n_frames, batch_size), Group())
            if editing.windowed(len(keyframes), window):  # the keyframe calls of the bounded pass, no propagation
                editing._propagate_ready = lambda step, rows, pending, *rest: (rows.keep(set()), [])[1]
                editing._windowed_step(step, None, 0.0, "original", window, None)
            else:
                editing._keyframe_call(step, list(range(len(keyframes))), [len(keyframes)])
    finally:
        TokenFlowAttnProcessor._attend = real_attend
        editing._propagate_ready = propagate_ready
        state.end_step()
    return {"keyframes": len(keyframes), "images_per_call": counted["max_images"], "calls": counted["calls"],
            "frame_pairs": counted["pairs"], "attention_flops": counted["pairs"] * per_pair_flops(layers),
            "seconds": round(time.perf_counter() - started, 1)}


def difference(pipe, n_frames: int, batch_size: int, window: int, steps: int) -> dict:
    from tokenflow import EditConfig

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from conftest import moving_frames

    video = torch.from_numpy(moving_frames(n_frames, 32, 48)).permute(0, 3, 1, 2).float() / 255
    base = dict(prompt="a robot", steps=steps, inversion_steps=steps, height=32, width=48, batch_size=batch_size,
                seed=3, editor="pnp", propagation="original")
    exact = pipe.edit(video, config=EditConfig(**base, keyframe_window=None), use_cache=False, progress=False,
                      return_latents=True)

    def edit(**changes):
        return pipe.edit(video, config=EditConfig(**{**base, **changes}), inversion=exact.inversion,
                         progress=False, return_latents=True)

    bounded, other_seed = edit(keyframe_window=window), edit(keyframe_window=None, seed=4)

    def gap(a, b) -> dict:
        d = (a - b).abs()
        return {"max_abs": float(d.max()), "mean_abs": float(d.mean())}

    return {"frames": n_frames, "batch_size": batch_size, "keyframes": -(-n_frames // batch_size), "window": window,
            "anchors": n_anchors(window), "steps": steps,
            "bounded_vs_exact": {"frames": gap(bounded.frames, exact.frames),
                                 "latents": gap(bounded.latents[-1], exact.latents[-1])},
            "seed_4_vs_seed_3_exact": {"frames": gap(other_seed.frames, exact.frames),
                                       "latents": gap(other_seed.latents[-1], exact.latents[-1])}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=DEFAULT_KEYFRAME_WINDOW)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--no-measure", action="store_true", help="formula only")
    p.add_argument("--no-difference", action="store_true", help="skip the tiny edits")
    p.add_argument("--diff-window", type=int, default=8)
    p.add_argument("--diff-batch-size", type=int, default=2)
    p.add_argument("--diff-frames", type=int, default=None, help="default: one keyframe past --diff-window")
    p.add_argument("--diff-steps", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    os.environ["TOKENFLOW_CPU_BF16"] = "0"
    layers = sd21_layers(args.height, args.width)
    pipe = None
    if not (args.no_measure and args.no_difference):
        from tokenflow import TokenFlowPipeline

        pipe = TokenFlowPipeline.from_tiny(seed=0)
    rows = []
    print(f"SD 2.1 self-attention at {args.height}x{args.width}: {len(layers)} layers, "
          f"{per_pair_flops(layers) / 1e9:.1f} GFLOP per (query frame, key frame) pair; batch {args.batch_size}, "
          f"window {args.window}, {n_anchors(args.window)} anchors")
    print(f"{'frames':>7} {'K':>6} {'pass':>7} {'how':>8} {'images/call':>11} {'calls':>6} {'attn PFLOP/step':>15}")
    for n in args.frames:
        for name, window in (("exact", None), ("bounded", args.window)):
            row = {"frames": n, "pass": name, "formula": formula(n, args.batch_size, window, layers)}
            if not args.no_measure:
                row["measured"] = measure(n, args.batch_size, window, layers, pipe)
            rows.append(row)
            for how in ("formula", "measured"):
                if how in row:
                    r = row[how]
                    print(f"{n:>7} {r['keyframes']:>6} {name:>7} {how:>8} {r['images_per_call']:>11} {r['calls']:>6} "
                          f"{r['attention_flops'] / 1e15:>15.3f}")
            if "measured" in row:
                same = all(row["measured"][k] == row["formula"][k] for k in row["formula"])
                print(f"{'':>31} measured == formula: {same} ({row['measured']['seconds']} s)")
    out = {"layers": layers, "batch_size": args.batch_size, "window": args.window, "rows": rows}
    if not args.no_difference:
        frames = args.diff_frames or args.diff_batch_size * (args.diff_window + 1)
        out["difference"] = d = difference(pipe, frames, args.diff_batch_size, args.diff_window, args.diff_steps)
        print(f"tiny edit, {d['frames']} frames, {d['keyframes']} keyframes, window {d['window']} "
              f"({d['anchors']} anchors), {d['steps']} steps:")
        for what in ("bounded_vs_exact", "seed_4_vs_seed_3_exact"):
            g = d[what]
            print(f"  {what}: frames max {g['frames']['max_abs']:.4f} mean {g['frames']['mean_abs']:.5f}; "
                  f"latents max {g['latents']['max_abs']:.4f} mean {g['latents']['mean_abs']:.5f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
