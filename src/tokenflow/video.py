"""Video in and out: read a file or a frame folder, fit frames to the working size, write.

Frames travel as uint8 arrays (N, H, W, 3) until :func:`fit_frames` turns them into the
float tensor (N, 3, H, W) in [0, 1] the models take. Writers are atomic: they write a
temporary file beside the target and rename it, so the output path never holds half a video.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .atomic import DIR_SUFFIX, TMP_NAME_EXTRA, atomic_dir, atomic_path
from .errors import TokenFlowError
from .decoding import (Damage, declared_frames, decode_frames, frame_pixel_aspect, header_rate, no_frames, open_video,
                       scan_timeline, short_message, upright)
from .timing import Timeline

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
VIDEO_OUTPUT_EXTENSIONS = (".mp4", ".mov", ".mkv")
DEFAULT_FOLDER_FPS = 10.0


@dataclass
class Video:
    frames: np.ndarray  # (N, H, W, 3) uint8, upright
    fps: float
    audio_source: Optional[str] = None  # a file whose first audio stream belongs to the frames
    source: str = ""
    start_time: float = 0.0  # seconds: the first frame's time in the source; audio is cut from there
    source_size: Optional[tuple[int, int]] = None  # (H, W) of the source's upright frames as shown, before fitting

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[1]), int(self.frames.shape[2])


@dataclass
class VideoInfo:
    """What :func:`probe_video` learns without decoding the whole input."""

    size: tuple[int, int]  # (H, W) of the first frame, upright and as shown (non-square pixels made square)
    n_frames: Optional[int]  # frames a read gives, counted from the packets (files in a folder); None if unknown
    fps: float
    has_audio: bool


# size=: keep the source size, a fixed (H, W), or a function of the first frame's (H, W)
SizeSpec = Union[None, tuple[int, int], Callable[[tuple[int, int]], tuple[int, int]]]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def check_input(path: str, max_frames: Optional[int]) -> None:
    if max_frames is not None and max_frames < 1:
        raise TokenFlowError(f"frame limit must be at least 1, got {max_frames}")
    if not os.path.exists(path):
        raise TokenFlowError(f"input '{path}' does not exist")


@dataclass(frozen=True)
class Selection:
    """Which frames of a source to take: from ``start_frame`` (or the first at ``start_time``
    seconds), every ``stride``-th, at most ``max_frames``."""

    max_frames: Optional[int] = None
    start_frame: int = 0
    start_time: Optional[float] = None
    stride: int = 1

    def first(self, fps: float) -> int:
        """The first frame's index, for sources whose frames are evenly spaced (folders, arrays)."""
        return int(math.ceil(self.start_time * fps - 1e-6)) if self.start_time is not None else self.start_frame

    def apply(self, frames, fps: float):
        """Select from a sequence of evenly spaced frames (an array or a list)."""
        kept = frames[self.first(fps)::self.stride]
        return kept[:self.max_frames] if self.max_frames else kept


