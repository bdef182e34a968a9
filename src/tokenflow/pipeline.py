"""TokenFlowPipeline: invert a video, then edit it with TokenFlow (Geyer et al., ICLR 2024).

The editing loop, per denoising step ``t`` (paper Alg. 1):

1. sample keyframes (one per interval of ``batch_size`` frames);
2. keyframe pass: the UNet on the keyframes with extended self-attention under the base
   editor; every self-attention layer keeps the keyframes' source tokens and outputs;
3. propagation pass, batch by batch: self-attention outputs are replaced by the keyframes'
   outputs at the nearest neighbours of the source tokens (the TokenFlow);
4. classifier-free guidance and the DDIM step.

The UNet batch is ``[source, uncond, cond]``: the source branch denoises the inverted source
latents at ``t`` with the inversion prompt; it gives the tokens for the correspondences
and the features that Plug-and-Play injects.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import TokenFlowState
from .cache import InversionCache, frames_digest, inversion_key
from .checkpoints import Checkpointer, CheckpointStore, EditCheckpoints, checkpoint_root, key_of
from .conditioning import (DEFAULT_CONTROLNETS, DEFAULT_DEPTH_MODEL, Conditioning, PromptEmbeds, control_images, estimate_depth,
                           load_depth_model, model_family, normalise_per_frame)
from .config import DEFAULT_MODEL, EditConfig, check_prompts, ours
from .progress import StageClock
from .correspondence import POLICIES as PROPAGATION_POLICIES
from .distributed import Group, ShardPlan
from .editing import denoise_step as tokenflow_step
from .editors import EDITORS, BaseEditor
from .errors import OutOfMemory, TokenFlowError
from .injection import resolve_layers, tokenflow_hooks
from .common import PipelineCommon, move_tensors
from .inputs import FittedVideo, VideoInput  # noqa: F401 (FittedVideo: public here before)
from .inversion import (Inversion, PredictFn, ddim_invert, ddim_reconstruct, missing_timesteps, psnr,
                        steps_error)
from .keyframes import ScheduledKeyframes, make_sampler
from .models import (Components, decode_latents, encode_frames, encode_prompt, encode_prompt_sdxl, free_memory,
                     is_out_of_memory, load_components, module_identity, path_identity, resolve_device,
                     resolve_dtype, short_error, upcast_vae)

logger = logging.getLogger(__name__)

# callback(stage, step, total): stage is "inversion", "reconstruction" or "editing"
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class EditResult:
    frames: Any  # output_type "pt": (N, 3, H, W) float32 in [0, 1], CPU; "np": (N, H, W, 3); "pil": images
    fps: float
    config: EditConfig
    timesteps: list[int]
    keyframes: list[list[int]]  # keyframe indices drawn at every step
    inversion: Inversion
    latents: Optional[list[torch.Tensor]] = None  # before the first step and after every step
    seconds: dict[str, float] = field(default_factory=dict)
    audio_source: Optional[str] = None
    audio_start: float = 0.0  # seconds into audio_source where the first frame starts
    resumed_from: int = 0  # editing steps a checkpoint of an interrupted run had done
    source_size: Optional[tuple[int, int]] = None  # (H, W) of the source frames, before fitting
    checkpoint: Optional[tuple[CheckpointStore, str]] = None  # the edit's checkpoint, while kept

    def uint8(self) -> np.ndarray:
        """The frames as uint8 (N, H, W, 3), whatever ``output_type`` the edit returned."""
        from .video import to_uint8

        if isinstance(self.frames, torch.Tensor):
            return to_uint8(self.frames)
        if isinstance(self.frames, np.ndarray):
            return to_uint8(torch.from_numpy(self.frames).permute(0, 3, 1, 2))
        return np.stack([np.asarray(im.convert("RGB")) for im in self.frames])

    def discard_checkpoint(self) -> None:
        """Remove the edit's resume checkpoint: call once the result is safely written."""
        if self.checkpoint is not None:
            store, name = self.checkpoint
            store.remove(name)
            self.checkpoint = None


