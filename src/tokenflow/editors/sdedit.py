"""SDEdit (Meng et al., ICLR 2022) as TokenFlow's base editor.

Sampling starts part-way down the schedule from a noised source and runs without injection.
The source branch still runs: its tokens give TokenFlow's correspondences.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..inversion import Inversion
from .base import BaseEditor


class SDEditEditor(BaseEditor):
    name = "sdedit"

    def select_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        # the official slicing timesteps[int(1 - start * n):]: 44 of 50 steps at start 0.9
        return timesteps[-self.config.sdedit_steps():]

    def start_latents(self, inversion: Inversion, scheduler, first_timestep: torch.Tensor,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.config.sdedit_noise == "ddim":
            return super().start_latents(inversion, scheduler, first_timestep, generator)
        # one noise image shared by every frame (what the official use_ddim_noise: False meant)
        x0 = inversion.x0  # read once (a stored inversion reads it from disk)
        noise = torch.randn((1, *x0.shape[1:]), generator=generator)
        return scheduler.add_noise(x0, noise.expand_as(x0), first_timestep)