def read_video(path: str | os.PathLike, max_frames: Optional[int] = None,
               fps: Optional[float] = None, size: SizeSpec = None, *, start_frame: int = 0,
               start_time: Optional[float] = None, stride: int = 1, fit: str = "stretch") -> Video:
    """Read a video file (anything PyAV decodes) or a folder of images in natural order.

    Frames come out upright (a phone video's rotation and a photo's EXIF orientation applied)
    as 8-bit RGB whatever the source's pixel format, with square pixels (a stream's sample aspect
    ratio applied). ``size`` fits every frame as it is decoded (``fit``: stretch, crop or pad when
    the aspect differs), so reading holds no more than the working size of the video, never the
    source's resolution, and a stream whose resolution changes midway still gives frames of one
    size. A file's frames are evenly spaced in time: a variable-rate clip is resampled by its
    timestamps to its average rate (see :mod:`tokenflow.timing`), so it lasts as long and stays in
    step with its audio; a packet that does not decode is skipped. ``fps`` applies to frame folders
    (a video keeps its own, divided by ``stride``); the frames kept start at ``start_frame`` (or
    ``start_time`` seconds), every ``stride``-th, at most ``max_frames``.
    """
    path = os.fspath(path)
    check_input(path, max_frames)
    select = Selection(max_frames, start_frame, start_time, stride)
    if os.path.isdir(path):
        return _read_folder(path, select, fps, size, fit)
    return _read_file(path, select, size, fit)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Size (as shown), frame count, fps and audio of an input, from its first frame and its packets'
    timestamps (read, not decoded): cheap, so bad input fails before any model loads. The count and
    the rate are those :func:`read_video` gives, never a header's claim."""
    path = os.fspath(path)
    check_input(path, None)
    if os.path.isdir(path):
        names = _frame_names(path)
        first = _read_image(os.path.join(path, names[0]))
        return VideoInfo(first.shape[:2], len(names), DEFAULT_FOLDER_FPS, False)
    timeline = scan_timeline(path)
    with open_video(path) as (container, stream):
        damage = Damage()
        frame = next(decode_frames(container, stream, damage), None)
        if frame is None:
            raise no_frames(path, damage)
        size = display_size(upright(frame).shape[:2], frame_pixel_aspect(frame, stream))
        has_audio = bool(container.streams.audio)
        if timeline is None:
            return VideoInfo(size, int(stream.frames) or None, float(header_rate(stream)), has_audio)
        return VideoInfo(size, timeline.slots, float(timeline.rate), has_audio)


def display_size(hw: tuple[int, int], pixel_aspect: float = 1.0) -> tuple[int, int]:
    """(H, W) of a picture as shown: its width stretched by the pixels' aspect (width / height)."""
    return int(hw[0]), max(1, round(hw[1] * pixel_aspect))


class _Fitter:
    """Resizes each frame to the size ``spec`` gives for the first frame as shown (non-square pixels
    made square); warns once when a frame's own size differs from the first one's."""

    def __init__(self, spec: SizeSpec, source: str, fit: str = "stretch"):  # source: "'clip.mp4'", "the frame list"
        self.spec, self.source, self.fit = spec, source, fit
        self.first: Optional[tuple[int, int]] = None
        self.target: Optional[tuple[int, int]] = None
        self.warned = False

    def __call__(self, frame: np.ndarray, pixel_aspect: Fraction = Fraction(1)) -> np.ndarray:
        hw = display_size(frame.shape[:2], pixel_aspect)
        if self.first is None:
            self.first = hw
            spec = self.spec
            self.target = tuple(spec(hw)) if callable(spec) else (tuple(spec) if spec else hw)
            if pixel_aspect != 1:
                logger.info("%s has non-square pixels (sample aspect ratio %s): its %dx%d pixels are read as "
                            "shown, %dx%d", self.source, pixel_aspect, frame.shape[1], frame.shape[0], hw[1], hw[0])
        elif hw != self.first and not self.warned:
            self.warned = True
            logger.warning("%s changes size midway (%dx%d, then %dx%d): every frame is fitted to %dx%d",
                           self.source, self.first[1], self.first[0], hw[1], hw[0], self.target[1], self.target[0])
        return resize_frame(frame, *self.target, fit=self.fit, pixel_aspect=float(pixel_aspect))


def _frame_names(path: str) -> list[str]:
    names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)
                    and os.path.isfile(os.path.join(path, n))), key=_natural_key)
    if not names:
        raise TokenFlowError(f"folder '{path}' has no frames (allowed: {', '.join(IMAGE_EXTENSIONS)})")
    return names


class FolderFrames:
    """The frames of a folder, fitted, in order: one pass per call of :meth:`frames` (a folder's files
    are read again, so a pass holds one frame at a time)."""

    def __init__(self, path: str, select: Selection, fps: Optional[float], size: SizeSpec, fit_mode: str):
        self.path, self.rate = path, float(fps or DEFAULT_FOLDER_FPS)
        self.names = select.apply(_frame_names(path), self.rate)
        if not self.names:
            raise TokenFlowError(f"folder '{path}' has no frames from the start asked for")
        self.fit = _Fitter(size, f"'{path}'", fit_mode)
        self.fps, self.audio_source, self.start = self.rate / select.stride, None, 0.0

    def frames(self) -> Iterator[np.ndarray]:
        for name in self.names:
            yield self.fit(_read_image(os.path.join(self.path, name)))

    def check(self, n_read: int) -> None:
        pass


