"""FLUX.1 dev and schnell (``FluxTransformer2DModel``; CLIP-L for the pooled embedding, T5).

Latents are packed 2x2 into a sequence ``(h/2 * w/2, 4C)`` with position ids per token (rotary
embeddings); the double-stream blocks attend over ``[text, image]`` with separate projections,
the single-stream blocks over one concatenated ``[text, image]`` sequence. FLUX.1-dev is
guidance-distilled: the guidance scale goes in as an embedding, one branch per prompt, no
classifier-free guidance; schnell has no guidance input. The timestep goes in on the 0-1 scale,
and the schedule's shift depends on the number of image tokens.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..conditioning import PromptEmbeds
from .base import FlowDefaults, FlowFamily


class FluxFamily(FlowFamily):
    name = "flux"
    uses_cfg = False
    text_first = True
    defaults = FlowDefaults(steps=28, n_max=24, source_guidance_scale=1.5, guidance_scale=5.5)  # FLUX_exp.yaml
    layer_roles = ((r"transformer_blocks\.\d+\.attn\.processor", "joint"),
                   (r"single_transformer_blocks\.\d+\.attn\.processor", "single"))
    max_sequence_length = 512  # T5 tokens (the pipeline's default)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        c = self.vae.config.latent_channels
        return ((height // 16) * (width // 16), c * 4)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        n, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, n, c, h, w)

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.pipe._unpack_latents(latents, height, width, 8)

    def schedule_kwargs(self, steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """FluxPipeline's schedule: sigmas from 1 to 1/steps, shifted by ``mu`` for the token count."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.scheduler.config
        kwargs: dict[str, Any] = {"sigmas": np.linspace(1.0, 1 / steps, steps)}
        if cfg.get("use_dynamic_shifting"):
            kwargs["mu"] = calculate_shift(latent_shape[0], cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.15))
        return kwargs

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> PromptEmbeds:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(embeds.to(self.dtype), pooled.to(self.dtype))

    def image_ids(self, n_tokens: int, device, dtype) -> torch.Tensor:
        """(L, 3) position ids of a packed latent's tokens (row, column), from the stored frame size."""
        h, w = self._grid
        assert h * w == n_tokens, (h, w, n_tokens)
        return self.pipe._prepare_latent_image_ids(1, h, w, device, dtype)

    def set_frame_size(self, height: int, width: int) -> None:
        self._grid = (height // 16, width // 16)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, text: PromptEmbeds,
                 guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        device, dtype = self.device, self.dtype
        embeds = text.embeds.to(device=device, dtype=dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        kwargs = {}
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("FLUX.1-dev takes a guidance value per branch")
            kwargs["guidance"] = guidance.to(device=device, dtype=torch.float32)
        timestep = (t.to(device) / 1000).expand(len(x))
        return self.transformer(hidden_states=x.to(device=device, dtype=dtype), timestep=timestep,
                                encoder_hidden_states=embeds, pooled_projections=text.pooled.to(device=device,
                                                                                                dtype=dtype),
                                txt_ids=text_ids, img_ids=self.image_ids(x.shape[1], device, dtype),
                                return_dict=False, **kwargs)[0].float()
