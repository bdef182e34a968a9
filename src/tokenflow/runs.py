"""One run of a command: its settings (the command line over a settings file over the defaults), the
checks before any expensive work, the pipeline it loads, and the writing of its results (the one writer of
edited videos, frames and settings files for ``edit``, ``demo`` and ``batch``)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Optional

from .config import DEFAULT_MODEL, RUN_KEYS, EditConfig, RunSettings, load_config_file, result_settings, settings_path
from .errors import TokenFlowError


logger = logging.getLogger("tokenflow.cli")


def flow_kind(model: Optional[str]) -> Optional[str]:  # torch is imported when a command needs it, not for
    from .flow import flow_kind as kind  # `tokenflow cache list` or `--help`

    return kind(model)


def flow_defaults(kind: str) -> dict[str, Any]:
    from .flow import flow_defaults as defaults

    return defaults(kind)


_ARG_TO_FIELD = {"prompt", "inversion_prompt", "negative_prompt", "editor", "steps", "inversion_steps",
                 "guidance_scale", "pnp_attn_t", "pnp_f_t", "sdedit_start", "batch_size", "propagation",
                 "keyframes", "keyframe_schedule", "keyframe_window", "seed", "height", "width", "max_frames", "fps", "control",
                 "fit", "start_frame", "start_time", "frame_stride",
                 "controlnet", "control_scale", "canny_low", "canny_high", "depth_model",
                 "n_max", "n_min", "n_avg", "source_guidance_scale"}


_ALL_KEYFRAMES = object()  # --keyframe-window all: no window (None in the settings)


def keyframe_window_arg(text: str):
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


def resolve_settings(args: argparse.Namespace) -> tuple[EditConfig, RunSettings]:
    """Command line over config file over defaults. Returns the edit settings and the run's own."""
    edit: dict[str, Any] = {}
    given: dict[str, Any] = {}
    if getattr(args, "data_path", None):  # --data_path, as the official scripts name the input
        if args.input and args.input != args.data_path:
            raise TokenFlowError(f"two inputs given: '{args.input}' and --data_path '{args.data_path}'")
        args.input = args.data_path
    if getattr(args, "config", None):
        loaded = load_config_file(args.config)
        edit.update(loaded.edit)
        given.update(loaded.run)
    from_config = dict(given)
    for name in _ARG_TO_FIELD:
        value = getattr(args, name, None)
        if isinstance(value, list):  # -p given several times: the settings hold the first (see cmd_edit)
            value = value[0]
        if value is not None:
            edit[name] = None if value is _ALL_KEYFRAMES else value
    for name in sorted(RUN_KEYS):
        value = getattr(args, name, None)
        if value is not None:
            given[name] = value
    run = RunSettings.from_dict(given)
    kind = flow_kind(run.model)
    try:  # SD3/FLUX start from FlowEdit's published settings
        config = EditConfig(**({**flow_defaults(kind), **edit} if kind else edit))
    except TypeError as e:
        raise TokenFlowError(f"bad settings: {e}") from None
    config = config.validate() if kind else with_inversion_steps(config.validate(), "inversion_steps" in edit)
    device = run.device
    if device and getattr(args, "device", None) is None and device == from_config.get("device") and device != "auto":
        from .models import resolve_device

        try:
            resolve_device(device)
        except TokenFlowError:  # a config written on another machine: use what this one has
            logger.warning("the config asks for device '%s', which is not available here; using auto", device)
            run = run.replace(device="auto")
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


TINY = "tiny"  # --model tiny: the tiny random model built in code (checks the machinery; output is noise)


def load_pipeline(run: RunSettings):
    from .pipeline import TokenFlowPipeline

    kind = flow_kind(run.model)
    if kind:
        return apply_runtime_options(load_flow_pipeline(run, kind), run)
    if run.model == TINY:
        if run.lora or run.model_config:
            raise TokenFlowError("--model tiny takes no --lora or --model-config")
        from .models import resolve_device

        return apply_runtime_options(TokenFlowPipeline.from_tiny(seed=0, device=str(resolve_device(
            run.device or "auto")), dtype=run.dtype if run.dtype not in (None, "auto")
            else "float32"), run)
    loras = run.lora or []
    pipe = TokenFlowPipeline.from_pretrained(run.model or DEFAULT_MODEL, device=run.device or "auto",
                                             dtype=run.dtype or "auto", model_config=run.model_config,
                                             allow_pickle=bool(run.allow_pickle),
                                             loras=[loras] if isinstance(loras, str) else list(loras))
    return apply_runtime_options(pipe, run)