def _read_folder(path: str, select: Selection, fps: Optional[float], size: SizeSpec, fit_mode: str) -> Video:
    read = FolderFrames(path, select, fps, size, fit_mode)
    return Video(np.stack(list(read.frames())), read.fps, None, path, 0.0, read.fit.first)


def read_images(images, fps: Optional[float] = None, size: SizeSpec = None, *, max_frames: Optional[int] = None,
                start_frame: int = 0, start_time: Optional[float] = None, stride: int = 1,
                fit: str = "stretch") -> Video:
    """Frames in memory (a list of PIL images or uint8 (H, W, 3) arrays), read as a folder of frames
    is: upright 8-bit RGB, the same selection, every frame fitted to the size ``size`` gives for the
    first one (a frame of another size is fitted too, with one warning)."""
    if max_frames is not None and max_frames < 1:
        raise TokenFlowError(f"frame limit must be at least 1, got {max_frames}")
    if not len(images):
        raise TokenFlowError("the frame list is empty: give at least one frame (PIL images or uint8 (H, W, 3) arrays)")
    rate = float(fps or DEFAULT_FOLDER_FPS)
    select = Selection(max_frames, start_frame, start_time, stride)
    kept = select.apply(range(len(images)), rate)
    if not len(kept):
        raise TokenFlowError(f"the frame list has {len(images)} frames: none from the start asked for")
    fitter = _Fitter(size, "the frame list", fit)
    frames = [fitter(_image_frame(images[i], i)) for i in kept]
    return Video(np.stack(frames), rate / select.stride, None, "", 0.0, fitter.first)


def _image_frame(image, index: int) -> np.ndarray:
    """One frame of a list as uint8 (H, W, 3), as a frame file would be read."""
    if isinstance(image, Image.Image):
        frame = image_to_rgb8(image)
    elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        frame = np.ascontiguousarray(image)
    else:
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise TokenFlowError(f"frame {index} of the list is a {what}; allowed: PIL images or uint8 (H, W, 3) arrays")
    if not frame.shape[0] or not frame.shape[1]:
        raise TokenFlowError(f"frame {index} of the list is empty ({frame.shape[1]}x{frame.shape[0]})")
    return frame


RANGE_SLACK = 1e-3  # float rounding just outside [0, 1] (a resize's overshoot) is clipped, not refused


