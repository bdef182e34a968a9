"""How long the web page's presets take: Preview one frame and Run, for each preset, through the page's own
EditorSession (what the buttons call), on the tiny model, the bundled demo clip (448x256, 24 frames) and
this machine's device. Nothing asserts a time; it prints one line per action and ``--json`` writes them.
Beside the wall time it prints the process's CPU time: on a machine shared with other work the wall time
grows with the load, the CPU time much less (on an idle machine, wall is about CPU / threads).

    .venv/bin/python benchmarks/ui_presets.py                     # Quick look only
    .venv/bin/python benchmarks/ui_presets.py --presets "Quick look" "Full quality" --json ui.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def main() -> None:
    from tokenflow import TokenFlowPipeline
    from tokenflow.ui import DEMO_CLIP, EditorSession, Limits, describe_preset, presets_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["Quick look"])
    parser.add_argument("--video", default=DEMO_CLIP)
    parser.add_argument("--max-frames", type=int, default=120, help="the page's limit (its default)")
    parser.add_argument("--json")
    args = parser.parse_args()
    pipe = TokenFlowPipeline.from_tiny(seed=0)
    presets = presets_for(pipe.device.type)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        session = EditorSession(pipe, "tiny", Limits(max_frames=args.max_frames), cache_dir=os.path.join(tmp, "c"),
                                output_dir=os.path.join(tmp, "o"))
        os.makedirs(session.output_dir)
        for name in args.presets:
            p = presets[name]
            settings = dict(max_frames=p["max_frames"], steps=p["steps"], inversion_steps=p["inversion_steps"],
                            height=0, width=0, preset=name)
            for action in ("preview", "run"):
                session.cache_dir = os.path.join(tmp, f"cache-{name}-{action}")  # each action from cold, as a first try
                started, cpu = time.perf_counter(), time.process_time()
                if action == "preview":
                    _, status = session.preview(args.video, "a shiny silver robotic wolf", **settings)
                else:
                    status = session.run(args.video, "a shiny silver robotic wolf", **settings).status
                seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
                rows.append(dict(preset=name, action=action, seconds=round(seconds, 1),
                                 cpu_seconds=round(cpu_seconds, 1), load=os.getloadavg()[0], status=status,
                                 threads=torch.get_num_threads(), device=pipe.device.type))
                print(f"{name} ({describe_preset(p, args.max_frames)}), {action}: {seconds:.1f} s wall, "
                      f"{cpu_seconds:.1f} s CPU on {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f} "
                      f"[{status}]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
