"""The ``tokenflow`` command: the only place that parses arguments and prints.

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
import csv
import json
from dataclasses import replace as dataclasses_replace
import logging
import os
import signal
import sys
import time
from typing import Any, Optional, Sequence

from .config import (DEFAULT_MODEL, DEMO_CLIP, EDITORS, KEYFRAME_SAMPLERS, PROPAGATIONS, RUN_KEYS, EditConfig,
                     load_config_file, result_settings, settings_path, validate_run)
from .errors import Interrupted, RankStopped, RunFailed, TokenFlowError

EXIT_USAGE = 2


def flow_kind(model: Optional[str]) -> Optional[str]:  # torch is imported when a command needs it, not for
    from .flow import flow_kind as kind  # `tokenflow cache list` or `--help`

    return kind(model)


def flow_defaults(kind: str) -> dict[str, Any]:
    from .flow import flow_defaults as defaults

    return defaults(kind)


logger = logging.getLogger("tokenflow.cli")
# The demo's settings: small enough for two CPU cores in well under two minutes.
DEMO_SETTINGS = dict(prompt="a shiny silver robotic wolf", inversion_prompt="a wolf", max_frames=16,
                     height=128, width=224, steps=20, inversion_steps=20, batch_size=8)


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
    edit.add_argument("--keyframe-window", type=_keyframe_window, metavar="W|all",
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


_ARG_TO_FIELD = {"prompt", "inversion_prompt", "negative_prompt", "editor", "steps", "inversion_steps",
                 "guidance_scale", "pnp_attn_t", "pnp_f_t", "sdedit_start", "batch_size", "propagation",
                 "keyframes", "keyframe_schedule", "keyframe_window", "seed", "height", "width", "max_frames", "fps", "control",
                 "fit", "start_frame", "start_time", "frame_stride",
                 "controlnet", "control_scale", "canny_low", "canny_high", "depth_model",
                 "n_max", "n_min", "n_avg", "source_guidance_scale"}


_ALL_KEYFRAMES = object()  # --keyframe-window all: no window (None in the settings)


def _keyframe_window(text: str):
    """``--keyframe-window``: a positive integer, or ``all`` for the exact pass."""
    if text.strip().lower() in ("all", "none"):
        return _ALL_KEYFRAMES
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'all', got {text[:40]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'all', got {value}")
    return value


def resolve_settings(args: argparse.Namespace) -> tuple[EditConfig, dict[str, Any]]:
    """Command line over config file over defaults. Returns the edit settings and the run keys."""
    edit: dict[str, Any] = {}
    run: dict[str, Any] = {}
    if getattr(args, "data_path", None):  # --data_path, as the official scripts name the input
        if args.input and args.input != args.data_path:
            raise TokenFlowError(f"two inputs given: '{args.input}' and --data_path '{args.data_path}'")
        args.input = args.data_path
    if getattr(args, "config", None):
        loaded = load_config_file(args.config)
        edit.update(loaded.edit)
        run.update(loaded.run)
    from_config = dict(run)
    for name in _ARG_TO_FIELD:
        value = getattr(args, name, None)
        if isinstance(value, list):  # -p given several times: the settings hold the first (see cmd_edit)
            value = value[0]
        if value is not None:
            edit[name] = None if value is _ALL_KEYFRAMES else value
    for name in sorted(RUN_KEYS):
        value = getattr(args, name, None)
        if value is not None:
            run[name] = value
    kind = flow_kind(run.get("model"))
    try:  # SD3/FLUX start from FlowEdit's published settings
        config = EditConfig(**({**flow_defaults(kind), **edit} if kind else edit))
    except TypeError as e:
        raise TokenFlowError(f"bad settings: {e}") from None
    config = config.validate() if kind else with_inversion_steps(config.validate(), "inversion_steps" in edit)
    run = validate_run(run)
    device = run.get("device")
    if device and getattr(args, "device", None) is None and device == from_config.get("device") and device != "auto":
        from .models import resolve_device

        try:
            resolve_device(device)
        except TokenFlowError:  # a config written on another machine: use what this one has
            logger.warning("the config asks for device '%s', which is not available here; using auto", device)
            run["device"] = "auto"
    return config, run


def with_inversion_steps(config: EditConfig, given: bool) -> EditConfig:
    """When the inversion steps were not given and the default misses editing timesteps of
    ``--steps``, choose the smallest valid multiple and say so in one line."""
    if given or config.steps == config.inversion_steps:
        return config
    from .inversion import choose_inversion_steps, missing_timesteps

    if not missing_timesteps(config.steps, config.inversion_steps):
        return config
    chosen = choose_inversion_steps(config.steps, config.inversion_steps)
    logger.warning("--inversion-steps %d chosen for --steps %d (the inversion must pass through every editing "
                   "timestep)", chosen, config.steps)
    return config.replace(inversion_steps=chosen)


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


TINY = "tiny"  # --model tiny: the tiny random model built in code (checks the machinery; output is noise)


def _load_pipeline(run: dict[str, Any]):
    from .pipeline import TokenFlowPipeline

    kind = flow_kind(run.get("model"))
    if kind:
        return apply_runtime_options(_load_flow_pipeline(run, kind), run)
    if run.get("model") == TINY:
        if run.get("lora") or run.get("model_config"):
            raise TokenFlowError("--model tiny takes no --lora or --model-config")
        from .models import resolve_device

        return apply_runtime_options(TokenFlowPipeline.from_tiny(seed=0, device=str(resolve_device(
            run.get("device") or "auto")), dtype=run.get("dtype") if run.get("dtype") not in (None, "auto")
            else "float32"), run)
    loras = run.get("lora") or []
    pipe = TokenFlowPipeline.from_pretrained(run.get("model") or DEFAULT_MODEL, device=run.get("device") or "auto",
                                             dtype=run.get("dtype") or "auto", model_config=run.get("model_config"),
                                             allow_pickle=bool(run.get("allow_pickle")),
                                             loras=[loras] if isinstance(loras, str) else list(loras))
    return apply_runtime_options(pipe, run)


def _load_flow_pipeline(run: dict[str, Any], kind: str):
    from .flow import TINY_MODELS, FlowPipeline
    from .models import resolve_device

    model, device = run["model"], run.get("device") or "auto"
    if model in TINY_MODELS:
        if run.get("lora") or run.get("model_config"):
            raise TokenFlowError(f"--model {model} takes no --lora or --model-config")
        dtype = run.get("dtype") if run.get("dtype") not in (None, "auto") else "float32"
        return FlowPipeline.from_tiny(kind, seed=0, device=str(resolve_device(device)), dtype=dtype)
    loras = run.get("lora") or []
    return FlowPipeline.from_pretrained(model, device=device, dtype=run.get("dtype") or "auto", family=kind,
                                        model_config=run.get("model_config"), offload=bool(run.get("offload")),
                                        loras=[loras] if isinstance(loras, str) else list(loras))


def apply_runtime_options(pipe, run: dict[str, Any]):
    """--offload, --vae-slicing, --vae-tiling, --compile (flags absent or False leave the pipeline as is)."""
    if run.get("offload"):
        pipe.enable_offload()
    if run.get("vae_slicing"):
        pipe.enable_vae_slicing()
    if run.get("vae_tiling"):
        pipe.enable_vae_tiling()
    if run.get("compile"):
        pipe.compile()
    return pipe


def _prompt_runs(run: dict[str, Any], prompts: Optional[list[str]]) -> list[dict[str, Any]]:
    """The run keys of each prompt's output: ``out.mp4`` -> ``out-1.mp4``, ...; ``DIR`` -> ``DIR/1``, ..."""
    if not prompts:
        return [run]
    from .outputs import resolve_output

    output = resolve_output(run.get("output"), run["input"])
    root, ext = os.path.splitext(output)
    frames_dir = run.get("frames_dir")
    if frames_dir and os.path.exists(frames_dir) and not os.path.isdir(frames_dir):
        raise TokenFlowError(f"--frames-dir '{frames_dir}' is a file; several prompts need a folder for "
                             f"their frame folders 1 ... {len(prompts)}")
    if frames_dir and not os.path.isdir(frames_dir):  # DIR, which holds DIR/1, DIR/2, ...: made only when
        from .video import check_writable_name  # the frames are written, so a refused run leaves nothing

        check_writable_name(frames_dir)
    return [{**run, "output": f"{root}-{i}{ext}",
             "frames_dir": os.path.join(frames_dir, str(i)) if frames_dir else None} for i in range(1, len(prompts) + 1)]


