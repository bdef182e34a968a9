"""``--dtype auto`` on a CPU, decided by measuring: bfloat16 only where this CPU runs it clearly
faster than float32.

The kernels that carry a diffusion model's work, a GEMM and a 3x3 convolution, are timed side by
side in both dtypes (a fraction of a second), once per CPU model and torch version; the result is
kept in ``~/.cache/tokenflow/cpu-dtype.json`` (``$XDG_CACHE_HOME`` respected), so later runs only
read it. bfloat16 is taken when both kernels run at least :data:`FASTER` times the float32 rate.
A rule on CPU features cannot say it: a Xeon with AVX512-BF16 but no AMX ran bfloat16 GEMMs at 0.52x
the float32 rate (benchmarks/dtype_drift.py --kernels), an AMD EPYC with AVX512-BF16 at 1.55x (GEMM)
and 1.7x (3x3 convolution) (issue 23).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)
FASTER = 1.2  # bfloat16 must be this much faster on both kernels
CACHE_NAME = "cpu-dtype.json"


def cpu_model() -> str:
    """The CPU's model string (``/proc/cpuinfo``'s model name on Linux), else what the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_file() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "tokenflow", CACHE_NAME)


def _best_seconds(fn: Callable[[], object], reps: int = 3) -> float:
    fn()  # warm up (kernel selection, allocation)
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return max(best, 1e-9)


def measure_speedups(reps: int = 3) -> dict[str, float]:
    """float32 time / bfloat16 time of a GEMM (256x1024 @ 1024x1024) and a 3x3 convolution
    (2x128x32x32, 128 filters): above 1, bfloat16 is faster."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    x, w = torch.randn(2, 128, 32, 32, generator=gen), torch.randn(128, 128, 3, 3, generator=gen)
    out = {}
    with torch.no_grad():
        for name, run, args in (("gemm", torch.matmul, (a, b)),
                                ("conv3x3", lambda x_, w_: torch.nn.functional.conv2d(x_, w_, padding=1), (x, w))):
            fp32 = _best_seconds(lambda: run(*args), reps)
            low = tuple(t.to(torch.bfloat16) for t in args)
            bf16 = _best_seconds(lambda: run(*low), reps)
            out[name] = round(fp32 / bf16, 3)
    return out


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def bf16_is_faster(measure: Optional[Callable[[], dict[str, float]]] = None, path: Optional[str] = None) -> bool:
    """Whether bfloat16 runs clearly faster than float32 on this CPU: measured once per CPU model and
    torch version, then read from the cache file (a cache that cannot be written only costs a re-measure)."""
    path = path or cache_file()
    key = f"{cpu_model()} | torch {torch.__version__.split('+')[0]}"
    known = _read(path)
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("bfloat16"), bool):
        return entry["bfloat16"]
    speed = (measure or measure_speedups)()
    faster = all(v >= FASTER for v in speed.values())
    logger.info("dtype auto on this CPU (%s): bfloat16 runs a GEMM at %.2fx and a 3x3 convolution at %.2fx the "
                "float32 speed, so %s (measured once; kept in %s)", cpu_model(), speed.get("gemm", 0),
                speed.get("conv3x3", 0), "bfloat16" if faster else "float32", path)
    try:
        from .atomic import atomic_path

        os.makedirs(os.path.dirname(path), exist_ok=True)
        known[key] = {**speed, "bfloat16": faster}
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(known, f, indent=1)
    except Exception as e:  # a read-only home: measured again next time
        logger.debug("could not keep the dtype measurement in %s: %s", path, e)
    return faster