def load_flow_pipeline(run: RunSettings, kind: str):
    from .flow import TINY_MODELS, FlowPipeline
    from .models import resolve_device

    model, device = run.model, run.device or "auto"
    if model in TINY_MODELS:
        if run.lora or run.model_config:
            raise TokenFlowError(f"--model {model} takes no --lora or --model-config")
        dtype = run.dtype if run.dtype not in (None, "auto") else "float32"
        return FlowPipeline.from_tiny(kind, seed=0, device=str(resolve_device(device)), dtype=dtype)
    loras = run.lora or []
    return FlowPipeline.from_pretrained(model, device=device, dtype=run.dtype or "auto", family=kind,
                                        model_config=run.model_config, offload=bool(run.offload),
                                        loras=[loras] if isinstance(loras, str) else list(loras))


def apply_runtime_options(pipe, run: RunSettings):
    """--offload, --vae-slicing, --vae-tiling, --compile (flags absent or False leave the pipeline as is)."""
    if run.offload:
        pipe.enable_offload()
    if run.vae_slicing:
        pipe.enable_vae_slicing()
    if run.vae_tiling:
        pipe.enable_vae_tiling()
    if run.compile:
        pipe.compile()
    return pipe


def prompt_runs(run: RunSettings, prompts: Optional[list[str]]) -> list[RunSettings]:
    """The run keys of each prompt's output: ``out.mp4`` -> ``out-1.mp4``, ...; ``DIR`` -> ``DIR/1``, ..."""
    if not prompts:
        return [run]
    from .outputs import resolve_output

    output = resolve_output(run.output, run.input)
    root, ext = os.path.splitext(output)
    frames_dir = run.frames_dir
    if frames_dir and os.path.exists(frames_dir) and not os.path.isdir(frames_dir):
        raise TokenFlowError(f"--frames-dir '{frames_dir}' is a file; several prompts need a folder for "
                             f"their frame folders 1 ... {len(prompts)}")
    if frames_dir and not os.path.isdir(frames_dir):  # DIR, which holds DIR/1, DIR/2, ...: made only when
        from .video import check_writable_name  # the frames are written, so a refused run leaves nothing

        check_writable_name(frames_dir)
    return [run.replace(output=f"{root}-{i}{ext}", frames_dir=os.path.join(frames_dir, str(i)) if frames_dir else None)
            for i in range(1, len(prompts) + 1)]


def write_results(pipe, result, output: str, run: RunSettings, started: float, label: str = "edited",
                  discard: bool = True) -> None:
    """:func:`save_result`, then the summary line of the command."""
    from .video import aspect_note

    n, h, w = save_result(pipe, result, output, run, discard)
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


