"""What an edit gives back (:class:`EditResult`), in the output types diffusers uses, and the wall time
of its stages: shared by the UNet and the rectified-flow pipelines."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Optional

import numpy as np
import torch

from .checkpoints import CheckpointStore
from .config import EditConfig
from .inversion import Inversion

# callback(stage, step, total): stage is "inversion", "reconstruction" or "editing"
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class EditResult:
    frames: Any  # output_type "pt": (N, 3, H, W) float32 in [0, 1], CPU; "np": (N, H, W, 3); "pil": images;
    # "stream": a StreamedFrames (the edited latents, decoded a batch at a time when read)
    fps: float
    config: EditConfig
    timesteps: list[int]
    keyframes: list[list[int]]  # keyframe indices drawn at every step
    inversion: Inversion
    latents: Optional[list[torch.Tensor]] = None  # before the first step and after every step
    seconds: dict[str, float] = field(default_factory=dict)
    audio_source: Optional[str] = None
    audio_start: float = 0.0  # seconds into audio_source where the first frame starts
    resumed_from: int = 0  # editing steps a checkpoint of an interrupted run had done
    source_size: Optional[tuple[int, int]] = None  # (H, W) of the source frames, before fitting
    checkpoint: Optional[tuple[CheckpointStore, str]] = None  # the edit's checkpoint, while kept
    # the memory settings this run's out-of-memory retries lowered, with the values it ended with (the
    # pipeline's own settings are left as they were)
    lowered: dict[str, Any] = field(default_factory=dict)

    def uint8(self) -> np.ndarray:
        """The frames as uint8 (N, H, W, 3), whatever ``output_type`` the edit returned."""
        from .video import to_uint8

        if isinstance(self.frames, StreamedFrames):
            return np.concatenate(list(self.frames.batches()))
        if isinstance(self.frames, torch.Tensor):
            return to_uint8(self.frames)
        if isinstance(self.frames, np.ndarray):
            return to_uint8(torch.from_numpy(self.frames).permute(0, 3, 1, 2))
        return np.stack([np.asarray(im.convert("RGB")) for im in self.frames])

    def uint8_batches(self, batch: int = 16) -> Iterator[np.ndarray]:
        """The frames as uint8 batches (B, H, W, 3), in order: what the writers take, so that an edit returned
        as ``"stream"`` is never whole in pixels (the other types are already whole; they are sliced)."""
        from .video import to_uint8

        if isinstance(self.frames, StreamedFrames):
            yield from self.frames.batches()
        elif isinstance(self.frames, (torch.Tensor, np.ndarray)):
            for i in range(0, len(self.frames), batch):
                part = self.frames[i:i + batch]
                yield to_uint8(part if isinstance(part, torch.Tensor) else torch.from_numpy(part).permute(0, 3, 1, 2))
        else:
            for i in range(0, len(self.frames), batch):
                yield np.stack([np.asarray(im.convert("RGB")) for im in self.frames[i:i + batch]])

    def frame_shape(self) -> tuple[int, int, int]:
        """(N, H, W) of the frames, without decoding any."""
        if isinstance(self.frames, StreamedFrames):
            return self.frames.shape[:3]
        if isinstance(self.frames, torch.Tensor):
            n, _, h, w = self.frames.shape
            return int(n), int(h), int(w)
        if isinstance(self.frames, np.ndarray):
            return tuple(int(v) for v in self.frames.shape[:3])
        return len(self.frames), self.frames[0].height, self.frames[0].width

    def discard_checkpoint(self) -> None:
        """Remove the edit's resume checkpoint: call once the result is safely written."""
        if self.checkpoint is not None:
            store, name = self.checkpoint
            store.remove(name)
            self.checkpoint = None


OUTPUT_TYPES = ("pt", "np", "pil", "stream")


class StreamedFrames:
    """An edit's frames kept as its latents (N, C, h, w) and decoded a batch at a time as they are read
    (``output_type="stream"``, what the command line asks for): a long video is never whole in pixels, only
    its latents are (4 values per 8x8 pixels). ``decode(latents)`` gives float frames (B, 3, H, W) in [0, 1];
    ``device()`` is the context that holds the VAE on the device while the frames are read. Batches are whole
    multiples of the VAE's batch, so each frame is decoded in the same VAE call as a whole-video decode would
    (the same rounding: the same frames)."""

    def __init__(self, latents: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], scale: int,
                 batch_size: int, device: Callable[[], ContextManager]):
        self.latents, self.decode, self.batch_size, self.device = latents, decode, batch_size, device
        self.seconds = 0.0  # spent decoding so far (the edit's decode stage, done while the frames are read)
        n, _, h, w = latents.shape
        self.shape = (int(n), int(h) * scale, int(w) * scale, 3)  # (N, H, W, 3), as the uint8 frames

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self) -> Iterator[np.ndarray]:
        """uint8 frames (B, H, W, 3), batch by batch."""
        from .video import to_uint8

        with self.device():
            for i in range(0, len(self), self.batch_size):
                started = time.perf_counter()
                frames = to_uint8(self.decode(self.latents[i:i + self.batch_size]))
                self.seconds += time.perf_counter() - started
                yield frames


def convert_frames(frames: torch.Tensor, output_type: str):
    """(N, 3, H, W) float in [0, 1] -> diffusers' ``np`` (N, H, W, 3) float32 or ``pil`` images."""
    if output_type == "np":
        return frames.permute(0, 2, 3, 1).contiguous().numpy()
    from PIL import Image

    from .video import to_uint8

    return [Image.fromarray(f) for f in to_uint8(frames)]


class Timer:
    """Wall time per stage: ``with timer("inversion"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def results_of(edited: list[Optional[torch.Tensor]], trail: Optional[list[torch.Tensor]], output_type: str,
               fitted, config: EditConfig, prompts: list[str], timesteps: list, keyframes: list[list[int]],
               inversion: Optional[Inversion], seconds: dict[str, float], resumed_from: int, saver,
               lowered: dict[str, Any]) -> list[EditResult]:
    """One result per prompt: edited frames (N, 3, H, W) per prompt (None on ranks other than 0),
    ``trail`` the latents (P, N, ...) before the first step and after every step, when asked for."""
    return [EditResult(frames if output_type in ("pt", "stream") or not isinstance(frames, torch.Tensor)
                       else convert_frames(frames, output_type),
                       fitted.fps, config.replace(prompt=prompts[p]), list(timesteps), keyframes, inversion, None if trail is None else [v[p] for v in trail], seconds,
                       fitted.audio_source, fitted.audio_start, resumed_from, fitted.source_size,
                       saver.handle() if saver else None, lowered)
            for p, frames in enumerate(edited)]
