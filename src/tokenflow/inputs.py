"""Reading a video (path, :class:`Video`, array or tensor) into frames fitted to the working size."""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import numpy as np
import torch

from .config import EditConfig
from .errors import TokenFlowError
from .video import Selection, Video, fit_frames, read_video, to_tensor, working_size

VideoInput = Union[str, os.PathLike, Video, np.ndarray, torch.Tensor]


class FittedVideo(NamedTuple):
    frames: torch.Tensor  # (N, 3, H, W) float32 in [0, 1]
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

    def load_video(self, video: VideoInput, config: EditConfig) -> FittedVideo:
        """Frames fitted to the working size (N, 3, H, W) in [0, 1], the fps and the audio.

        A path is decoded and fitted frame by frame: reading never holds the source's resolution.
        The frames kept follow ``config``'s start, stride and frame limit.
        """
        select = Selection(config.max_frames, config.start_frame, config.start_time, config.frame_stride)
        if isinstance(video, torch.Tensor):
            frames = video.float()
            if frames.ndim != 4 or frames.shape[1] != 3:
                raise TokenFlowError(f"frame tensor must be (N, 3, H, W), got {tuple(frames.shape)}")
            fps = float(config.fps or 10.0)
            frames = select.apply(frames, fps)
            if not len(frames):
                raise TokenFlowError(f"the tensor has {len(video)} frames: none from the start asked for")
            source_hw = tuple(frames.shape[2:])
            if config.height or config.width:
                h, w = self.working_size(source_hw, config)
                if (h, w) != source_hw:
                    frames = torch.nn.functional.interpolate(frames, (h, w), mode="bicubic",
                                                             antialias=True).clamp(0, 1)
            if frames.shape[2] % 8 or frames.shape[3] % 8:
                raise TokenFlowError(f"frame size {frames.shape[3]}x{frames.shape[2]} is not a multiple of 8")
            return FittedVideo(frames, fps / config.frame_stride, None, 0.0, source_hw)
        if isinstance(video, np.ndarray):
            if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
                raise TokenFlowError(f"frame array must be uint8 (N, H, W, 3), got {video.dtype} {video.shape}")
            video = Video(video, float(config.fps or 10.0))
        elif not isinstance(video, Video):  # decoded at the working size
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
