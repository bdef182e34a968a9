"""The PyAV side of reading a video file: which stream is the video, when its frames are shown,
decoding past damaged packets, and what the stream itself declares.

Headers are read for what they are worth: counts and rates come from the packets' timestamps
(:mod:`tokenflow.timing`), and a duration is the video stream's own, never the container's (which
covers the audio too).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np

from .errors import TokenFlowError
from .timing import Timeline, plan

DEFAULT_RATE = 10.0  # frames per second when a stream says nothing
NOT_VIDEO_FORMATS = ("tty",)


def short_message(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "corrupt or unsupported"


def unreadable(path: str, e: BaseException) -> TokenFlowError:
    """In words: FFmpeg's ``InvalidDataError: [Errno 1094995529] ...`` means the file is not a video it knows."""
    import av

    if isinstance(e, getattr(av.error, "InvalidDataError", ())):
        return TokenFlowError(f"cannot read '{path}' as a video: it is not a video file FFmpeg knows (not a video, "
                              f"damaged, or an unknown format); convert it to .mp4, or give a folder of frames")
    if isinstance(e, getattr(av.error, "FFmpegError", ())) and getattr(e, "strerror", None):
        return TokenFlowError(f"cannot read '{path}' as a video: {e.strerror}")
    return TokenFlowError(f"cannot read '{path}' as a video: {type(e).__name__}: {short_message(e)}")


@contextlib.contextmanager
def open_video(path: str):
    import av

    if os.path.getsize(path) == 0:
        raise TokenFlowError(f"input '{path}' is an empty file")
    try:
        container = av.open(path)
    except Exception as e:  # av raises InvalidDataError and friends
        raise unreadable(path, e) from None
    try:
        # ffmpeg renders any text file as a "video" through its tty (ANSI art) demuxer
        if not container.streams.video or container.format.name in NOT_VIDEO_FORMATS:
            raise TokenFlowError(f"cannot read '{path}' as a video: it has no video stream")
        yield container, _video_stream(container, path)
    finally:
        container.close()


def _video_stream(container, path: str):
    """The first video stream that is not an attached picture (the cover art of an mp4 or mkv,
    which may come first)."""
    from av.stream import Disposition

    for stream in container.streams.video:
        if not stream.disposition & Disposition.attached_pic:
            return stream
    raise TokenFlowError(f"cannot read '{path}' as a video: its only picture is a cover (attached picture)")


def header_rate(stream) -> Fraction:
    return Fraction(stream.average_rate or stream.guessed_rate or Fraction(DEFAULT_RATE))


def scan_timeline(path: str) -> Optional[Timeline]:
    """When the video stream's frames are shown, from its packets (read, not decoded). None where the
    timestamps cannot be trusted (missing, or the clock jumps back, as in joined recordings): frames
    are then taken in decoding order at the header's rate."""
    times, latest, last_shown, last_dts = [], None, 0.0, None
    with open_video(path) as (container, stream):
        try:
            for packet in container.demux(stream):
                if not packet.size or packet.is_discard:  # the end, or cut by an edit list
                    continue
                if packet.pts is None or packet.dts is not None and last_dts is not None and packet.dts < last_dts:
                    return None
                last_dts = packet.dts if packet.dts is not None else last_dts
                time = float(packet.pts * packet.time_base)
                if latest is None or time > latest:  # how long the last frame shows: its packet's duration
                    latest, last_shown = time, float(packet.duration * packet.time_base) if packet.duration else 0.0
                times.append(time)
        except Exception:  # a damaged container: the packets before the damage; decoding reports it
            pass
        return plan(times, last_shown, header_rate(stream))


@dataclass
class Damage:
    """What went wrong while decoding: packets skipped, and the error that ended the container early."""

    skipped: int = 0  # packets whose decoding failed
    decoded: int = 0  # frames the decoder gave
    last: Optional[BaseException] = None  # the last decoding error
    ended: Optional[BaseException] = None  # the error that stopped reading the container


def decode_frames(container, stream, damage: Damage):
    """The stream's frames in presentation order. A packet that does not decode is skipped, as
    ffmpeg does, and counted; an error reading the container ends the frames there, after those
    the decoder still holds."""
    import av

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets, None)
        except Exception as e:  # a cut or damaged container
            damage.ended, packet = e, None
        try:
            frames = packet.decode() if packet is not None else stream.decode(None)
        except av.FFmpegError as e:
            if packet is None or not packet.size:  # flushing the decoder at the end
                return
            damage.skipped, damage.last = damage.skipped + 1, e
            continue
        damage.decoded += len(frames)
        yield from frames
        if packet is None:
            return


def no_frames(path: str, damage: Damage) -> TokenFlowError:
    error = damage.last or damage.ended
    return unreadable(path, error) if error else TokenFlowError(f"input '{path}' has no video frames")


def upright(frame) -> np.ndarray:
    """A decoded frame as RGB, turned by its display matrix (phones store portrait clips sideways)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = _turns(frame)
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _turns(frame) -> int:
    rotation = getattr(frame, "rotation", 0) or 0  # degrees counter-clockwise, as ffmpeg displays it
    return int(round(rotation / 90)) % 4


def frame_pixel_aspect(frame, stream) -> Fraction:
    """Width over height of a pixel of the upright frame (DVD and broadcast video: 8:9, 32:27...)."""
    sar = stream.sample_aspect_ratio
    if not sar or sar <= 0:
        return Fraction(1)
    return 1 / Fraction(sar) if _turns(frame) % 2 else Fraction(sar)


def declared_frames(stream, timeline: Optional[Timeline], rate: Fraction) -> Optional[int]:
    """The frames the video stream's own duration holds (never the container's, which covers the
    audio too); without timestamps, the count its header gives. None if it does not say."""
    if timeline is None:
        return int(stream.frames) or None
    seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    tag = _tag_seconds(stream.metadata.get("DURATION"))  # Matroska: the track's end, as ffmpeg writes it
    if seconds is None and tag:
        seconds = tag - timeline.start if tag > timeline.start else tag
    return round(seconds * rate) if seconds and seconds > 0 else None


def _tag_seconds(text: Optional[str]) -> Optional[float]:
    """'00:00:03.000000000' -> 3.0"""
    try:
        h, m, s = (text or "").split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    except ValueError:
        return None
