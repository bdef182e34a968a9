"""Base image editors that TokenFlow wraps."""

from .base import BaseEditor
from .controlnet import ControlNetEditor
from .pnp import PnPEditor
from .sdedit import SDEditEditor

EDITORS: dict[str, type[BaseEditor]] = {cls.name: cls for cls in (PnPEditor, SDEditEditor, ControlNetEditor)}

__all__ = ["BaseEditor", "PnPEditor", "SDEditEditor", "ControlNetEditor", "EDITORS"]
