#!/usr/bin/env python3
"""Peak memory while loading a model folder into a dtype, against the weights' size in that dtype.

    python benchmarks/load_peak.py --model FOLDER --dtype bfloat16
    python benchmarks/load_peak.py --make-full-size FOLDER   # write an SD-2.1-shaped random folder first

Each load runs in a fresh process (``TokenFlowPipeline.from_pretrained(FOLDER, dtype=...)`` on the CPU).
It reports the size of all weights in the target dtype and the largest single tensor, and two peaks
above the process's memory before the load:
- RSS (VmHWM), which counts the memory-mapped file's pages while they are mapped;
- anonymous memory (RssAnon, sampled every 2 ms), the memory the process itself holds.
The aim is an anonymous peak below weights + largest tensor: no full float32 copy resident at any
moment. Nothing here asserts a size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, torch
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import threading, time
from tokenflow import TokenFlowPipeline
import diffusers, transformers  # their import's memory is not the load's
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
before, before_anon = status("VmRSS"), status("RssAnon")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
anon, done = [before_anon], [False]
def sample():  # the kernel keeps no high-water mark of anonymous memory: sample it every 2 ms
    while not done[0]:
        anon.append(status("RssAnon"))
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
pipe = TokenFlowPipeline.from_pretrained(sys.argv[1], device="cpu", dtype=sys.argv[2])
done[0] = True
sampler.join()
peak = status("VmHWM")
tensors = [t for m in (pipe.unet, pipe.vae, pipe.text_encoder) for t in m.state_dict().values()]
print(json.dumps({"peak_above_start": peak - before, "anon_peak_above_start": max(anon) - before_anon, "weights": sum(t.numel() * t.element_size() for t in tensors),
                  "largest": max(t.numel() * t.element_size() for t in tensors), "dtype": str(pipe.dtype)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--make-full-size", metavar="FOLDER")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.make_full_size:
        from tokenflow.tiny import save_tiny_model

        save_tiny_model(args.make_full_size, seed=0, full_size=True)
        args.model = args.model or args.make_full_size
    if not args.model:
        parser.error("give --model FOLDER (or --make-full-size FOLDER)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    for dtype in args.dtype:
        proc = subprocess.run([sys.executable, "-c", CHILD, args.model, dtype], capture_output=True, text=True,
                              env=env)
        if proc.returncode:
            sys.exit(proc.stderr[-2000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[dtype] = r
        mb = 2 ** 20
        bound = r["weights"] + r["largest"]
        print(f"{dtype}: weights {r['weights'] / mb:,.0f} MB, largest tensor {r['largest'] / mb:,.0f} MB; peak above "
              f"the start: RSS {r['peak_above_start'] / mb:,.0f} MB ({r['peak_above_start'] / bound:.2f} of weights + "
              f"largest; counts the file's mapped pages), anonymous {r['anon_peak_above_start'] / mb:,.0f} MB "
              f"({r['anon_peak_above_start'] / bound:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
