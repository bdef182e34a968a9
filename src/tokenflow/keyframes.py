"""Keyframe samplers.

TokenFlow (Sec. 4.2) draws one keyframe at random in every interval of ``batch_size``
frames and redraws them at every denoising step, so that every frame is edited jointly
with the others over the course of sampling. The official code draws them with
``torch.randint(batch_size, (n_frames // batch_size,))`` from the global RNG; the random
sampler below makes the same draw from a ``torch.Generator`` seeded the same way, so a
seed gives the official keyframes whenever ``n_frames`` is a multiple of ``batch_size``.
A shorter last interval gets one more draw of its own (the official code drops those frames).
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

import torch

from .errors import TokenFlowError


class KeyframeSampler(Protocol):
    def __call__(self, step: int, n_frames: int, batch_size: int) -> torch.Tensor:
        """Sorted keyframe indices (K,) int64 for denoising step ``step`` (0-based)."""


def interval_starts(n_frames: int, batch_size: int) -> torch.Tensor:
    """First frame of every interval of ``batch_size`` frames, the last one possibly shorter."""
    return torch.arange(0, n_frames, batch_size)


class RandomKeyframes:
    """One uniformly random frame per interval, redrawn every step (the paper's and official)."""

    def __init__(self, seed: int, generator: "torch.Generator | None" = None):
        self.generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))

    def __call__(self, step: int, n_frames: int, batch_size: int) -> torch.Tensor:
        n_full, rest = divmod(n_frames, batch_size)
        offsets = torch.randint(batch_size, (n_full,), generator=self.generator)
        if rest:
            offsets = torch.cat([offsets, torch.randint(rest, (1,), generator=self.generator)])
        return offsets + interval_starts(n_frames, batch_size)

    def get_state(self) -> torch.Tensor:
        """The generator's state, for a checkpoint: a resumed run draws what this one would."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


class FixedKeyframes:
    """The middle frame of every interval at every step (the paper's fixed-keyframe ablation)."""

    def __call__(self, step: int, n_frames: int, batch_size: int) -> torch.Tensor:
        starts = interval_starts(n_frames, batch_size)
        lengths = torch.clamp(n_frames - starts, max=batch_size)
        return starts + lengths // 2


class ScheduledKeyframes:
    """Keyframes given explicitly for every step, e.g. recorded from another run."""

    def __init__(self, schedule: Sequence[Sequence[int]]):
        if len(schedule) == 0:
            raise TokenFlowError("keyframe schedule is empty; give one list of frame indices per step")
        self.schedule = [torch.as_tensor(list(s), dtype=torch.long) for s in schedule]

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ScheduledKeyframes":
        """Read ``[[i, ...], ...]`` or ``{"steps": [...]}`` or a list of ``{"keyframes": [...]}``."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise TokenFlowError(f"cannot read keyframe schedule '{path}': {getattr(e, 'strerror', None) or e}") from None
        if isinstance(data, dict):
            data = data.get("steps", data.get("keyframes"))
        if not isinstance(data, list):
            raise TokenFlowError(f"keyframe schedule '{path}' must be a list of per-step index lists")
        steps = [d.get("keyframes", d.get("pivotal_idx")) if isinstance(d, dict) else d for d in data]
        if not all(isinstance(s, list) and all(isinstance(i, int) for i in s) for s in steps):
            raise TokenFlowError(f"keyframe schedule '{path}' must hold lists of integer frame indices")
        return cls(steps)

    def check(self, steps: int, n_frames: int, batch_size: int) -> "ScheduledKeyframes":
        """Validate every step now, so a bad schedule fails before the inversion, not at step 30."""
        for step in range(steps):
            self(step, n_frames, batch_size)
        return self

    def __call__(self, step: int, n_frames: int, batch_size: int) -> torch.Tensor:
        if step >= len(self.schedule):
            raise TokenFlowError(
                f"keyframe schedule has {len(self.schedule)} steps but step {step + 1} was asked for")
        keyframes = self.schedule[step]
        n_intervals = len(interval_starts(n_frames, batch_size))
        if len(keyframes) != n_intervals:
            raise TokenFlowError(f"keyframe schedule step {step + 1} has {len(keyframes)} keyframes; "
                                 f"{n_frames} frames in batches of {batch_size} need {n_intervals}")
        if bool(((keyframes // batch_size) != torch.arange(n_intervals)).any()) or int(keyframes.max()) >= n_frames \
                or int(keyframes.min()) < 0:
            raise TokenFlowError(f"keyframe schedule step {step + 1}: {keyframes.tolist()} must hold "
                                 f"one frame of each interval of {batch_size} frames, in order")
        return keyframes.clone()


def make_sampler(kind: str, seed: int, schedule_path: str | None = None,
                 generator: "torch.Generator | None" = None) -> KeyframeSampler:
    if schedule_path:
        return ScheduledKeyframes.from_json(schedule_path)
    if kind == "random":
        return RandomKeyframes(seed, generator)
    if kind == "fixed":
        return FixedKeyframes()
    raise TokenFlowError(f"unknown keyframe sampler '{kind}'; allowed: random, fixed")


# ---------------------------------------------------------------- bounded keyframe attention
DEFAULT_KEYFRAME_WINDOW = 64  # keyframes per keyframe-pass call: 512 frames at batch 8 keep the exact pass
KEYFRAME_ANCHORS = 8  # anchor keyframes shared by every group (fewer when the window is smaller)


def n_anchors(window: int) -> int:
    """Anchors of a windowed keyframe pass: ``KEYFRAME_ANCHORS``, at most the window."""
    return min(KEYFRAME_ANCHORS, window)


def windowed(n_keyframes: int, window: "int | None") -> bool:
    """Whether a step with ``n_keyframes`` keyframes runs the bounded pass (else the exact one)."""
    return window is not None and n_keyframes > window


def window_groups(keyframes: "torch.Tensor | Sequence[int] | int", window: int,
                  anchors: int) -> tuple[list[int], list[list[int]]]:
    """Anchors and groups of a bounded keyframe pass, as positions in the step's keyframe list
    (keyframe ``b`` lies in batch ``b``: the positions are batch indices).

    ``anchors`` positions spread evenly over the whole list (the middle of each of ``anchors`` equal
    parts); the groups are the chunks ``[g*window, (g+1)*window)`` of the positions without the
    anchors, so each holds at most ``window`` consecutive keyframes and a group never straddles a
    chunk boundary (ranks own whole chunks: a group never spans ranks). Every keyframe is in exactly
    one of the anchors or a group. With ``len(keyframes) <= window`` there is one group of all
    keyframes and no anchor: the exact pass.
    """
    n = keyframes if isinstance(keyframes, int) else len(keyframes)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if not windowed(n, window):
        return [], [list(range(n))] if n else []
    if not 1 <= anchors <= window:
        raise ValueError(f"anchors must be in [1, window={window}], got {anchors!r}")
    chosen = [(2 * i + 1) * n // (2 * anchors) for i in range(anchors)]  # distinct: n > window >= anchors
    taken = set(chosen)
    groups = [[p for p in range(start, min(start + window, n)) if p not in taken] for start in range(0, n, window)]
    return chosen, [g for g in groups if g]