def float_frames(frames: torch.Tensor, what: str = "frame tensor") -> torch.Tensor:
    """(N, 3, H, W) frames as float32 in [0, 1]: uint8 is scaled by 1/255; float must be finite and in
    [0, 1] (0..255 or -1..1 would be edited as a washed-out or clipped video, so they are refused)."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise TokenFlowError(f"{what} must be (N, 3, H, W), got {tuple(frames.shape)}")
    if not len(frames):
        raise TokenFlowError(f"the {what} has no frames")
    if frames.dtype == torch.uint8:
        return frames.float() / 255
    if not frames.is_floating_point():
        raise TokenFlowError(f"{what} must be float in [0, 1] or uint8, got {str(frames.dtype).replace('torch.', '')}")
    frames = frames.float()
    bad = ~torch.isfinite(frames)
    if bad.any():
        first = int(bad.flatten(1).any(1).nonzero()[0])
        raise TokenFlowError(f"{what} holds {int(bad.sum())} NaN or infinite values (the first in frame {first}); "
                             f"frames must be finite values in [0, 1]")
    low, high = float(frames.min()), float(frames.max())
    if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
        hint = ("; divide 0..255 values by 255" if low >= -RANGE_SLACK and high <= 255 + RANGE_SLACK
                else "; map -1..1 values by (x + 1) / 2" if low >= -1 - RANGE_SLACK and high <= 1 + RANGE_SLACK else "")
        raise TokenFlowError(f"{what} values lie in [{low:.4g}, {high:.4g}]; expected [0, 1]{hint}")
    return frames.clamp(0, 1) if low < 0 or high > 1 else frames


def _read_image(file: str) -> np.ndarray:
    try:
        with Image.open(file) as im:
            return image_to_rgb8(im)
    except TokenFlowError:
        raise
    except Exception as e:  # PIL raises many types for bad files
        raise TokenFlowError(f"cannot read frame '{file}': {type(e).__name__}: {short_message(e)}") from None


def image_to_rgb8(im: Image.Image) -> np.ndarray:
    """Any image Pillow opens -> upright uint8 (H, W, 3).

    16-bit and 32-bit integer images (depth maps, VFX exports: Pillow's ``I;16`` and ``I``) are
    scaled from 0..65535, float images (``F``) from 0..1; palette, CMYK, grey and alpha modes
    go through Pillow's conversion (alpha dropped). EXIF orientation is applied.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 if im.mode == "F" else 255.0 / 65535.0
        gray = np.clip(np.nan_to_num(a * scale), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("P", "PA") and "transparency" in im.info or im.mode == "PA":
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"))


class FileFrames:
    """The selected frames of a video file, fitted, in order: one decoding pass per call of :meth:`frames`
    (the same frames every time), and what a whole pass learnt (the rate, the first frame's time, the
    audio) for :meth:`check` and the :class:`Video`."""

    def __init__(self, path: str, select: Selection, size: SizeSpec, fit_mode: str):
        self.path, self.select = path, select
        self.timeline = scan_timeline(path)
        self.fit = _Fitter(size, f"'{path}'", fit_mode)  # one for every pass: it says what it notices once
        self.start, self.seen, self.complete, self.audio_source = 0.0, 0, True, None
        self.rate: Fraction = Fraction(1)
        self.declared: Optional[int] = None
        self.damage = Damage()

    @property
    def fps(self) -> float:
        return float(self.rate) / self.select.stride

    def frames(self) -> Iterator[np.ndarray]:
        self.damage = Damage()
        with open_video(self.path) as (container, stream):
            self.rate = self.timeline.rate if self.timeline else header_rate(stream)
            slots = _slots(decode_frames(container, stream, self.damage), self.timeline)

            def convert(frame) -> np.ndarray:
                return self.fit(upright(frame), frame_pixel_aspect(frame, stream))

            yield from _take(slots, self.select, self.rate, convert, self)
            self.audio_source = self.path if container.streams.audio else None
            self.declared = declared_frames(stream, self.timeline, self.rate)

    def check(self, n_read: int) -> None:
        """What a whole pass of ``n_read`` frames tells the user: none read is an error; a variable rate,
        damaged data or a truncated file are said."""
        path, timeline = self.path, self.timeline
        if not n_read:
            if self.seen:
                raise TokenFlowError(f"input '{path}' has {self.seen} frames: none from the start asked for")
            raise no_frames(path, self.damage)
        if timeline is not None and not timeline.even:
            logger.info("'%s' has a variable frame rate (%d frames over %.2f s): read at %.3f fps, each frame at "
                        "its own time, so the length and the audio sync are kept", path, timeline.count,
                        timeline.duration, float(self.rate))
        _report_damage(path, self.damage, timeline, self.complete)
        if self.complete:
            _check_complete(path, n_read, self.declared, self.select, float(self.rate), self.damage.ended)


def _read_file(path: str, select: Selection, size: SizeSpec, fit_mode: str) -> Video:
    read = FileFrames(path, select, size, fit_mode)
    frames = list(read.frames())
    read.check(len(frames))
    return Video(np.stack(frames), read.fps, read.audio_source, path, read.start, read.fit.first)


def _slots(frames, timeline: Optional[Timeline]):
    """(slot, time, frame): on the timeline's evenly spaced slots, or one per frame in decoding order."""
    if timeline is None:
        return ((i, frame.time, frame) for i, frame in enumerate(frames))
    return timeline.fill((frame.time, frame) for frame in frames)


def _take(slots, select: Selection, rate: Fraction, convert: Callable, read) -> Iterator[np.ndarray]:
    """The selected slots' frames, each decoded frame converted once. Sets on ``read``: the first frame's
    time (``start``), the slots seen, and whether the video ran out before the frame limit did
    (``complete``)."""
    kept, begin = 0, select.first(float(rate))
    read.start, read.seen, read.complete = 0.0, 0, True
    held, array = None, None
    for slot, time, frame in slots:
        read.seen = slot + 1
        if slot < begin or (slot - begin) % select.stride:
            continue
        if not kept:
            read.start = float(time) if time is not None else 0.0
        if frame is not held:  # a frame may fill several slots
            held, array = frame, convert(frame)
        kept += 1
        yield array
        if select.max_frames and kept >= select.max_frames:
            read.complete = False
            return


def _report_damage(path: str, damage: Damage, timeline: Optional[Timeline], complete: bool) -> None:
    """Frames lost to data that did not decode; once the whole video is read, the timeline also
    counts those lost without an error."""
    lost = max(damage.skipped, timeline.count - damage.decoded if timeline and complete else 0)
    if lost:
        total = timeline.count if timeline else damage.decoded + lost
        logger.warning("'%s': %d of %d frames could not be decoded (damaged data, skipped as ffmpeg does); the "
                       "frames around them keep their times%s", path, lost, total,
                       f" ({type(damage.last).__name__}: {short_message(damage.last)})" if damage.last else "")


def _check_complete(path: str, n_read: int, declared: Optional[int], select: Selection, rate: float,
                    ended: Optional[BaseException]) -> None:
    """Warn when the frames stop early: reading the container failed, or the stream's own
    duration holds more frames than were read."""
    first = select.first(rate)
    if declared and (first or select.stride > 1):  # what the selection should have given
        declared = len(range(first, declared, select.stride))
    wanted = min(declared, select.max_frames) if declared and select.max_frames else declared
    if ended is not None or (wanted and not _close(n_read, wanted)):
        logger.warning("'%s' looks truncated or damaged: read %d frames, the container declares %s%s; "
                       "editing the frames that were read", path, n_read, declared or "no count",
                       f" ({type(ended).__name__}: {short_message(ended)})" if ended else "")


def _close(read: int, declared: int) -> bool:
    """Frame counts estimated from durations are off by a frame or two."""
    return read >= declared - max(2, declared // 50)


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


def resize_frame(frame: np.ndarray, height: int, width: int, fit: str = "stretch",
                 pixel_aspect: float = 1.0) -> np.ndarray:
    """uint8 (H, W, 3) -> (height, width, 3) with Pillow's LANCZOS; unchanged if same size.

    Another aspect is stretched, centre-cropped (``crop``) or letterboxed in black (``pad``). The
    aspect is the picture's as shown: its width times ``pixel_aspect`` (a pixel's width / height).
    """
    h, w = frame.shape[:2]
    shown_w = w * pixel_aspect
    if (h, w) == (height, width) and (fit == "stretch" or pixel_aspect == 1):
        return frame
    image = Image.fromarray(frame)
    other_aspect = abs(h * width - shown_w * height) > 1e-9 * h * width
    if fit == "crop" and other_aspect:
        if shown_w * height > h * width:  # too wide: keep the middle columns
            keep = h * width / height / pixel_aspect
            box = ((w - keep) / 2, 0, (w + keep) / 2, h)
        else:
            keep = shown_w * height / width
            box = (0, (h - keep) / 2, w, (h + keep) / 2)
        return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS, box=box))
    if fit == "pad" and other_aspect:
        scale = min(height / h, width / shown_w)
        inner_h, inner_w = max(1, round(h * scale)), max(1, round(shown_w * scale))
        out = np.zeros((height, width, 3), np.uint8)
        top, left = (height - inner_h) // 2, (width - inner_w) // 2
        out[top:top + inner_h, left:left + inner_w] = image.resize((inner_w, inner_h), Image.Resampling.LANCZOS)
        return out
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS))