def save_result(pipe, result, output: str, run: RunSettings, discard: bool = True):
    """The one writer of an edit's results (the command, ``batch`` and the web page): the video, the
    frames (``run.frames_dir``) and the settings file beside the video, in the one format ``--config``
    reads back (what ran: the working size, the fps, the model, the numerics). Each lands whole: all three
    are written under temporary names first and renamed only once every one of them is complete, so a
    full disk while writing leaves none of them behind; the settings file is renamed last. ``discard``:
    the edit's resume checkpoint goes once the output is safe. The frames go to the video encoder (and the
    frames folder) a batch at a time: an edit returned as ``output_type="stream"`` is decoded batch by batch
    as it is written and is never whole in pixels. Returns (N, H, W) of the frames written."""
    import contextlib

    import yaml

    from .atomic import atomic_dir, atomic_path
    from .config import resolved_settings
    from .models import dropped_text
    from .outputs import make_output_folder
    from .video import VideoEncoder, frames_replaceable, save_frames
    from .results import StreamedFrames

    make_output_folder(output)  # made before the work (see cmd_edit); here in case it went meanwhile
    n, h, w = result.frame_shape()
    depends = resolved_settings(result_settings(run, result.config), h, w, result.fps,
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
        video, folder = commit.enter_context(atomic_path(output)), None
        if run.frames_dir:  # several prompts: DIR/1, ... go into DIR, made now (see prompt_runs)
            os.makedirs(os.path.dirname(os.path.abspath(run.frames_dir)), exist_ok=True)
            folder = commit.enter_context(atomic_dir(run.frames_dir, frames_replaceable))
        written = 0
        with VideoEncoder(video, result.fps, result.audio_source, audio_start=result.audio_start) as encoder:
            for batch in result.uint8_batches():  # one pass: each batch to the video and to the frames folder
                encoder.write(batch)
                if folder:
                    written = save_frames(folder, batch, written)
        if isinstance(result.frames, StreamedFrames):  # decoded while written: the stage's time is counted here
            result.seconds["decode"] = result.seconds.get("decode", 0.0) + result.frames.seconds
    if discard:
        result.discard_checkpoint()  # the output is safe: the resume checkpoint has done its job
    return n, h, w


def settings_and_input(args: argparse.Namespace, usage: str):
    """Settings, run keys, and a probe of the input (header and first frame), before any model
    loads so that bad input fails fast; frames are decoded later, fitted one at a time."""
    from .models import resolve_device, resolve_dtype
    from .preflight import check_local_paths
    from .video import probe_video

    config, run = resolve_settings(args)
    if not run.input:
        raise TokenFlowError(f"no input given: {usage}")
    if run.cache_dir and os.path.exists(run.cache_dir) and not os.path.isdir(run.cache_dir):
        raise TokenFlowError(f"cache folder '{run.cache_dir}' is a file")
    device = resolve_device(run.device or "auto")
    resolve_dtype(run.dtype or "auto", device)
    check_local_paths(config, run)
    if flow_kind(run.model):  # no inversion: the rectified-flow pipeline checks its own settings
        check_flow(config, run)
    else:
        check_steps(config)
    return config, run, probe_video(run.input)


def no_flow(run: RunSettings, command: str, why: str) -> None:
    if flow_kind(run.model):
        raise TokenFlowError(f"tokenflow {command} is not for SD3/FLUX models ({run.model}): {why}")


def check_flow(config: EditConfig, run: RunSettings) -> None:
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


def check_steps(config: EditConfig) -> None:
    """--steps and --inversion-steps against the usual SD schedule (the model's is checked again)."""
    from .inversion import missing_timesteps, steps_error
    from .keyframes import ScheduledKeyframes

    missing = missing_timesteps(config.steps, config.inversion_steps)
    if missing:
        raise steps_error(config.steps, config.inversion_steps, missing)
    if config.keyframe_schedule:
        ScheduledKeyframes.from_json(config.keyframe_schedule)  # readable and well formed


def check_schedule_frames(config: EditConfig, info) -> None:
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


def check_outputs(run: RunSettings, config: EditConfig, info, config_file: Optional[str] = None,
                   frames_parent_later: bool = False, no_cache: bool = False) -> str:
    """Everything about an edit's outputs that can fail, checked before the work: names, folders,
    outputs against inputs, the keyframe schedule against the frames, free space. Returns the output.
    ``frames_parent_later``: the frames folder's parent is made when the frames are written.
    ``no_cache``: the checkpoints go beside the output instead of the cache folder."""
    from .outputs import check_output, note_replaced, resolve_output
    from .preflight import check_free_space, check_no_overwrite, protected_paths
    from .video import check_frames_dir

    output = check_output(resolve_output(run.output, run.input))
    settings_file = check_output(settings_path(output), extensions=None)
    frames_dir = run.frames_dir
    if frames_dir:
        check_frames_dir(frames_dir, parent_later=frames_parent_later)
    work = checkpoint_dir_beside(output) if no_cache else cache_root(run)  # what the run writes besides its outputs
    check_no_overwrite([output, settings_file, work], frames_dir,
                       protected_paths(run.input, config_file, config, run))
    check_schedule_frames(config, info)
    check_free_space(info, config, output, frames_dir, work)
    note_replaced(output)
    return output


def cached_inversion(pipe, frames, config: EditConfig, run: RunSettings, args: argparse.Namespace,
                      conditioning=None, output: Optional[str] = None):
    """The inversion through the cache; checkpointed beside the cache, or with --no-cache beside
    ``output`` (none without an output: ``tokenflow invert --no-cache`` keeps nothing)."""
    checkpoint_dir = checkpoint_dir_beside(output) if args.no_cache and output else None
    return pipe.invert(frames, config.inversion_prompt, config.inversion_steps, config.steps,
                       config.inversion_batch(), run.cache_dir, not args.no_cache, progress=not args.quiet,
                       conditioning=conditioning or pipe.prepare_conditioning(frames, config),
                       checkpoint=not args.no_cache or output is not None, restart=bool(run.no_resume),
                       checkpoint_dir=checkpoint_dir, source=run.input)


def existing_ancestor(path: str) -> str:
    """``path`` if it exists, else the folder it would be made in (its nearest existing ancestor's child)."""
    path = os.path.abspath(path)
    while not os.path.exists(os.path.dirname(path)) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


CHECKPOINT_FOLDER = ".tokenflow-checkpoints"  # with --no-cache, beside the output; gone with its last checkpoint


def checkpoint_dir_beside(output: str) -> str:
    """Where --no-cache keeps the resume checkpoints: beside the output, as its temporaries are."""
    return os.path.join(os.path.dirname(os.path.abspath(output)), CHECKPOINT_FOLDER)


def cache_root(run: RunSettings) -> str:
    from .cache import default_cache_dir

    return run.cache_dir or default_cache_dir()
