"""Out of memory: telling it apart, giving memory back, and one way to retry smaller.

Every stage that can run out of device memory (the inversion's batches, the keyframe pass, the
propagation pass's chunks, the VAE) runs through :func:`retry_smaller`: the work is a function of a
size (frames or branches per model call); out of memory, the size is lowered and the work retried,
until nothing smaller is left, and then one :class:`~tokenflow.errors.OutOfMemory` names the setting to
change. The sizes one run ends with live in that run's :class:`MemoryPlan`, a copy of the pipeline's
settings: a retry never changes the pipeline for later runs (the result says what it lowered).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

import torch

from .errors import OutOfMemory

logger = logging.getLogger(__name__)

T = TypeVar("T")


def is_out_of_memory(e: BaseException) -> bool:
    """A device (or host) allocation failure that smaller batches may avoid."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def free_memory(device: torch.device | str) -> None:
    """Give cached blocks back after an out-of-memory error, before a retry."""
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def halve(size: int) -> Optional[int]:
    """The next size down: half, and nothing below one."""
    return size // 2 if size > 1 else None


def retry_smaller(work: Callable[[int], T], size: int, *, device: torch.device | str, fail: Callable[[int], str],
                  retrying: Callable[[int, int], str], smaller: Callable[[int], Optional[int]] = halve
                  ) -> tuple[T, int]:
    """``work(size)``; out of memory, ``work(smaller(size))`` and so on. Returns (the result, the size that
    worked). ``fail(size)`` is the message of the error raised when no smaller size is left (``smaller``
    gives None); ``retrying(size, next)`` the warning before a retry. Other errors pass through."""
    while True:
        try:
            return work(size), size
        except Exception as e:
            if not is_out_of_memory(e):
                raise
        # out of the except block: the failed attempt's frames, and their tensors, are gone now
        lower = smaller(size)
        if lower is None or lower >= size:
            raise OutOfMemory(fail(size))
        logger.warning("out of memory %s", retrying(size, lower))
        free_memory(device)
        size = lower


def vae_in_pieces(run: Callable[[int], T], memory: "MemoryPlan", what: str) -> T:
    """A VAE pass ``run(frames per call)`` (``what``: "encoding" or "decoding"); out of memory, retried with
    half the frames. The run keeps the size that worked."""
    result, memory.vae_batch_size = retry_smaller(
        run, memory.vae_batch_size, device=memory.device,
        fail=lambda s: f"out of memory {what} frames even one at a time: use --vae-tiling, or lower --height/--width",
        retrying=lambda s, lower: f"{what} frames; retrying {lower} frames at a time")
    return result


@dataclass
class MemoryPlan:
    """How one run splits its work: taken from the pipeline's settings at the start of the run
    (:meth:`from_settings`); an out-of-memory retry lowers this copy only, and :meth:`lowered` says what
    changed, for the result."""

    device: torch.device
    reuse_keyframe_outputs: bool = True  # paper propagation: a keyframe takes its keyframe-pass prediction
    split_keyframe_pass: Optional[bool] = None  # None: split when a rank has more keyframes than the batch size
    propagation_chunk: Optional[int] = None  # frames per UNet call in the propagation pass; None: the batch size
    offload_cache: Optional[bool] = None  # keyframe caches on the CPU; None: when the device is not the CPU
    vae_batch_size: int = 10  # frames per VAE call
    _start: dict = field(default_factory=dict, repr=False)

    SETTINGS = ("reuse_keyframe_outputs", "split_keyframe_pass", "propagation_chunk", "offload_cache",
                "vae_batch_size")

    @classmethod
    def from_settings(cls, owner, device: torch.device) -> "MemoryPlan":
        """A run's plan from an object with the settings as attributes (a pipeline)."""
        values = {name: getattr(owner, name) for name in cls.SETTINGS}
        plan = cls(device=device, **values)
        plan._start = dict(values)
        return plan

    def lowered(self) -> dict[str, object]:
        """The settings the run's retries changed, with the values it ended with."""
        return {name: getattr(self, name) for name in self.SETTINGS
                if name in self._start and getattr(self, name) != self._start[name]}
