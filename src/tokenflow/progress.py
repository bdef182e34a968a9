"""What a stage says beside its progress bar: the rate of this run's own work (a resumed run does
not count what the interrupted one did), and, once, after its first piece of work, how long the
stage will take when that is long, naming the settings that shorten it.

The lines are log records (``tokenflow`` logger); the command sends its log through ``tqdm.write``
(:func:`above_the_bars`), so they land above a running bar instead of breaking into it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

logger = logging.getLogger(__name__)
LONG_SECONDS = 300.0  # a stage expected to take longer than this is announced


def above_the_bars():
    """For the length of the command: log lines to the console go through ``tqdm.write``."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # an old tqdm: lines as they were
        return contextlib.nullcontext()
    return logging_redirect_tqdm()


def duration(seconds: float) -> str:
    """``42 s``, ``14 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def job_left(stage_left: float, later: float, rate: float) -> str:
    """``, edit ~14 min left``: the time the rest of a job takes at ``rate`` units per second, the stage's
    ``stage_left`` units and the ``later`` ones of the stages after it (the same kind of unit: UNet images);
    '' with nothing after the stage or no rate yet."""
    if later <= 0 or rate <= 0:
        return ""
    return f", edit done in ~{duration((stage_left + later) / rate)}"


class StageClock:
    """Work done against time in one stage. ``done``/``total`` are in the stage's units (frame-steps
    of the inversion, steps of the edit); ``already``: units an interrupted run had done."""

    def __init__(self, stage: str, shorten: str, announce: bool = True, already: float = 0.0,
                 what: Optional[str] = None):
        self.stage, self.shorten, self.announce, self.what = stage, shorten, announce, what
        self.started = time.perf_counter()
        self.skipped = self.last = float(already)
        self._skip_next = False
        self.restored = False
        self.said = False

    def resumed(self) -> None:
        """The next :meth:`update` reports work an earlier run did (restored from its checkpoint)."""
        self._skip_next = True

    def update(self, done: float, total: float) -> float:
        """Record progress; returns this run's rate (units per second). After the first unit of this
        run's work, says once how long the rest will take if that is longer than :data:`LONG_SECONDS`."""
        self.restored = self._skip_next  # this update is an earlier run's work
        if self._skip_next:
            self.skipped += done - self.last
            self._skip_next = False
        self.last = done
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        mine = done - self.skipped
        rate = mine / elapsed
        if mine > 0 and not self.said:
            self.said = True
            left = (total - done) / rate
            if self.announce and left > LONG_SECONDS:
                what = f" ({self.what})" if self.what else ""
                logger.warning("%s will take about %s more%s; %s shorten it", self.stage, duration(left), what,
                               self.shorten)
        return rate
