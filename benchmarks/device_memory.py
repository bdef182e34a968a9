#!/usr/bin/env python3
"""Device memory, host memory, disk and time per step of a long edit, by formula (issue: any length).

    python benchmarks/device_memory.py                                # SD 2.1 at 512x512: 1,000 frames on 1 GPU,
                                                                      # 10,000 frames on 8
    python benchmarks/device_memory.py --measure-activations          # + the UNet's activations per image,
                                                                      # measured here (CPU, float32; minutes)
    python benchmarks/device_memory.py --gpu-frames 1000              # on a GPU: a real 2-step edit of the
                                                                      # full-size random model, peak memory

The formula follows the code: what each rank holds is independent of the video's length except the
latents and the inversion, which live on the host and on disk.

- **device**: the fp16 weights (UNet + VAE; the text encoder is released once the prompts are encoded),
  the activations of the largest UNet call (``max(3 x batch, W)`` images: a propagation batch of every
  branch, or a bounded keyframe group one branch at a time; ``a_img`` per image), and the keyframe caches
  the batch reads (3 keyframes; the caches themselves are offloaded to page-locked host memory on a GPU).
- **host**: the keyframe caches held by the bounded pass (a group of W, the anchors and 3 neighbours; under
  torchrun also the two groups at the rank's boundaries, run first) and three latent tensors of the rank's
  frames (the edit's, the step's inversion timestep, the step's output).
- **disk**: the inversion cache entry, one float32 latent per frame and kept timestep (+ the clean ones).
- **time per step** (``--tflops``, the throughput assumed: no GPU was measured here): the UNet's images,
  ``N_r (1 + 2P)`` propagated plus ``K_r (1 + 2P)`` keyframes, at ``F_img`` FLOPs (counted with PyTorch's
  FLOP counter on the meta device), plus the bounded keyframe pass's extended attention
  (``benchmarks/keyframe_window.py``'s formula).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from keyframe_window import formula, sd21_layers  # noqa: E402

from tokenflow.keyframes import DEFAULT_KEYFRAME_WINDOW, n_anchors  # noqa: E402

GB = 1e9


def model_figures(height: int, width: int) -> dict:
    """Parameters and FLOPs per image of SD 2.1's UNet and VAE at this size, counted on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from tokenflow.tiny import FULL_SIZE, UNET_CONFIG, VAE_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**UNET_CONFIG, **FULL_SIZE["unet"]})
        vae = AutoencoderKL(**{**VAE_CONFIG, **FULL_SIZE["vae"]})
        x = torch.zeros(1, 4, height // 8, width // 8)
        text = torch.zeros(1, 77, FULL_SIZE["unet"]["cross_attention_dim"])
        with FlopCounterMode(display=False) as unet_flops:
            unet(x, torch.tensor([500]), encoder_hidden_states=text)
        with FlopCounterMode(display=False) as decode_flops:
            vae.decode(x)
        with FlopCounterMode(display=False) as encode_flops:
            vae.encode(torch.zeros(1, 3, height, width))
    return {"unet_params": sum(p.numel() for p in unet.parameters()),
            "vae_params": sum(p.numel() for p in vae.parameters()),
            "unet_flops": unet_flops.get_total_flops(), "vae_flops": decode_flops.get_total_flops()
            + encode_flops.get_total_flops()}


def measure_activations(height: int, width: int) -> float:
    """Bytes of activations per image of the full-size UNet forward here (float32, CPU): the peak RSS of a
    batch of 2 less that of a batch of 1, each in a fresh process."""
    code = f"""
import resource, sys, torch
sys.path.insert(0, {os.path.join(HERE, '..', 'src')!r})
from diffusers import UNet2DConditionModel
from tokenflow.tiny import FULL_SIZE, UNET_CONFIG
unet = UNet2DConditionModel(**{{**UNET_CONFIG, **FULL_SIZE["unet"]}}).eval()
n = int(sys.argv[1])
with torch.no_grad():
    unet(torch.randn(n, 4, {height // 8}, {width // 8}), torch.tensor([500]),
         encoder_hidden_states=torch.randn(n, 77, 1024))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
    peaks = [int(subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True,
                                check=True).stdout.split()[-1]) for n in (1, 2)]
    return float(peaks[1] - peaks[0])


def plan(frames: int, ranks: int, args, model: dict, a_img: float) -> dict:
    batch, window, prompts = args.batch_size, args.keyframe_window, args.prompts
    branches = 1 + 2 * prompts
    layers = sd21_layers(args.height, args.width)
    per_keyframe = 2 * (1 + branches) * sum(L * D for L, D in layers)  # fp16 source tokens + every branch's output
    kf = formula(frames, batch, window, layers)
    n_r, k_r = -(-frames // ranks), -(-kf["keyframes"] // ranks)
    latent = 4 * 4 * (args.height // 8) * (args.width // 8)  # float32 (C, h, w)
    images_per_call = max(branches * batch, kf["images_per_call"])
    weights = 2 * (model["unet_params"] + model["vae_params"])
    device = weights + a_img * images_per_call + 3 * per_keyframe
    held = window + n_anchors(window) + 3 + (2 * window if ranks > 1 else 0) if kf["keyframes"] > window \
        else kf["keyframes"]
    host = held * per_keyframe + 3 * n_r * latent
    step_flops = (n_r + k_r) * branches * model["unet_flops"] + kf["attention_flops"] / ranks
    throughput = args.tflops * 1e12
    inversion = n_r * args.inversion_steps * model["unet_flops"] / throughput
    return {"frames": frames, "ranks": ranks, "keyframes": kf["keyframes"], "frames_per_rank": n_r,
            "images_per_call": images_per_call, "device_gb": device / GB, "weights_gb": weights / GB,
            "activations_gb": a_img * images_per_call / GB, "keyframe_cache_mb": per_keyframe / 1e6,
            "keyframes_held": held, "host_gb": host / GB, "disk_gb": frames * latent * (args.steps + 1) / GB,
            "step_pflop": step_flops / 1e15, "seconds_per_step": step_flops / throughput,
            "inversion_seconds": inversion, "vae_seconds": n_r * model["vae_flops"] / throughput,
            "edit_minutes": (inversion + args.steps * step_flops / throughput
                             + n_r * model["vae_flops"] / throughput) / 60}


def gpu_run(frames: int, args) -> dict:
    """A real 2-step edit of ``frames`` frames at the size on the full-size random model, on ``--device``
    (fp16 on a GPU): peak device memory (host RSS on the CPU) and seconds per editing step."""
    import resource
    import time

    import torch

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from conftest import moving_frames

    from tokenflow import EditConfig, TokenFlowPipeline

    cuda = args.device.startswith("cuda")
    pipe = TokenFlowPipeline.from_tiny(full_size=True, device=args.device, dtype="float16" if cuda else "float32")
    video = torch.from_numpy(moving_frames(frames, args.height, args.width)).permute(0, 3, 1, 2)
    config = EditConfig(prompt="a robot", steps=2, inversion_steps=2, height=args.height, width=args.width,
                        batch_size=args.batch_size, keyframe_window=args.keyframe_window)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = pipe.edit(video.float() / 255, config=config, use_cache=False, progress=False,
                       callback=lambda stage, done, total: times.append((stage, done, time.perf_counter())),
                       output_type="stream")
    steps = [t for s, _, t in times if s == "editing"]
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"frames": frames, "device": args.device, "peak_memory_gb": peak / GB,
            "seconds_per_step": (steps[-1] - steps[0]) / max(1, len(steps) - 1) if len(steps) > 1 else None,
            "seconds": result.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keyframe-window", type=int, default=DEFAULT_KEYFRAME_WINDOW)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--inversion-steps", type=int, default=50)
    parser.add_argument("--tflops", type=float, default=150.0, help="achieved fp16 TFLOP/s per GPU (assumed)")
    parser.add_argument("--activation-gb", type=float, default=None,
                        help="fp16 activations per UNet image in GB (default: half the float32 figure measured "
                             "with --measure-activations, else 0.3)")
    parser.add_argument("--measure-activations", action="store_true")
    parser.add_argument("--gpu-frames", type=int, default=None)
    parser.add_argument("--device", default="cuda", help="for --gpu-frames (cpu: a check of the run itself)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    model = model_figures(args.height, args.width)
    a_img = args.activation_gb * GB if args.activation_gb else 0.3 * GB
    measured = None
    if args.measure_activations:
        measured = measure_activations(args.height, args.width)
        a_img = measured / 2 if not args.activation_gb else a_img
    print(f"SD 2.1 at {args.width}x{args.height}: UNet {model['unet_params'] / 1e6:.0f} M parameters, "
          f"{model['unet_flops'] / 1e12:.3f} TFLOP per image; VAE {model['vae_params'] / 1e6:.0f} M, "
          f"{model['vae_flops'] / 1e12:.2f} TFLOP per frame (encode + decode)")
    if measured is not None:
        print(f"activations per image measured here: {measured / GB:.2f} GB float32 -> {a_img / GB:.2f} GB fp16")
    print(f"assumed: {args.tflops:g} TFLOP/s per GPU, {a_img / GB:.2f} GB fp16 activations per image, batch "
          f"{args.batch_size}, window {args.keyframe_window}, {args.prompts} prompt(s), {args.steps} steps")
    rows = [plan(1000, 1, args, model, a_img), plan(10000, 8, args, model, a_img)]
    for r in rows:
        print(f"{r['frames']:>6} frames on {r['ranks']} GPU(s): device {r['device_gb']:.1f} GB per rank "
              f"(weights {r['weights_gb']:.1f}, activations {r['activations_gb']:.1f} for {r['images_per_call']} "
              f"images per call); host {r['host_gb']:.1f} GB per rank ({r['keyframes_held']} keyframes of "
              f"{r['keyframe_cache_mb']:.0f} MB held); disk {r['disk_gb']:.1f} GB; {r['step_pflop']:.2f} PFLOP "
              f"and {r['seconds_per_step']:.1f} s per step per rank; the whole edit ~{r['edit_minutes']:.0f} min")
    if args.gpu_frames:
        rows.append(gpu_run(args.gpu_frames, args))
        print(rows[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
