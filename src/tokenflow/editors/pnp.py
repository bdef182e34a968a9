"""Plug-and-Play (Tumanyan et al., CVPR 2023) as TokenFlow's base editor.

The source branch denoises the inverted source latents with the inversion prompt; for the
first ``pnp_f_t`` of the steps the edit branches take its decoder residual features, and
for the first ``pnp_attn_t`` its decoder self-attention queries and keys.
"""

from __future__ import annotations

from .base import BaseEditor


class PnPEditor(BaseEditor):
    name = "pnp"

    def injection(self, step_index: int, n_steps: int) -> tuple[bool, bool]:
        # the official thresholds: timesteps[:int(n * fraction)]
        qk = step_index < int(n_steps * self.config.pnp_attn_t)
        features = step_index < int(n_steps * self.config.pnp_f_t)
        return qk, features
