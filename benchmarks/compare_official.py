#!/usr/bin/env python3
"""Ours against the official TokenFlow code, side by side in one run, identical settings.

    python benchmarks/compare_official.py --model MODEL_DIR --input ../shared/data/wolf.mp4 \
        --refpy ~/.cache/tokenflow-ref/venv/bin/python --official ~/.cache/tokenflow-ref/work/tokenflow \
        --frames 16 --height 128 --width 192 --inversion-steps 10 --steps 10 --json out.json

The official side is ``../shared/harness/run_official.py`` (the unmodified official preprocess +
PnP editor, patched to run on the CPU in float32); ours is the ``tokenflow edit`` command. Both
load the same model folder (e.g. ``make_tiny_sd.py --full-size``: SD-2.1-base widths, random
weights) and get the same video, frame count, size, inversion and editing steps, batch size,
prompts, guidance, PnP thresholds, seed, and torch thread count. Each runs in its own process;
wall time is measured around the process and peak memory is the process's peak RSS (``wait4``).
Edit-only figures: the official ``pnp`` stage (model load + editing + writing) against our
editing + decode stages. ``--dtype`` sets our side's dtype (the official side is float32, as the
harness runs it): ``--dtype bfloat16`` is what ``--dtype auto`` picks on a CPU with native bfloat16.
Nothing is asserted; the figures, per stage too, are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time


def run(cmd: list[str], env: dict[str, str], log: str) -> dict:
    """Run a command; its wall time and peak RSS (MB) from the kernel's rusage of that child."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{cmd[1]} failed with exit code {code}:\n{tail}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


_DEFAULT_OFFICIAL = os.path.expanduser("~/.cache/tokenflow-ref/work/tokenflow")


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model folder both sides load")
    ap.add_argument("--input", required=True, help="video file")
    ap.add_argument("--harness", default=os.path.join(here, "..", "..", "shared", "harness"))
    ap.add_argument("--refpy", default=os.path.expanduser("~/.cache/tokenflow-ref/venv/bin/python"),
                    help="python of the reference venv (harness setup_refenv.sh)")
    ap.add_argument("--official", default=os.environ.get("TOKENFLOW_OFFICIAL_DIR", _DEFAULT_OFFICIAL if
                                                        os.path.isdir(_DEFAULT_OFFICIAL) else None),
                    help="extracted official TokenFlow checkout (default: where the harness's "
                         "setup_refenv.sh puts it)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=192, help="not equal to height: the official code "
                                                           "turns square frames into 512x512")
    ap.add_argument("--inversion-steps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=("float32", "bfloat16", "float16"),
                    help="our side's dtype, or several: ours runs once per dtype against the one official run "
                         "(which is float32)")
    ap.add_argument("--inversion-prompt", default="a wolf")
    ap.add_argument("--prompt", default="a shiny silver robotic wolf")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if not args.official:
        ap.error("--official (or TOKENFLOW_OFFICIAL_DIR) must name the extracted official code")

    work = args.work or tempfile.mkdtemp(prefix="tokenflow-compare-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENFLOW_OFFICIAL_DIR=os.path.abspath(args.official))
    official_cmd = [args.refpy, os.path.join(args.harness, "run_official.py"), "--model", args.model,
                    "--input", args.input, "--out", os.path.join(work, "official"),
                    "--H", str(args.height), "--W", str(args.width), "--n_frames", str(args.frames),
                    "--inv_steps", str(args.inversion_steps), "--save_steps", str(args.steps),
                    "--inv_batch_size", str(args.batch_size), "--batch_size", str(args.batch_size),
                    "--n_timesteps", str(args.steps), "--inversion_prompt", args.inversion_prompt,
                    "--prompt", args.prompt, "--modes", "pnp", "--threads", str(args.threads)]

    def ours_cmd(dtype: str) -> list[str]:
        return [sys.executable, "-m", "tokenflow.cli", "edit", args.input, "--model", args.model,
                "--device", "cpu", "--dtype", dtype, "--height", str(args.height), "--width", str(args.width),
                "--max-frames", str(args.frames), "--inversion-steps", str(args.inversion_steps),
                "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--inversion-prompt", args.inversion_prompt, "-p", args.prompt, "--editor", "pnp",
                "--no-cache", "-q", "-o", os.path.join(work, f"ours-{dtype}.mp4")]

    print(f"official: {' '.join(official_cmd)}", flush=True)
    official = run(official_cmd, env, os.path.join(work, "official.log"))
    with open(os.path.join(work, "official", "meta.json")) as f:
        stages = json.load(f)["stages"]
    official["edit_s"] = stages["pnp"]["wall_s"]
    official["preprocess_s"] = stages["preprocess"]["wall_s"]

    ours, ratios = {}, {}
    for dtype in args.dtype:
        cmd = ours_cmd(dtype)
        print(f"ours: {' '.join(cmd)}", flush=True)
        log = os.path.join(work, f"ours-{dtype}.log")
        r = run(cmd, env, log)
        with open(log) as f:
            summary = f.read()
        seconds = {k: float(v) for k, v in re.findall(r"(inversion|editing|decode) ([0-9.]+)s", summary)}
        r["inversion_s"], r["editing_s"], r["decode_s"] = (seconds.get(k) for k in ("inversion", "editing", "decode"))
        r["edit_s"] = round(seconds.get("editing", 0) + seconds.get("decode", 0), 2)
        ours[dtype] = r
        ratios[dtype] = {k: round(v, 3) for k, v in (("time_end_to_end", r["wall_s"] / official["wall_s"]),
                                                      ("time_edit", r["edit_s"] / official["edit_s"]),
                                                      ("peak_memory", r["peak_rss_mb"] / official["peak_rss_mb"]))}
    settings = {k: getattr(args, k) for k in ("model", "input", "frames", "height", "width", "inversion_steps",
                                              "steps", "batch_size", "threads", "inversion_prompt", "prompt", "dtype")}
    report = {"settings": settings, "official": official, "ours": ours, "ours_over_official": ratios}
    print(f"{'':<16} {'end to end':>11} {'edit':>8} {'peak RSS':>10}   stages")
    print(f"{'official':<16} {official['wall_s']:>10.1f}s {official['edit_s']:>7.1f}s "
          f"{official['peak_rss_mb']:>8.0f}MB   preprocess {official['preprocess_s']:.1f}s, pnp {official['edit_s']:.1f}s")
    for dtype, r in ours.items():
        print(f"{'ours ' + dtype:<16} {r['wall_s']:>10.1f}s {r['edit_s']:>7.1f}s {r['peak_rss_mb']:>8.0f}MB   "
              f"inversion {r['inversion_s']}s, editing {r['editing_s']}s, decode {r['decode_s']}s")
        q = ratios[dtype]
        print(f"{'  / official':<16} {q['time_end_to_end']:>11.2f} {q['time_edit']:>8.2f} {q['peak_memory']:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
