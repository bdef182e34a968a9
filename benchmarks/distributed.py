#!/usr/bin/env python3
"""One edit split across 1, 2, 4 ... ranks: per-rank UNet image-forwards, bytes sent, peak memory.

    python benchmarks/distributed.py --ranks 1 2 4 --frames 40 --batch-size 8 --height 64 --width 64
    python benchmarks/distributed.py --ranks 1 2 --full-size --frames 16 --height 128 --width 128 --steps 2

Each world size is a real launch: that many processes on this machine, ``gloo`` over loopback,
each with one thread (``--device cuda`` with ``nccl`` on a machine with that many GPUs). The model
is the tiny SD-2.1-shaped one built in code (``--full-size``: the real widths). Per rank it reports:

- UNet image-forwards per editing step (keyframe pass and propagation pass) and in the inversion;
- bytes this rank put into collectives per editing step (keyframe K/V all-gathers, boundary caches,
  the keyframe check), measured by the group, and the same figure from the formula below;
- peak memory of the edit, and how much of it is above the loaded model: the RSS high-water mark
  (reset after the model is loaded and the text encoder freed, as ``bench.py`` does), or
  ``torch.cuda.max_memory_allocated`` on a GPU;
- the editing wall time, and the work balance (max / mean editing forwards over the ranks).

It then prints the formula's figures for SD-2.1-base at 512x512 on 8 ranks and 120 frames. Nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def self_attention_layers(unet_config: dict, height: int, width: int) -> list[tuple[int, int]]:
    """(tokens L, width D) of every self-attention layer of an SD-2.x-shaped UNet at this image size."""
    layers = []
    channels = unet_config["block_out_channels"]
    per_block = unet_config["layers_per_block"]
    h, w = height // 8, width // 8
    down, up = unet_config["down_block_types"], unet_config["up_block_types"]
    for i, kind in enumerate(down):
        if "CrossAttn" in kind:
            layers += [(h * w >> (2 * i), channels[i])] * per_block
    layers.append((h * w >> (2 * (len(down) - 1)), channels[-1]))  # mid block
    for i, kind in enumerate(up):
        level = len(up) - 1 - i
        if "CrossAttn" in kind:
            layers += [(h * w >> (2 * level), channels[level])] * (per_block + 1)
    return layers


def qk_layers(unet_config: dict, height: int, width: int) -> set[int]:
    """Indices (into :func:`self_attention_layers`) of the decoder layers that take PnP's Q/K injection:
    every decoder self-attention layer but that of the first decoder attention block (one transformer
    layer per block in SD 1.x/2.x; see ``injection.resolve_layers``)."""
    layers = self_attention_layers(unet_config, height, width)
    per_block = unet_config["layers_per_block"]
    n_encoder = sum(per_block for k in unet_config["down_block_types"] if "CrossAttn" in k) + 1  # + mid
    return set(range(n_encoder + 1, len(layers)))


def bytes_per_step(unet_config: dict, height: int, width: int, n_frames: int, batch_size: int, world: int,
                   element: int, qk_share: float, policy: str = "paper") -> list[int]:
    """Bytes each rank sends per editing step (the formula).

    Keyframe pass, every self-attention layer (L tokens, width D): one all-gather of the edit branches'
    keys and values over max_r K_r padded rows; under Q/K injection the two edit branches share the
    source's keys, so 3 rows of L*D per keyframe travel instead of 4. ``qk_share``: the fraction of the
    steps with Q/K injection (PnP's ``pnp_attn_t``). Propagation: each boundary keyframe a neighbour
    reads travels once, with every layer's source tokens and three branch outputs (4 L*D). Plus the
    8-byte keyframe check. On one rank nothing is sent.
    """
    if world == 1:
        return [0]
    from tokenflow.distributed import ShardPlan

    layers = self_attention_layers(unet_config, height, width)
    qk = qk_layers(unet_config, height, width)
    plans = [ShardPlan(n_frames, batch_size, world, r) for r in range(world)]
    k_max = max(plans[0].keyframe_counts())
    gather = 0.0
    for i, (tokens, dim) in enumerate(layers):
        rows = (qk_share * 3 + (1 - qk_share) * 4) if i in qk else 4
        gather += rows * k_max * tokens * dim * element
    cache = sum(4 * tokens * dim * element for tokens, dim in layers)
    sent = []
    for r, plan in enumerate(plans):
        boundary = sum(1 for q in range(world) if q != r for b in plan.window(policy, q) if b in plan.batches())
        sent.append(int(gather + boundary * cache + 8))
    return sent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    from tokenflow import EditConfig, TokenFlowPipeline
    from tokenflow.distributed import Group

    sys.path.insert(0, HERE)
    from bench import count_forwards, memory_mb, peak_memory_mb, reset_peak_memory

    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    pipe = TokenFlowPipeline.from_tiny(seed=0, device=str(device), full_size=args.full_size)
    pipe.distribute(Group(rank, world, device if device.type == "cuda" else None))
    config = EditConfig(prompt="a robot", steps=args.steps, inversion_steps=args.steps, height=args.height,
                        width=args.width, batch_size=args.batch_size, propagation=args.policy)
    pipe.release_text_encoders([config.inversion_prompt, config.negative_prompt, config.prompt])
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(args.frames, 3, args.height, args.width, generator=g)

    forwards = count_forwards(pipe)
    marks = []  # (forwards, bytes, time) after every editing step

    def callback(stage, step, total):
        if stage == "editing":
            marks.append((forwards["n"], pipe.group.bytes_sent, time.perf_counter()))

    if device.type == "cuda":
        torch.cuda.set_device(device)
    loaded = memory_mb(device)  # the model, after the text encoder is freed
    reset_peak_memory(device)
    started = time.perf_counter()
    inverted = {"n": None}
    real_invert = pipe.invert

    def invert(*a, **k):
        result = real_invert(*a, **k)
        inverted["n"] = forwards["n"]
        return result

    pipe.invert = invert
    pipe.edit(frames, config=config, use_cache=False, progress=False, callback=callback)
    seconds = time.perf_counter() - started
    peak = peak_memory_mb(device)
    steps = len(marks) - 1  # per-step figures from step 1 to the last: the same every step
    record = {"rank": rank, "world": world, "frames": len(pipe.group.plan(args.frames, args.batch_size).frames()),
              "inversion_forwards": inverted["n"],
              "edit_forwards_per_step": (marks[-1][0] - marks[0][0]) / max(steps, 1),
              "bytes_per_step": (marks[-1][1] - marks[0][1]) / max(steps, 1),
              "seconds_per_step": (marks[-1][2] - marks[0][2]) / max(steps, 1),
              "seconds": seconds, "peak_mb": peak, "loaded_mb": loaded,
              "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in pipe.unet.config.items()
                              if k in ("block_out_channels", "layers_per_block", "down_block_types",
                                       "up_block_types")}}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    from tokenflow.distributed import shutdown

    shutdown(pipe.group)


def launch(world: int, args: argparse.Namespace) -> list[dict]:
    out = tempfile.mkdtemp(prefix="tf-dist-")
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        sys.exit(f"a rank failed (exit codes {[p.exitcode for p in procs]})")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--policy", default="paper", choices=["paper", "original"])
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json")
    args = parser.parse_args()
    element = 4  # float32 on the CPU; the formula below also gives float16 (2 bytes)
    from tokenflow import EditConfig
    from tokenflow.editors import EDITORS

    editor = EDITORS["pnp"](EditConfig(prompt="x", steps=args.steps))
    # the steps measured are 2..N (step 1 is the baseline): the share of them with Q/K injection
    measured = range(1, args.steps)
    qk_share = sum(editor.injection(i, args.steps)[0] for i in measured) / max(len(measured), 1)
    results = {}
    print(f"{args.frames} frames at {args.width}x{args.height}, batch {args.batch_size}, {args.steps} steps, "
          f"{args.policy} propagation, {'full-size' if args.full_size else 'tiny'} model, {args.device}")
    print("ranks rank frames inv.fwd edit.fwd/step  MB sent/step (formula)  peak MB (above model)  s/step")
    for world in args.ranks:
        records = launch(world, args)
        results[world] = records
        config = records[0]["unet_config"]
        formula = bytes_per_step(config, args.height, args.width, args.frames, args.batch_size, world, element,
                                 qk_share, args.policy)
        for r in records:
            print(f"{world:5d} {r['rank']:4d} {r['frames']:6d} {r['inversion_forwards']:7d} "
                  f"{r['edit_forwards_per_step']:13.1f} {r['bytes_per_step'] / 1e6:12.3f} "
                  f"({formula[r['rank']] / 1e6:.3f}) {r['peak_mb']:8.1f} ({r['peak_mb'] - r['loaded_mb']:7.1f}) "
                  f"{r['seconds_per_step']:7.2f}")
        work = [r["edit_forwards_per_step"] for r in records]
        print(f"      balance (max/mean editing forwards): {max(work) / (sum(work) / len(work)):.3f}")
    # the aim: 8 GPUs, 120 frames at 512x512, SD-2.1-base, 50 steps, batch 8, float16
    sd21 = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    n, bs, world, steps = 120, 8, 8, 50
    editor = EDITORS["pnp"](EditConfig(prompt="x", steps=steps))
    sent = bytes_per_step(sd21, 512, 512, n, bs, world, 2,
                          sum(editor.injection(i, steps)[0] for i in range(steps)) / steps, "paper")
    from tokenflow.distributed import ShardPlan

    plans = [ShardPlan(n, bs, world, r) for r in range(world)]
    per_rank = [3 * len(p.frames()) + 3 * len(p.batches()) for p in plans]
    print(f"SD-2.1-base, {n} frames at 512x512, batch {bs}, {world} ranks, float16: editing forwards per step "
          f"per rank {per_rank} (balance {max(per_rank) / (sum(per_rank) / world):.3f}); inversion "
          f"{max(len(p.frames()) for p in plans)} frames x steps per rank; sent per step per rank "
          f"{max(sent) / 1e6:.1f} MB (max), {max(sent) * steps / 1e9:.2f} GB per {steps}-step edit")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
