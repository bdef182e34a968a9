"""Video in and out: read a file or a frame folder, fit frames to the working size, write.

Frames travel as uint8 arrays (N, H, W, 3) until :func:`fit_frames` turns them into the
float tensor (N, 3, H, W) in [0, 1] the models take. Writers are atomic: they write a
temporary file beside the target and rename it, so the output path never holds half a video.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path
from .errors import TokenFlowError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_OUTPUT_EXTENSIONS = (".mp4", ".mov", ".mkv")
DEFAULT_FOLDER_FPS = 10.0
NOT_VIDEO_FORMATS = ("tty",)


@dataclass
class Video:
    frames: np.ndarray  # (N, H, W, 3) uint8
    fps: float
    audio_source: Optional[str] = None  # a file whose first audio stream belongs to the frames
    source: str = ""

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[1]), int(self.frames.shape[2])


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def read_video(path: str | os.PathLike, max_frames: Optional[int] = None,
               fps: Optional[float] = None) -> Video:
    """Read a video file (anything PyAV decodes) or a folder of images in natural order.

    ``fps`` applies to frame folders (a video keeps its own); ``max_frames`` keeps the first frames.
    """
    path = os.fspath(path)
    if max_frames is not None and max_frames < 1:
        raise TokenFlowError(f"frame limit must be at least 1, got {max_frames}")
    if not os.path.exists(path):
        raise TokenFlowError(f"input '{path}' does not exist")
    if os.path.isdir(path):
        return _read_folder(path, max_frames, fps)
    return _read_file(path, max_frames)


def _read_folder(path: str, max_frames: Optional[int], fps: Optional[float]) -> Video:
    names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)),
                   key=_natural_key)
    if not names:
        raise TokenFlowError(f"folder '{path}' has no frames (allowed: {', '.join(IMAGE_EXTENSIONS)})")
    names = names[:max_frames] if max_frames else names
    frames = []
    for name in names:
        file = os.path.join(path, name)
        try:
            with Image.open(file) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except Exception as e:  # PIL raises many types for bad files
            raise TokenFlowError(f"cannot read frame '{file}': {type(e).__name__}: {e}") from None
        if frames[-1].shape != frames[0].shape:
            raise TokenFlowError(f"frame '{file}' is {frames[-1].shape[1]}x{frames[-1].shape[0]} "
                                 f"but the first frame is {frames[0].shape[1]}x{frames[0].shape[0]}")
    return Video(np.stack(frames), float(fps or DEFAULT_FOLDER_FPS), None, path)


def _read_file(path: str, max_frames: Optional[int]) -> Video:
    import av

    if os.path.getsize(path) == 0:
        raise TokenFlowError(f"input '{path}' is an empty file")
    frames = []
    try:
        with av.open(path) as container:
            # ffmpeg renders any text file as a "video" through its tty (ANSI art) demuxer
            if not container.streams.video or container.format.name in NOT_VIDEO_FORMATS:
                raise TokenFlowError(f"cannot read '{path}' as a video: it has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(DEFAULT_FOLDER_FPS)
            has_audio = bool(container.streams.audio)
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames and len(frames) >= max_frames:
                    break
    except TokenFlowError:
        raise
    except Exception as e:  # av raises InvalidDataError and friends
        if not frames:
            raise TokenFlowError(f"cannot read '{path}' as a video: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else 'corrupt or unsupported'}") from None
        # a truncated tail: keep the frames that decoded
    if not frames:
        raise TokenFlowError(f"input '{path}' has no video frames")
    return Video(np.stack(frames), float(rate), path if has_audio else None, path)


def default_size(height: int, width: int, area: int = 512 * 512, multiple: int = 64) -> tuple[int, int]:
    """Keep the aspect ratio, about ``area`` pixels, both sides multiples of ``multiple``."""
    scale = math.sqrt(area / (height * width))
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def working_size(source_hw: tuple[int, int], height: Optional[int] = None,
                 width: Optional[int] = None, area: int = 512 * 512) -> tuple[int, int]:
    """The size frames are edited at: given sides are kept; a missing side follows the aspect."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value < 8 or value % 8):
            raise TokenFlowError(f"{name} must be a positive multiple of 8, got {value}")
    h, w = source_hw
    if height is None and width is None:
        return default_size(h, w, area)
    if height is None:
        height = max(8, round(width * h / w / 8) * 8)
    if width is None:
        width = max(8, round(height * w / h / 8) * 8)
    return int(height), int(width)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, height, width, 3) with Pillow's LANCZOS; unchanged if same size."""
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.LANCZOS))
                     for f in frames])


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1], with no full-size temporaries."""
    n, h, w, _ = frames.shape
    out = torch.empty(n, 3, h, w)
    out.copy_(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))
    return out.div_(255)


def to_uint8(frames: torch.Tensor, chunk: int = 16) -> np.ndarray:
    """float (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3), rounded; a few frames at a time, so a
    long video needs no float temporaries of its full size."""
    n, _, h, w = frames.shape
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(0, n, chunk):
        part = (frames[i:i + chunk].clamp(0, 1) * 255).round().to(torch.uint8)
        out[i:i + chunk] = part.permute(0, 2, 3, 1).cpu().numpy()
    return out


def fit_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Resize to the working size and convert to the float tensor the models take."""
    return to_tensor(resize_frames(frames, height, width))