def resize_frames(frames: np.ndarray, height: int, width: int, fit: str = "stretch") -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, height, width, 3) with Pillow's LANCZOS; unchanged if same size."""
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([resize_frame(f, height, width, fit) for f in frames])


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


def fit_frames(frames: np.ndarray, height: int, width: int, fit: str = "stretch") -> torch.Tensor:
    """Resize to the working size and convert to the float tensor the models take."""
    return to_tensor(resize_frames(frames, height, width, fit))


def aspect_note(source_hw: Optional[tuple[int, int]], hw: tuple[int, int], fit: str) -> str:
    """A few words when the working size has another aspect than the source ('' otherwise)."""
    if not source_hw:
        return ""
    (sh, sw), (h, w) = source_hw, hw
    if abs(sw / sh - w / h) <= 0.01 * (w / h):
        return ""
    done = {"stretch": "stretched", "crop": "centre-cropped", "pad": "padded"}[fit]
    tip = "; --fit crop or pad keeps the aspect" if fit == "stretch" else ""
    return f"{done} from {sw}x{sh}{tip}"


def check_output_path(path: str | os.PathLike, extensions=VIDEO_OUTPUT_EXTENSIONS, parent_later: bool = False) -> str:
    """Fail early, before any work, if ``path`` cannot be written (nor its temporary beside it).
    ``parent_later``: its folder may be missing (it is made before the work: see ``outputs.py``)."""
    path = os.fspath(path)
    if extensions and not path.lower().endswith(extensions):
        raise TokenFlowError(f"output '{path}' must end in {', '.join(extensions)}")
    if os.path.isdir(path):
        raise TokenFlowError(f"output '{path}' is a folder (end it with '/' to write into it)")
    check_writable_name(path, parent_later=parent_later)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise TokenFlowError(f"cannot write output '{path}': permission denied")
    return path


