"""A web page for editing videos: ``tokenflow ui`` (Gradio, an optional extra).

The page's work is done by :class:`EditorSession`, which knows nothing of Gradio (it is unit-tested
on the tiny model): it checks the upload against the limits, runs one edit at a time per model,
reuses cached inversions when only the prompt or editing settings change, and writes the edited
video and the settings used. :func:`build_app` lays the page out around it.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .config import DEMO_CLIP, EDITORS, FLOW_EDITORS, PROPAGATIONS, UNET_EDITORS, EditConfig, RunSettings
from .errors import TokenFlowError

logger = logging.getLogger(__name__)
ProgressFn = Callable[[float, str], None]


@dataclass
class Limits:
    max_upload_mb: float = 200.0
    max_frames: int = 120
    max_side: int = 1024  # largest working height or width
    max_prompts: int = 4  # prompts edited together in one run (one per line of the prompt box)


# A first result in about a minute, and the full-quality settings one click away. On a GPU the quick look
# works at the model's size; on a CPU (the tiny model's home) also at a small size and with few inversion
# steps: at the model's 512x512 its inversion alone took minutes there (measured by
# benchmarks/ui_presets.py). area: the working size's pixels when Height/Width are automatic (None: the
# model's); inversion: the fewest inversion steps "automatic" picks (the official 50; it also passes
# every editing timestep).
PRESETS = {
    "Quick look": dict(max_frames=16, steps=20, inversion_steps=0, area=None, inversion=50),
    "Full quality": dict(max_frames=None, steps=50, inversion_steps=0, area=None, inversion=50),  # frames: the page's limit
}
CPU_QUICK_LOOK = dict(max_frames=8, steps=10, inversion_steps=0, area=192 * 192, inversion=10)
# what the upload box takes: what the command reads (any video PyAV decodes, GIFs too); the browser is
# told the MIME family and the suffixes it may not map to one
UPLOAD_TYPES = ["video", ".gif", ".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"]


def presets_for(device_type: str) -> dict[str, dict[str, Any]]:
    """The page's presets for a pipeline computing on ``device_type`` ("cpu", "cuda", ...)."""
    return {**PRESETS, "Quick look": CPU_QUICK_LOOK} if device_type == "cpu" else dict(PRESETS)


def describe_preset(preset: dict[str, Any], max_frames: int) -> str:
    """A preset in words, from its values (so the page's promise is what it does)."""
    frames = f"{preset['max_frames']} frames" if preset["max_frames"] else f"every frame (up to {max_frames})"
    size = f", about {int(preset['area'] ** 0.5)}x{int(preset['area'] ** 0.5)} pixels" if preset.get("area") else ""
    return f"{frames}, {preset['steps']} steps{size}"


def slug(text: str, limit: int = 40) -> str:
    """A file-name piece from a prompt or a file name: lower case letters, digits and '-'."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (words[:limit].rstrip("-") or "edit") if len(words) > limit else (words or "edit")
# what command-line words in a message are called on this page
PAGE_LABELS = [
    ("--inversion-steps", "Inversion steps"), ("inversion-steps", "Inversion steps"),
    ("--steps", "Steps"), ("--height/--width", "Height/Width"), ("--height", "Height"), ("--width", "Width"),
    ("--max-frames", "Frames"), ("max-frames", "Frames"), ("--batch-size", "Batch size"), ("batch-size", "Batch size"),
    ("--controlnet", "ControlNet"), ("--control", "Control"), ("--guidance-scale", "Guidance scale"),
    ("guidance-scale", "Guidance scale"), ("--sdedit-start", "SDEdit start"), ("sdedit-start", "SDEdit start"),
    ("--pnp-attn-t", "PnP attention injection"), ("pnp-attn-t", "PnP attention injection"),
    ("--pnp-f-t", "PnP feature injection"), ("pnp-f-t", "PnP feature injection"), ("--offload", "offloading"),
    ("--seed", "Seed"), ("--editor", "Editor"), ("-p/--prompt", "Prompt"),
]


def page_message(message: str) -> str:
    """A library message in the page's own words: its labels, not command-line flags."""
    for flag, label in PAGE_LABELS:
        message = message.replace(f"{flag} ", f"'{label}' ").replace(f"{flag};", f"'{label}';")
        message = message.replace(f"{flag},", f"'{label}',").replace(f"{flag})", f"'{label}')")
        if message.endswith(flag):
            message = message[:-len(flag)] + f"'{label}'"
    return message