def check_output_path(path: str | os.PathLike, extensions=VIDEO_OUTPUT_EXTENSIONS) -> str:
    """Fail early, before any work, if ``path`` cannot be written."""
    path = os.fspath(path)
    if extensions and not path.lower().endswith(extensions):
        raise TokenFlowError(f"output '{path}' must end in {', '.join(extensions)}")
    if os.path.isdir(path):
        raise TokenFlowError(f"output '{path}' is a folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise TokenFlowError(f"cannot write output '{path}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise TokenFlowError(f"cannot write output '{path}': permission denied")
    return path


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float,
                audio_source: Optional[str] = None, crf: int = 18) -> str:
    """Write uint8 (N, H, W, 3) frames as H.264 yuv420p at ``fps``, atomically.

    The first audio stream of ``audio_source`` is copied (or re-encoded to AAC where the
    container cannot hold its codec), cut at the end of the video.
    """
    import av

    path = check_output_path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp, av.open(tmp, "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.height, stream.width = int(frames.shape[1]), int(frames.shape[2])
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        audio = _open_audio(audio_source, out)
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(stream.encode())
        if audio is not None:
            _copy_audio(audio, out, duration=len(frames) / float(rate))
    return path


@dataclass
class _Audio:
    container: object
    stream: object
    out_stream: object
    transcode: bool


def _open_audio(source: Optional[str], out) -> Optional[_Audio]:
    import av

    if not source:
        return None
    try:
        container = av.open(source)
    except Exception:
        return None
    if not container.streams.audio:
        container.close()
        return None
    stream = container.streams.audio[0]
    copyable = out.format.name.startswith("matroska") or stream.codec_context.name in ("aac", "mp3", "ac3", "alac")
    if copyable:
        return _Audio(container, stream, out.add_stream_from_template(stream), False)
    out_stream = out.add_stream("aac", rate=stream.codec_context.sample_rate or 44100)
    return _Audio(container, stream, out_stream, True)


def _copy_audio(audio: _Audio, out, duration: float) -> None:
    try:
        if audio.transcode:
            for frame in audio.container.decode(audio.stream):
                if frame.time is not None and frame.time >= duration:
                    break
                frame.pts = None
                out.mux(audio.out_stream.encode(frame))
            out.mux(audio.out_stream.encode())
            return
        for packet in audio.container.demux(audio.stream):
            if packet.dts is None:
                continue
            if packet.pts is not None and float(packet.pts * packet.time_base) >= duration:
                break
            packet.stream = audio.out_stream
            out.mux(packet)
    finally:
        audio.container.close()


def write_frames(folder: str | os.PathLike, frames: np.ndarray) -> str:
    """Write uint8 frames as ``00000.png, ...`` into ``folder``; each file lands atomically."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise TokenFlowError(f"frames folder '{folder}' is a file")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise TokenFlowError(f"cannot create frames folder '{folder}': {e.strerror}") from None
    for i, frame in enumerate(frames):
        with atomic_path(os.path.join(folder, f"{i:05d}.png")) as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
    return folder
