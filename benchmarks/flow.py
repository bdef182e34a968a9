#!/usr/bin/env python3
"""TokenFlow with FlowEdit on the rectified-flow families: forwards, seconds per step, memory.

    python benchmarks/flow.py --family sd3 flux --frames 16 --height 64 --width 64      # tiny models, CPU
    python benchmarks/flow.py --formula                                                 # full-size figures
    python benchmarks/flow.py --formula --full-width 256    # + SD3.5 Medium's widths, random, timed on this machine

Measured (tiny random SD3/FLUX built in code): transformer image-forwards per frame and step, split
into keyframe pass and propagation; seconds per editing step; peak RSS of the edit. ``--formula``
prints, for the real models (SD3.5 Medium/Large, FLUX.1-dev/schnell), the same counts by formula and
the memory of TokenFlow's per-layer caches, at 512x512 and 1024x1024 for 40 and 120 frames. Nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections import defaultdict

import torch

from tokenflow.flow import FlowPipeline

# name: (hooked attention layers, hidden width, branches per frame, published steps run, parameters)
REAL = {
    "SD3.5-Medium": (24 + 13, 1536, 4, 33, 2.5e9),  # 24 joint blocks, 13 with dual attention
    "SD3.5-Large": (38, 2432, 4, 33, 8.1e9),
    "SD3.5-Large-Turbo (4 steps)": (38, 2432, 4, 4, 8.1e9),
    "FLUX.1-dev": (19 + 38, 3072, 2, 24, 12e9),  # 19 double-stream + 38 single-stream blocks
    "FLUX.1-schnell (4 steps)": (19 + 38, 3072, 2, 4, 12e9),
}
TEXT_TOKENS = {"SD3": 77 + 256, "FLUX": 512}


def measure(kind: str, frames: int, height: int, width: int, steps: int, n_max: int, batch: int,
            propagation: str) -> dict:
    pipe = FlowPipeline.from_tiny(kind)
    transformer = pipe.family.transformer
    counts: dict = defaultdict(int)
    state_of = {}

    def pre(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        mode = next(iter(state_of.values())).mode if state_of else "plain"
        counts[mode] += int(x.shape[0])

    handle = transformer.register_forward_pre_hook(pre, with_kwargs=True)
    video = torch.rand(frames, 3, height, width, generator=torch.Generator().manual_seed(0))
    config = pipe.default_config(prompt="a robot", inversion_prompt="a wolf", steps=steps, n_max=n_max,
                                 height=height, width=width, batch_size=batch, propagation=propagation)
    from tokenflow import joint_attention

    original = joint_attention.JointTokenFlowProcessor.__init__

    def remember(self, name, state, role, text_first):  # the hooks' shared state tells the pass
        original(self, name, state, role, text_first)
        state_of["state"] = state

    joint_attention.JointTokenFlowProcessor.__init__ = remember
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = pipe.edit(video, config=config, progress=False)
    seconds = time.perf_counter() - started
    joint_attention.JointTokenFlowProcessor.__init__ = original
    handle.remove()
    run = len(result.keyframes)
    return {"family": kind, "frames": frames, "size": f"{width}x{height}", "steps run": run,
            "forwards per frame and step": {k: v / (frames * run) for k, v in counts.items()},
            "seconds per step": result.seconds["editing"] / run, "seconds total": seconds,
            "peak RSS MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "RSS before MB": base_rss / 1024}


def formula() -> list[dict]:
    """Image-forwards, FLOPs and cache memory of TokenFlow + FlowEdit on the real models, by formula."""
    rows = []
    for name, (layers, width, branches, steps, params) in REAL.items():
        text = TEXT_TOKENS["FLUX" if "FLUX" in name else "SD3"]
        for side in (512, 1024):
            tokens = (side // 16) ** 2
            for frames in (40, 120):
                keyframes = -(-frames // 8)  # batch size 8
                forwards = frames * branches * steps  # paper propagation: keyframes reuse their pass
                flops = 2 * params * (tokens + text) * forwards
                # extended attention of the edit branches: each keyframe's queries over K keyframes' tokens
                ext = 4 * layers * (branches // 2 if branches == 4 else 1) * keyframes * (tokens + text) \
                    * keyframes * tokens * width * steps
                cache_gb = layers * (branches + 1) * keyframes * tokens * width * 2 / 1e9  # bf16
                rows.append({"model": name, "size": side, "frames": frames, "image-forwards": forwards,
                             "PFLOP (dense)": round(flops / 1e15, 1), "PFLOP (extended attention)":
                             round(ext / 1e15, 2), "keyframe caches GB (bf16, per step)": round(cache_gb, 1),
                             "weights GB (bf16)": round(params * 2 / 1e9, 1)})
    return rows


FULL_SD35_MEDIUM = dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                        qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))


def measure_full_width(side: int, frames: int, repeats: int = 1) -> dict:
    """SD3.5 Medium's transformer at its real widths (random weights, 2.5 B parameters, float32): seconds
    per image-forward, plain and as TokenFlow's keyframe pass (extended attention over ``frames``)."""
    from diffusers import SD3Transformer2DModel

    from tokenflow.attention import TokenFlowState
    from tokenflow.families.base import AttentionLayer
    from tokenflow.joint_attention import joint_tokenflow_hooks

    torch.manual_seed(0)
    started = time.perf_counter()
    model = SD3Transformer2DModel(**FULL_SD35_MEDIUM).eval().requires_grad_(False)
    built = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    branches = 4
    x = torch.randn(branches * frames, 16, side // 8, side // 8)
    text = torch.randn(branches * frames, TEXT_TOKENS["SD3"], 4096)
    pooled = torch.randn(branches * frames, 2048)
    t = torch.full((branches * frames,), 500.0)

    def forward() -> float:
        begin = time.perf_counter()
        with torch.no_grad():
            for _ in range(repeats):
                model(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled)
        return (time.perf_counter() - begin) / (repeats * len(x))

    plain = forward()
    state = TokenFlowState(n_branches=branches, n_source_branches=2)
    state.set_mode("keyframe")
    layers = [AttentionLayer(k[:-len(".processor")], "image" if ".attn2." in k else "joint")
              for k in model.attn_processors]
    with joint_tokenflow_hooks(model, state, layers, text_first=False):
        keyframe = forward()
    return {"model": "SD3.5-Medium widths, random", "parameters": params, "size": side, "frames": frames,
            "seconds to build": round(built, 1), "seconds per image-forward": round(plain, 3),
            "seconds per image-forward, keyframe pass": round(keyframe, 3),
            "peak RSS MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--n-max", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--propagation", default="paper")
    parser.add_argument("--formula", action="store_true", help="print the full-size figures by formula only")
    parser.add_argument("--full-width", type=int, metavar="SIDE",
                        help="also time SD3.5 Medium's transformer at real widths (random) at SIDE x SIDE")
    parser.add_argument("--json", help="write the figures")
    args = parser.parse_args()
    out = {"formula": formula()}
    if not args.formula:
        out["measured"] = [measure(k, args.frames, args.height, args.width, args.steps, args.n_max,
                                   args.batch_size, args.propagation) for k in args.family]
    if args.full_width:
        out["full width"] = measure_full_width(args.full_width, 2)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