def _finish(pipe, result, output: str, run: dict[str, Any], started: float, label: str = "edited",
            discard: bool = True) -> None:
    """Write the video, the frames and the settings. Each lands whole: all three are written under
    temporary names first and renamed only once every one of them is complete, so a full disk
    while writing leaves none of them behind; the settings file is renamed last."""
    import contextlib

    import yaml

    from .atomic import atomic_dir, atomic_path
    from .config import resolved_settings
    from .models import dropped_text
    from .outputs import make_output_folder
    from .video import aspect_note, encode_video, frames_replaceable, save_frames

    make_output_folder(output)  # made before the work (see cmd_edit); here in case it went meanwhile
    frames = result.uint8()
    depends = resolved_settings(result_settings(run, result.config), frames.shape[1], frames.shape[2], result.fps,
                                result.config.frame_stride)
    settings = {"tokenflow": __import__("tokenflow").__version__, "input": depends.pop("input"),
                "model": depends.pop("model"), "device": str(pipe.device),
                "dtype": str(pipe.dtype).replace("torch.", ""), **depends}
    dropped = {f"{key}_dropped": dropped_text(settings[key]) for key in ("prompt", "inversion_prompt", "negative_prompt")
               if dropped_text(settings[key])}
    if dropped:  # CLIP reads 77 tokens: what it did not read of a prompt (ignored when read back)
        settings["notes"] = dropped
    with contextlib.ExitStack() as commit:  # renames happen on exit, in reverse order: settings last,
        # so a settings file never stands beside an older video (batch skips by it)
        with open(commit.enter_context(atomic_path(settings_path(output))), "w") as f:
            yaml.safe_dump(settings, f, sort_keys=False)
        encode_video(commit.enter_context(atomic_path(output)), frames, result.fps, result.audio_source,
                     audio_start=result.audio_start)
        if run.get("frames_dir"):  # several prompts: DIR/1, ... go into DIR, made now (see _prompt_runs)
            os.makedirs(os.path.dirname(os.path.abspath(run["frames_dir"])), exist_ok=True)
            save_frames(commit.enter_context(atomic_dir(run["frames_dir"], frames_replaceable)), frames)
    if discard:
        result.discard_checkpoint()  # the output is safe: the resume checkpoint has done its job
    n, h, w = frames.shape[:3]
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items() if k != "read")
    resumed = f", resumed after step {result.resumed_from}" if result.resumed_from else ""
    resumed_frames = getattr(result.inversion, "resumed_frames", 0)
    if resumed_frames:
        resumed += f", inversion resumed after {resumed_frames} of {n} frames"
    aspect = aspect_note(result.source_size, (h, w), result.config.fit)
    aspect = f" ({aspect})" if aspect else ""
    numerics = f"{pipe.device.type} {str(pipe.dtype).replace('torch.', '')}"
    print(f"{label} {n} frames at {w}x{h}{aspect} in {time.perf_counter() - started:.1f}s ({numerics}; {stages}"
          f"{resumed}) -> {output}")


