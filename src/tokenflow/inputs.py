"""Reading a video (path, :class:`Video`, array or tensor) into frames fitted to the working size."""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from .config import EditConfig
from .errors import TokenFlowError
from .video import (Selection, Video, fit_frames, float_frames, read_images, read_video, stream_video, to_tensor,
                    working_size)

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
        as a :class:`~tokenflow.video.FrameStream`, decoded again a batch at a time when read (long videos).
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
