"""TokenFlow: consistent diffusion features for consistent video editing (ICLR 2024).

The names below are imported on first use (PEP 562), so that ``import tokenflow`` and the commands
that need no model (``tokenflow cache list``, ``--help``) do not load torch and diffusers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
# the name to install it by: "tokenflow" on PyPI is an unrelated package (a tokenizer, 2020); the import
# and the command stay `tokenflow`
DISTRIBUTION = "tokenflow-video"

# public name -> the module that defines it
_LAZY = {"EditConfig": "config", "TokenFlowError": "errors", "FlowPipeline": "flow", "Inversion": "inversion",
         "EditResult": "pipeline", "TokenFlowPipeline": "pipeline", "Video": "video", "read_video": "video",
         "write_frames": "video", "write_video": "video"}

__all__ = ["TokenFlowPipeline", "FlowPipeline", "EditConfig", "EditResult", "Inversion", "TokenFlowError",
           "Video", "read_video", "write_video", "write_frames", "__version__"]

if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from .config import EditConfig
    from .errors import TokenFlowError
    from .flow import FlowPipeline
    from .inversion import Inversion
    from .pipeline import EditResult, TokenFlowPipeline
    from .video import Video, read_video, write_frames, write_video


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenflow' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
