"""The ``tokenflow`` commands (``edit``, ``invert``, ``eval``, ``analyze``, ``ui``, ``cache``, ``batch``,
``demo``): each reads its settings and checks them (:mod:`tokenflow.runs`), does its work and reports."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from dataclasses import replace as dataclasses_replace
from typing import NamedTuple, Optional

from . import runs
from .config import DEFAULT_MODEL, DEMO_CLIP, EditConfig, RunSettings, result_settings
from .errors import RankStopped, TokenFlowError

logger = logging.getLogger("tokenflow.cli")


# The demo's settings: small enough for two CPU cores in well under two minutes.
DEMO_SETTINGS = dict(prompt="a shiny silver robotic wolf", inversion_prompt="a wolf", max_frames=16,
                     height=128, width=224, steps=20, inversion_steps=20, batch_size=8)


def cmd_edit(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    plan = _edit_plan(args)
    rank, world, run = _edit_launch(plan.run)
    plan = plan._replace(run=run)
    pipe = runs.load_pipeline(run)
    from .outputs import make_output_folder

    for output in plan.outputs:  # the model loaded: a missing output folder is made now (a refused run leaves none)
        make_output_folder(output)
    config = plan.config
    pipe.release_text_encoders([config.inversion_prompt, config.negative_prompt, *(plan.prompts or [config.prompt])])
    from .distributed import Group, shutdown

    group = Group()
    try:
        if world > 1:
            group = pipe.distribute().group
        _edit_and_write(pipe, plan, args, group, started)
    except RuntimeError as e:
        stopped = _edit_failure(e, rank, world)
        if stopped is None:
            raise
        raise stopped from None
    shutdown(group)  # after an error the process exits instead: a collective with a dead peer may not return
    return 0


class _EditPlan(NamedTuple):
    """An edit's checked settings: one run (and one output) per prompt; ``prompts`` None for one prompt."""

    config: EditConfig
    run: RunSettings
    prompts: Optional[list[str]]
    prompt_runs: list[RunSettings]
    outputs: list[str]


def _edit_plan(args: argparse.Namespace) -> _EditPlan:
    """The settings, the prompts and every output checked, before the model loads."""
    config, run, info = runs.settings_and_input(args, "tokenflow edit INPUT -p PROMPT")
    prompts = args.prompt if args.prompt and len(args.prompt) > 1 else None
    from .config import check_prompts

    check_prompts(prompts or [config.prompt], several=bool(prompts))
    prompt_runs = runs.prompt_runs(run, prompts)  # one output per prompt
    outputs = [runs.check_outputs(r, config.replace(prompt=p).validate(), info, getattr(args, "config", None),
                              frames_parent_later=bool(prompts), no_cache=args.no_cache)
               for r, p in zip(prompt_runs, prompts or [config.prompt])]
    return _EditPlan(config, run, prompts, prompt_runs, outputs)


def _edit_launch(run: RunSettings) -> tuple[int, int, RunSettings]:
    """(rank, world size, the run on this rank's device): ranks in range, and what the process group needs."""
    from .distributed import check_launch, local_device

    rank, world, local_rank = check_launch()
    if world > 1:  # under torchrun: this rank's own GPU, and the edit split across the ranks
        if str(run.device or "").startswith("cuda:"):
            raise TokenFlowError(f"--device {run.device} under torchrun would put every rank on one GPU; "
                                 f"give --device cuda (or auto): each rank takes cuda:LOCAL_RANK")
        device = local_device(run.device or "auto", local_rank)
        if device != (run.device or "auto"):
            run = run.replace(device=device)
        if rank:
            logging.getLogger("tokenflow").setLevel(logging.WARNING)  # rank 0 reports
    return rank, world, run