def _settings_and_input(args: argparse.Namespace, usage: str):
    """Settings, run keys, and a probe of the input (header and first frame), before any model
    loads so that bad input fails fast; frames are decoded later, fitted one at a time."""
    from .models import resolve_device, resolve_dtype
    from .preflight import check_local_paths
    from .video import probe_video

    config, run = resolve_settings(args)
    if not run.get("input"):
        raise TokenFlowError(f"no input given: {usage}")
    if run.get("cache_dir") and os.path.exists(run["cache_dir"]) and not os.path.isdir(run["cache_dir"]):
        raise TokenFlowError(f"cache folder '{run['cache_dir']}' is a file")
    device = resolve_device(run.get("device") or "auto")
    resolve_dtype(run.get("dtype") or "auto", device)
    check_local_paths(config, run)
    if flow_kind(run.get("model")):  # no inversion: the rectified-flow pipeline checks its own settings
        _check_flow(config, run)
    else:
        _check_steps(config)
    return config, run, probe_video(run["input"])


def _no_flow(run: dict[str, Any], command: str, why: str) -> None:
    if flow_kind(run.get("model")):
        raise TokenFlowError(f"tokenflow {command} is not for SD3/FLUX models ({run['model']}): {why}")


def _check_flow(config: EditConfig, run: dict[str, Any]) -> None:
    from .config import FLOW_EDITORS

    if config.editor not in FLOW_EDITORS:
        raise TokenFlowError(f"editor {config.editor} is for the UNet models; SD3/FLUX take "
                             f"{', '.join(FLOW_EDITORS)} (default flowedit)")
    if config.control:
        raise TokenFlowError("--control (ControlNet) is for the UNet models, not SD3/FLUX")
    for name in ("height", "width"):
        value = getattr(config, name)
        if value is not None and value % 16:
            raise TokenFlowError(f"{name} must be a multiple of 16 for SD3/FLUX (VAE factor 8, patches of 2), "
                                 f"got {value}")
    if config.keyframe_schedule:
        from .keyframes import ScheduledKeyframes

        ScheduledKeyframes.from_json(config.keyframe_schedule)


