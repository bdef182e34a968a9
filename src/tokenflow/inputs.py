"""Reading a video (path, :class:`Video`, array or tensor) into frames fitted to the working size."""

from __future__ import annotations

import os
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from .config import EditConfig
from .errors import TokenFlowError
from .video import (FileFrames, FolderFrames, Selection, SizeSpec, Video, check_input, fit_frames, float_frames,
                    read_images, read_video, to_tensor, working_size)

VideoInput = Union[str, os.PathLike, Video, Sequence[Any], np.ndarray, torch.Tensor]  # Sequence: PIL images or uint8 arrays


class FittedVideo(NamedTuple):
    frames: torch.Tensor  # (N, 3, H, W) float32 in [0, 1], or a FrameStream of them
    fps: float
    audio_source: Optional[str]
    audio_start: float = 0.0
    source_size: Optional[tuple[int, int]] = None  # (H, W) before fitting


class VideoInputs:
    """What a pipeline needs to take a video in: ``native_side`` (the default working area is its square)
    and ``size_multiple`` (both sides of the working size are multiples of it)."""

    native_side = 512
    size_multiple = 8

    def working_size(self, source_hw: tuple[int, int], config: EditConfig) -> tuple[int, int]:
        """The size a source of ``source_hw`` (H, W) is edited at under ``config``."""
        return working_size(source_hw, config.height, config.width, self.native_side ** 2)

    def load_video(self, video: VideoInput, config: EditConfig, stream: bool = False) -> FittedVideo:
        """Frames fitted to the working size (N, 3, H, W) in [0, 1], the fps and the audio.

        ``video``: a path (file or folder of frames), a :class:`Video`, a list of PIL images or uint8
        (H, W, 3) arrays (read as a folder of frames is), a uint8 (N, H, W, 3) array, or (N, 3, H, W)
        float frames in [0, 1] (a tensor, or an (N, H, W, 3) float array as ``output_type="np"`` gives).
        A path is decoded and fitted frame by frame: reading never holds the source's resolution.
        The frames kept follow ``config``'s start, stride and frame limit. ``stream``: a path's frames come
        as a :class:`FrameStream`, decoded again a batch at a time when read (long videos).
        """
        select = Selection(config.max_frames, config.start_frame, config.start_time, config.frame_stride)
        if isinstance(video, np.ndarray) and video.dtype != np.uint8:
            if video.ndim != 4 or video.shape[-1] != 3 or not np.issubdtype(video.dtype, np.floating):
                raise TokenFlowError(f"frame array must be (N, H, W, 3), uint8 or float in [0, 1], got "
                                     f"{video.dtype} {video.shape}")
            video = torch.from_numpy(video).permute(0, 3, 1, 2)
        if isinstance(video, torch.Tensor):
            return self._fit_tensor(float_frames(video), config, select)
        if isinstance(video, np.ndarray):
            if video.ndim != 4 or video.shape[-1] != 3:
                raise TokenFlowError(f"frame array must be uint8 (N, H, W, 3), got {video.dtype} {video.shape}")
            video = Video(video, float(config.fps or 10.0))
        elif isinstance(video, (list, tuple)):
            video = read_images(video, config.fps, lambda hw: self.working_size(hw, config),
                                max_frames=config.max_frames, start_frame=config.start_frame,
                                start_time=config.start_time, stride=config.frame_stride, fit=config.fit)
            return FittedVideo(to_tensor(video.frames), video.fps, None, 0.0, video.source_size)
        elif not isinstance(video, Video):  # decoded at the working size
            if not isinstance(video, (str, os.PathLike)):
                raise TokenFlowError(f"video must be a path, a Video, a list of frames, an array or a tensor, "
                                     f"got {type(video).__name__}")
            if stream:
                frames = stream_video(video, config.max_frames, config.fps,
                                      size=lambda hw: self.working_size(hw, config), start_frame=config.start_frame,
                                      start_time=config.start_time, stride=config.frame_stride, fit=config.fit)
                return FittedVideo(frames, frames.fps, frames.read.audio_source, frames.read.start,
                                   frames.read.fit.first)
            video = read_video(video, config.max_frames, config.fps, size=lambda hw: self.working_size(hw, config),
                               start_frame=config.start_frame, start_time=config.start_time,
                               stride=config.frame_stride, fit=config.fit)
            return FittedVideo(to_tensor(video.frames), video.fps, video.audio_source, video.start_time,
                               video.source_size)
        first = select.first(video.fps)
        frames = select.apply(video.frames, video.fps)
        if not len(frames):
            raise TokenFlowError(f"the video has {len(video.frames)} frames: none from the start asked for")
        h, w = self.working_size(video.size, config)
        return FittedVideo(fit_frames(frames, h, w, config.fit), video.fps / config.frame_stride, video.audio_source,
                           video.start_time + first / video.fps, video.source_size or video.size)

    def _fit_tensor(self, frames: torch.Tensor, config: EditConfig, select: Selection) -> FittedVideo:
        """Float frames (N, 3, H, W) in [0, 1]: selected, and resized when a height or width is given."""
        fps = float(config.fps or 10.0)
        kept = select.apply(frames, fps)
        if not len(kept):
            raise TokenFlowError(f"the tensor has {len(frames)} frames: none from the start asked for")
        source_hw = tuple(kept.shape[2:])
        if config.height or config.width:
            h, w = self.working_size(source_hw, config)
            if (h, w) != source_hw:
                kept = torch.nn.functional.interpolate(kept, (h, w), mode="bicubic", antialias=True).clamp(0, 1)
        if kept.shape[2] % self.size_multiple or kept.shape[3] % self.size_multiple:
            raise TokenFlowError(f"frame size {kept.shape[3]}x{kept.shape[2]} is not a multiple of {self.size_multiple}")
        return FittedVideo(kept, fps / config.frame_stride, None, 0.0, source_hw)


