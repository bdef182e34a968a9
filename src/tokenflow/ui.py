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
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .config import EDITORS, OFFICIAL_NEGATIVE_PROMPT, PROPAGATIONS, EditConfig, save_settings
from .errors import TokenFlowError

logger = logging.getLogger(__name__)
DEMO_CLIP = os.path.join(os.path.dirname(__file__), "data", "demo.mp4")
ProgressFn = Callable[[float, str], None]


@dataclass
class Limits:
    max_upload_mb: float = 200.0
    max_frames: int = 120
    max_side: int = 1024  # largest working height or width


@dataclass
class EditorSession:
    pipe: Any
    model_name: str
    limits: Limits = field(default_factory=Limits)
    cache_dir: Optional[str] = None
    output_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="tokenflow-ui-"))
    lock: threading.Lock = field(default_factory=threading.Lock)

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

    def run(self, video: Optional[str], prompt: str, *, progress: Optional[ProgressFn] = None,
            random_seed: bool = False, **settings: Any) -> tuple[str, str, str]:
        """Edit; returns (edited video path, settings YAML path, a status line)."""
        from .video import probe_video, working_size, write_video

        started = time.perf_counter()
        path = self.check_upload(video)
        if not prompt or not prompt.strip():
            raise TokenFlowError("write a prompt: what should the edited video show?")
        settings = {k: (int(v) if k in _INT_FIELDS and v is not None else v) for k, v in settings.items()}
        if random_seed:
            settings["seed"] = random.randrange(2 ** 31)
        max_frames = settings.get("max_frames") or self.limits.max_frames
        if max_frames > self.limits.max_frames:
            raise TokenFlowError(f"frames: at most {self.limits.max_frames} on this page, got {max_frames}")
        settings["max_frames"] = max_frames
        for side in ("height", "width"):
            if not settings.get(side):
                settings[side] = None
        config = EditConfig(prompt=prompt.strip(), **settings).validate()
        info = probe_video(path)  # frames are decoded at the working size inside the edit
        h, w = self.pipe.working_size(info.size, config)
        if max(h, w) > self.limits.max_side:
            raise TokenFlowError(f"size {w}x{h}: this page edits at most {self.limits.max_side} pixels a side")
        # one job at a time per model: a second visitor waits here, never shares the UNet mid-edit
        with self.lock:
            result = self.pipe.edit(path, config=config, cache_dir=self.cache_dir, progress=False,
                                    callback=_progress_adapter(progress))
        stem = f"tokenflow-{time.strftime('%Y%m%d-%H%M%S')}-{random.randrange(16 ** 6):06x}"
        out = os.path.join(self.output_dir, stem + ".mp4")
        write_video(out, result.uint8(), result.fps, result.audio_source, audio_start=result.audio_start)
        yaml_path = os.path.join(self.output_dir, stem + ".yaml")
        save_settings(yaml_path, {"model": self.model_name, **result.config.to_dict()})
        n, _, fh, fw = result.frames.shape
        status = (f"Edited {n} frames at {fw}x{fh} in {time.perf_counter() - started:.1f}s "
                  f"(seed {config.seed}).")
        return out, yaml_path, status


_INT_FIELDS = {"max_frames", "height", "width", "steps", "inversion_steps", "batch_size", "seed"}


def _progress_adapter(progress: Optional[ProgressFn]):
    """Turn the pipeline's (stage, step, total) into (fraction, text with time left)."""
    if progress is None:
        return None
    started: dict[str, float] = {}

    def callback(stage: str, step: int, total: int) -> None:
        now = time.perf_counter()
        started.setdefault(stage, now)
        elapsed = now - started[stage]
        left = elapsed / step * (total - step) if step else 0.0
        name = {"inversion": "Inverting the video", "editing": "Editing"}.get(stage, stage)
        # inversion is the first half of the bar, editing the second
        fraction = (0.0 if stage == "inversion" else 0.5) + 0.5 * step / max(total, 1)
        progress(fraction, f"{name}: {step}/{total}, about {left:.0f}s left")

    return callback