class Stopped(Exception):
    """The visitor pressed Stop."""


@dataclass
class RunOutput:
    """What one Run wrote: a video and its settings file per prompt, in prompt order."""
    prompts: list[str]
    videos: list[str]
    settings: list[str]
    status: str


def split_prompts(text: Optional[str]) -> list[str]:
    """The prompt box's prompts: one per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


OUTPUT_PREFIX = "tokenflow-ui-"  # + the server's process id: a killed server's folder is found and removed


def remove_stale_output_dirs() -> list[str]:
    """Remove the output folders that servers killed outright (SIGKILL) left in the temporary folder."""
    from .atomic import pid_alive

    root, removed = tempfile.gettempdir(), []
    pattern = re.compile(re.escape(OUTPUT_PREFIX) + r"(\d+)-")
    for name in os.listdir(root):
        m = pattern.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path) and not os.path.islink(path) and not pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@dataclass
class EditorSession:
    pipe: Any
    model_name: str
    limits: Limits = field(default_factory=Limits)
    cache_dir: Optional[str] = None
    output_dir: Optional[str] = None  # default: a new temporary folder, removed by close()
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._owns_output_dir = self.output_dir is None
        if self._owns_output_dir:
            remove_stale_output_dirs()
            self.output_dir = tempfile.mkdtemp(prefix=f"{OUTPUT_PREFIX}{os.getpid()}-")

    def close(self) -> None:
        """Remove the temporary output folder the session made (one it was given stays)."""
        if self._owns_output_dir and self.output_dir:
            shutil.rmtree(self.output_dir, ignore_errors=True)

    @property
    def editors(self) -> list[str]:
        """The editors this model can run: ControlNet only where a default ControlNet exists; SD3/FLUX:
        FlowEdit and SDEdit."""
        from .conditioning import model_family

        if is_flow(self.pipe):
            return list(FLOW_EDITORS)
        return [e for e in EDITORS if e in UNET_EDITORS and (e != "controlnet" or model_family(self.pipe.unet) is not None)]

    def request_stop(self) -> None:
        """Stop the running job at its next step (it ends cleanly, the queue moves on)."""
        self.stop_event.set()

    def check_upload(self, path: Optional[str]) -> str:
        if not path:
            raise TokenFlowError("upload a video first (or pick the demo clip)")
        if not os.path.isfile(path):
            raise TokenFlowError("the uploaded file is gone; upload it again")
        size_mb = os.path.getsize(path) / 2 ** 20
        if size_mb > self.limits.max_upload_mb:
            raise TokenFlowError(f"the upload is {size_mb:.0f} MB; this page takes at most "
                                 f"{self.limits.max_upload_mb:.0f} MB")
        return path

    def _config(self, path: str, prompt: str, random_seed: bool, settings: dict[str, Any]) -> EditConfig:
        if not prompt or not prompt.strip():
            raise TokenFlowError("write a prompt: what should the edited video show?")
        settings = {k: (int(v) if k in _INT_FIELDS and v is not None else v) for k, v in settings.items()}
        preset = presets_for(self.pipe.device.type).get(settings.pop("preset", None) or "", {})
        self._control_settings(settings)
        if random_seed:
            settings["seed"] = random.randrange(2 ** 31)
        self._frame_settings(settings)
        self._size_settings(path, settings, preset.get("area"))
        if not settings.get("inversion_steps") and isinstance(settings.get("steps"), int) and settings["steps"] > 0:
            from .inversion import choose_inversion_steps

            settings["inversion_steps"] = choose_inversion_steps(settings["steps"], preset.get("inversion", 50))
        return defaults_of(self.pipe).replace(prompt=prompt.strip(), **settings).validate()

    def _control_settings(self, settings: dict[str, Any]) -> None:
        """The page's control choice (canny, depth or an uploaded condition video) as the edit's ``control``."""
        control, control_video = settings.pop("control", None), settings.pop("control_video", None)
        if settings.get("editor") == "controlnet" or control:
            if control == "condition video":
                if not control_video:
                    raise TokenFlowError("upload a condition video for the ControlNet, or pick canny or depth")
                control = self.check_upload(control_video)
            settings["control"] = control or "canny"

    def _frame_settings(self, settings: dict[str, Any]) -> None:
        max_frames = settings.get("max_frames") or self.limits.max_frames
        if max_frames > self.limits.max_frames:
            raise TokenFlowError(f"frames: at most {self.limits.max_frames} on this page, got {max_frames}")
        settings["max_frames"] = max_frames

    @staticmethod
    def _size_settings(path: str, settings: dict[str, Any], area: Optional[int]) -> None:
        """Automatic Height/Width as None; with both automatic, the preset's working ``area`` (if it has one)."""
        from .video import default_size, probe_video

        for side in ("height", "width"):
            if not settings.get(side):
                settings[side] = None
        if area and settings["height"] is None and settings["width"] is None:
            settings["height"], settings["width"] = default_size(*probe_video(path).size, area=int(area))

    def describe_upload(self, path: Optional[str]) -> str:
        """The status line once a video is in: what it is, and what to do next (an error for a file that
        is not a video, or too big)."""
        from .video import probe_video

        info = probe_video(self.check_upload(path))
        frames = f"{info.n_frames} frames" if info.n_frames else "frames"
        return (f"{os.path.basename(path)}: {frames} at {info.size[1]}x{info.size[0]}, {info.fps:g} fps. "
                "Write a prompt, then Run (or preview one frame first).")

    def output_stem(self, path: str, prompt: str) -> str:
        """A download's name: the source's, the prompt's, and the time (two runs never share one)."""
        source = slug(os.path.splitext(os.path.basename(path))[0], 24)
        return f"{source}-{slug(prompt)}-{time.strftime('%H%M%S')}-{random.randrange(16 ** 3):03x}"

    def _check_size(self, path: str, config: EditConfig) -> None:
        from .video import probe_video

        info = probe_video(path)  # frames are decoded at the working size inside the edit
        h, w = self.pipe.working_size(info.size, config)
        if max(h, w) > self.limits.max_side:
            raise TokenFlowError(f"size {w}x{h}: this page edits at most {self.limits.max_side} pixels a side")

    def _prepare(self, video: Optional[str], prompt: str, random_seed: bool,
                 settings: dict[str, Any]) -> tuple[str, list[str], EditConfig]:
        """The upload, the prompt box's prompts and the settings, checked: (path, prompts, config)."""
        path = self.check_upload(video)
        prompts = split_prompts(prompt)
        if len(prompts) > self.limits.max_prompts:
            raise TokenFlowError(f"{len(prompts)} prompts: this page edits at most {self.limits.max_prompts} "
                                 f"in one run (one per line)")
        config = self._config(path, prompts[0] if prompts else "", random_seed, settings)
        self._check_size(path, config)
        return path, prompts, config

    def _edit(self, path: str, config: EditConfig, progress: Optional[ProgressFn], prompts: list[str]) -> list:
        """Every prompt's result, from one run. One job at a time per model: a second visitor waits
        here, never shares the UNet mid-edit."""
        with self.lock:
            self.stop_event.clear()
            report = _progress_adapter(progress)

            def callback(stage: str, step: int, total: int) -> None:
                if self.stop_event.is_set():
                    raise Stopped(f"{stage} step {step}")
                if report:
                    report(stage, step, total)

            try:
                several = prompts if len(prompts) > 1 else None
                results = self.pipe.edit(path, config=config, cache_dir=self.cache_dir, progress=False,
                                         callback=callback, prompts=several)
                return results if several else [results]
            finally:
                self.stop_event.clear()

    def run(self, video: Optional[str], prompt: str, *, progress: Optional[ProgressFn] = None,
            random_seed: bool = False, **settings: Any) -> RunOutput:
        """Edit towards each line of ``prompt`` (several prompts share one run: the source branch and
        the keyframe draws are computed once per step); writes a video and its settings per prompt.
        Raises :class:`Stopped` when the visitor stops the job."""
        from .runs import save_result

        started = time.perf_counter()
        path, prompts, config = self._prepare(video, prompt, random_seed, settings)
        results = self._edit(path, config, progress, prompts)
        videos, yamls = [], []
        for result in results:
            name = self.output_stem(path, result.config.prompt)
            out, yaml_path = os.path.join(self.output_dir, name + ".mp4"), os.path.join(self.output_dir, name + ".yaml")
            # the command's writer: the same atomic files and the settings format --config reads back
            save_result(self.pipe, result, out, RunSettings(input=path, model=self.model_name), discard=False)
            videos.append(out)
            yamls.append(yaml_path)
        n, _, fh, fw = results[0].frames.shape
        together = f" for {len(results)} prompts in one run" if len(results) > 1 else ""
        status = (f"Edited {n} frames at {fw}x{fh}{together} in {time.perf_counter() - started:.1f}s "
                  f"(seed {config.seed}).")
        return RunOutput([r.config.prompt for r in results], videos, yamls, status)

    def preview(self, video: Optional[str], prompt: str, *, progress: Optional[ProgressFn] = None,
                **settings: Any) -> tuple[str, str]:
        """Edit one frame (the middle of the frames the settings take) with the current settings:
        the look of the edit in seconds. With several prompts (one per line) the frame is edited
        towards each in one run and the previews sit side by side, in prompt order.
        Returns (PNG path, a status line)."""
        import numpy as np
        from PIL import Image

        from .preflight import expected_frames
        from .video import probe_video

        started = time.perf_counter()
        path, prompts, config = self._prepare(video, prompt, False, settings)
        n = expected_frames(probe_video(path), config) or 1
        middle = config.start_frame + (n // 2) * config.frame_stride
        one = config.replace(max_frames=1, start_frame=middle, start_time=None, frame_stride=1)
        results = self._edit(path, one, progress, prompts)
        out = os.path.join(self.output_dir, f"preview-{self.output_stem(path, ' '.join(prompts))}.png")
        Image.fromarray(np.concatenate([r.uint8()[0] for r in results], axis=1)).save(out)
        _, _, fh, fw = results[0].frames.shape
        several = f" for {len(results)} prompts, left to right," if len(results) > 1 else ""
        return out, (f"Preview of frame {middle} at {fw}x{fh}{several} in {time.perf_counter() - started:.1f}s; "
                     f"Run edits the whole video with these settings.")


_INT_FIELDS = {"max_frames", "height", "width", "steps", "inversion_steps", "batch_size", "seed"}


def is_flow(pipe) -> bool:
    """A rectified-flow pipeline (SD3, FLUX): FlowEdit settings, no inversion."""
    return hasattr(pipe, "family")


def defaults_of(pipe) -> EditConfig:
    """The settings the page starts from: the official TokenFlow's, or FlowEdit's for SD3/FLUX."""
    return pipe.default_config() if is_flow(pipe) else EditConfig()


def _progress_adapter(progress: Optional[ProgressFn]):
    """Turn the pipeline's (stage, step, total) into (fraction of the whole job, what is going on and the
    stage's time left). The fraction is the one figure the page shows (Gradio prints it after the text):
    the text carries no second one. An inversion, when there is one, is the first half of the job; a
    cached inversion, or a model without one (SD3, FLUX), leaves the whole bar to the editing."""
    if progress is None:
        return None
    started: dict[str, float] = {}

    def callback(stage: str, step: int, total: int) -> None:
        now = time.perf_counter()
        started.setdefault(stage, now)
        elapsed = now - started[stage]
        done = step / max(total, 1)
        name = {"inversion": "Inverting the video", "editing": "Editing"}.get(stage, stage)
        if stage == "inversion":
            fraction = 0.5 * done
        else:
            fraction = 0.5 + 0.5 * done if "inversion" in started else done
        left = f", about {_duration(elapsed / step * (total - step))} left" if step and step < total else ""
        if stage == "inversion" and left:
            left += " to invert"
        progress(fraction, f"{name}{left}")

    return callback


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def build_app(session: EditorSession):
    """The Gradio page around ``session``: prompt, Run and Stop together at the top; one progress
    display and the result (or the error, as text) in the result panel."""
    import gradio as gr

    d = defaults_of(session.pipe)
    presets = presets_for(session.pipe.device.type)
    quick = presets["Quick look"]
    with gr.Blocks(title="TokenFlow video editing", analytics_enabled=False) as app:
        gr.Markdown(f"# TokenFlow video editing\nModel: `{session.model_name}`. Upload a video, describe "
                    "the edit, Run. Changing only the prompt or the editing settings reuses the inversion.")
        with gr.Row():
            with gr.Column():
                # a file box, not gr.Video: that one takes video/* only, and the command edits GIFs too
                video_in = gr.File(label="Input video (or GIF)", file_types=UPLOAD_TYPES, file_count="single",
                                   type="filepath", elem_id="input-video")
                input_view = gr.Video(label="Input", interactive=False, visible=False, elem_id="input-view")
                input_gif = gr.Image(label="Input", interactive=False, visible=False, type="filepath",
                                     elem_id="input-gif")
                demo_btn = gr.Button("Use the demo clip", elem_id="demo-clip", size="sm")
                prompt = gr.Textbox(label="Prompt", placeholder="a marble statue of a woman running",
                                    elem_id="prompt", lines=2, max_lines=session.limits.max_prompts,
                                    info=f"Several prompts, one per line (at most {session.limits.max_prompts}), "
                                         "are edited together in one run, faster than one by one.")
                with gr.Row():
                    run_btn = gr.Button("Run", variant="primary", elem_id="run")
                    preview_btn = gr.Button("Preview one frame", elem_id="preview")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                quality = gr.Radio(list(presets), value="Quick look", label="Quality", elem_id="quality",
                                   info=". ".join(f"{name}: {describe_preset(p, session.limits.max_frames)}"
                                                  for name, p in presets.items()) + ".")
                preset = gr.State("Quick look")  # its working area and automatic inversion steps apply
                inversion_prompt = gr.Textbox(label="Inversion prompt (describes the input)", value=d.inversion_prompt)
                with gr.Row():
                    editor = gr.Dropdown(session.editors, value=d.editor, label="Editor", elem_id="editor")
                    propagation = gr.Dropdown(list(PROPAGATIONS), value=d.propagation, label="Propagation")
                with gr.Group(visible=False) as control_group:
                    control = gr.Radio(["canny", "depth", "condition video"], value="canny", label="Control",
                                       elem_id="control", info="what the ControlNet follows in every frame")
                    control_video = gr.Video(label="Condition video (one image per frame)", sources=["upload"],
                                             visible=False, elem_id="control-video")
                with gr.Accordion("Settings", open=False):
                    negative_prompt = gr.Textbox(label="Negative prompt", value=d.negative_prompt)
                    with gr.Row():
                        max_frames = gr.Number(value=min(quick["max_frames"], session.limits.max_frames), precision=0,
                                               label=f"Frames (at most {session.limits.max_frames})",
                                               elem_id="max-frames")
                        height = gr.Number(value=0, precision=0, label="Height (0: automatic)", elem_id="height")
                        width = gr.Number(value=0, precision=0, label="Width (0: automatic)", elem_id="width")
                    with gr.Row():
                        steps = gr.Number(value=quick["steps"], precision=0, label="Steps", elem_id="steps")
                        inversion_steps = gr.Number(value=0, precision=0, label="Inversion steps (0: automatic)",
                                                    elem_id="inversion-steps")
                        batch_size = gr.Number(value=d.batch_size, precision=0, label="Batch size")
                    with gr.Row():
                        guidance = gr.Number(value=d.guidance_scale, label="Guidance scale")
                        pnp_attn_t = gr.Slider(0, 1, value=d.pnp_attn_t, step=0.05, label="PnP attention injection")
                        pnp_f_t = gr.Slider(0, 1, value=d.pnp_f_t, step=0.05, label="PnP feature injection")
                        sdedit_start = gr.Slider(0.05, 1, value=d.sdedit_start, step=0.05, label="SDEdit start")
                    with gr.Row():
                        seed = gr.Number(value=d.seed, precision=0, label="Seed")
                        random_seed = gr.Checkbox(value=False, label="Random seed")
            with gr.Column():
                status = gr.Markdown("Upload a video and write a prompt, then Run (or preview one frame first).",
                                     elem_id="status")
                video_out = gr.Video(label="Edited video", interactive=False, elem_id="output-video")
                preview_out = gr.Image(label="Preview (one frame)", interactive=False, elem_id="preview-image",
                                       type="filepath")
                results = gr.Gallery(label="One edit per prompt", visible=False, elem_id="results",
                                     columns=2, height="auto", interactive=False)
                download = gr.File(label="Download the edited video", elem_id="download-video",
                                   file_count="multiple")
                settings_file = gr.File(label="Settings used (YAML)", elem_id="download-settings",
                                        file_count="multiple")

        inputs = [video_in, prompt, inversion_prompt, negative_prompt, editor, propagation, control, control_video,
                  max_frames, height, width, steps, inversion_steps, batch_size, guidance, pnp_attn_t, pnp_f_t,
                  sdedit_start, seed, preset, random_seed]

        def settings_of(inversion_prompt, negative_prompt, editor, propagation, control, control_video, max_frames,
                        height, width, steps, inversion_steps, batch_size, guidance, pnp_attn_t, pnp_f_t,
                        sdedit_start, seed, preset):
            return dict(preset=preset, inversion_prompt=inversion_prompt or "", negative_prompt=negative_prompt or "",
                        editor=editor, propagation=propagation,
                        control=control if editor == "controlnet" else None, control_video=control_video,
                        max_frames=max_frames, height=height, width=width, steps=steps,
                        inversion_steps=inversion_steps, batch_size=batch_size,
                        guidance_scale=float(guidance) if guidance is not None else None,
                        pnp_attn_t=pnp_attn_t, pnp_f_t=pnp_f_t, sdedit_start=sdedit_start, seed=seed)

        def failure(e: Exception, video) -> str:
            if isinstance(e, Stopped):
                return "**Stopped.** The job ended cleanly; change the settings and Run again."
            if isinstance(e, TokenFlowError):
                message = page_message(str(e))
                if video:  # name the upload, not Gradio's temporary copy of it
                    message = message.replace(str(video), os.path.basename(str(video)))
            else:  # never a stack trace in the page
                logger.exception("edit failed")
                message = f"the edit failed: {type(e).__name__}: {e}"[:300]
            return f"**Error:** {message}"

        def on_run(video, prompt, *rest, progress=gr.Progress()):
            *values, random_seed = rest
            try:
                done = session.run(video, prompt, progress=lambda f, text: progress(f, desc=text),
                                   random_seed=random_seed, **settings_of(*values))
            except Exception as e:
                return gr.update(), gr.update(), gr.update(), gr.update(), failure(e, video)
            several = len(done.videos) > 1
            gallery = gr.update(value=list(zip(done.videos, done.prompts)) if several else None, visible=several)
            return done.videos[0], gallery, done.videos, done.settings, done.status

        def on_preview(video, prompt, *rest, progress=gr.Progress()):
            *values, _ = rest
            try:
                image, line = session.preview(video, prompt, progress=lambda f, text: progress(f, desc=text),
                                              **settings_of(*values))
            except Exception as e:
                return gr.update(), failure(e, video)
            return image, line

        def on_stop():
            session.request_stop()
            return "Stopping at the next step..."

        def on_quality(choice):
            preset = presets[choice]
            frames = preset["max_frames"] or session.limits.max_frames
            return (min(frames, session.limits.max_frames), preset["steps"], preset["inversion_steps"],
                    choice, f"{choice}: {describe_preset(preset, session.limits.max_frames)}.")

        def on_upload(video):
            """The input shown (a GIF as an image: the video player does not play one) and a fresh status."""
            if not video:
                return (gr.update(value=None, visible=False), gr.update(value=None, visible=False),
                        "Upload a video and write a prompt, then Run (or preview one frame first).")
            gif = str(video).lower().endswith(".gif")
            try:
                line = session.describe_upload(video)
            except Exception as e:
                return gr.update(value=None, visible=False), gr.update(value=None, visible=False), failure(e, video)
            return (gr.update(value=None if gif else video, visible=not gif),
                    gr.update(value=video if gif else None, visible=gif), line)

        def on_editor(choice):
            return gr.update(visible=choice == "controlnet")

        def on_control(choice):
            return gr.update(visible=choice == "condition video")

        demo_btn.click(lambda: DEMO_CLIP, outputs=video_in)
        # every action leaves a status line of its own: no message of an earlier one stays
        video_in.change(on_upload, inputs=video_in, outputs=[input_view, input_gif, status], show_progress="hidden")
        quality.change(on_quality, inputs=quality, outputs=[max_frames, steps, inversion_steps, preset, status])
        editor.change(on_editor, inputs=editor, outputs=control_group)
        control.change(on_control, inputs=control, outputs=control_video)
        # one progress display, in the result panel (the status line), not on every output
        run_btn.click(on_run, inputs=inputs, outputs=[video_out, results, download, settings_file, status],
                      concurrency_limit=1, concurrency_id="edit", show_progress_on=[status])
        preview_btn.click(on_preview, inputs=inputs, outputs=[preview_out, status], concurrency_limit=1,
                          concurrency_id="edit", show_progress_on=[status])
        stop_btn.click(on_stop, outputs=status, queue=False, show_progress="hidden")
    return app


def launch(session: EditorSession, host: str = "127.0.0.1", port: int = 7860, share: bool = False):
    app = build_app(session)
    app.queue(default_concurrency_limit=1)
    max_size = f"{int(session.limits.max_upload_mb)}mb"
    import gradio as gr

    # system fonts: the page must not fetch web fonts (it may run with no internet)
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])
    app.launch(server_name=host, server_port=port, share=share, max_file_size=max_size, theme=theme,
               allowed_paths=[session.output_dir, os.path.dirname(DEMO_CLIP)], show_error=True,
               quiet=True)