def frame_rows(frames, rows: range):
    """The frames ``rows`` of fitted frames: a tensor's slice, or a :class:`FrameStream` of them (not decoded
    until read)."""
    return frames.rows(rows) if isinstance(frames, FrameStream) else frames[rows.start:rows.stop]


def stream_video(path: str | os.PathLike, max_frames: Optional[int] = None, fps: Optional[float] = None,
                 size: SizeSpec = None, *, start_frame: int = 0, start_time: Optional[float] = None, stride: int = 1,
                 fit: str = "stretch") -> "FrameStream":
    """The frames :func:`read_video` gives, as a :class:`FrameStream`: decoded again a batch at a time
    whenever they are read, never whole. One pass now counts them, hashes them for the inversion cache's
    key and says what :func:`read_video` says about the input (damage, a variable rate, a cut file)."""
    path = os.fspath(path)
    check_input(path, max_frames)
    select = Selection(max_frames, start_frame, start_time, stride)
    read = FolderFrames(path, select, fps, size, fit) if os.path.isdir(path) else FileFrames(path, select, size, fit)
    return FrameStream.scan(read)


class FrameStream:
    """Fitted frames (N, 3, H, W) float32 in [0, 1] that are decoded from their file when read, so host
    memory never holds the video in pixels. ``stream[a:b]`` gives those frames as a tensor (reading on
    from the last read is one decoding pass; going back starts a new one), :meth:`rows` a stream of part
    of the frames, :meth:`batches` every frame a batch at a time. ``digest`` is the cache key's hash of
    the frames (:func:`tokenflow.cache.frames_digest`), computed in the first pass."""

    def __init__(self, read, n: int, hw: tuple[int, int], digest: str, first: int = 0):
        self.read, self.n, self.hw, self.digest, self.first = read, n, hw, digest, first
        self._frames: Optional[Iterator[np.ndarray]] = None
        self._next = 0  # the video frame the open pass gives next

    @classmethod
    def scan(cls, read) -> "FrameStream":
        from .cache import FramesHash

        digest, n, batch = FramesHash(), 0, []
        for frame in read.frames():
            batch.append(frame)
            if len(batch) == 16:
                digest.update(to_tensor(np.stack(batch)))
                n, batch = n + len(batch), []
        if batch:
            digest.update(to_tensor(np.stack(batch)))
            n += len(batch)
        read.check(n)
        return cls(read, n, read.fit.target, digest.hexdigest())

    @property
    def fps(self) -> float:
        return self.read.fps

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, 3, *self.hw))

    def __len__(self) -> int:
        return self.n

    def rows(self, frames: range) -> "FrameStream":
        """The frames ``frames`` (a range of this stream's rows), as a stream of their own."""
        return FrameStream(self.read, len(frames), self.hw, self.digest, self.first + frames.start)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("a FrameStream is read by slices of consecutive frames")
        start, stop, _ = rows.indices(self.n)
        start, stop = self.first + start, self.first + max(start, stop)
        if self._frames is None or start < self._next:  # a new pass from the first frame
            self.close()
            self._frames, self._next = self.read.frames(), 0
        for _ in range(start - self._next):  # frames before the slice: decoded, not kept
            next(self._frames)
        taken = [next(self._frames) for _ in range(stop - start)]
        self._next = stop
        h, w = self.hw
        return to_tensor(np.stack(taken)) if taken else torch.empty(0, 3, h, w)

    def batches(self, size: int = 16) -> Iterator[torch.Tensor]:
        for i in range(0, self.n, size):
            yield self[i:i + size]

    def close(self) -> None:
        if self._frames is not None:
            self._frames.close()
            self._frames = None
