"""ControlNet (Zhang et al., ICCV 2023) as TokenFlow's base editor.

The structure of every frame comes from its own condition image (``--control canny``,
``depth`` or images the user gives) through the ControlNet residuals, which the pipeline adds
to every UNet call (:class:`tokenflow.conditioning.Conditioning`), inversion included. The
editor itself only says where sampling starts: from the inverted noise, as PnP does, so
colours and layout the prompt does not change stay close to the source. No Plug-and-Play
injection; TokenFlow (keyframes, extended attention, propagation) runs as with any editor.
"""

from __future__ import annotations

from .base import BaseEditor


class ControlNetEditor(BaseEditor):
    name = "controlnet"  # EditConfig.validate requires --control with it