def build_app(session: EditorSession):
    """The Gradio page around ``session``."""
    import gradio as gr

    d = EditConfig()
    with gr.Blocks(title="TokenFlow video editing", analytics_enabled=False) as app:
        gr.Markdown(f"# TokenFlow video editing\nModel: `{session.model_name}`. Upload a video, describe "
                    "the edit, run. Changing only the prompt or the editing settings reuses the inversion.")
        with gr.Row():
            with gr.Column():
                video_in = gr.Video(label="Input video", sources=["upload"], elem_id="input-video")
                demo_btn = gr.Button("Use the demo clip", elem_id="demo-clip", size="sm")
                prompt = gr.Textbox(label="Prompt", placeholder="a marble statue of a woman running",
                                    elem_id="prompt")
                inversion_prompt = gr.Textbox(label="Inversion prompt (describes the input)", value=d.inversion_prompt)
                negative_prompt = gr.Textbox(label="Negative prompt", value=OFFICIAL_NEGATIVE_PROMPT)
                with gr.Row():
                    editor = gr.Dropdown(list(EDITORS), value=d.editor, label="Editor")
                    propagation = gr.Dropdown(list(PROPAGATIONS), value=d.propagation, label="Propagation")
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        max_frames = gr.Number(value=min(40, session.limits.max_frames), precision=0,
                                               label=f"Frames (at most {session.limits.max_frames})",
                                               elem_id="max-frames")
                        height = gr.Number(value=0, precision=0, label="Height (0: automatic)", elem_id="height")
                        width = gr.Number(value=0, precision=0, label="Width (0: automatic)", elem_id="width")
                    with gr.Row():
                        steps = gr.Number(value=d.steps, precision=0, label="Steps", elem_id="steps")
                        inversion_steps = gr.Number(value=d.inversion_steps, precision=0, label="Inversion steps",
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
                run_btn = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                video_out = gr.Video(label="Edited video", interactive=False, elem_id="output-video")
                status = gr.Markdown(elem_id="status")
                download = gr.File(label="Download the edited video", elem_id="download-video")
                settings_file = gr.File(label="Settings used (YAML)", elem_id="download-settings")

        def on_run(video, prompt, inversion_prompt, negative_prompt, editor, propagation, max_frames, height,
                   width, steps, inversion_steps, batch_size, guidance, pnp_attn_t, pnp_f_t, sdedit_start, seed,
                   random_seed, progress=gr.Progress()):
            try:
                out, yaml_path, line = session.run(
                    video, prompt, progress=lambda f, text: progress(f, desc=text), random_seed=random_seed,
                    inversion_prompt=inversion_prompt or "", negative_prompt=negative_prompt or "",
                    editor=editor, propagation=propagation, max_frames=max_frames, height=height, width=width,
                    steps=steps, inversion_steps=inversion_steps, batch_size=batch_size,
                    guidance_scale=float(guidance) if guidance is not None else None,
                    pnp_attn_t=pnp_attn_t, pnp_f_t=pnp_f_t, sdedit_start=sdedit_start, seed=seed)
            except TokenFlowError as e:
                message = str(e)
                if video:  # name the upload, not Gradio's temporary copy of it
                    message = message.replace(str(video), os.path.basename(str(video)))
                raise gr.Error(message, print_exception=False) from None
            except Exception as e:  # never a stack trace in the page
                logger.exception("edit failed")
                raise gr.Error(f"the edit failed: {type(e).__name__}: {e}"[:300], print_exception=False) from None
            return out, out, yaml_path, line

        demo_btn.click(lambda: DEMO_CLIP, outputs=video_in)
        run_btn.click(on_run, inputs=[video_in, prompt, inversion_prompt, negative_prompt, editor, propagation,
                                      max_frames, height, width, steps, inversion_steps, batch_size, guidance,
                                      pnp_attn_t, pnp_f_t, sdedit_start, seed, random_seed],
                      outputs=[video_out, download, settings_file, status], concurrency_limit=1)
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
