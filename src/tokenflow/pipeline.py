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

import logging
import os
from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .cache import InversionCache, frames_digest, inversion_key
from .checkpoints import Checkpointer, CheckpointStore, checkpoint_root
from .common import PipelineCommon, move_tensors
from .conditioning import Conditioning, PromptEmbeds
from .config import DEFAULT_MODEL, EditConfig, ours
from .correspondence import POLICIES as PROPAGATION_POLICIES
from .distributed import Group, ShardPlan
from .editors import EDITORS, BaseEditor
from .errors import TokenFlowError
from .families.unet import UNetEditLoop, UNetModel
from .injection import resolve_layers
from .inputs import FittedVideo, VideoInput, frame_rows  # noqa: F401 (FittedVideo: public here before)
from .inversion import (Inversion, ddim_invert, ddim_reconstruct, missing_timesteps, psnr,
                        steps_error)
from .keyframes import ScheduledKeyframes, make_sampler
from .memory import MemoryPlan, vae_in_pieces
from .progress import StageClock, job_left
from .models import (Components, decode_latents, encode_frames, load_components, module_identity, path_identity,
                     resolve_device, resolve_dtype, upcast_vae)
from .results import EditResult, ProgressCallback, StreamedFrames, Timer, results_of  # noqa: F401 (EditResult: public here)

logger = logging.getLogger(__name__)


