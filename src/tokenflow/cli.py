"""The ``tokenflow`` command: its arguments and its exit codes (the commands are :mod:`tokenflow.commands`,
their settings, checks and writing :mod:`tokenflow.runs`).

    tokenflow edit INPUT -p PROMPT [-o OUTPUT] [options]
    tokenflow invert INPUT [options]
    tokenflow eval --source SRC --edited EDITED [--edited ...] --prompt P
    tokenflow analyze INPUT [-o FOLDER]
    tokenflow ui [--model ID] [--host 127.0.0.1] [--port 7860]
    tokenflow demo [-o OUTPUT]

A user's mistake ends with one line on stderr and exit status 2, and nothing at the output path.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from .commands import cmd_analyze, cmd_batch, cmd_cache, cmd_demo, cmd_edit, cmd_eval, cmd_invert, cmd_ui
from .config import DEFAULT_MODEL, DEMO_CLIP, EDITORS, KEYFRAME_SAMPLERS, PROPAGATIONS  # noqa: F401 (DEMO_CLIP)
from .errors import Interrupted, RunFailed, TokenFlowError
from .runs import keyframe_window_arg, resolve_settings  # noqa: F401 (resolve_settings: the command's, here before)

EXIT_USAGE = 2
logger = logging.getLogger("tokenflow.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise TokenFlowError(f"{message} (see '{self.prog} --help')")

    def parse_known_args(self, args=None, namespace=None):  # the official flags, underscored names: ours
        from .options import ours

        return super().parse_known_args(ours(self, sys.argv[1:] if args is None else args), namespace)

    def parse_args(self, args=None, namespace=None):  # an unknown option: the close one, the command's --help
        from .options import subcommand_parser, unknown_options_message

        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            sub = subcommand_parser(self, getattr(namespace, "command", None))
            raise TokenFlowError(unknown_options_message(extras, sub or self, (sub or self).prog))
        return namespace


def _edit_options(p: argparse.ArgumentParser, edit: bool = False) -> None:
    """Options shared by edit, invert and analyze; defaults are None so a config file can fill them.
    For edit, the prompt and the output come right after the input."""
    p.add_argument("input", nargs="?", help="video file (mp4, mov, mkv, webm, avi, gif) or folder of frames")
    if edit:
        p.add_argument("-p", "--prompt", action="append",
                       help="what the edited video should show (required); repeat it for several edits in "
                            "one run, written as OUTPUT-1.mp4, OUTPUT-2.mp4, ... (frames in DIR/1, DIR/2, ...)")
        p.add_argument("-o", "--output", help="output video (.mp4/.mov/.mkv; default INPUT-tokenflow.mp4)")
    p.add_argument("--config", help="YAML settings: our keys (e.g. the OUTPUT.yaml an edit writes) or the official "
                                          "config_pnp/config_sdedit keys; the command line wins (default: none)")
    p.add_argument("--model", help=f"hub id, local diffusers folder, single .safetensors checkpoint (SD 1.x/2.x, "
                                   f"SD 2 depth, SDXL), or 'tiny' (a tiny random model; default {DEFAULT_MODEL})")
    p.add_argument("--model-config", help="configs for a single-file --model: a diffusers folder or hub id "
                                          "(default: the family's, inferred from the weights)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a pickle checkpoint (.ckpt/.pt/.bin) as --model; pickles can run code")
    p.add_argument("--lora", action="append", help="LoRA file, folder or hub id, optionally :SCALE "
                                                   "(repeatable; fused into the model; default: none)")
    p.add_argument("--control", help="ControlNet condition: canny, depth, or a folder/video of condition images "
                                        "(default: none)")
    p.add_argument("--controlnet", help="ControlNet id, folder or .safetensors (default: the family's "
                                        "ControlNet 1.1 for --control canny/depth)")
    p.add_argument("--control-scale", type=float, help="ControlNet conditioning scale (default 1.0)")
    p.add_argument("--canny-low", type=int, help="Canny low threshold (default 100)")
    p.add_argument("--canny-high", type=int, help="Canny high threshold (default 200)")
    p.add_argument("--depth-model", help="transformers depth-estimation id or folder, for --control depth "
                                         "(default Intel/dpt-hybrid-midas)")
    p.add_argument("--inversion-prompt", help='prompt describing the source video (default "")')
    p.add_argument("--height", type=int, help="working height, a multiple of 8 (default: ~512x512 area, aspect kept)")
    p.add_argument("--width", type=int, help="working width, a multiple of 8 (default: ~512x512 area, aspect kept)")
    p.add_argument("--fit", help="when --height and --width change the aspect: stretch, crop (centre) or pad "
                                 "(black bars) (default stretch, as the official code)")
    p.add_argument("--max-frames", type=int, help="edit at most N frames (default: all)")
    p.add_argument("--start-frame", type=int, help="first frame to edit (default 0)")
    p.add_argument("--start-time", type=float, help="first frame to edit, in seconds (default 0)")
    p.add_argument("--every", "--frame-stride", dest="frame_stride", type=int,
                   help="keep every N-th frame (default 1); the output's frame rate is divided by N")
    p.add_argument("--fps", type=float, help="frame rate of a frame folder (a video keeps its own; default 10)")
    p.add_argument("--steps", type=int, help="DDIM editing steps (default 50)")
    p.add_argument("--inversion-steps", type=int, help="DDIM inversion steps (default 50, or the smallest "
                                                       "multiple of --steps above it that passes every editing step)")
    p.add_argument("--batch-size", type=int, help="frames per keyframe interval and UNet batch (default 8)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default auto: cuda, then mps, "
                                                  "then cpu)")
    p.add_argument("--dtype", default=None, help="auto, float32, float16 or bfloat16 (or fp32, fp16, bf16; default "
                                                 "auto: float16 on cuda, bfloat16 on a CPU where it measures "
                                                 "clearly faster, float32 elsewhere; --model tiny: float32)")
    p.add_argument("--cache-dir", help="inversion cache folder (default ~/.cache/tokenflow/inversions)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the inversion cache; nothing goes to the cache folder: resume "
                        "checkpoints are kept beside the output instead (in its folder's .tokenflow-checkpoints/, "
                        "removed when the output is written; invert, which has no output, keeps none)")
    p.add_argument("--no-resume", action="store_true", default=None,
                   help="start over instead of resuming from the checkpoints of an interrupted run of "
                        "the same command (default: resume)")
    p.add_argument("--offload", action="store_true",
                   help="keep the models on the CPU and bring each to the GPU only for its stage")
    p.add_argument("--vae-slicing", action="store_true", help="encode/decode one frame at a time")
    p.add_argument("--vae-tiling", action="store_true", help="encode/decode large frames in tiles")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet's convolution and MLP blocks (pays off on long runs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only errors and the summary")
    p.add_argument("--data-path", help=argparse.SUPPRESS)  # the official scripts' name of the input


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tokenflow", description="Edit a video from a text prompt with TokenFlow "
                                                   "(consistent diffusion features, ICLR 2024).")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"tokenflow {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    edit = sub.add_parser("edit", help="edit a video from a text prompt")
    _edit_options(edit, edit=True)
    edit.add_argument("--editor", help=f"base image editor: {', '.join(EDITORS)} (default pnp)")
    edit.add_argument("--negative-prompt", help="negative prompt (default: the official one)")
    edit.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default 7.5)")
    edit.add_argument("--pnp-attn-t", type=float, help="PnP: fraction of steps with Q/K injection (default 0.5)")
    edit.add_argument("--pnp-f-t", type=float, help="PnP: fraction of steps with feature injection (default 0.8)")
    edit.add_argument("--sdedit-start", type=float, help="SDEdit: fraction of the schedule to run (default 0.9)")
    edit.add_argument("--propagation", help=f"{', '.join(PROPAGATIONS)} (default original: the official code's)")
    edit.add_argument("--keyframes", help=f"keyframe sampler: {', '.join(KEYFRAME_SAMPLERS)} (default random)")
    edit.add_argument("--keyframe-schedule", help="JSON file with the keyframes of every step (default: drawn)")
    edit.add_argument("--keyframe-window", type=keyframe_window_arg, metavar="W|all",
                      help="at most W keyframes per keyframe-pass call: past W, groups of W keyframes attend to "
                           "themselves and 8 anchors spread over the video (memory bounded, time linear); "
                           "all: every keyframe attends to every keyframe (default 64: exact up to 512 frames "
                           "at batch size 8)")
    edit.add_argument("--seed", type=int, help="seed of the keyframe draws (and SD3/FLUX's noise; default 1)")
    edit.add_argument("--n-max", type=int, help="FlowEdit (SD3/FLUX): run the last N of the steps "
                                                "(default: the family's, 33 of 50 SD3, 24 of 28 FLUX)")
    edit.add_argument("--n-min", type=int, help="FlowEdit: of those, sample the last N plainly (default 0)")
    edit.add_argument("--n-avg", type=int, help="FlowEdit: velocity differences averaged per step (default 1)")
    edit.add_argument("--source-guidance-scale", type=float,
                      help="FlowEdit: the source branch's guidance (default 3.5 SD3, 1.5 FLUX); "
                           "--guidance-scale is the target's (default 13.5 SD3, 5.5 FLUX)")
    edit.add_argument("--frames-dir", help="also write the edited frames as PNG into this folder (default: none)")

    inv = sub.add_parser("invert", help="invert a video into the cache (optionally reconstruct it)",
                         description="DDIM-invert the frames and keep the inverted latents in the inversion "
                                     "cache, so that later edits of the same frames, size, model and inversion "
                                     "prompt skip the inversion. Without --reconstruct nothing else is written. "
                                     "--reconstruct also runs the DDIM reconstruction and prints its PSNR; with "
                                     "-o it writes it as a video (as the official preprocess's inverted.mp4).")
    _edit_options(inv)
    inv.add_argument("--reconstruct", action="store_true",
                     help="also run a DDIM reconstruction and report its PSNR (as many UNet calls again)")
    inv.add_argument("-o", "--output", help="with --reconstruct: write the reconstruction to this video "
                                            "(.mp4/.mov/.mkv, or a folder: INPUT-tokenflow.mp4 in it; default: none)")

    ev = sub.add_parser("eval", help="warp error and CLIP scores of edited videos against their source")
    ev.add_argument("--source", required=True, help="the source video or frame folder (required)")
    ev.add_argument("--edited", required=True, action="append", help="an edited video or folder (required; repeatable)")
    ev.add_argument("-p", "--prompt", help="the edit prompt, for CLIP-T (required unless --no-clip)")
    ev.add_argument("--json", help="write the results as JSON (default: none)")
    ev.add_argument("--csv", help="write the results as CSV (default: none)")
    ev.add_argument("--plot", help="draw per-frame warp error of every edited video as PNG (default: none)")
    ev.add_argument("--no-clip", action="store_true", help="skip the CLIP scores (no weights needed)")
    ev.add_argument("--clip-model", default=None, help="CLIP model id or folder (default openai/clip-vit-large-patch14)")
    ev.add_argument("--max-frames", type=int, help="evaluate only the first N frames (default: all)")
    ev.add_argument("--fps", type=float, help="frame rate of frame folders (default 10)")
    ev.add_argument("--device", default=None, help="device for CLIP: auto, cpu, cuda or mps (default auto)")

    an = sub.add_parser("analyze", help="pictures of the diffusion features (the paper's Figures 2 and 3)")
    _edit_options(an)
    an.add_argument("-o", "--output", default="tokenflow-analysis", help="output folder (default %(default)s)")
    an.add_argument("--timestep", type=int, default=201,
                    help="diffusion timestep of the features; the nearest kept one is used (default 201)")
    an.add_argument("--source-frame", type=int, default=0, help="Figure 2: frame the target is rebuilt from (default 0)")
    an.add_argument("--target-frame", type=int, default=None, help="Figure 2: frame to rebuild (default: the last)")
    an.add_argument("--layer", default=None, help="self-attention layer (default: highest-resolution decoder layer)")

    ui = sub.add_parser("ui", help="start the web page (needs the extra: pip install 'tokenflow-video[ui]')")
    ui.add_argument("--model", default=None, help=f"hub id or local folder (default {DEFAULT_MODEL}); "
                                                  "'tiny' for the built-in tiny random model")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    ui.add_argument("--port", type=int, default=7860, help="port to listen on (default %(default)s)")
    ui.add_argument("--share", action="store_true", help="ask Gradio for a public link (off by default)")
    ui.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default auto)")
    ui.add_argument("--dtype", default=None, help="auto, float32, float16 or bfloat16 (or fp32, fp16, bf16; default "
                                                  "auto: float16 on cuda, bfloat16 on a CPU where it measures "
                                                  "clearly faster, float32 elsewhere; --model tiny: float32)")
    ui.add_argument("--cache-dir", help="inversion cache folder (default ~/.cache/tokenflow/inversions)")
    ui.add_argument("--max-upload-mb", type=float, default=200.0, help="largest upload (default %(default)s MB)")
    ui.add_argument("--max-frames", type=int, default=120, help="most frames a visitor may edit (default %(default)s)")
    ui.add_argument("--max-side", type=int, default=1024, help="largest working height or width "
                                                                "(default %(default)s)")

    batch = sub.add_parser("batch", help="run many edits from a YAML jobs file (alone, or under torchrun)")
    batch.add_argument("jobs", help="YAML with 'defaults:' (any edit setting) and 'jobs:' (input, prompt, output, "
                                    "any setting) (required)")
    batch.add_argument("--json", help="also write the summary (job, rank, seconds, status, error) as JSON "
                                      "(default: none)")
    batch.add_argument("--force", action="store_true",
                       help="redo jobs whose output exists with the same settings (default: skip them)")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    cache = sub.add_parser("cache", help="list or clear the inversion cache and resume checkpoints")
    cache.add_argument("action", choices=("list", "clear"), help="list: what is cached, with sizes; clear: remove")
    cache.add_argument("--cache-dir", help="the cache folder (default ~/.cache/tokenflow/inversions)")
    cache.add_argument("--older-than", type=float, help="clear: only entries unused for more than DAYS days "
                                                        "(default: all)")

    demo = sub.add_parser("demo", help="run the whole pipeline on a bundled clip with a tiny random model")
    demo.add_argument("-o", "--output", default="tokenflow-demo.mp4", help="output video (default %(default)s)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def _configure_logging(quiet: bool, libraries: bool = True) -> None:
    """Our log lines' format; with ``libraries``, diffusers' and transformers' own notices quietened (that
    imports them: `tokenflow cache`, which loads no model, goes without, and starts in a fraction of a second)."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    who = f"tokenflow [rank {rank}]" if world.isdigit() and int(world) > 1 else "tokenflow"  # under torchrun
    logging.basicConfig(level=logging.WARNING, format=f"{who}: %(message)s", stream=sys.stderr)
    logging.getLogger("tokenflow").setLevel(logging.WARNING if quiet else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # library deprecation notices are for us, not for the person running the command
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if not libraries:
        return
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # logging setup must never stop the command
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    command, args = None, None
    previous = _handle_sigterm()
    try:
        args = parser.parse_args(argv)
        command = args.command
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        _configure_logging(getattr(args, "quiet", False), libraries=args.command != "cache")
        commands = {"edit": cmd_edit, "invert": cmd_invert, "eval": cmd_eval, "analyze": cmd_analyze,
                    "ui": cmd_ui, "demo": cmd_demo, "cache": cmd_cache, "batch": cmd_batch}
        from .progress import above_the_bars

        with above_the_bars():  # notices land above a running progress bar, not inside it
            return commands[args.command](args)
    except RunFailed as e:  # out of memory, a stopped peer rank: not the user's input
        print(f"tokenflow: error: {e}", file=sys.stderr)
        return 1
    except TokenFlowError as e:
        print(f"tokenflow: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("tokenflow: error: out of host memory: lower --height/--width or --max-frames", file=sys.stderr)
        return 1
    except OSError as e:  # a write or read the helpers did not wrap: still one line, nothing half-written
        where = f" ('{e.filename}')" if getattr(e, "filename", None) else ""
        print(f"tokenflow: error: {TokenFlowError((e.strerror or str(e) or type(e).__name__) + where)}",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        checkpointed = command in RESUMABLE and not (command == "invert" and getattr(args, "no_cache", False))
        hint = ("; finished work is checkpointed: run the same command again to resume (--no-resume "
                "starts over)") if checkpointed else ""
        print(f"tokenflow: interrupted ({name}){hint}", file=sys.stderr)
        return 128 + int(signum)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


RESUMABLE = ("edit", "invert", "analyze", "batch")


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _handle_sigterm():
    """SIGTERM (timeout, cluster schedulers) ends the run like Ctrl-C: temporaries removed, one line."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupted)


if __name__ == "__main__":
    sys.exit(main())
