"""Frame timing: when a file's frames are shown, and the evenly spaced frames that keep that time.

The editor works on frames at one constant rate, but a file's frames carry their own presentation
times (pts * time_base), and those need not be evenly spaced: phones record at a variable rate,
a damaged file loses frames. :func:`plan` lays a grid of evenly spaced *slots* over the time the
video spans, and :meth:`Timeline.fill` gives every slot the frame shown nearest to its time, so the
frames last as long as the video and stay in step with its audio. A constant-rate file gets one
frame per slot, unchanged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Iterator, Optional, Sequence, TypeVar

T = TypeVar("T")

MAX_GAP = 5.0  # seconds without a frame: a jump of the clock (joined recordings), not a slow frame rate
RATE_TOLERANCE = 0.02  # the header's rate is kept when the timestamps agree with it this closely
EVEN = 0.25  # frames whose spacing stays this close to one slot are evenly spaced (ms-rounded clocks jitter)


@dataclass(frozen=True)
class Timeline:
    start: float  # seconds: the first frame's presentation time
    end: float  # seconds: when the last frame stops being shown
    last: float  # seconds: the last frame's presentation time
    count: int  # frames with a timestamp
    rate: Fraction  # slots per second
    even: bool  # every frame follows the one before by about one slot (a constant-rate file)

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def slots(self) -> int:
        return max(1, round(self.duration * self.rate))

    def time(self, slot: int) -> float:
        return self.start + slot / float(self.rate)

    def fill(self, frames: Iterable[tuple[Optional[float], T]]) -> Iterator[tuple[int, float, T]]:
        """(slot, its time, frame) for every slot, from (time, frame) pairs in presentation order:
        each slot takes the frame shown nearest to its time, so a frame that is missing (it did not
        decode) is stood in for by its neighbours. Slots before the first frame given, and past the
        last one when the frames after it are missing, are left out rather than frozen."""
        period = 1 / float(self.rate)
        slot, held = 0, None  # held: the last frame given, until the next one says where its slots end
        for time, frame in frames:
            if time is None:  # an untimed frame follows the one before by one slot
                time = self.start if held is None else held[0] + period
            if held is None:
                slot = max(0, math.ceil((time - self.start) / period - 0.5 - 1e-9))
            else:
                slot = yield from self._give(slot, held[1], (held[0] + time) / 2)
            held = (time, frame)
        if held is not None:
            until = self.end if held[0] >= self.last - 1e-6 else held[0] + period / 2
            yield from self._give(slot, held[1], until)

    def _give(self, slot: int, frame: T, until: float):
        """The slots from ``slot`` on whose time is before ``until``, with ``frame``; returns the next slot."""
        while slot < self.slots and self.time(slot) < until - 1e-9:
            yield slot, self.time(slot), frame
            slot += 1
        return slot


def plan(times: Sequence[float], last_shown: float, header_rate: Optional[Fraction]) -> Optional[Timeline]:
    """The timeline of frames presented at ``times`` (seconds, in any order), the last one shown for
    ``last_shown`` seconds (0: unknown). The slots run at the header's rate when the timestamps agree
    with it, else at the rate they give (frames / duration: a variable-rate clip keeps its frame
    count and its length). None when the timestamps cannot be trusted to say how the frames play:
    two frames at one time, or a gap over MAX_GAP."""
    times = sorted(times)
    if not times or len(set(times)) < len(times):
        return None
    gaps = [b - a for a, b in zip(times, times[1:])]
    if gaps and max(gaps) > MAX_GAP:
        return None
    usual = statistics.median(gaps) if gaps else 1 / float(header_rate or 10)
    start, end = times[0], times[-1] + (last_shown if 0 < last_shown <= MAX_GAP else usual)
    measured = len(times) / (end - start)
    if header_rate and abs(float(header_rate) - measured) <= RATE_TOLERANCE * measured:
        rate = Fraction(header_rate)
    else:
        rate = Fraction(measured).limit_denominator(1001)
    even = all(abs(g * rate - 1) <= EVEN for g in gaps)
    return Timeline(start, end, times[-1], len(times), rate, even)