class TokenFlowPipeline(UNetModel, PipelineCommon):
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
        self.model_name: Optional[str] = None  # see PipelineCommon.model_name; None: only model_id is known
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
        pipe = cls(c.unet, c.vae, c.text_encoder, c.tokenizer, c.scheduler, c.model_id,
                   text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                   depth_estimator=c.depth_estimator, feature_extractor=c.feature_extractor)
        pipe.model_name = " + ".join([os.fspath(model), *map(os.fspath, loras or ())])
        return pipe

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
        made = cls(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
                   model_id, text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"),
                   depth_estimator=parts.get("depth_estimator"),
                   feature_extractor=parts.get("feature_extractor") if parts.get("depth_estimator") else None)
        made.model_name = os.fspath(name) if name else None
        return made

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
        pipe.model_name = "tiny" if seed == 0 and not full_size else f"tiny (seed {seed}{', full size' * full_size})"
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
               checkpoint_dir: Optional[str] = None, source: Optional[str] = None) -> Inversion:
        """DDIM-invert fitted frames (N, 3, H, W), keeping x_t at every timestep of a ``steps`` schedule.

        With ``use_cache`` the result is read from / written to the inversion cache. With
        ``checkpoint``, every finished batch of frames is checkpointed in ``checkpoint_dir`` (default:
        ``checkpoints/`` beside the cache), and a run interrupted midway picks up from its last
        finished batch (unless ``restart``).
        ``conditioning`` (see :meth:`prepare_conditioning`) is applied to every UNet call.
        ``shard``: with :meth:`distribute`, this rank inverts and returns only these frames; the
        cache still holds one entry for the whole video, written by rank 0 from every rank's share.
        ``source``: the video's path, recorded in the cache entry so that ``tokenflow cache list`` names it.
        """
        self.check_steps(steps, inversion_steps)
        if conditioning is None and (self.is_sdxl or self.is_depth):
            conditioning = self.prepare_conditioning(frames, EditConfig())
        return self._invert(frames, inversion_prompt, inversion_steps, steps, batch_size,
                            InversionCache(cache_dir) if use_cache else None, progress, callback, conditioning,
                            (checkpoint_dir or checkpoint_root(cache_dir)) if checkpoint else None, restart, shard,
                            MemoryPlan.from_settings(self, self.device), self.cache_label(source))

    def _invert(self, frames: torch.Tensor, prompt: str, inversion_steps: int, steps: int, batch_size: int,
                cache: Optional[InversionCache], progress: bool, callback: Optional[ProgressCallback],
                conditioning: Optional[Conditioning], checkpoints: Optional[str], restart: bool,
                shard: Optional[range], memory: MemoryPlan, label: Optional[dict] = None,
                after: float = 0.0) -> Inversion:
        """:meth:`invert` once its inputs are checked: the cache, else the checkpoints and the inversion.
        ``after``: UNet images per frame of the work that follows (the edit), for the bar's time left."""
        n = len(frames)
        group = self.group if shard is not None else Group()
        shard = range(n) if shard is None else shard
        keep = self.editing_timesteps(steps)
        key, fields = inversion_key(frames=frames_digest(frames), model=self.model_id,
                                    size=list(frames.shape[-2:]), inversion_steps=inversion_steps,
                                    inversion_prompt=prompt, keep=keep.tolist(),
                                    scheduler=_stable_config(self.scheduler_config), dtype=str(self.dtype),
                                    batch_size=batch_size,
                                    conditioning=conditioning.identity() if conditioning else {})
        # a rank's checkpoints are of its own frames
        saver = None if checkpoints is None else Checkpointer(
            CheckpointStore(checkpoints), key if not group.distributed else f"{key}-{shard.start}-{shard.stop}",
            label)
        cached = cache.load_agreed(key, fields, group) if cache is not None else None
        if cached is not None:
            if saver:  # batches an interrupted run left are not needed any more
                saver.remove("inversion")
            return cached.rows(shard)
        x0 = self._clean_latents(frames, shard, saver, restart, memory)
        # one process writes the entry while it inverts; ranks gather their shares into it, a timestep at a time
        sink = None if cache is None or group.distributed else (
            lambda timesteps, final: cache.writer(key, fields, x0.shape, timesteps, final, label))
        inversion = self._ddim_invert(x0, shard, n, prompt, inversion_steps, keep, batch_size, conditioning,
                                      saver, restart, progress, callback, group, sink, after)
        inversion.key = key
        if cache is not None and group.distributed:
            cache.save_gathered(key, fields, inversion, group, label)
        if saver:
            saver.remove("inversion")
        return inversion

    def _clean_latents(self, frames: torch.Tensor, shard: range, saver: Optional[Checkpointer], restart: bool,
                       memory: MemoryPlan) -> torch.Tensor:
        """The VAE latents of this rank's frames, from the checkpoint of an interrupted run when there is one."""
        x0 = saver.load_tensor("inversion", "x0") if saver and not restart else None
        if x0 is not None:
            return x0
        mine = frame_rows(frames, shard)
        if not len(mine):  # a rank with no frames (more ranks than batches)
            return torch.zeros((0, self.vae.config.latent_channels, frames.shape[-2] // 8, frames.shape[-1] // 8))
        with self._on_device(self.vae):
            x0 = vae_in_pieces(lambda bs: encode_frames(self.vae, mine, bs, first_frame=shard.start).cpu(), memory,
                               "encoding")
        if saver:
            saver.save("inversion", "x0", {"x0": x0})
        return x0

    def _ddim_invert(self, x0: torch.Tensor, shard: range, n: int, prompt: str, inversion_steps: int,
                     keep: torch.Tensor, batch_size: int, conditioning: Optional[Conditioning],
                     saver: Optional[Checkpointer], restart: bool, progress: bool,
                     callback: Optional[ProgressCallback], group: Group, sink=None, after: float = 0.0) -> Inversion:
        """DDIM inversion of this rank's clean latents with a progress bar, batches checkpointed; ``sink``: see
        :func:`ddim_invert`."""
        predict = self._predictor(self.prompt_embeds(prompt), conditioning, shard.start)

        h, w = 8 * x0.shape[-2], 8 * x0.shape[-1]
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
                bar.set_postfix_str(f"{rate:.2f} frames/s{job_left(total - done, len(shard) * after, rate)}",
                                    refresh=False)
                if callback:
                    callback("inversion", done, total)

            with self._on_device(*self._denoisers()):
                inversion = ddim_invert(self.unet, self.new_scheduler(), x0, None, inversion_steps, keep.tolist(),
                                        batch_size, report, predict, restore=restore,
                                        on_batch=saver.save_rows if saver else None, first_frame=shard.start,
                                        sink=sink)
        say_resumed()
        inversion.resumed_frames = resumed["frames"]  # for the summary line
        return inversion

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
    def _check(self, config: EditConfig, prompts: list[str]) -> None:
        if config.editor not in EDITORS:
            raise TokenFlowError(f"editor {config.editor} needs a rectified-flow model (SD3, FLUX.1); "
                                 f"this UNet model takes {', '.join(EDITORS)}")
        self.check_steps(config.steps, config.inversion_steps)

    @torch.no_grad()
    def edit(self, video: VideoInput, prompt: Optional[str] = None, config: Optional[EditConfig] = None, *,
             inversion: Optional[Inversion] = None, cache_dir: Optional[str] = None, use_cache: bool = True,
             return_latents: bool = False, progress: bool = True, checkpoint: bool = False,
             restart: bool = False, callback: Optional[ProgressCallback] = None,
             generator: Optional[torch.Generator] = None, output_type: str = "pt",
             prompts: Optional[Sequence[str]] = None, checkpoint_dir: Optional[str] = None,
             **overrides: Any) -> Union[EditResult, list[EditResult]]:
        """Edit a video (path, :class:`Video`, uint8 array or float tensor) towards ``prompt``, with the
        settings of ``config`` (an :class:`EditConfig`) and keyword ``overrides``.

        ``prompts`` (a list): one run edits towards each, a list of results in order; the source branch
        and the keyframes run once per step (1 + 2P image-forwards per frame instead of 3P), each result
        equal to its single-prompt edit up to float rounding. ``checkpoint``: the inversion and the loop
        are checkpointed in ``checkpoint_dir`` (default ``checkpoints/`` in ``cache_dir``) and a rerun of
        an interrupted edit continues to the same result (``restart`` ignores them); call
        ``result.discard_checkpoint()`` once the result is saved.
        """
        # 1. check the inputs: every setting, before any work
        config, prompt_list = self.check_inputs((config or EditConfig()).replace(**ours(overrides)), prompt, prompts,
                                                output_type, generator)
        editor: BaseEditor = EDITORS[config.editor](config)
        timer, memory = Timer(), MemoryPlan.from_settings(self, self.device)
        checkpoints = checkpoint_dir or checkpoint_root(cache_dir)
        # 2. frames, this rank's share of them, the keyframe sampler, the per-frame conditions
        with timer("read"):  # a path is streamed unless depth maps or control images need every frame's pixels
            fitted = self.load_video(video, config, stream=not (self.is_depth or config.control))
        n = len(fitted.frames)
        # this rank's frames and batches (all of them on one process; whole keyframe windows past the window)
        plan = self.group.plan(n, config.batch_size, config.keyframe_window
                               if config.propagation in PROPAGATION_POLICIES else None)
        generator_state = generator.get_state() if generator is not None else None
        sampler = make_sampler(config.keyframes, config.seed, config.keyframe_schedule, generator)
        if isinstance(sampler, ScheduledKeyframes):  # a bad schedule fails now, not after the inversion
            sampler.check(len(editor.select_timesteps(self.editing_timesteps(config.steps))), n, config.batch_size)
        with timer("conditioning"):
            conditioning = self.prepare_conditioning(fitted.frames, config)
        # 3. the inversion: given, read from the cache, or computed (resumed from its checkpoints)
        with timer("inversion"):
            inversion = self._source_inversion(fitted.frames, config, inversion, plan, cache_dir, use_cache,
                                               progress, callback, conditioning,
                                               checkpoints if checkpoint else None, restart, memory,
                                               self.cache_label(video),
                                               self._edit_images_per_frame(config, editor, len(prompt_list)))
        fitted = fitted._replace(frames=None)  # the pixels are not needed past here: long videos keep latents
        # 4. the sampling loop (from its checkpoint, when an interrupted run left one)
        loop = UNetEditLoop(self, config, editor, prompt_list, inversion, plan, sampler, conditioning, memory,
                            generator or torch.Generator().manual_seed(config.seed), return_latents)
        saver = loop.checkpoints(checkpoints, generator_state, restart, self.cache_label(video)) \
            if checkpoint and inversion.key and not return_latents else None
        with timer("editing"), self._on_device(*self._denoisers()):
            x = loop.run(progress, callback, saver)
        # 5. decode (or, streamed, keep the latents to decode as they are written); rank 0 gathers the video
        with timer("decode"):
            edited, trail = self._decoded(x, loop.trail, plan, memory, output_type == "stream")
        # 6. one result per prompt
        results = results_of(edited, trail, output_type, fitted, config, prompt_list,
                             [int(t) for t in loop.timesteps], loop.keyframe_log, inversion, timer.seconds,
                             loop.first, saver, memory.lowered())
        return results if prompts is not None else results[0]

    def _decoded(self, x: torch.Tensor, trail: Optional[list[torch.Tensor]], plan: ShardPlan, memory: MemoryPlan,
                 stream: bool) -> tuple[list, Optional[list[torch.Tensor]]]:
        """Each prompt's frames (N, 3, H, W) from its latents ``x`` (P, n_r, C, h, w), whole on rank 0.
        ``stream``: the latents are gathered instead and each prompt gets a :class:`StreamedFrames` that
        decodes them a batch at a time when the writer reads it (the same frames, never whole in pixels)."""
        if stream:
            latents, trail = self._gather(list(x), trail, plan)
            batch = memory.vae_batch_size * max(1, 32 // memory.vae_batch_size)  # whole VAE batches per read
            return [None if z is None else StreamedFrames(
                z, lambda part: vae_in_pieces(lambda bs: decode_latents(self.vae, part, bs), memory, "decoding"),
                2 ** (len(self.vae.config.block_out_channels) - 1), batch,
                lambda: self._on_device(self.vae)) for z in latents], trail
        with self._on_device(self.vae):
            edited = [vae_in_pieces(lambda bs: decode_latents(self.vae, x_p, bs), memory, "decoding") if x.shape[1]
                      else torch.zeros((0, 3, x.shape[-2] * 8, x.shape[-1] * 8)) for x_p in x]  # per prompt
        return self._gather(edited, trail, plan)

    def _source_inversion(self, frames: torch.Tensor, config: EditConfig, given: Optional[Inversion], plan: ShardPlan,
                          cache_dir: Optional[str], use_cache: bool, progress: bool,
                          callback: Optional[ProgressCallback], conditioning: Conditioning,
                          checkpoints: Optional[str], restart: bool, memory: MemoryPlan,
                          label: dict, after: float = 0.0) -> Inversion:
        """This rank's share of the source video's inversion: the given one (checked against the frames and
        the editing timesteps), or :meth:`_invert`'s."""
        mine = plan.frames()
        if given is None:
            return self._invert(frames, config.inversion_prompt, config.inversion_steps, config.steps,
                                config.inversion_batch(), InversionCache(cache_dir) if use_cache else None, progress,
                                callback, conditioning, checkpoints, restart, mine, memory, label, after)
        if given.n_frames != len(frames) or given.shape[-2:] != (frames.shape[-2] // 8, frames.shape[-1] // 8):
            raise TokenFlowError("the given inversion does not match the frames (count or size)")
        missing = [int(t) for t in self.editing_timesteps(config.steps) if int(t) not in given.latents]
        if missing:
            raise TokenFlowError(f"the inversion has no latents at timesteps {missing[:3]}; "
                                 f"invert with the same --steps as the edit")
        return given.rows(mine)


    def _edit_images_per_frame(self, config: EditConfig, editor: BaseEditor, prompts: int) -> float:
        """UNet images an edit runs per frame: 1 + 2P branches at every editing step, and the keyframe pass's
        share (one keyframe per batch)."""
        steps = len(editor.select_timesteps(self.editing_timesteps(config.steps)))
        return steps * (1 + 2 * prompts) * (1 + 1 / config.batch_size)


def _stable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A component config for a cache key: diffusers' private bookkeeping left out (its
    ``_use_default_values`` is a list made from a set, in an order that changes from process to
    process with Python's string hashing, which made the key of the same inversion differ between runs)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}
