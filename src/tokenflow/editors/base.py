"""The base-editor interface: what an image editor contributes to TokenFlow's loop.

TokenFlow wraps any diffusion-based image editor. The loop (``pipeline.py``) owns the
keyframes, the extended attention, the propagation, guidance and the scheduler; an editor
says which timesteps to run, where sampling starts, and which Plug-and-Play injections are
on at each step. Adding an editor is one module with a subclass of :class:`BaseEditor`,
registered in ``EDITORS``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import EditConfig
from ..inversion import Inversion


class BaseEditor:
    name = "base"

    def __init__(self, config: EditConfig):
        self.config = config

    def select_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The editing timesteps (descending) out of the full DDIM schedule."""
        return timesteps

    def start_latents(self, inversion: Inversion, scheduler, first_timestep: torch.Tensor,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Where sampling starts, (N, C, h, w) float32 on the CPU.

        As in the official code: the noise that takes the clean latents to the noisiest
        inverted state, ``eps = (x_T - sqrt(a_T) x0) / sqrt(1 - a_T)``, added back to the clean
        latents at the first editing timestep.
        """
        a_T = scheduler.alphas_cumprod[inversion.final_timestep]
        x0 = inversion.x0  # read once (a stored inversion reads it from disk)
        eps = (inversion.final - a_T ** 0.5 * x0) / (1 - a_T) ** 0.5
        return scheduler.add_noise(x0, eps, first_timestep)

    def injection(self, step_index: int, n_steps: int) -> tuple[bool, bool]:
        """(self-attention Q/K injection, residual-feature injection) at this step."""
        return False, False
