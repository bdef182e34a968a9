#!/usr/bin/env python3
"""Measure one invert + edit workload: UNet image-forwards, time per stage, peak memory.

    python benchmarks/bench.py --frames 40 --height 512 --width 512 --full-size --device cuda --json out.json
    python benchmarks/bench.py --frames 40 --height 64 --width 64        # tiny model, quick, on CPU

The model is SD-2.1-base-shaped with random weights built in code (``--full-size``: real widths,
so the compute is representative; the pictures are noise). Nothing here asserts a time.
Stages: frame I/O, VAE encode, inversion (UNet), keyframe passes, propagation passes, VAE decode,
video write; the share of edit time spent inside the UNet and the VAE; peak memory (RSS on the
CPU, ``torch.cuda.max_memory_allocated`` on a GPU), taken from after the model is loaded and
the prompts are encoded (the text encoder freed, as the command does) to the end of the video write.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict

import torch

from tokenflow import EditConfig, TokenFlowPipeline, read_video, write_video
from tokenflow.attention import TokenFlowAttnProcessor


class Probe:
    """Forward hooks that count UNet image-forwards and time UNet/VAE calls by stage."""

    def __init__(self, pipe: TokenFlowPipeline):
        self.pipe = pipe
        self.forwards = defaultdict(int)
        self.seconds = defaultdict(float)
        self.stage = "inversion"
        self._start = {}
        self.handles = []
        self._hook(pipe.unet, "unet", count=True)
        self._hook(pipe.vae.encoder, "vae_encode")
        self._hook(pipe.vae.decoder, "vae_decode")

    def _sync(self):
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize()

    def _mode(self) -> str:
        for p in self.pipe.unet.attn_processors.values():
            if isinstance(p, TokenFlowAttnProcessor):
                return {"keyframe": "keyframe_pass", "propagate": "propagation"}.get(p.state.mode, p.state.mode)
        return self.stage

    def _hook(self, module, name, count=False):
        def pre(m, args, kwargs):
            self._sync()
            sample = args[0] if args else kwargs.get("sample")
            key = self._mode() if name == "unet" else name
            if count:
                self.forwards[key] += int(sample.shape[0])
            self._start[name] = (key, time.perf_counter())

        def post(m, args, kwargs, out):
            self._sync()
            key, start = self._start.pop(name)
            self.seconds[f"{name}:{key}" if name == "unet" else name] += time.perf_counter() - start

        self.handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                         module.register_forward_hook(post, with_kwargs=True)]


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def count_forwards(pipe: TokenFlowPipeline) -> dict:
    """Count UNet image-forwards from here on: the returned ``{"n": ...}`` grows with every call."""
    forwards = {"n": 0}
    real = pipe._predict

    def counting(latents, *a, **k):
        forwards["n"] += len(latents)
        return real(latents, *a, **k)

    pipe._predict = counting
    return forwards


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the workload's peak, not the model build's (Linux: clear_refs 5 resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_mb(device: torch.device) -> float:
    return torch.cuda.memory_allocated() / 2 ** 20 if device.type == "cuda" else _proc_status_mb("VmRSS")


def peak_memory_mb(device: torch.device) -> float:
    """Peak since the last reset: max allocated on a GPU, the peak RSS (VmHWM) on the CPU."""
    return torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else _proc_status_mb("VmHWM")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", default=os.path.join(os.path.dirname(__file__), "..", "src", "tokenflow", "data",
                                                    "demo.mp4"))
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--inversion-steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--editor", default="pnp")
    ap.add_argument("--full-size", action="store_true", help="SD 2.1-base widths (random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto: as the command picks it (float16 on CUDA)")
    ap.add_argument("--json", help="write the figures as JSON")
    args = ap.parse_args()

    pipe = TokenFlowPipeline.from_tiny(seed=0, device=args.device, full_size=args.full_size, dtype=args.dtype)
    probe = Probe(pipe)
    config = EditConfig(prompt="a robot", editor=args.editor, steps=args.steps, inversion_steps=args.inversion_steps,
                        batch_size=args.batch_size, height=args.height, width=args.width)
    # as the command does: the prompts encoded up front, the text encoder freed before the UNet runs
    pipe.release_text_encoders([config.inversion_prompt, config.negative_prompt, config.prompt])
    gc.collect()
    loaded_mb = memory_mb(pipe.device)  # the model alone: what the workload adds is above this
    reset_peak_memory(pipe.device)
    t0 = time.perf_counter()
    video = read_video(args.input)
    # loop the clip to the frame count asked for
    reps = -(-args.frames // len(video.frames))
    video.frames = video.frames.repeat(reps, axis=0)[:args.frames] if reps > 1 else video.frames[:args.frames]
    read_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = pipe.edit(video, config=config, use_cache=False, progress=False)
    total_edit = time.perf_counter() - t1
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_video(os.path.join(tmp, "out.mp4"), result.uint8(), result.fps)
    write_s = time.perf_counter() - t2

    s = probe.seconds
    unet_inv, unet_kf, unet_prop = s["unet:inversion"], s["unet:keyframe_pass"], s["unet:propagation"]
    figures = {
        "workload": vars(args),
        "device": str(pipe.device), "dtype": str(pipe.dtype),
        "unet_image_forwards": dict(probe.forwards, total=sum(probe.forwards.values())),
        "seconds": {"frame_io": read_s + result.seconds.get("read", 0.0), "vae_encode": s["vae_encode"],
                    "inversion_unet": unet_inv, "inversion_total": result.seconds["inversion"],
                    "keyframe_pass_unet": unet_kf, "propagation_unet": unet_prop,
                    "editing_total": result.seconds["editing"], "vae_decode": s["vae_decode"],
                    "video_write": write_s, "end_to_end": read_s + total_edit + write_s},
        "share_in_unet_vae_of_editing": (unet_kf + unet_prop) / max(result.seconds["editing"], 1e-9),
        "share_in_unet_vae_end_to_end": (unet_inv + unet_kf + unet_prop + s["vae_encode"] + s["vae_decode"])
        / max(read_s + total_edit + write_s, 1e-9),
        "peak_memory_mb": peak_memory_mb(pipe.device),
        "memory_after_model_load_mb": loaded_mb,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    width = max(len(k) for k in figures["seconds"])
    print(f"workload: {args.frames} frames {args.width}x{args.height}, {args.inversion_steps} inversion + "
          f"{args.steps} edit steps, batch {args.batch_size}, {'full-size' if args.full_size else 'tiny'} model, "
          f"{pipe.device} {pipe.dtype}")
    print("UNet image-forwards:", ", ".join(f"{k} {v}" for k, v in figures["unet_image_forwards"].items()))
    for k, v in figures["seconds"].items():
        print(f"  {k:<{width}}  {v:8.2f} s")
    print(f"share of editing time in the UNet: {figures['share_in_unet_vae_of_editing']:.1%}; "
          f"end to end in UNet+VAE: {figures['share_in_unet_vae_end_to_end']:.1%}")
    print(f"peak memory during the workload: {figures['peak_memory_mb']:.0f} MB (the model alone: {loaded_mb:.0f} MB; "
          f"process peak RSS including the model build: {figures['process_peak_rss_mb']:.0f} MB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