def nearest_existing_folder(path: str) -> str:
    """The folder ``path`` would be written in if it exists, else its nearest existing ancestor
    (which may be a file: then nothing can be made there)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return parent


def check_writable_name(path: str, suffix: str = "", parent_later: bool = False) -> None:
    """The parent folder exists and is writable; the name and its temporary (with ``suffix``)
    fit the file system. ``parent_later``: a missing parent is fine when the nearest existing
    folder above it is writable (the missing folders are made there)."""
    parent = os.path.dirname(os.path.abspath(path))
    if parent_later and not os.path.lexists(parent):
        parent = nearest_existing_folder(path)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise TokenFlowError(f"cannot write output '{path}': '{parent}' is a file, not a folder")
    if not os.path.isdir(parent):
        raise TokenFlowError(f"cannot write output '{path}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise TokenFlowError(f"cannot write output '{path}': permission denied")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    name = os.path.basename(os.path.abspath(path)).encode("utf-8", "surrogateescape")
    extra = TMP_NAME_EXTRA + len(suffix)
    if len(name) + extra > name_max:
        raise TokenFlowError(f"output name '{os.path.basename(path)[:40]}...' is too long "
                             f"({len(name)} bytes; at most {name_max - extra} here)")


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float,
                audio_source: Optional[str] = None, crf: int = 18, audio_start: float = 0.0) -> str:
    """Write uint8 (N, H, W, 3) frames as H.264 yuv420p at ``fps``, atomically.

    The first audio stream of ``audio_source`` is copied (or re-encoded to AAC where the
    container cannot hold its codec) from ``audio_start`` seconds (the first frame's time in
    the source) for as long as the video lasts, shifted to start with the first frame.
    """
    path = check_output_path(path)
    with atomic_path(path) as tmp:
        encode_video(tmp, frames, fps, audio_source, crf, audio_start)
    return path


def encode_video(path: str, frames, fps: float, audio_source: Optional[str] = None, crf: int = 18,
                 audio_start: float = 0.0) -> int:
    """The encoding of :func:`write_video`, into ``path`` as it is (the caller makes it atomic).

    ``frames``: uint8 (N, H, W, 3), or an iterable of such batches (a long edit decoded a batch at a
    time: the video is never whole in memory). Returns the frames written."""
    with VideoEncoder(path, fps, audio_source, crf, audio_start) as encoder:
        for batch in ([frames] if isinstance(frames, np.ndarray) else frames):
            encoder.write(batch)
    return encoder.count


class VideoEncoder:
    """H.264 yuv420p frames fed a batch at a time (``write``); the size is the first batch's, and the
    source's audio is copied on a clean exit for as long as the frames written last. Nothing is held
    but the batch being encoded."""

    def __init__(self, path: str, fps: float, audio_source: Optional[str] = None, crf: int = 18,
                 audio_start: float = 0.0):
        self.rate = Fraction(fps).limit_denominator(1001)
        if self.rate <= 0:
            raise TokenFlowError(f"frame rate {fps} is too low to write; at least 1/1001")
        self.path, self.audio_source, self.crf, self.audio_start = path, audio_source, crf, audio_start
        self.out = self.stream = self.audio = None
        self.count = 0

    def __enter__(self) -> "VideoEncoder":
        import av

        self.out = av.open(self.path, "w", format=_container_format(self.path))
        return self

    def write(self, frames: np.ndarray) -> None:
        """uint8 frames (B, H, W, 3) after those written before."""
        import av

        if self.stream is None:  # the first batch gives the size; the audio stream follows the video's
            self.stream = self.out.add_stream("libx264", rate=self.rate)
            self.stream.height, self.stream.width = int(frames.shape[1]), int(frames.shape[2])
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": str(self.crf), "preset": "medium"}
            self.audio = _open_audio(self.audio_source, self.out)
        for frame in frames:
            self.out.mux(self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                                                       format="rgb24")))
        self.count += len(frames)

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                if self.stream is None:
                    raise TokenFlowError("no frames to write")
                self.out.mux(self.stream.encode())
                if self.audio is not None:
                    _copy_audio(self.audio, self.out, self.audio_start, self.count / float(self.rate))
        finally:
            if self.audio is not None and kind is not None:
                self.audio.container.close()
            self.out.close()


def _container_format(path: str) -> Optional[str]:
    """The muxer for a temporary name ('.out.123-ab.tmp.mp4' is an mp4)."""
    return {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}.get(os.path.splitext(path)[1].lower())


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


def _copy_audio(audio: _Audio, out, start: float, duration: float) -> None:
    """Audio in [start, start + duration) of the source, shifted so ``start`` becomes 0."""
    try:
        if audio.transcode:
            for frame in audio.container.decode(audio.stream):
                if frame.time is not None and frame.time < start:
                    continue
                if frame.time is not None and frame.time >= start + duration:
                    break
                frame.pts = None
                out.mux(audio.out_stream.encode(frame))
            out.mux(audio.out_stream.encode())
            return
        shift = None
        for packet in audio.container.demux(audio.stream):
            if packet.dts is None or packet.pts is None:
                continue
            time = float(packet.pts * packet.time_base)
            if time < start:
                continue
            if time >= start + duration:
                break
            if shift is None:
                shift = int(round(start / packet.time_base))
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = audio.out_stream
            out.mux(packet)
    finally:
        audio.container.close()


FRAME_NAME = re.compile(r"\d{5}\.png\Z")


def frames_replaceable(name: str) -> bool:
    """What a frames folder may hold to be replaced whole: frames an earlier run wrote."""
    return bool(FRAME_NAME.match(name))


def check_frames_dir(folder: str | os.PathLike, parent_later: bool = False) -> str:
    """Fail early if ``folder`` cannot take the frames: a file, or a folder of the user's own files.
    ``parent_later``: the folder above may not exist yet (it is made when the frames are written)."""
    from .atomic import check_replaceable_dir

    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    if parent_later and not os.path.lexists(parent):
        check_writable_name(parent)  # then the folder itself is new: nothing in it to replace
        return folder
    check_writable_name(folder, DIR_SUFFIX)
    check_replaceable_dir(os.path.abspath(folder), frames_replaceable)
    return folder


def write_frames(folder: str | os.PathLike, frames: np.ndarray) -> str:
    """Write uint8 frames as ``00000.png, ...`` into ``folder``, atomically as a whole: they go
    into a temporary folder beside it that then takes its place (an earlier run's frames go)."""
    folder = check_frames_dir(folder)
    with atomic_dir(folder, frames_replaceable) as tmp:
        save_frames(tmp, frames)
    return folder


def save_frames(folder: str, frames, first: int = 0) -> int:
    """``00000.png, ...`` into an existing (temporary) folder, numbered from ``first``. ``frames``: uint8
    (N, H, W, 3) or an iterable of such batches. Returns the number after the last frame written."""
    for batch in ([frames] if isinstance(frames, np.ndarray) else frames):
        for frame in batch:
            Image.fromarray(frame).save(os.path.join(folder, f"{first:05d}.png"), format="PNG")
            first += 1
    return first
