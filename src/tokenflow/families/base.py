"""What a rectified-flow family gives TokenFlow's loop (SD3, FLUX.1).

Rectified flow (Liu et al. 2023; Esser et al. 2024, SD3): ``x_t = (1 - sigma_t) x_0 + sigma_t eps``,
the network predicts the velocity ``v = eps - x_0`` and sampling is the Euler step
``x_{t-1} = x_t + (sigma_{t-1} - sigma_t) v``. A family supplies the latent layout and the VAE,
prompt encoding, the schedule, the network call on a batch of branches, and the attention layers
TokenFlow hooks; the loop and the editors are the same for every family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..conditioning import PromptEmbeds


@dataclass(frozen=True)
class FlowDefaults:
    """A family's published FlowEdit settings (``SD3_exp.yaml`` / ``FLUX_exp.yaml`` of the FlowEdit code)."""

    steps: int
    n_max: int
    source_guidance_scale: float
    guidance_scale: float  # the target's


@dataclass(frozen=True)
class AttentionLayer:
    """An attention module TokenFlow hooks: its name and where its image tokens lie.

    role ``joint``: image tokens in ``hidden_states``, text tokens in ``encoder_hidden_states``;
    ``image``: image tokens only (SD3.5's dual attention); ``single``: FLUX's single-stream
    blocks, one sequence ``[text, image]`` in ``hidden_states``."""

    name: str
    role: str


class FlowFamily:
    """Base of the rectified-flow families: a diffusers pipeline's components, held, not copied."""

    name = "flow"
    uses_cfg = False  # classifier-free guidance: two branches per prompt (SD3); else one (FLUX)
    text_first = False  # the joint sequence's order in the model's own processor
    size_multiple = 16  # VAE factor 8 x patch 2
    native_side = 1024  # SD3.5 and FLUX.1 are trained at about 1024 x 1024: the default working area
    defaults = FlowDefaults(steps=28, n_max=24, source_guidance_scale=1.5, guidance_scale=5.5)
    layer_roles: tuple[tuple[str, str], ...] = ()  # (regex on processor names, role)

    def __init__(self, pipe):
        self.pipe = pipe  # a diffusers pipeline: prompt encoding and the latent helpers are its own
        self.transformer, self.vae, self.scheduler = pipe.transformer, pipe.vae, pipe.scheduler
        # where the compute runs (with offload the modules wait on the CPU between stages)
        self.compute_device = self.transformer.device

    # ------------------------------------------------------------------ components
    @property
    def device(self) -> torch.device:
        return self.compute_device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for k in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if (m := getattr(self.pipe, k, None)) is not None]

    def release_text_encoders(self) -> None:
        for k in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if hasattr(self.pipe, k):
                setattr(self.pipe, k, None)

    def attention_layers(self) -> list[AttentionLayer]:
        """Every attention layer TokenFlow hooks, by role from the module names; fails loudly if none."""
        layers = []
        for key in self.transformer.attn_processors:
            for pattern, role in self.layer_roles:
                if re.fullmatch(pattern, key):
                    layers.append(AttentionLayer(key[:-len(".processor")], role))
                    break
        if not layers:
            raise ValueError(f"the {self.name} transformer has no attention layers TokenFlow knows")
        return layers

    # ------------------------------------------------------------------ latents
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of one frame's latent in this family's layout."""
        c = self.vae.config.latent_channels
        return (c, height // 8, width // 8)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) VAE latents -> this family's layout (unchanged by default)."""
        return latents

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """float (N, 3, H, W) in [0, 1] -> clean latents in the family's layout, float32 on the CPU:
        ``(mode - shift) * scale`` as the family's pipelines (and FlowEdit) do."""
        vae, cfg = self.vae, self.vae.config
        if not len(frames):  # a rank with no frames (more ranks than batches)
            return torch.zeros((0, *self.latent_shape(*frames.shape[-2:])))
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        out = []
        for i in range(0, len(frames), batch_size):
            x = frames[i:i + batch_size].to(device=device, dtype=dtype) * 2 - 1
            z = vae.encode(x).latent_dist.mode()
            out.append(((z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).float().cpu())
        return self.pack(torch.cat(out)).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int, batch_size: int = 8) -> torch.Tensor:
        """Latents in the family's layout -> float32 frames (N, 3, H, W) in [0, 1] on the CPU."""
        vae, cfg = self.vae, self.vae.config
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        out = torch.empty(len(latents), 3, height, width)
        for i in range(0, len(latents), batch_size):
            z = self.unpack(latents[i:i + batch_size].to(device=device, dtype=dtype), height, width)
            z = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            out[i:i + len(z)] = (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1).cpu()
        return out

    # ------------------------------------------------------------------ schedule
    def schedule(self, steps: int, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (T,) on the model's 0-1000 scale, sigmas (T + 1,) ending at 0), as the family's
        pipeline sets its scheduler."""
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(steps, **self.schedule_kwargs(steps, latent_shape))
        return scheduler.timesteps.clone().cpu(), scheduler.sigmas.clone().float().cpu()

    def new_scheduler(self):
        return type(self.scheduler).from_config(self.scheduler.config)

    def schedule_kwargs(self, steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ the network
    def encode_prompt(self, prompt: str) -> PromptEmbeds:
        """One prompt -> its embeddings (1, T, D) and pooled embedding (1, P), in the model's dtype."""
        raise NotImplementedError

    def text_tokens(self, text: PromptEmbeds) -> int:
        return text.embeds.shape[1]

    def velocity(self, x: torch.Tensor, t: torch.Tensor, text: PromptEmbeds,
                 guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The predicted velocity (M, ...) float32 for latents x (M, ...) at timestep t with
        ``text`` rows (M) and, for guidance-distilled models, the guidance values (M,)."""
        raise NotImplementedError
