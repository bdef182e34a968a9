"""The UNet families' seam (SD 1.x/2.x, SD 2 depth, SDXL): prompts, per-frame conditions and the one
model call, shared by the inversion and the editing loop; and the UNet editing loop itself
(:class:`UNetEditLoop`, the counterpart of the rectified-flow families' ``flow._FlowLoop``).

:class:`UNetModel` is what :class:`~tokenflow.pipeline.TokenFlowPipeline` knows of its network; the
rectified-flow families have theirs in :mod:`tokenflow.families.base`. It needs the pipeline's modules
(``unet``, ``vae``, the text encoders and tokenizers, ``controlnets``, ``depth_estimator``), ``device``,
``dtype``, ``offload`` and ``_on_device``.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
from tqdm.auto import tqdm

from ..attention import TokenFlowState
from ..checkpoints import Checkpointer, CheckpointStore, EditCheckpoints, edit_key
from ..conditioning import (DEFAULT_CONTROLNETS, DEFAULT_DEPTH_MODEL, Conditioning, PromptEmbeds, control_images,
                            estimate_depth, load_depth_model, model_family, normalise_per_frame)
from ..config import POLICIES as PROPAGATION_POLICIES
from ..config import EditConfig
from ..distributed import ShardPlan
from ..editing import denoise_step as tokenflow_step
from ..editors import BaseEditor
from ..errors import TokenFlowError
from ..injection import tokenflow_hooks
from ..inversion import Inversion, PredictFn
from ..memory import MemoryPlan
from ..models import encode_prompt, encode_prompt_sdxl, path_identity, short_error
from ..progress import StageClock
from ..results import ProgressCallback

if TYPE_CHECKING:
    from ..pipeline import TokenFlowPipeline


class UNetModel:
    """Prompts, conditions and the UNet call of a Stable Diffusion UNet pipeline."""

    # ------------------------------------------------------------------ prompts
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """(1, 77, D) prompt embedding (SDXL: both encoders')."""
        return self.prompt_embeds(prompt).embeds

    def prompt_embeds(self, prompt: str) -> PromptEmbeds:
        """The prompt's embedding, with SDXL's pooled embedding."""
        if self._kept_prompts is not None:
            if prompt not in self._kept_prompts:
                raise TokenFlowError(f"the text encoder was released after encoding "
                                     f"{sorted(self._kept_prompts)}; prompt {prompt!r} was not among them")
            return self._kept_prompts[prompt]
        if self.is_sdxl:
            with self._on_device(self.text_encoder, self.text_encoder_2):
                embeds, pooled = encode_prompt_sdxl((self.tokenizer, self.tokenizer_2),
                                                    (self.text_encoder, self.text_encoder_2), prompt, self.device)
            return PromptEmbeds(embeds.to(self.dtype), pooled.to(self.dtype))
        with self._on_device(self.text_encoder):
            return PromptEmbeds(encode_prompt(self.tokenizer, self.text_encoder, prompt, self.device).to(self.dtype))

    # ------------------------------------------------------------------ conditioning
    def controlnet_for(self, config: EditConfig):
        """The ControlNet an edit asks for (``--controlnet``, or the family's default for the control type)."""
        name = config.controlnet
        if not name:
            family = model_family(self.unet)
            control = config.control if config.control in ("canny", "depth") else None
            if family is None or control is None:
                raise TokenFlowError("no default ControlNet for this model or control; give one with --controlnet")
            name = DEFAULT_CONTROLNETS[family][control]
        if name not in self.controlnets:
            from diffusers import ControlNetModel

            try:
                if os.path.isfile(name):
                    if not name.lower().endswith(".safetensors"):
                        raise TokenFlowError(f"ControlNet file '{name}' must be .safetensors")
                    net = ControlNetModel.from_single_file(name, torch_dtype=self.dtype)
                else:
                    from ..models import hub_kwargs

                    net = ControlNetModel.from_pretrained(name, torch_dtype=self.dtype, **hub_kwargs(name, "ControlNet"))
            except TokenFlowError:
                raise
            except Exception as e:
                raise TokenFlowError(f"cannot load ControlNet '{name}': {short_error(e)}") from None
            if net.config.cross_attention_dim != self.unet.config.cross_attention_dim:
                raise TokenFlowError(f"ControlNet '{name}' is for another model family "
                                     f"(text width {net.config.cross_attention_dim}, the model's "
                                     f"{self.unet.config.cross_attention_dim})")
            net.to("cpu" if self.offload else self.device).eval().requires_grad_(False)
            self.controlnets[name] = net
        return name, self.controlnets[name]

    @torch.no_grad()
    def prepare_conditioning(self, frames: torch.Tensor, config: EditConfig) -> Conditioning:
        """Per-frame conditions of fitted frames (N, 3, H, W): depth maps, control images, SDXL ids."""
        cond = Conditioning()
        h, w = frames.shape[-2:]
        if self.is_sdxl:
            cond.time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)
        if self.is_depth:
            if self.depth_estimator is None:
                self.depth_estimator, self.feature_extractor = load_depth_model(
                    config.depth_model or DEFAULT_DEPTH_MODEL, "cpu" if self.offload else self.device)
            with self._on_device(self.depth_estimator):
                depth = estimate_depth(self.depth_estimator, self.feature_extractor, frames, (h // 8, w // 8))
            cond.depth = normalise_per_frame(depth, -1.0, 1.0)
        if config.control:
            cond.controlnet_id, cond.controlnet = self.controlnet_for(config)
            if os.path.exists(cond.controlnet_id):
                cond.controlnet_id = path_identity(cond.controlnet_id)
            cond.control = control_images(config.control, frames, canny_low=config.canny_low,
                                          canny_high=config.canny_high, depth_model=config.depth_model,
                                          device=self.device)
            cond.control_scale = config.control_scale
        return cond

    def _predict(self, latents: torch.Tensor, t: torch.Tensor, prompt: PromptEmbeds, frames: torch.Tensor,
                 conditioning: Optional[Conditioning] = None) -> torch.Tensor:
        """The one UNet call of the pipeline: latents (M, C, h, w) of ``frames`` (M,) with ``prompt``
        rows (M) and the per-frame conditions. Returns the noise prediction in float32."""
        device, dtype = self.device, self.dtype
        x = latents.to(device=device, dtype=dtype)
        t = t.to(device)
        embeds = prompt.embeds.to(device=device, dtype=dtype)
        kwargs: dict[str, Any] = {}
        if conditioning is None:
            conditioning = Conditioning()
        if conditioning.time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": prompt.pooled.to(device=device, dtype=dtype),
                                           "time_ids": conditioning.time_ids.to(device=device, dtype=dtype)
                                           .repeat(len(x), 1)}
        if conditioning.control is not None:
            net = conditioning.controlnet  # on the device for the stage (see _denoisers)
            down, mid = net(x, t, encoder_hidden_states=embeds,
                            controlnet_cond=conditioning.control[frames.cpu()].to(device=device, dtype=dtype),
                            conditioning_scale=conditioning.control_scale, return_dict=False,
                            **({"added_cond_kwargs": kwargs["added_cond_kwargs"]} if "added_cond_kwargs" in kwargs
                               else {}))
            kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"] = down, mid
        if conditioning.depth is not None:
            x = torch.cat([x, conditioning.depth[frames.cpu()].to(device=device, dtype=dtype)], dim=1)
        return self.unet(x, t, encoder_hidden_states=embeds, **kwargs).sample.float()

    def _predictor(self, prompt: PromptEmbeds, conditioning: Optional[Conditioning], first: int = 0) -> PredictFn:
        """predict(x, t, frames) for inversion and reconstruction: one prompt for every frame.
        ``first``: the video frame of row 0 (a rank's share starts there)."""
        def predict(x: torch.Tensor, t: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
            rows = prompt.rows([0] * len(x))
            return self._predict(x, t, rows, frames + first, conditioning)

        return predict

    # ------------------------------------------------------------------ the editing loop's model call
    def _unet(self, x: torch.Tensor, source: torch.Tensor, t: torch.Tensor, text: PromptEmbeds | torch.Tensor,
              branches: Optional[tuple[int, ...]] = None, frames: Optional[torch.Tensor] = None,
              conditioning: Optional[Conditioning] = None) -> torch.Tensor:
        """UNet on F frames of the given branches (all by default), branch-major: 0 the ``source``
        latents, 2p+1 / 2p+2 prompt p's uncond / cond on ``x[p]`` (x: (P, F, C, h, w), or (F, C, h, w)
        for one prompt). Branch b takes row b of ``text`` (1 + 2P rows) and the conditions of ``frames``."""
        x = x[None] if x.ndim == 4 else x
        n = x.shape[1]
        branches = tuple(range(1 + 2 * len(x))) if branches is None else branches
        text = text if isinstance(text, PromptEmbeds) else PromptEmbeds(text)
        latent_input = torch.cat([source if b == 0 else x[(b - 1) // 2] for b in branches])
        rows = [b for b in branches for _ in range(n)]  # (len(branches)*F,)
        frames = torch.arange(n) if frames is None else frames.cpu()
        return self._predict(latent_input, t, text.rows(rows), frames.repeat(len(branches)), conditioning)

    @torch.no_grad()
    def denoise_step(self, x: torch.Tensor, t: torch.Tensor, source: torch.Tensor, keyframes: torch.Tensor,
                     state: TokenFlowState, scheduler, text: PromptEmbeds | torch.Tensor, config: EditConfig,
                     qk_injection: bool, feature_injection: bool,
                     conditioning: Optional[Conditioning] = None, plan: Optional[ShardPlan] = None,
                     memory: Optional[MemoryPlan] = None) -> torch.Tensor:
        """One TokenFlow step (see :func:`tokenflow.editing.denoise_step`) with this pipeline's UNet.

        x, source: (n, C, h, w) float32 of the frames ``plan.frames()`` (every frame by default);
        keyframes (K,). Returns x at the next timestep (CPU, float32). Hooks must be installed
        (see :func:`tokenflow_hooks`). ``memory``: the run's plan (default: one from the pipeline's settings).
        """
        def unet(x_, source_, t_, branches=None, frames=None):
            return self._unet(x_, source_, t_, text, branches, frames, conditioning)

        return tokenflow_step(unet, x, t, source, keyframes, state, scheduler, config.guidance_scale,
                              config.batch_size, config.propagation, qk_injection, feature_injection,
                              memory or MemoryPlan.from_settings(self, self.device),
                              plan, self.group if plan is not None else None,
                              keyframe_window=config.keyframe_window)

    # ------------------------------------------------------------------ modules
    def _denoisers(self) -> list[torch.nn.Module]:
        """What a denoising stage runs: the UNet and any loaded ControlNet (moved once per stage)."""
        return [self.unet, *self.controlnets.values()]

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.depth_estimator,
                            *self.controlnets.values()) if m is not None]


class UNetEditLoop:
    """The editing loop of one UNet edit (paper Alg. 1 per step): keyframes, injections, the TokenFlow step."""

    def __init__(self, pipe: "TokenFlowPipeline", config: EditConfig, editor: BaseEditor, prompts: list[str],
                 inversion: Inversion, plan: ShardPlan, sampler, conditioning: Conditioning, memory: MemoryPlan,
                 generator: torch.Generator, return_latents: bool):
        self.pipe, self.config, self.editor, self.prompts = pipe, config, editor, prompts
        self.inversion, self.plan, self.sampler, self.conditioning = inversion, plan, sampler, conditioning
        self.memory = memory
        self.scheduler = pipe.new_scheduler()
        self.scheduler.set_timesteps(config.steps)
        self.timesteps = editor.select_timesteps(self.scheduler.timesteps)
        negative = pipe.prompt_embeds(config.negative_prompt)
        self.text = PromptEmbeds.cat([pipe.prompt_embeds(config.inversion_prompt),  # 1 + 2P rows: source, then
                                      *(e for p in prompts for e in (negative, pipe.prompt_embeds(p)))])  # uncond/cond
        x = editor.start_latents(inversion, self.scheduler, self.timesteps[0], generator).float()
        self.x = x[None].repeat(len(prompts), *([1] * x.ndim))  # (P, n, C, h, w): every prompt starts alike
        self.trail = [self.x.clone()] if return_latents else None
        self.keyframe_log: list[list[int]] = []
        self.first = 0  # the step a resumed run starts at

    def checkpoints(self, root: str, generator_state: Optional[torch.Tensor], restart: bool,
                    label: dict) -> EditCheckpoints:
        """The edit's resume checkpoint; picks up where an interrupted run of the same edit stopped."""
        pipe, group = self.pipe, self.pipe.group
        key = edit_key("edit", self.config, pipe.model_id, pipe.dtype, pipe.device, generator_state,
                       self.plan.n_frames, inversion=self.inversion.key,
                       **({"prompts": self.prompts} if len(self.prompts) > 1 else {}))
        if group.distributed:  # each rank checkpoints its own frames
            key = f"{key}-{group.world_size}-{group.rank}"
        saver = EditCheckpoints(Checkpointer(CheckpointStore(root), key, label), self.sampler, group)
        restored = None if restart else saver.restore(len(self.timesteps))
        if restored is not None:
            x, self.keyframe_log = restored
            self.x = x[None] if x.ndim == 4 else x  # one prompt's checkpoint of an earlier version
            self.first = len(self.keyframe_log)
        return saver

    def run(self, progress: bool, callback: Optional[ProgressCallback], saver: Optional[EditCheckpoints]
            ) -> torch.Tensor:
        """Every step from the first (or the one resumed at); returns the latents (P, n_r, C, h, w)."""
        pipe, config, group, n, total = self.pipe, self.config, self.pipe.group, self.plan.n_frames, len(self.timesteps)
        state = TokenFlowState(n_branches=3)
        with tokenflow_hooks(pipe.unet, state, pipe.layers):
            bar = tqdm(range(self.first, total), desc="Editing", unit="step", initial=self.first, total=total,
                       disable=not progress or not group.is_main, leave=False)
            clock = StageClock("the edit", "--steps, --max-frames or --height/--width",
                               announce=progress and group.is_main, already=self.first,
                               what=f"{n} frames at {8 * self.x.shape[-1]}x{8 * self.x.shape[-2]}, {total} steps")
            for i in bar:
                t = self.timesteps[i]
                started = time.perf_counter()
                # 1. keyframes (the baselines have none), the same seeded draws on every rank
                keyframes = self.sampler(i, n, config.batch_size) if config.propagation in PROPAGATION_POLICIES \
                    else torch.empty(0, dtype=torch.long)
                self.keyframe_log.append(keyframes.tolist())
                group.check_same(self.keyframe_log[-1], f"keyframes of step {i + 1}")
                qk, feat = self.editor.injection(i, config.steps)
                # 2.-5. on this rank's frames (smaller UNet batches when the device runs out of memory)
                self.x = pipe.denoise_step(self.x, t, self.inversion.latents[int(t)], keyframes, state, self.scheduler,
                                           self.text, config, qk, feat, self.conditioning, self.plan, self.memory)
                bar.set_postfix_str(f"{n * len(self.x) / (time.perf_counter() - started):.2f} frames/s", refresh=False)
                clock.update(i + 1, total)
                if saver:
                    saver.after_step(self.x, self.keyframe_log, total, time.perf_counter() - started)
                if self.trail is not None:
                    self.trail.append(self.x.clone())
                if callback:
                    callback("editing", i + 1, total)
        return self.x
