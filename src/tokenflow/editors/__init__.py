"""Base image editors that TokenFlow wraps."""

from ..config import UNET_EDITORS
from .base import BaseEditor
from .controlnet import ControlNetEditor
from .pnp import PnPEditor
from .sdedit import SDEditEditor

# the classes of the UNet families' editors, under the names the settings know them by (config.UNET_EDITORS:
# the one list of editor names)
EDITORS: dict[str, type[BaseEditor]] = {cls.name: cls for cls in (PnPEditor, SDEditEditor, ControlNetEditor)}
if tuple(EDITORS) != UNET_EDITORS:  # pragma: no cover (a new editor registered in one place only)
    raise ImportError(f"editor classes {tuple(EDITORS)} do not match config.UNET_EDITORS {UNET_EDITORS}")

__all__ = ["BaseEditor", "PnPEditor", "SDEditEditor", "ControlNetEditor", "EDITORS"]