class TokenFlowPipeline(PipelineCommon):
    """TokenFlow on a Stable Diffusion model (diffusers components)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, model_id: Optional[str] = None, *,
                 text_encoder_2=None, tokenizer_2=None, depth_estimator=None, feature_extractor=None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2  # SDXL
        self.depth_estimator, self.feature_extractor = depth_estimator, feature_extractor  # SD 2 depth
        self.is_sdxl = text_encoder_2 is not None
        self.is_depth = unet.config.in_channels == vae.config.latent_channels + 1
        self.controlnets: dict[str, Any] = {}  # id -> ControlNetModel, loaded when an edit asks
        # the model's native resolution: the default working area (at least 512 x 512)
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.native_side = max(512, int(unet.config.sample_size) * vae_scale)
        from diffusers import DDIMScheduler

        # DDIM for inversion and editing, whatever scheduler the model ships with
        self.scheduler_config = dict(scheduler.config)
        self.scheduler = DDIMScheduler.from_config(self.scheduler_config)
        self.model_id = model_id or module_identity(*(m for m in (unet, vae, text_encoder, text_encoder_2)
                                                      if m is not None))
        self.layers = resolve_layers(unet)
        self._device = unet.device  # where the compute runs (the modules may wait on the CPU)
        self.offload = False  # models on the CPU between stages (enable_offload)
        self.offload_cache: Optional[bool] = None  # keyframe caches on the CPU; None: when not on the CPU
        self.split_keyframe_pass: Optional[bool] = None  # None: split when keyframes > batch size
        self.vae_batch_size = 10  # frames per VAE call (the official 10); 1 is "VAE slicing"
        # frames per UNet call in the propagation pass; None: the batch size. Lowered when the
        # device runs out of memory (frames are independent there: same result up to rounding)
        self.propagation_chunk: Optional[int] = None
        # paper propagation: a keyframe's propagation pass would recompute its keyframe-pass prediction
        # (it blends its own outputs with weight 1 at its own tokens), so that prediction is reused: K
        # fewer frames through the UNet per step. False recomputes them (the same result up to rounding).
        self.reuse_keyframe_outputs = True
        self.group = Group()  # the ranks one edit is split across (see distribute); one process by default
        self._kept_prompts: Optional[dict[str, PromptEmbeds]] = None  # set by release_text_encoders

    def _moved_to(self, device: torch.device) -> None:
        if self._kept_prompts:
            self._kept_prompts = {p: move_tensors(e, device) for p, e in self._kept_prompts.items()}

    # ------------------------------------------------------------------ memory options
    def enable_offload(self) -> "TokenFlowPipeline":
        """Keep the models on the CPU and bring each to the device only for its stage."""
        self.offload = True
        for m in self._modules():
            m.to("cpu")
        return self

    def enable_vae_slicing(self) -> "TokenFlowPipeline":
        """Encode and decode one frame at a time."""
        self.vae_batch_size = 1
        return self

    def enable_vae_tiling(self) -> "TokenFlowPipeline":
        """Encode and decode large frames in overlapping tiles (diffusers' VAE tiling)."""
        self.vae.enable_tiling()
        return self

    def release_text_encoders(self, prompts) -> "TokenFlowPipeline":
        """Encode these prompts now, keep their embeddings, and free the text encoder(s).

        For a run whose prompts are known up front (the command line): the text encoder's weights
        (1.4 GB in float32 for SD 2.x) are gone before the UNet's are first touched, which lowers
        the peak. Asking for another prompt afterwards is an error.
        """
        kept = {p: self.prompt_embeds(p) for p in dict.fromkeys(prompts) if p is not None}
        self._kept_prompts = {**(self._kept_prompts or {}), **kept}
        self.text_encoder = self.text_encoder_2 = None
        import gc

        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        return self


    def compile(self, backend: str = "inductor", mode: Optional[str] = None) -> "TokenFlowPipeline":
        """``torch.compile`` the UNet's resnets and feed-forward blocks, in place.

        Regional compilation: the attention processors (TokenFlow's data-dependent part) stay
        eager, the convolutional and MLP blocks that carry most of the FLOPs are compiled once
        per shape. Hooks and processors keep working, and results are unchanged.
        """
        from diffusers.models.attention import FeedForward
        from diffusers.models.resnet import ResnetBlock2D

        for module in self.unet.modules():
            if isinstance(module, (ResnetBlock2D, FeedForward)):
                module.compile(backend=backend, mode=mode, dynamic=False)
        return self

    def _denoisers(self) -> list[torch.nn.Module]:
        """What a denoising stage runs: the UNet and any loaded ControlNet (moved once per stage)."""
        return [self.unet, *self.controlnets.values()]

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.depth_estimator,
                            *self.controlnets.values()) if m is not None]


    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, device: str = "auto", dtype: str | torch.dtype = "auto", *,
                        model_config: Optional[str] = None, allow_pickle: bool = False,
                        loras: tuple[str, ...] | list[str] = (), variant: Optional[str] = None,
                        revision: Optional[str] = None,
                        torch_dtype: Optional[str | torch.dtype] = None) -> "TokenFlowPipeline":
        """Load SD 1.x/2.x, SD 2 depth or SDXL (an SD3 or FLUX.1 model gives a :class:`tokenflow.FlowPipeline`) from a hub id, a local diffusers folder or a single
        checkpoint file (configs from ``model_config``), with LoRAs (``PATH_OR_ID[:SCALE]``) fused in.
        ``variant`` (e.g. ``"fp16"``), ``revision`` and ``torch_dtype`` (the same as ``dtype``) are
        diffusers' own. ``"tiny"`` (and ``"tiny-sd3"``, ``"tiny-flux"``) is the tiny random model built
        in code, as ``--model tiny`` on the command line (float32 unless a dtype is asked for)."""
        from .flow import flow_kind

        if torch_dtype is not None:
            if dtype != "auto" and dtype != torch_dtype:
                raise TokenFlowError("give dtype or torch_dtype, not both")
            dtype = torch_dtype
        if model == "tiny":
            return cls.from_tiny(seed=0, device=str(resolve_device(device)),
                                 dtype="float32" if dtype == "auto" else dtype)
        if flow_kind(model):  # SD3/SD3.5, FLUX.1: the rectified-flow pipeline
            from .flow import FlowPipeline

            return FlowPipeline.from_pretrained(model, device, dtype, loras=loras, model_config=model_config,
                                                variant=variant, revision=revision)
        dev = resolve_device(device)
        c: Components = load_components(model, dev, resolve_dtype(dtype, dev), model_config=model_config,
                                        allow_pickle=allow_pickle, loras=loras, variant=variant, revision=revision)
        return cls(c.unet, c.vae, c.text_encoder, c.tokenizer, c.scheduler, c.model_id,
                   text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                   depth_estimator=c.depth_estimator, feature_extractor=c.feature_extractor)

    @classmethod
    def from_pipe(cls, pipe) -> "TokenFlowPipeline":
        """Reuse the components of a loaded diffusers pipeline (StableDiffusion[XL]Pipeline, Depth2Img...):
        no second copy of the weights. Its scheduler's config is kept; TokenFlow samples with DDIM."""
        parts = pipe.components
        missing = [k for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if parts.get(k) is None]
        if missing:
            raise TokenFlowError(f"{type(pipe).__name__} has no {', '.join(missing)}: TokenFlow needs a Stable "
                                 f"Diffusion pipeline")
        name = getattr(pipe.config, "_name_or_path", None) or getattr(pipe, "name_or_path", None)
        model_id = None
        if name:
            model_id = path_identity(name) if os.path.exists(name) else f"hub:{name}"
        return cls(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
                   model_id, text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"),
                   depth_estimator=parts.get("depth_estimator"),
                   feature_extractor=parts.get("feature_extractor") if parts.get("depth_estimator") else None)

    @classmethod
    def from_tiny(cls, seed: int = 0, device: str = "cpu", full_size: bool = False,
                  dtype: str | torch.dtype = "float32") -> "TokenFlowPipeline":
        """A tiny randomly initialised SD-2.1-shaped model built in code: noise out, machinery checked.
        float32 by default, so that it gives the same numbers on every CPU; any dtype, or "auto", may be asked for."""
        from .tiny import build_tiny_components

        c = build_tiny_components(seed, full_size)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        for m in (c.unet, c.vae, c.text_encoder):
            torch.nn.Module.to(m, device=dev, dtype=dt)  # not diffusers' .to, which warns about any dtype
        upcast_vae(c.vae, dt)
        pipe = cls(c.unet, c.vae, c.text_encoder, c.tokenizer, c.scheduler)
        if not full_size:  # a first try that finishes on a CPU (see tiny.TINY_NATIVE_SIDE)
            from .tiny import TINY_NATIVE_SIDE

            pipe.native_side = TINY_NATIVE_SIDE
        return pipe

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def new_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

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
                    from .models import hub_kwargs

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

    # ------------------------------------------------------------------ inversion
    def editing_timesteps(self, steps: int) -> torch.Tensor:
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(steps)
        return scheduler.timesteps.clone()

    def check_steps(self, steps: int, inversion_steps: int) -> None:
        """The inversion must pass through every editing timestep (cheap: no model call)."""
        missing = missing_timesteps(steps, inversion_steps, self.new_scheduler())
        if missing:
            raise steps_error(steps, inversion_steps, missing, self.new_scheduler())

    def invert(self, frames: torch.Tensor, inversion_prompt: str = "", inversion_steps: int = 50,
               steps: int = 50, batch_size: int = 8, cache_dir: Optional[str] = None,
               use_cache: bool = True, progress: bool = True,
               callback: Optional[ProgressCallback] = None,
               conditioning: Optional[Conditioning] = None, checkpoint: bool = False,
               restart: bool = False, shard: Optional[range] = None,
               checkpoint_dir: Optional[str] = None) -> Inversion:
        """DDIM-invert fitted frames (N, 3, H, W), keeping x_t at every timestep of a ``steps`` schedule.

        With ``use_cache`` the result is read from / written to the inversion cache. With
        ``checkpoint``, every finished batch of frames is checkpointed in ``checkpoint_dir`` (default:
        ``checkpoints/`` beside the cache), and a run interrupted midway picks up from its last
        finished batch (unless ``restart``).
        ``conditioning`` (see :meth:`prepare_conditioning`) is applied to every UNet call.
        ``shard``: with :meth:`distribute`, this rank inverts and returns only these frames; the
        cache still holds one entry for the whole video, written by rank 0 from every rank's share.
        """
        n = len(frames)
        group = self.group if shard is not None else Group()
        shard = range(n) if shard is None else shard
        if conditioning is None and (self.is_sdxl or self.is_depth):
            conditioning = self.prepare_conditioning(frames, EditConfig())
        self.check_steps(steps, inversion_steps)
        keep = self.editing_timesteps(steps)
        cache = InversionCache(cache_dir) if use_cache else None
        checkpoints = checkpoint_dir or checkpoint_root(cache_dir)
        key, fields = inversion_key(frames=frames_digest(frames), model=self.model_id,
                                    size=list(frames.shape[-2:]), inversion_steps=inversion_steps,
                                    inversion_prompt=inversion_prompt, keep=keep.tolist(),
                                    scheduler=_stable_config(self.scheduler_config), dtype=str(self.dtype),
                                    batch_size=batch_size,
                                    conditioning=conditioning.identity() if conditioning else {})
        # a rank's checkpoints are of its own frames
        part_key = key if not group.distributed else f"{key}-{shard.start}-{shard.stop}"
        if cache is not None:
            cached = cache.load(key, fields)
            if group.agree(cached is not None):
                logger.info("inversion cache hit: %s", cache.entry(key))
                cached.key = key
                if checkpoint:  # batches an interrupted run left are not needed any more
                    Checkpointer(CheckpointStore(checkpoints), part_key).remove("inversion")
                return cached.rows(shard)
            del cached
        saver = Checkpointer(CheckpointStore(checkpoints), part_key) if checkpoint else None
        x0 = saver.load_tensor("inversion", "x0") if saver and not restart else None
        mine = frames[shard.start:shard.stop]
        if x0 is None and not len(mine):  # a rank with no frames (more ranks than batches)
            x0 = torch.zeros((0, self.vae.config.latent_channels, frames.shape[-2] // 8, frames.shape[-1] // 8))
        if x0 is None:
            x0 = self._vae(lambda bs: encode_frames(self.vae, mine, bs, first_frame=shard.start).cpu(), "encoding")
            if saver:
                saver.save("inversion", "x0", {"x0": x0})
        predict = self._predictor(self.prompt_embeds(inversion_prompt), conditioning, shard.start)

        h, w = frames.shape[-2:]
        clock = StageClock("the inversion", "--inversion-steps, --max-frames or --height/--width",
                           announce=progress and group.is_main,
                           what=f"{n} frames at {w}x{h}, {inversion_steps} steps")
        resumed = {"frames": 0, "said": False}  # frames an interrupted run had inverted

        def say_resumed() -> None:  # one notice, once the batches an interrupted run finished are all found
            if resumed["frames"] and not resumed["said"]:
                resumed["said"] = True
                logger.info("resuming the inversion at frame %d of %d", shard.start + resumed["frames"], n)

        def restore(first: int):
            found = saver.find_rows(first) if saver and not restart else None
            if found is not None:
                resumed["frames"] += found[0] - first
                clock.resumed()
            else:
                say_resumed()
            return found

        with tqdm(total=inversion_steps, desc="Inverting", unit="step", disable=not progress, leave=False,
                  bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}{postfix}]") as bar:

            def report(done: int, total: int) -> None:  # done: frame-steps; the bar counts steps
                rate = clock.update(done, total)
                if clock.restored:  # an earlier run's work: the bar moves on without counting it as fast work
                    bar.n = bar.last_print_n = bar.initial = done / max(len(shard), 1)
                    bar.refresh()
                else:
                    bar.update(done / max(len(shard), 1) - bar.n)
                bar.set_postfix_str(f"{rate:.2f} frames/s", refresh=False)
                if callback:
                    callback("inversion", done, total)

            with self._on_device(*self._denoisers()):
                inversion = ddim_invert(self.unet, self.new_scheduler(), x0, None, inversion_steps, keep.tolist(),
                                        batch_size, report, predict, restore=restore,
                                        on_batch=saver.save_rows if saver else None, first_frame=shard.start)
        inversion.key = key
        say_resumed()
        inversion.resumed_frames = resumed["frames"]  # for the summary line
        if cache is not None:
            whole = self._gather_inversion(inversion, shard, n, group)
            if whole is not None:  # rank 0 (or the only process) writes the one entry
                try:
                    cache.save(key, fields, whole)
                except (OSError, TokenFlowError) as e:
                    logger.warning("could not write the inversion cache at %s: %s", cache.entry(key), e)
        if saver:
            saver.remove("inversion")
        return inversion

    @staticmethod
    def _gather_inversion(part: Inversion, shard: range, n: int, group: Group) -> Optional[Inversion]:
        """Every rank's share of an inversion, whole on rank 0; None on the others."""
        if not group.distributed:
            return part
        counts = group.all_ints([len(shard)])
        counts = [c[0] for c in counts]
        x0 = group.gather_rows(part.x0, counts)
        latents = {t: group.gather_rows(part.latents[t], counts) for t in sorted(part.latents)}
        if x0 is None:
            return None
        assert len(x0) == n, (len(x0), n)
        return Inversion(x0, latents, part.final_timestep, part.key)

    def reconstruct(self, inversion: Inversion, inversion_prompt: str = "", inversion_steps: int = 50,
                    batch_size: int = 8, progress: bool = True,
                    conditioning: Optional[Conditioning] = None) -> torch.Tensor:
        """Decode a DDIM reconstruction from the inverted noise: (N, 3, H, W) in [0, 1]."""
        if conditioning is None and (self.is_sdxl or self.is_depth):
            raise TokenFlowError("reconstructing with this model needs the conditioning of the inversion")
        predict = self._predictor(self.prompt_embeds(inversion_prompt), conditioning)
        with tqdm(total=inversion_steps * -(-inversion.n_frames // batch_size), desc="Reconstructing",
                  disable=not progress, leave=False) as bar:
            with self._on_device(*self._denoisers()):
                latents = ddim_reconstruct(self.unet, self.new_scheduler(), inversion, None, inversion_steps,
                                           batch_size, lambda d, t: bar.update(d - bar.n), predict)
        with self._on_device(self.vae):
            return decode_latents(self.vae, latents, self.vae_batch_size)

    def reconstruction_psnr(self, frames: torch.Tensor, inversion: Inversion, **kwargs) -> float:
        return psnr(self.reconstruct(inversion, **kwargs), frames)

    # ------------------------------------------------------------------ editing
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
                     conditioning: Optional[Conditioning] = None, plan: Optional[ShardPlan] = None) -> torch.Tensor:
        """One TokenFlow step (see :func:`tokenflow.editing.denoise_step`) with this pipeline's UNet.

        x, source: (n, C, h, w) float32 of the frames ``plan.frames()`` (every frame by default);
        keyframes (K,). Returns x at the next timestep (CPU, float32). Hooks must be installed
        (see :func:`tokenflow_hooks`).
        """
        def unet(x_, source_, t_, branches=None, frames=None):
            return self._unet(x_, source_, t_, text, branches, frames, conditioning)

        return tokenflow_step(unet, x, t, source, keyframes, state, scheduler, config.guidance_scale,
                              config.batch_size, config.propagation, qk_injection, feature_injection, self,
                              plan, self.group if plan is not None else None)

    # ------------------------------------------------------------------ out of memory
    def _vae(self, run: Callable[[int], torch.Tensor], what: str) -> torch.Tensor:
        """A VAE pass ``run(frames per call)``; out of memory, it is retried with half the frames."""
        while True:
            try:
                return run(self.vae_batch_size)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
            if self.vae_batch_size <= 1:
                raise OutOfMemory(f"out of memory {what} frames even one at a time: use --vae-tiling, "
                                  f"or lower --height/--width")
            self.vae_batch_size = max(1, self.vae_batch_size // 2)
            logger.warning("out of memory %s frames; retrying %d frames at a time", what, self.vae_batch_size)
            free_memory(self.device)

    def edit_key(self, inversion_key: str, config: EditConfig, generator_state: Optional[torch.Tensor] = None,
                 prompts: Optional[list[str]] = None) -> str:
        """Identity of an edit's result: the inversion, every setting, the model and its numerics
        (and the prompts, when several are edited together)."""
        schedule = None
        if config.keyframe_schedule:
            with open(config.keyframe_schedule, "rb") as f:
                schedule = hashlib.sha256(f.read()).hexdigest()
        generator = None if generator_state is None else hashlib.sha256(generator_state.numpy().tobytes()).hexdigest()
        extra = {"prompts": prompts} if prompts else {}
        return key_of(kind="edit", inversion=inversion_key, config=config.to_dict(), schedule=schedule,
                      model=self.model_id, dtype=str(self.dtype), device=self.device.type, generator=generator,
                      **extra)

    @torch.no_grad()
    def edit(self, video: VideoInput, prompt: Optional[str] = None, config: Optional[EditConfig] = None, *,
             inversion: Optional[Inversion] = None, cache_dir: Optional[str] = None, use_cache: bool = True,
             return_latents: bool = False, progress: bool = True, checkpoint: bool = False,
             restart: bool = False, callback: Optional[ProgressCallback] = None,
             generator: Optional[torch.Generator] = None, output_type: str = "pt",
             prompts: Optional[Sequence[str]] = None, checkpoint_dir: Optional[str] = None,
             **overrides: Any) -> Union[EditResult, list[EditResult]]:
        """Edit a video (path, :class:`Video`, uint8 array or float tensor) towards ``prompt``.

        With ``prompts`` (a list), the video is edited towards each of them in one run and a list of
        results comes back, in order: the source branch and the keyframes do not depend on the prompt,
        so they run once per step and the prompts' edit branches share the UNet batch (1 + 2P
        image-forwards per frame and step instead of 3P). Each result equals the single-prompt edit of
        its prompt up to float rounding.

        Settings come from ``config`` (an :class:`EditConfig`) with keyword ``overrides``.
        With ``checkpoint``, the inversion and the editing loop are checkpointed in ``checkpoint_dir``
        (default: ``checkpoints/`` beside the cache, ``cache_dir``), and a run of the same edit after an interruption continues from the last
        checkpoint with the same result (``restart`` ignores them); call
        ``result.discard_checkpoint()`` once the result is saved.
        """
        config = (config or EditConfig()).replace(**ours(overrides))
        if prompts is not None:
            if isinstance(prompts, str) or not len(prompts) or prompt is not None:
                raise TokenFlowError("prompts must be a non-empty list of prompts (and then no prompt)")
            prompt = prompts[0]
        if prompt is not None:
            config = config.replace(prompt=prompt)
        config.validate()
        prompt_list = [config.prompt] if prompts is None else [config.replace(prompt=p).validate().prompt
                                                                for p in prompts]
        check_prompts(prompt_list, several=prompts is not None)  # the command's rule
        if output_type not in OUTPUT_TYPES:
            raise TokenFlowError(f"unknown output_type {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
        if generator is not None and generator.device.type != "cpu":
            raise TokenFlowError("generator must be a CPU torch.Generator (keyframes are drawn on the CPU)")
        if config.editor not in EDITORS:
            raise TokenFlowError(f"editor {config.editor} needs a rectified-flow model (SD3, FLUX.1); "
                                 f"this UNet model takes {', '.join(EDITORS)}")
        editor: BaseEditor = EDITORS[config.editor](config)
        self.check_steps(config.steps, config.inversion_steps)
        timer = _Timer()
        with timer("read"):
            frames, fps, audio, audio_start, source_size = self.load_video(video, config)
        n = len(frames)
        group = self.group
        plan = group.plan(n, config.batch_size)  # this rank's frames and batches: all of them on one process
        mine = plan.frames()
        generator_state = generator.get_state() if generator is not None else None
        sampler = make_sampler(config.keyframes, config.seed, config.keyframe_schedule, generator)
        if isinstance(sampler, ScheduledKeyframes):  # a bad schedule fails now, not after the inversion
            sampler.check(len(editor.select_timesteps(self.editing_timesteps(config.steps))), n, config.batch_size)
        with timer("conditioning"):
            conditioning = self.prepare_conditioning(frames, config)
        with timer("inversion"):
            if inversion is None:
                inversion = self.invert(frames, config.inversion_prompt, config.inversion_steps, config.steps,
                                        config.inversion_batch(), cache_dir, use_cache, progress, callback,
                                        conditioning, checkpoint=checkpoint, restart=restart, shard=mine,
                                        checkpoint_dir=checkpoint_dir)
            elif inversion.n_frames != n or inversion.x0.shape[-2:] != (frames.shape[-2] // 8, frames.shape[-1] // 8):
                raise TokenFlowError("the given inversion does not match the frames (count or size)")
            else:
                inversion = inversion.rows(mine)
        del frames  # the pixels are not needed past the inversion: long videos keep only latents

        scheduler = self.new_scheduler()
        scheduler.set_timesteps(config.steps)
        timesteps = editor.select_timesteps(scheduler.timesteps)
        missing = [int(t) for t in timesteps if int(t) not in inversion.latents]
        if missing:
            raise TokenFlowError(f"the inversion has no latents at timesteps {missing[:3]}; "
                                 f"invert with the same --steps as the edit")
        if generator is None:
            generator = torch.Generator().manual_seed(config.seed)
        negative = self.prompt_embeds(config.negative_prompt)
        text = PromptEmbeds.cat([self.prompt_embeds(config.inversion_prompt),  # 1 + 2P rows: source, then
                                 *(e for p in prompt_list for e in (negative, self.prompt_embeds(p)))])  # uncond/cond
        x = editor.start_latents(inversion, scheduler, timesteps[0], generator).float()
        x = x[None].repeat(len(prompt_list), *([1] * x.ndim))  # (P, n, C, h, w): every prompt starts alike
        latents = [x.clone()] if return_latents else None
        keyframe_log: list[list[int]] = []
        saver = None
        if checkpoint and inversion.key and not return_latents:
            key = self.edit_key(inversion.key, config, generator_state,
                                prompt_list if len(prompt_list) > 1 else None)
            if group.distributed:  # each rank checkpoints its own frames
                key = f"{key}-{group.world_size}-{group.rank}"
            store = CheckpointStore(checkpoint_dir or checkpoint_root(cache_dir))
            saver = EditCheckpoints(Checkpointer(store, key), sampler, group)
            restored = None if restart else saver.restore(len(timesteps))
            if restored is not None:
                x, keyframe_log = restored
                x = x[None] if x.ndim == 4 else x  # one prompt's checkpoint of an earlier version
        first = len(keyframe_log)
        state = TokenFlowState(n_branches=3)
        with timer("editing"), self._on_device(*self._denoisers()), tokenflow_hooks(self.unet, state, self.layers):
            bar = tqdm(range(first, len(timesteps)), desc="Editing", unit="step", initial=first,
                       total=len(timesteps), disable=not progress or not group.is_main, leave=False)
            clock = StageClock("the edit", "--steps, --max-frames or --height/--width",
                               announce=progress and group.is_main, already=first,
                               what=f"{n} frames at {8 * x.shape[-1]}x{8 * x.shape[-2]}, {len(timesteps)} steps")
            for i in bar:
                t = timesteps[i]
                started = time.perf_counter()
                # 1. keyframes (the baselines have none)
                keyframes = sampler(i, n, config.batch_size) if config.propagation in PROPAGATION_POLICIES \
                    else torch.empty(0, dtype=torch.long)
                keyframe_log.append(keyframes.tolist())
                group.check_same(keyframe_log[-1], f"keyframes of step {i + 1}")  # same seeded draws everywhere
                qk, feat = editor.injection(i, config.steps)
                # 2.-5. on this rank's frames (smaller UNet batches when the device runs out of memory)
                x = self.denoise_step(x, t, inversion.latents[int(t)], keyframes, state, scheduler, text,
                                      config, qk, feat, conditioning, plan)
                bar.set_postfix_str(f"{n * len(x) / (time.perf_counter() - started):.2f} frames/s", refresh=False)
                clock.update(i + 1, len(timesteps))
                if saver:
                    saver.after_step(x, keyframe_log, len(timesteps), time.perf_counter() - started)
                if latents is not None:
                    latents.append(x.clone())
                if callback:
                    callback("editing", i + 1, len(timesteps))
        with timer("decode"):
            with self._on_device(self.vae):
                edited = [self._vae(lambda bs: decode_latents(self.vae, x_p, bs), "decoding") if x.shape[1] else
                          torch.zeros((0, 3, x.shape[-2] * 8, x.shape[-1] * 8)) for x_p in x]  # per prompt
        if group.distributed:  # rank 0 gets the whole video; the other ranks' results have no frames
            counts = plan.frame_counts()
            edited = [group.gather_rows(e, counts) for e in edited]
            if latents is not None:  # (P, n_r, ...) -> (P, N, ...): rows gathered along the frames
                latents = [group.gather_rows(v.transpose(0, 1), counts) for v in latents]
                latents = None if latents[0] is None else [v.transpose(0, 1) for v in latents]
        results = []
        for p, frames_p in enumerate(edited):
            if output_type != "pt" and frames_p is not None:
                frames_p = _convert_frames(frames_p, output_type)
            results.append(EditResult(frames_p, fps, config.replace(prompt=prompt_list[p]),
                                      [int(t) for t in timesteps], keyframe_log, inversion,
                                      None if latents is None else [v[p] for v in latents], timer.seconds, audio,
                                      audio_start, first, source_size, saver.handle() if saver else None))
        return results if prompts is not None else results[0]


OUTPUT_TYPES = ("pt", "np", "pil")


def _stable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A component config for a cache key: diffusers' private bookkeeping left out (its
    ``_use_default_values`` is a list made from a set, in an order that changes from process to
    process with Python's string hashing, which made the key of the same inversion differ between runs)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _convert_frames(frames: torch.Tensor, output_type: str):
    """(N, 3, H, W) float in [0, 1] -> diffusers' ``np`` (N, H, W, 3) float32 or ``pil`` images."""
    if output_type == "np":
        return frames.permute(0, 2, 3, 1).contiguous().numpy()
    from PIL import Image

    from .video import to_uint8

    return [Image.fromarray(f) for f in to_uint8(frames)]


class _Timer:
    """Wall time per stage: ``with timer("inversion"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