def _edit_and_write(pipe, plan: _EditPlan, args: argparse.Namespace, group, started: float) -> None:
    """The edit (every prompt in one run), then rank 0 writes each output and the checkpoint goes."""
    run, prompts, outputs = plan.run, plan.prompts, plan.outputs
    results = pipe.edit(run.input, config=plan.config, cache_dir=run.cache_dir,
                        use_cache=not args.no_cache, progress=not args.quiet and group.is_main,
                        checkpoint=True, restart=bool(run.no_resume), prompts=prompts, output_type="stream",
                        checkpoint_dir=runs.checkpoint_dir_beside(outputs[0]) if args.no_cache else None)
    results = results if prompts else [results]
    if group.is_main:  # rank 0 holds the whole video and writes it
        for r, result, output in zip(plan.prompt_runs, results, outputs):
            runs.write_results(pipe, result, output, r, started, discard=False)
        results[0].discard_checkpoint()  # every output is written: the checkpoint has done its job
    if group.distributed and group.agree(True) and not group.is_main:
        results[0].discard_checkpoint()  # only once rank 0 has written the outputs


def _edit_failure(e: RuntimeError, rank: int, world: int) -> Optional[TokenFlowError]:
    """The one-line error an edit's RuntimeError becomes; None: re-raise it as it is."""
    from .errors import OutOfMemory
    from .memory import is_out_of_memory
    from .models import short_error

    if is_out_of_memory(e):  # what the retries inside could not lower (e.g. gathering the output)
        return OutOfMemory(f"out of memory: {short_error(e)}; lower --height/--width or --max-frames, "
                           f"or use --offload")
    if world <= 1:
        return None
    return RankStopped(f"rank {rank} of {world} stopped: {short_error(e)}; the other ranks' messages say "
                       f"why, and the same command resumes from the checkpoints")