def _check_steps(config: EditConfig) -> None:
    """--steps and --inversion-steps against the usual SD schedule (the model's is checked again)."""
    from .inversion import missing_timesteps, steps_error
    from .keyframes import ScheduledKeyframes

    missing = missing_timesteps(config.steps, config.inversion_steps)
    if missing:
        raise steps_error(config.steps, config.inversion_steps, missing)
    if config.keyframe_schedule:
        ScheduledKeyframes.from_json(config.keyframe_schedule)  # readable and well formed


def _check_schedule_frames(config: EditConfig, info) -> None:
    """The keyframe schedule fits the frames the input declares (checked again on the real count)."""
    from .preflight import expected_frames

    n = expected_frames(info, config)
    if not config.keyframe_schedule or not n or config.editor == "flowedit":  # flow: checked before the work
        return
    import torch

    from .editors import EDITORS as EDITOR_CLASSES
    from .keyframes import ScheduledKeyframes

    steps = len(EDITOR_CLASSES[config.editor](config).select_timesteps(torch.arange(config.steps)))
    ScheduledKeyframes.from_json(config.keyframe_schedule).check(steps, n, config.batch_size)


def _check_outputs(run: dict[str, Any], config: EditConfig, info, config_file: Optional[str] = None,
                   frames_parent_later: bool = False, no_cache: bool = False) -> str:
    """Everything about an edit's outputs that can fail, checked before the work: names, folders,
    outputs against inputs, the keyframe schedule against the frames, free space. Returns the output.
    ``frames_parent_later``: the frames folder's parent is made when the frames are written.
    ``no_cache``: the checkpoints go beside the output instead of the cache folder."""
    from .outputs import check_output, note_replaced, resolve_output
    from .preflight import check_free_space, check_no_overwrite, protected_paths
    from .video import check_frames_dir

    output = check_output(resolve_output(run.get("output"), run["input"]))
    settings_file = check_output(settings_path(output), extensions=None)
    frames_dir = run.get("frames_dir")
    if frames_dir:
        check_frames_dir(frames_dir, parent_later=frames_parent_later)
    work = _checkpoint_dir(output) if no_cache else _cache_root(run)  # what the run writes besides its outputs
    check_no_overwrite([output, settings_file, work], frames_dir,
                       protected_paths(run["input"], config_file, config, run))
    _check_schedule_frames(config, info)
    check_free_space(info, config, output, frames_dir, work)
    note_replaced(output)
    return output


def _cached_inversion(pipe, frames, config: EditConfig, run: dict[str, Any], args: argparse.Namespace,
                      conditioning=None, output: Optional[str] = None):
    """The inversion through the cache; checkpointed beside the cache, or with --no-cache beside
    ``output`` (none without an output: ``tokenflow invert --no-cache`` keeps nothing)."""
    checkpoint_dir = _checkpoint_dir(output) if args.no_cache and output else None
    return pipe.invert(frames, config.inversion_prompt, config.inversion_steps, config.steps,
                       config.inversion_batch(), run.get("cache_dir"), not args.no_cache, progress=not args.quiet,
                       conditioning=conditioning or pipe.prepare_conditioning(frames, config),
                       checkpoint=not args.no_cache or output is not None, restart=bool(run.get("no_resume")),
                       checkpoint_dir=checkpoint_dir, source=run["input"])


def _existing_ancestor(path: str) -> str:
    """``path`` if it exists, else the folder it would be made in (its nearest existing ancestor's child)."""
    path = os.path.abspath(path)
    while not os.path.exists(os.path.dirname(path)) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


CHECKPOINT_FOLDER = ".tokenflow-checkpoints"  # with --no-cache, beside the output; gone with its last checkpoint


def _checkpoint_dir(output: str) -> str:
    """Where --no-cache keeps the resume checkpoints: beside the output, as its temporaries are."""
    return os.path.join(os.path.dirname(os.path.abspath(output)), CHECKPOINT_FOLDER)


def _cache_root(run: dict[str, Any]) -> str:
    from .cache import default_cache_dir

    return run.get("cache_dir") or default_cache_dir()


