"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``; CLIP-L, CLIP-G and T5 text encoders).

The MM-DiT blocks attend jointly over ``[image, text]`` tokens (``attn``); SD3.5 Medium's first
blocks add an image-only self-attention (``attn2``). Classifier-free guidance: an unconditional
and a conditional branch per prompt. The timestep goes to the transformer on the 0-1000 scale.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..conditioning import PromptEmbeds
from .base import FlowDefaults, FlowFamily


class SD3Family(FlowFamily):
    name = "sd3"
    uses_cfg = True
    text_first = False
    defaults = FlowDefaults(steps=50, n_max=33, source_guidance_scale=3.5, guidance_scale=13.5)  # SD3_exp.yaml
    layer_roles = ((r"transformer_blocks\.\d+\.attn\.processor", "joint"),
                   (r"transformer_blocks\.\d+\.attn2\.processor", "image"))
    max_sequence_length = 256  # T5 tokens (the pipeline's default)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> PromptEmbeds:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(embeds.to(self.dtype), pooled.to(self.dtype))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, text: PromptEmbeds,
                 guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        device, dtype = self.device, self.dtype
        timestep = t.to(device).expand(len(x))
        return self.transformer(hidden_states=x.to(device=device, dtype=dtype), timestep=timestep,
                                encoder_hidden_states=text.embeds.to(device=device, dtype=dtype),
                                pooled_projections=text.pooled.to(device=device, dtype=dtype),
                                return_dict=False)[0].float()