def cmd_invert(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config, run, _ = runs.settings_and_input(args, "tokenflow invert INPUT")
    runs.no_flow(run, "invert", "FlowEdit edits SD3/FLUX without an inversion: use tokenflow edit")
    output = None
    if args.output:  # the reconstruction's video (not a config's output_path), checked before the model loads
        from .outputs import check_output, note_replaced, resolve_output
        from .preflight import check_no_overwrite, protected_paths

        if not args.reconstruct:
            raise TokenFlowError("-o writes the reconstruction: give --reconstruct too (invert alone writes "
                                 "only the cache)")
        output = check_output(resolve_output(args.output, run.input))
        check_no_overwrite([output], None, protected_paths(run.input, getattr(args, "config", None), config, run))
        note_replaced(output)
    pipe = runs.load_pipeline(run).release_text_encoders([config.inversion_prompt])
    video = pipe.load_video(run.input, config)
    frames = video.frames
    conditioning = pipe.prepare_conditioning(frames, config)
    inversion = runs.cached_inversion(pipe, frames, config, run, args, conditioning)
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
    _check_eval_args(args)
    results = _evaluate(args)
    _print_eval_table(results)
    _write_eval_files(args, results)
    return 0


def _check_eval_args(args: argparse.Namespace) -> None:
    """Every setting and output path checked before a video is read."""
    from .preflight import check_no_overwrite
    from .video import check_output_path

    if args.max_frames is not None and args.max_frames < 2:
        raise TokenFlowError(f"max-frames must be at least 2 for a warp error, got {args.max_frames}")
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


def _evaluate(args: argparse.Namespace) -> list:
    """The metrics of every edited video against the source (a warning where their frames do not match)."""
    from .metrics import DEFAULT_CLIP, ClipScorer, evaluate, mismatch
    from .models import resolve_device
    from .video import read_video

    source = read_video(args.source, args.max_frames, args.fps).frames
    edited = {path: read_video(path, args.max_frames, args.fps).frames for path in args.edited}
    for note in filter(None, (mismatch(path, source, frames) for path, frames in edited.items())):
        logger.warning("%s", note)
    clip = None if args.no_clip else ClipScorer.from_pretrained(args.clip_model or DEFAULT_CLIP,
                                                                 str(resolve_device(args.device or "auto")))
    return evaluate(source, edited, args.prompt, clip)


def _print_eval_table(results: list) -> None:
    fmt = lambda v, p=5: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    width = max(len("edited"), *(len(r.name) for r in results))
    print(f"{'edited':<{width}}  frames  warp_error  floor     clip_t  clip_f")
    for r in results:
        print(f"{r.name:<{width}}  {r.n_frames:>6}  {fmt(r.warp_error):>10}  {fmt(r.warp_error_floor):<8}  "
              f"{fmt(r.clip_t, 4):>6}  {fmt(r.clip_f, 4):>6}")


def _write_eval_files(args: argparse.Namespace, results: list) -> None:
    """The JSON, CSV and plot asked for, each written atomically."""
    from .atomic import atomic_path
    from .metrics import plot_warp_errors

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


def cmd_analyze(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from .analysis import analyze_features, nearest_neighbour_rebuild, write_figures
    from .video import to_uint8

    config, run, info = runs.settings_and_input(args, "tokenflow analyze INPUT")
    from .analysis import FIGURES
    from .preflight import check_no_overwrite, protected_paths
    from .video import check_writable_name

    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise TokenFlowError(f"output folder '{args.output}' is a file")
    check_writable_name(runs.existing_ancestor(args.output))
    check_no_overwrite([os.path.join(args.output, name) for name in FIGURES], None,
                       protected_paths(run.input, getattr(args, "config", None), config, run))
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
    pipe = runs.load_pipeline(run).release_text_encoders([config.inversion_prompt])
    layers = [hooked.name for hooked in pipe.layers] if runs.flow_kind(run.model) else pipe.layers.self_attention
    if args.layer and args.layer not in layers:
        raise TokenFlowError(f"unknown layer '{args.layer}'; the layers TokenFlow hooks are e.g. {layers[-1]}")
    frames, fps = pipe.load_video(run.input, config)[:2]
    n = len(frames)
    target = check_frames(n)
    if runs.flow_kind(run.model):  # no inversion: the features of FlowEdit's noised source branch
        from .analysis import analyze_flow_features

        analysis = analyze_flow_features(pipe, frames, args.timestep, config.inversion_prompt, args.layer,
                                         config.seed, source_guidance=config.source_guidance_scale)
        timestep = analysis.timestep
    else:
        conditioning = pipe.prepare_conditioning(frames, config)
        inversion = runs.cached_inversion(pipe, frames, config, run, args, conditioning, output=args.output)
        timestep = min(inversion.latents, key=lambda t: abs(t - args.timestep))
        analysis = analyze_features(pipe, inversion, tuple(inversion.shape[-2:]), timestep,
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
    pipe = runs.load_pipeline(RunSettings(model=args.model, device=args.device, dtype=args.dtype))
    from .flow import TINY_MODELS

    name = ("tiny random model (built in code; output is noise)" if args.model == runs.TINY or args.model in TINY_MODELS
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
    from .cache import default_cache_dir, list_entries

    root = args.cache_dir or default_cache_dir()
    if args.older_than is not None and (args.older_than != args.older_than or args.older_than < 0):
        raise TokenFlowError(f"--older-than must be a number of days >= 0, got {args.older_than}")
    if os.path.exists(root) and not os.path.isdir(root):
        raise TokenFlowError(f"cache folder '{root}' is a file")
    entries = list_entries(root)
    if args.action == "list":
        _print_entries(entries, root, time.time())
    else:
        _clear_entries(entries, root, args.older_than)
    return 0


def _print_entries(entries: list, root: str, now: float) -> None:
    """One line per cache entry: kind, key, size, age, frames, size, the video and the model it came from."""
    from .errors import human_bytes

    if not entries:
        print(f"the cache at {root} is empty")
        return
    # the video by its file name (the whole path is in the entry's manifest.json), the model as it was named
    videos = [_cut(os.path.basename(e.input), 32) if e.input else "-" for e in entries]
    models = [_cut(e.model, 48) or "-" for e in entries]
    vw, mw = max(map(len, ["input", *videos])), max(map(len, ["model", *models]))
    print(f"{'kind':<22} {'key':<12} {'size':>9} {'age':>7}  {'frames':>6}  {'WxH':>9}  {'input':<{vw}}  "
          f"{'model':<{mw}}  inversion prompt")
    for e, video, model in zip(entries, videos, models):
        wh = f"{e.size[1]}x{e.size[0]}" if e.size else "-"
        line = (f"{e.kind:<22} {e.key[:12]:<12} {human_bytes(e.bytes):>9} {(now - e.modified) / 86400:>6.1f}d  "
                f"{e.frames or '-':>6}  {wh:>9}  {video:<{vw}}  {model:<{mw}}  {repr(e.prompt) if e.prompt else ''}")
        print(line.rstrip())
    print(f"{len(entries)} entries, {human_bytes(sum(e.bytes for e in entries))} in {root}")


def _clear_entries(entries: list, root: str, older_than: Optional[float]) -> None:
    """Remove the entries (those not touched for ``older_than`` days), each atomically."""
    from .cache import remove_entry
    from .errors import human_bytes

    cutoff = None if older_than is None else time.time() - older_than * 86400
    doomed = [e for e in entries if cutoff is None or e.modified < cutoff]
    for e in doomed:
        try:
            remove_entry(e)
        except OSError as err:
            raise TokenFlowError(f"cannot remove '{e.path}': {err.strerror or err}") from None
    print(f"removed {len(doomed)} of {len(entries)} entries, {human_bytes(sum(e.bytes for e in doomed))} "
          f"freed in {root}")


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters: the middle gives way to '...' (a name's ends tell it apart)."""
    return text if len(text) <= width else text[:width - 13] + "..." + text[-10:]


BATCH_TIMEOUT_HOURS = 24.0  # how long a rank that is done waits for the others at the summary


def _run_job(job, pipes: dict, rank: int, quiet: bool) -> str:
    """One job of a batch: its own checks, the model (loaded once per model), the edit, the outputs."""
    from .preflight import check_local_paths
    from .video import probe_video

    run, config = job.run, job.config
    info = probe_video(run.input)
    check_local_paths(config, run)
    output = runs.check_outputs(run, config, info)
    key = job.model_key()
    if key not in pipes:
        pipes[key] = runs.load_pipeline(run)
    from .outputs import make_output_folder

    make_output_folder(output)
    started = time.perf_counter()
    result = pipes[key].edit(run.input, config=config, cache_dir=run.cache_dir, progress=not quiet,
                             checkpoint=True, restart=bool(run.no_resume), output_type="stream")
    runs.write_results(pipes[key], result, output, run, started, label=f"{job.name} [rank {rank}]: edited")
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
        if torch.cuda.is_available() and not job.run.device:
            job.run = job.run.replace(device=local_device("auto", local_rank))
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=BATCH_TIMEOUT_HOURS))


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import deal, format_table, gather_results, load_jobs
    from .distributed import check_launch
    from .video import check_output_path

    if args.json:
        check_output_path(args.json, extensions=(".json",))
    jobs = load_jobs(args.jobs, summary=args.json)  # every job's settings and paths checked before any work
    jobs = [j if runs.flow_kind(j.run.model) else
            dataclasses_replace(j, config=runs.with_inversion_steps(j.config, j.given_inversion_steps)) for j in jobs]
    rank, world, local_rank = check_launch()
    summary_group = _join_batch_ranks(jobs, local_rank) if world > 1 else None
    pipes: dict = {}
    results = [_batch_job(job, args, pipes, rank, world) for job in deal(jobs, rank, world)]
    everything = gather_results(results, world, summary_group)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if everything is None:  # not rank 0
        return 0 if all(r.status != "failed" for r in results) else 1
    print(format_table(everything))
    if args.json:
        _write_batch_summary(args.json, args.jobs, world, everything)
    return 0 if all(r.status != "failed" for r in everything) else 1


def _batch_job(job, args: argparse.Namespace, pipes: dict, rank: int, world: int):
    """One job's :class:`~tokenflow.batch.JobResult`: skipped when its outputs are already there with the
    same settings (unless --force), else edited; a failure is this job's alone and is said on stderr."""
    from .batch import JobResult, finished_settings
    from .models import short_error

    started = time.perf_counter()
    r = JobResult(job.index, job.run.input, job.output, rank)
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
    return r


def _write_batch_summary(path: str, jobs_file: str, world: int, everything: list) -> None:
    from .atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump({"jobs_file": jobs_file, "world_size": world,
                   "results": [r.to_dict() for r in sorted(everything, key=lambda r: r.job)]}, f, indent=1)


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
    result = pipe.edit(DEMO_CLIP, config=config, use_cache=False, progress=not args.quiet,
                       output_type="stream")
    runs.write_results(pipe, result, output, RunSettings(input=DEMO_CLIP, model=runs.TINY), started, label="demo: edited")
    return 0