def cmd_edit(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config, run, info = _settings_and_input(args, "tokenflow edit INPUT -p PROMPT")
    prompts = args.prompt if args.prompt and len(args.prompt) > 1 else None
    from .config import check_prompts

    check_prompts(prompts or [config.prompt], several=bool(prompts))
    runs = _prompt_runs(run, prompts)  # one output per prompt
    outputs = [_check_outputs(r, config.replace(prompt=p).validate(), info, getattr(args, "config", None),
                              frames_parent_later=bool(prompts), no_cache=args.no_cache)
               for r, p in zip(runs, prompts or [config.prompt])]
    from .distributed import check_launch, local_device, shutdown

    rank, world, local_rank = check_launch()  # ranks in range, and what the process group needs
    if world > 1:  # under torchrun: this rank's own GPU, and the edit split across the ranks
        if str(run.get("device") or "").startswith("cuda:"):
            raise TokenFlowError(f"--device {run['device']} under torchrun would put every rank on one GPU; "
                                 f"give --device cuda (or auto): each rank takes cuda:LOCAL_RANK")
        device = local_device(run.get("device") or "auto", local_rank)
        if device != (run.get("device") or "auto"):
            run = {**run, "device": device}
        if rank:
            logging.getLogger("tokenflow").setLevel(logging.WARNING)  # rank 0 reports
    pipe = _load_pipeline(run)
    from .outputs import make_output_folder

    for output in outputs:  # the model loaded: a missing output folder is made now (a refused run leaves none)
        make_output_folder(output)
    pipe.release_text_encoders([config.inversion_prompt, config.negative_prompt, *(prompts or [config.prompt])])
    from .distributed import Group
    from .errors import OutOfMemory
    from .memory import is_out_of_memory
    from .models import short_error

    group = Group()
    try:
        if world > 1:
            group = pipe.distribute().group
        results = pipe.edit(run["input"], config=config, cache_dir=run.get("cache_dir"),
                            use_cache=not args.no_cache, progress=not args.quiet and group.is_main,
                            checkpoint=True, restart=bool(run.get("no_resume")), prompts=prompts,
                            checkpoint_dir=_checkpoint_dir(outputs[0]) if args.no_cache else None)
        results = results if prompts else [results]
        if group.is_main:  # rank 0 holds the whole video and writes it
            for r, result, output in zip(runs, results, outputs):
                _finish(pipe, result, output, r, started, discard=False)
            results[0].discard_checkpoint()  # every output is written: the checkpoint has done its job
        if group.distributed and group.agree(True) and not group.is_main:
            results[0].discard_checkpoint()  # only once rank 0 has written the outputs
    except RuntimeError as e:
        if is_out_of_memory(e):  # what the retries inside could not lower (e.g. gathering the output)
            raise OutOfMemory(f"out of memory: {short_error(e)}; lower --height/--width or --max-frames, "
                              f"or use --offload") from None
        if world <= 1:
            raise
        raise RankStopped(f"rank {rank} of {world} stopped: {short_error(e)}; the other ranks' messages say "
                          f"why, and the same command resumes from the checkpoints") from None
    shutdown(group)  # after an error the process exits instead: a collective with a dead peer may not return
    return 0


def cmd_invert(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config, run, _ = _settings_and_input(args, "tokenflow invert INPUT")
    _no_flow(run, "invert", "FlowEdit edits SD3/FLUX without an inversion: use tokenflow edit")
    output = None
    if args.output:  # the reconstruction's video (not a config's output_path), checked before the model loads
        from .outputs import check_output, note_replaced, resolve_output
        from .preflight import check_no_overwrite, protected_paths

        if not args.reconstruct:
            raise TokenFlowError("-o writes the reconstruction: give --reconstruct too (invert alone writes "
                                 "only the cache)")
        output = check_output(resolve_output(args.output, run["input"]))
        check_no_overwrite([output], None, protected_paths(run["input"], getattr(args, "config", None), config, run))
        note_replaced(output)
    pipe = _load_pipeline(run).release_text_encoders([config.inversion_prompt])
    video = pipe.load_video(run["input"], config)
    frames = video.frames
    conditioning = pipe.prepare_conditioning(frames, config)
    inversion = _cached_inversion(pipe, frames, config, run, args, conditioning)
    n, _, h, w = frames.shape
    line = f"inverted {n} frames at {w}x{h} ({config.inversion_steps} steps)"
    if args.reconstruct:
        from .inversion import psnr

        rebuilt = pipe.reconstruct(inversion, inversion_prompt=config.inversion_prompt,
                                   inversion_steps=config.inversion_steps, batch_size=config.inversion_batch(),
                                   progress=not args.quiet, conditioning=conditioning)
        line += f", reconstruction PSNR {psnr(rebuilt, frames):.2f} dB"
        if output:
            from .outputs import make_output_folder
            from .video import to_uint8, write_video

            make_output_folder(output)
            write_video(output, to_uint8(rebuilt), video.fps, video.audio_source, audio_start=video.audio_start)
    print(f"{line} in {time.perf_counter() - started:.1f}s" + (f" -> {output}" if output else ""))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .atomic import atomic_path
    from .metrics import DEFAULT_CLIP, ClipScorer, evaluate, plot_warp_errors
    from .models import resolve_device
    from .video import check_output_path, read_video

    if args.max_frames is not None and args.max_frames < 2:
        raise TokenFlowError(f"max-frames must be at least 2 for a warp error, got {args.max_frames}")
    from .preflight import check_no_overwrite

    outputs = [(args.json, (".json",)), (args.csv, (".csv",)), (args.plot, (".png",))]
    for path, ext in outputs:
        if path:
            check_output_path(path, extensions=ext)
    check_no_overwrite([p for p, _ in outputs if p], None,
                       [p for p in [args.source, *args.edited] if os.path.exists(p)])
    if args.fps is not None and not 0.01 <= args.fps < 1000:
        raise TokenFlowError(f"fps must be a number in [0.01, 1000), got {args.fps}")
    if not args.no_clip and not args.prompt:
        raise TokenFlowError("CLIP-T needs --prompt (or give --no-clip)")
    source = read_video(args.source, args.max_frames, args.fps).frames
    edited = {path: read_video(path, args.max_frames, args.fps).frames for path in args.edited}
    from .metrics import mismatch

    for note in filter(None, (mismatch(path, source, frames) for path, frames in edited.items())):
        logger.warning("%s", note)
    clip = None if args.no_clip else ClipScorer.from_pretrained(args.clip_model or DEFAULT_CLIP,
                                                                 str(resolve_device(args.device or "auto")))
    results = evaluate(source, edited, args.prompt, clip)
    fmt = lambda v, p=5: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    width = max(len("edited"), *(len(r.name) for r in results))
    print(f"{'edited':<{width}}  frames  warp_error  floor     clip_t  clip_f")
    for r in results:
        print(f"{r.name:<{width}}  {r.n_frames:>6}  {fmt(r.warp_error):>10}  {fmt(r.warp_error_floor):<8}  "
              f"{fmt(r.clip_t, 4):>6}  {fmt(r.clip_f, 4):>6}")
    if args.json:
        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump({"source": args.source, "prompt": args.prompt, "results": [r.to_dict() for r in results]},
                      f, indent=1)
    if args.csv:
        with atomic_path(args.csv) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["edited", "n_frames", "warp_error", "warp_error_floor", "clip_t", "clip_f"])
            for r in results:
                writer.writerow([r.name, r.n_frames, r.warp_error, r.warp_error_floor, r.clip_t, r.clip_f])
    if args.plot:
        plot_warp_errors(args.plot, results)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from .analysis import analyze_features, nearest_neighbour_rebuild, write_figures
    from .video import to_uint8

    config, run, info = _settings_and_input(args, "tokenflow analyze INPUT")
    from .analysis import FIGURES
    from .preflight import check_no_overwrite, protected_paths
    from .video import check_writable_name

    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise TokenFlowError(f"output folder '{args.output}' is a file")
    check_writable_name(_existing_ancestor(args.output))
    check_no_overwrite([os.path.join(args.output, name) for name in FIGURES], None,
                       protected_paths(run["input"], getattr(args, "config", None), config, run))
    if args.layer is not None and not args.layer.strip():
        raise TokenFlowError("--layer must name a self-attention layer, got an empty name")

    def check_frames(n: int) -> int:
        target = n - 1 if args.target_frame is None else args.target_frame
        for name, value in (("source-frame", args.source_frame), ("target-frame", target)):
            if not 0 <= value < n:
                raise TokenFlowError(f"{name} must be in [0, {n - 1}], got {value}")
        return target

    from .preflight import expected_frames

    if expected_frames(info, config):  # what the input declares, now; the frames read, below
        check_frames(expected_frames(info, config))
    if not 0 <= args.timestep < 1000:
        raise TokenFlowError(f"timestep must be in [0, 999], got {args.timestep}")
    pipe = _load_pipeline(run).release_text_encoders([config.inversion_prompt])
    layers = [hooked.name for hooked in pipe.layers] if flow_kind(run.get("model")) else pipe.layers.self_attention
    if args.layer and args.layer not in layers:
        raise TokenFlowError(f"unknown layer '{args.layer}'; the layers TokenFlow hooks are e.g. {layers[-1]}")
    frames, fps = pipe.load_video(run["input"], config)[:2]
    n = len(frames)
    target = check_frames(n)
    if flow_kind(run.get("model")):  # no inversion: the features of FlowEdit's noised source branch
        from .analysis import analyze_flow_features

        analysis = analyze_flow_features(pipe, frames, args.timestep, config.inversion_prompt, args.layer,
                                         config.seed, source_guidance=config.source_guidance_scale)
        timestep = analysis.timestep
    else:
        conditioning = pipe.prepare_conditioning(frames, config)
        inversion = _cached_inversion(pipe, frames, config, run, args, conditioning, output=args.output)
        timestep = min(inversion.latents, key=lambda t: abs(t - args.timestep))
        analysis = analyze_features(pipe, inversion, tuple(inversion.x0.shape[-2:]), timestep,
                                    config.inversion_prompt, args.layer, conditioning)
    frames_u8 = to_uint8(frames)
    rebuild = nearest_neighbour_rebuild(frames_u8, analysis.features, args.source_frame, target)
    summary = write_figures(args.output, frames_u8, fps, analysis, rebuild, args.source_frame, target)
    print(f"analyzed {n} frames at t={timestep} ({analysis.layer}): frame {target} rebuilt from frame "
          f"{args.source_frame} by feature NN {summary['psnr_features_nn']:.2f} dB, by RGB NN "
          f"{summary['psnr_rgb_nn']:.2f} dB in {time.perf_counter() - started:.1f}s -> {args.output}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        from .errors import install_hint

        raise TokenFlowError(f"the web page needs Gradio: {install_hint('ui')}") from None
    from .ui import EditorSession, Limits, launch

    if not 0 < args.port < 65536:
        raise TokenFlowError(f"port must be in 1..65535, got {args.port}")
    from .preflight import check_port

    check_port(args.host, args.port)  # before the model loads, not after
    if not args.max_upload_mb > 0 or args.max_upload_mb == float("inf") or args.max_frames < 1 or args.max_side < 8:
        raise TokenFlowError("limits must be positive (max-upload-mb > 0, max-frames >= 1, max-side >= 8)")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    pipe = _load_pipeline({"model": args.model, "device": args.device, "dtype": args.dtype})
    from .flow import TINY_MODELS

    name = ("tiny random model (built in code; output is noise)" if args.model == TINY or args.model in TINY_MODELS
            else args.model or DEFAULT_MODEL)
    session = EditorSession(pipe, name, Limits(args.max_upload_mb, args.max_frames, args.max_side),
                            cache_dir=args.cache_dir)
    try:
        print(f"tokenflow ui: http://{args.host}:{args.port} ({name})", flush=True)
        launch(session, args.host, args.port, args.share)
    finally:  # Ctrl-C, SIGTERM or an error: the edited videos the page served go with the server
        session.close()
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .cache import default_cache_dir, list_entries, remove_entry
    from .errors import human_bytes as _human_bytes

    root = args.cache_dir or default_cache_dir()
    if args.older_than is not None and (args.older_than != args.older_than or args.older_than < 0):
        raise TokenFlowError(f"--older-than must be a number of days >= 0, got {args.older_than}")
    if os.path.exists(root) and not os.path.isdir(root):
        raise TokenFlowError(f"cache folder '{root}' is a file")
    entries = list_entries(root)
    now = time.time()
    if args.action == "list":
        if not entries:
            print(f"the cache at {root} is empty")
            return 0
        # the video by its file name (the whole path is in the entry's manifest.json), the model as it was named
        videos = [_cut(os.path.basename(e.input), 32) if e.input else "-" for e in entries]
        models = [_cut(e.model, 48) or "-" for e in entries]
        vw, mw = max(map(len, ["input", *videos])), max(map(len, ["model", *models]))
        print(f"{'kind':<22} {'key':<12} {'size':>9} {'age':>7}  {'frames':>6}  {'WxH':>9}  {'input':<{vw}}  "
              f"{'model':<{mw}}  inversion prompt")
        for e, video, model in zip(entries, videos, models):
            wh = f"{e.size[1]}x{e.size[0]}" if e.size else "-"
            line = (f"{e.kind:<22} {e.key[:12]:<12} {_human_bytes(e.bytes):>9} {(now - e.modified) / 86400:>6.1f}d  "
                    f"{e.frames or '-':>6}  {wh:>9}  {video:<{vw}}  {model:<{mw}}  {repr(e.prompt) if e.prompt else ''}")
            print(line.rstrip())
        print(f"{len(entries)} entries, {_human_bytes(sum(e.bytes for e in entries))} in {root}")
        return 0
    cutoff = None if args.older_than is None else now - args.older_than * 86400
    doomed = [e for e in entries if cutoff is None or e.modified < cutoff]
    for e in doomed:
        try:
            remove_entry(e)
        except OSError as err:
            raise TokenFlowError(f"cannot remove '{e.path}': {err.strerror or err}") from None
    print(f"removed {len(doomed)} of {len(entries)} entries, {_human_bytes(sum(e.bytes for e in doomed))} "
          f"freed in {root}")
    return 0


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters: the middle gives way to '...' (a name's ends tell it apart)."""
    return text if len(text) <= width else text[:width - 13] + "..." + text[-10:]


BATCH_TIMEOUT_HOURS = 24.0  # how long a rank that is done waits for the others at the summary


def _run_job(job, pipes: dict, rank: int, quiet: bool) -> str:
    """One job of a batch: its own checks, the model (loaded once per model), the edit, the outputs."""
    from .preflight import check_local_paths
    from .video import probe_video

    run, config = job.run, job.config
    info = probe_video(run["input"])
    check_local_paths(config, run)
    output = _check_outputs(run, config, info)
    key = job.model_key()
    if key not in pipes:
        pipes[key] = _load_pipeline(run)
    from .outputs import make_output_folder

    make_output_folder(output)
    started = time.perf_counter()
    result = pipes[key].edit(run["input"], config=config, cache_dir=run.get("cache_dir"), progress=not quiet,
                             checkpoint=True, restart=bool(run.get("no_resume")))
    _finish(pipes[key], result, output, run, started, label=f"{job.name} [rank {rank}]: edited")
    return output


def _join_batch_ranks(jobs, local_rank: int):
    """Under torchrun: join the process group (bounded by TOKENFLOW_DIST_TIMEOUT), give each job this
    rank's GPU, and return the group the summary is gathered over (ranks finish their jobs hours
    apart: only the summary waits that long, on a group of its own)."""
    import datetime

    import torch
    import torch.distributed as dist

    from .distributed import local_device, start_process_group, timeout_seconds

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    start_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout_seconds())
    for job in jobs:  # each rank its own device
        if torch.cuda.is_available() and not job.run.get("device"):
            job.run["device"] = local_device("auto", local_rank)
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=BATCH_TIMEOUT_HOURS))


def cmd_batch(args: argparse.Namespace) -> int:
    from .atomic import atomic_path
    from .batch import JobResult, deal, finished_settings, format_table, gather_results, load_jobs
    from .distributed import check_launch
    from .models import short_error
    from .video import check_output_path

    if args.json:
        check_output_path(args.json, extensions=(".json",))
    jobs = load_jobs(args.jobs, summary=args.json)  # every job's settings and paths checked before any work
    jobs = [j if flow_kind(j.run.get("model")) else
            dataclasses_replace(j, config=with_inversion_steps(j.config, j.given_inversion_steps)) for j in jobs]
    rank, world, local_rank = check_launch()
    summary_group = _join_batch_ranks(jobs, local_rank) if world > 1 else None
    pipes: dict = {}
    results = []
    for job in deal(jobs, rank, world):
        started = time.perf_counter()
        r = JobResult(job.index, job.run["input"], job.output, rank)
        try:
            if not args.force and finished_settings(job, result_settings(job.run, job.config)):
                r.status = "skipped"
            else:
                _run_job(job, pipes, rank, args.quiet or world > 1)
                r.status = "done"
        except TokenFlowError as e:  # this job's input or output: it fails alone
            r.status, r.error = "failed", str(e)
        except (OSError, RuntimeError, ValueError) as e:
            r.status, r.error = "failed", f"{type(e).__name__}: {short_error(e)}"
        r.seconds = time.perf_counter() - started
        if r.status == "failed":
            print(f"tokenflow: {job.name} failed: {r.error}", file=sys.stderr)
        results.append(r)
    everything = gather_results(results, world, summary_group)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if everything is None:  # not rank 0
        return 0 if all(r.status != "failed" for r in results) else 1
    print(format_table(everything))
    if args.json:
        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump({"jobs_file": args.jobs, "world_size": world,
                       "results": [r.to_dict() for r in sorted(everything, key=lambda r: r.job)]}, f, indent=1)
    return 0 if all(r.status != "failed" for r in everything) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from .pipeline import TokenFlowPipeline
    from .video import check_output_path

    output = check_output_path(args.output)
    print("tokenflow demo: a tiny randomly initialised Stable-Diffusion-2.1-shaped model built in code; "
          "its output is noise. This checks the machinery (video in, inversion, TokenFlow editing, "
          "video out with audio), not the pictures.", file=sys.stderr)
    pipe = TokenFlowPipeline.from_tiny(seed=0, device="cpu")
    config = EditConfig(**DEMO_SETTINGS).validate()
    result = pipe.edit(DEMO_CLIP, config=config, use_cache=False, progress=not args.quiet)
    _finish(pipe, result, output, {"input": DEMO_CLIP, "model": TINY}, started, label="demo: edited")
    return 0


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
