"""TokenFlow on rectified-flow transformers (SD3 / SD3.5, FLUX.1) with FlowEdit or SDEdit.

FlowEdit (Kulikov et al., 2024) edits without inversion. With ``x_src`` the clean source latents and
``y = z_edit - x_src`` the edit so far (0 at the start), each of the last ``n_max`` steps ``i``:

1. noise ``eps`` (one draw, shared by every frame: the source is noised alike across the video);
   ``z_src = (1 - sigma_i) x_src + sigma_i eps``, ``z_tar = z_src + y``;
2. keyframes, then the TokenFlow step (:func:`tokenflow.editing.denoise_step`) on the branches
   ``[source..., target...]``: the source branches (``z_src`` with the source prompt, which is
   ``--inversion-prompt``; SD3 adds its unconditional branch) give the tokens for the
   correspondences; the target branches (``z_tar`` with each prompt) are edited;
3. ``y += (sigma_{i+1} - sigma_i) (v_tar - v_src)``, with classifier-free guidance on each side for
   SD3 and the guidance embedding for FLUX.1-dev (averaged over ``n_avg`` draws).

The last ``n_min`` steps sample the target plainly from ``z_tar`` (one more noise draw at the switch);
SDEdit is that from its start (``--sdedit-start``). The result is ``x_src + y`` (or the sampled
target), decoded. A one-frame video, its own keyframe, is FlowEdit's image edit exactly.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .attention import TokenFlowState
from .checkpoints import Checkpointer, CheckpointStore, EditCheckpoints, checkpoint_root, edit_key
from .conditioning import PromptEmbeds
from .config import FLOW_EDITORS, EditConfig, ours
from .progress import StageClock
from .correspondence import POLICIES
from .distributed import Group
from .editing import denoise_step
from .errors import TokenFlowError
from .common import PipelineCommon, move_tensors
from .families.base import FlowFamily
from .inputs import VideoInput, frame_rows
from .joint_attention import joint_tokenflow_hooks
from .keyframes import ScheduledKeyframes, make_sampler
from .memory import MemoryPlan, vae_in_pieces
from .models import module_identity, resolve_device, resolve_dtype
from .results import EditResult, ProgressCallback, Timer, results_of

logger = logging.getLogger(__name__)


class _Generators:
    """The keyframe sampler's and the noise's generator states as one (what a checkpoint keeps)."""

    def __init__(self, sampler, noise: torch.Generator):
        self.sampler, self.noise = sampler, noise

    def get_state(self) -> torch.Tensor:
        parts = [self.noise.get_state()]
        if hasattr(self.sampler, "get_state"):
            parts.append(self.sampler.get_state())
        return torch.cat(parts)

    def set_state(self, state: torch.Tensor) -> None:
        n = len(self.noise.get_state())
        self.noise.set_state(state[:n].clone())
        if hasattr(self.sampler, "set_state"):
            self.sampler.set_state(state[n:].clone())


class FlowPipeline(PipelineCommon):
    """TokenFlow on an SD3 or FLUX.1 model: the family (:mod:`tokenflow.families`) owns the network."""

    size_multiple = 16

    def __init__(self, family: FlowFamily, model_id: Optional[str] = None):
        self.family = family
        self.model_id = model_id or module_identity(family.transformer, family.vae)
        self.native_side = family.native_side
        self.layers = family.attention_layers()
        self._device = family.compute_device
        # memory settings; each run takes a copy (memory.MemoryPlan) that its out-of-memory retries lower
        self.reuse_keyframe_outputs = True
        self.split_keyframe_pass: Optional[bool] = None
        self.propagation_chunk: Optional[int] = None
        self.offload_cache: Optional[bool] = None
        self.offload = False
        self.vae_batch_size = 8
        self.group = Group()
        self._prompts: dict[str, PromptEmbeds] = {}
        self._released = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: str, device: str = "auto", dtype: Union[str, torch.dtype] = "auto", *,
                        family: Optional[str] = None, loras: Sequence[str] = (), model_config: Optional[str] = None,
                        variant: Optional[str] = None, revision: Optional[str] = None, offload: bool = False,
                        torch_dtype: Optional[Union[str, torch.dtype]] = None, **_: Any) -> "FlowPipeline":
        """SD3/SD3.5 or FLUX.1 from a hub id, a local diffusers folder or a single checkpoint file
        (``model_config``: the diffusers folder or id its configs come from), LoRAs fused in. ``dtype``
        "auto" on CUDA is bfloat16 where the GPU has it (FLUX's T5 overflows in float16). ``offload``:
        the models stay on the CPU and go to the device one stage at a time (never all at once)."""
        from .families import detect_family
        from .models import apply_loras, hub_kwargs, short_error

        if torch_dtype is not None:  # diffusers' name
            if dtype != "auto" and dtype != torch_dtype:
                raise TokenFlowError("give dtype or torch_dtype, not both")
            dtype = torch_dtype
        if model in TINY_MODELS:  # the tiny random models built in code, as on the command line
            return cls.from_tiny(TINY_MODELS[model], seed=0, device=str(resolve_device(device)),
                                 dtype="float32" if dtype == "auto" else dtype)
        family = family or detect_family(model)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if dtype == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported():
            dt = torch.bfloat16
        cls_ = _pipeline_class(family)
        try:
            if os.path.isfile(model):
                kwargs = {"config": model_config} if model_config else {}
                pipe = cls_.from_single_file(model, torch_dtype=dt, **kwargs)
            else:
                extra = {k: v for k, v in (("variant", variant), ("revision", revision)) if v}
                pipe = cls_.from_pretrained(model, torch_dtype=dt, **extra, **hub_kwargs(model, "model"))
        except TokenFlowError:
            raise
        except Exception as e:
            raise TokenFlowError(f"cannot load {family} model '{model}': {short_error(e)}") from None
        if loras:
            apply_loras(pipe, list(loras))
        if not offload:
            pipe.to(dev)
        flow_family = _family(family, pipe)
        flow_family.compute_device = dev
        result = cls(flow_family, _model_identity(model, loras, model_config, variant, revision))
        result.offload = offload
        result.model_name = " + ".join([os.fspath(model), *map(os.fspath, loras or ())])
        return result

    @classmethod
    def from_tiny(cls, kind: str, seed: int = 0, device: str = "cpu",
                  dtype: Union[str, torch.dtype] = "float32") -> "FlowPipeline":
        """A tiny random SD3 (``sd3``) or FLUX.1 (``flux``) built in code: noise out, machinery real."""
        from .tiny_flow import build_tiny_pipeline

        pipe = build_tiny_pipeline(kind, seed)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                torch.nn.Module.to(module, device=dev, dtype=dt)
        tiny = cls(_family(kind, pipe), f"tiny-{kind}:{seed}")
        from .tiny import TINY_NATIVE_SIDE

        tiny.native_side = TINY_NATIVE_SIDE  # a first try that finishes on a CPU
        tiny.model_name = f"tiny-{kind}" + (f" (seed {seed})" if seed else "")
        return tiny

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.family.dtype

    def default_config(self, **changes: Any) -> EditConfig:
        """The edit settings this family starts from: FlowEdit with its published defaults."""
        return EditConfig(**{**flow_defaults(self.family.name), **changes})

    # ------------------------------------------------------------------ options (the UNet pipeline's names)
    def enable_offload(self) -> "FlowPipeline":
        """Keep the models on the CPU and bring each to the device only for its stage."""
        self.offload = True
        for module in (self.family.transformer, self.family.vae, *self.family.text_encoders()):
            module.to("cpu")
        return self

    def _modules(self) -> list[torch.nn.Module]:
        return [self.family.transformer, self.family.vae, *self.family.text_encoders()]

    def _moved_to(self, device: torch.device) -> None:
        self.family.compute_device = device
        self._prompts = {p: move_tensors(e, device) for p, e in self._prompts.items()}

    def enable_vae_slicing(self) -> "FlowPipeline":
        self.vae_batch_size = 1
        return self

    def enable_vae_tiling(self) -> "FlowPipeline":
        self.family.vae.enable_tiling()
        return self

    def compile(self, backend: str = "inductor", mode: Optional[str] = None) -> "FlowPipeline":
        """``torch.compile`` the transformer's feed-forward blocks in place (attention stays eager)."""
        from diffusers.models.attention import FeedForward

        for module in self.family.transformer.modules():
            if isinstance(module, FeedForward):
                module.compile(backend=backend, mode=mode, dynamic=False)
        return self


    def release_text_encoders(self, prompts) -> "FlowPipeline":
        """Encode these prompts now and free the text encoders (T5-XXL is 9.5 GB in bfloat16)."""
        for p in dict.fromkeys(prompts):
            if p is not None:
                self.prompt_embeds(p)
        self.family.release_text_encoders()
        self._released = True
        return self

    def prompt_embeds(self, prompt: str) -> PromptEmbeds:
        if prompt not in self._prompts:
            if self._released:
                raise TokenFlowError(f"the text encoders were released; prompt {prompt!r} was not encoded before")
            with self._on_device(*self.family.text_encoders()):
                self._prompts[prompt] = self.family.encode_prompt(prompt)
        return self._prompts[prompt]


    # ------------------------------------------------------------------ the edit
    def _check(self, config: EditConfig, prompt_list: list[str]) -> None:
        if config.editor not in FLOW_EDITORS:
            raise TokenFlowError(f"editor {config.editor} is for the UNet models; {self.family.name} takes "
                                 f"{', '.join(FLOW_EDITORS)} (pipe.default_config() has the family's defaults)")
        if config.control:
            raise TokenFlowError(f"--control (ControlNet) is for the UNet models, not {self.family.name}")

    def flow_steps(self, config: EditConfig) -> tuple[int, int]:
        """(steps run, of which the last sample plainly): FlowEdit's n_max/n_min, SDEdit's start."""
        if config.editor == "sdedit":
            run = config.sdedit_steps()
            return run, run
        n_max = min(config.n_max if config.n_max is not None else self.family.defaults.n_max, config.steps)
        return n_max, min(config.n_min, n_max)

    @torch.no_grad()
    def edit(self, video: VideoInput, prompt: Optional[str] = None, config: Optional[EditConfig] = None, *,
             prompts: Optional[Sequence[str]] = None, progress: bool = True, checkpoint: bool = False,
             restart: bool = False, cache_dir: Optional[str] = None, callback: Optional[ProgressCallback] = None,
             generator: Optional[torch.Generator] = None, output_type: str = "pt", return_latents: bool = False,
             use_cache: bool = True, inversion=None, checkpoint_dir: Optional[str] = None,
             **overrides: Any) -> Union[EditResult, list[EditResult]]:
        """Edit a video towards ``prompt`` (or each of ``prompts`` in one run, the source branch shared).

        Settings: ``config`` (default :meth:`default_config`) with keyword ``overrides``. ``generator``
        draws the per-step noise (default: seeded from ``config.seed``); the keyframes have their own,
        seeded from ``config.seed``. With ``checkpoint`` the loop is checkpointed in ``checkpoint_dir``
        (default: beside the cache, under ``cache_dir``) and an interrupted run resumes (unless
        ``restart``) to the same result. There is no inversion here:
        ``inversion`` and ``use_cache`` are accepted for the UNet pipeline's signature and unused.
        """
        # 1. check the inputs
        config, prompt_list = self.check_inputs((config or self.default_config()).replace(**ours(overrides)), prompt,
                                                prompts, output_type, generator)
        timer, memory = Timer(), MemoryPlan.from_settings(self, self.device)
        # 2. frames, and this rank's share of them as clean latents
        with timer("read"):  # a path is streamed: decoded again a batch at a time when encoded
            fitted = self.load_video(video, config, stream=True)
        plan = self.group.plan(len(fitted.frames), config.batch_size,
                               config.keyframe_window if config.propagation in POLICIES else None)
        with timer("encode"):
            x_src, frames_key = self._encode(fitted.frames, plan, memory)
        height, width = fitted.frames.shape[-2:]
        fitted = fitted._replace(frames=None)  # the pixels are not needed past here
        # 3. the sampling loop: keyframes, noise, resume
        loop, saver = self._loop(config, prompt_list, x_src, plan, (height, width), frames_key, generator,
                                 checkpoint and not return_latents, checkpoint_dir or checkpoint_root(cache_dir),
                                 restart, memory, self.cache_label(video))
        with timer("editing"), self._on_device(self.family.transformer):
            latents = loop.run(progress, callback, saver, return_latents)
        # 4. decode; rank 0 gathers the video
        with timer("decode"), self._on_device(self.family.vae):
            edited = [vae_in_pieces(lambda bs: self.family.decode(x_p, height, width, bs), memory, "decoding")
                      for x_p in latents]
        edited, trail = self._gather(edited, loop.trail, plan)
        # 5. one result per prompt
        results = results_of(edited, trail, output_type, fitted, config, prompt_list, loop.timesteps,
                             loop.keyframe_log, None, timer.seconds, loop.first, saver, memory.lowered())
        return results if prompts is not None else results[0]

    def _encode(self, frames: torch.Tensor, plan, memory: MemoryPlan) -> tuple[torch.Tensor, str]:
        """This rank's frames as clean latents (n_r, ...) and the whole video's content key."""
        from .cache import frames_digest

        height, width = frames.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise TokenFlowError(f"frame size {width}x{height} is not a multiple of {self.size_multiple} "
                                 f"({self.family.name}: VAE factor 8, patches of 2); give --height/--width")
        if hasattr(self.family, "set_frame_size"):
            self.family.set_frame_size(height, width)
        mine = plan.frames()
        with self._on_device(self.family.vae):
            part = frame_rows(frames, mine)
            x_src = vae_in_pieces(lambda bs: self.family.encode(part, bs), memory, "encoding")
        return x_src, frames_digest(frames)

    def _loop(self, config: EditConfig, prompts: list[str], x_src: torch.Tensor, plan, size: tuple[int, int],
              frames_key: str, generator: Optional[torch.Generator], checkpoint: bool, checkpoints: str,
              restart: bool, memory: MemoryPlan, label: Optional[dict] = None
              ) -> tuple["_FlowLoop", Optional[EditCheckpoints]]:
        """The loop of this edit, resumed from its checkpoint where there is one."""
        sampler = make_sampler(config.keyframes, config.seed, config.keyframe_schedule, None)
        n_run, n_sample = self.flow_steps(config)
        if isinstance(sampler, ScheduledKeyframes):
            sampler.check(n_run, plan.n_frames, config.batch_size)
        key_generator = None if generator is None else torch.Generator().set_state(generator.get_state())
        noise = generator if generator is not None else torch.Generator().manual_seed(config.seed)
        loop = _FlowLoop(self, config, prompts, x_src, plan, sampler, noise, size, n_run, n_sample, memory)
        if not checkpoint:
            return loop, None
        key = edit_key("flow-edit", config, self.model_id, self.dtype, self.device,
                       None if key_generator is None else key_generator.get_state(), plan.n_frames, frames=frames_key,
                       prompts=prompts, world=self.group.world_size, rank=self.group.rank)
        saver = EditCheckpoints(Checkpointer(CheckpointStore(checkpoints), key, label),
                                _Generators(sampler, noise), self.group, extra=loop.extra_state)
        if not restart:
            loop.restore(saver)
        return loop, saver

    def working_size(self, source_hw: tuple[int, int], config: EditConfig) -> tuple[int, int]:
        """As the UNet pipeline's, with sides that are multiples of 16 (VAE 8 x patch 2)."""
        from .video import working_size

        h, w = working_size(source_hw, config.height, config.width, self.native_side ** 2)
        for name, given, value in (("height", config.height, h), ("width", config.width, w)):
            if given is not None and given % self.size_multiple:
                raise TokenFlowError(f"{name} must be a multiple of {self.size_multiple} for {self.family.name} "
                                     f"(VAE factor 8, patches of 2), got {given}")
        return max(16, round(h / 16) * 16), max(16, round(w / 16) * 16)


class _FlowLoop:
    """The sampling loop of one flow edit: branches, noise, the update, checkpoints."""

    def __init__(self, pipe: FlowPipeline, config: EditConfig, prompts: list[str], x_src: torch.Tensor, plan,
                 sampler, noise: torch.Generator, size: tuple[int, int], n_run: int, n_sample: int,
                 memory: MemoryPlan):
        self.pipe, self.family, self.config, self.prompts = pipe, pipe.family, config, prompts
        self.memory = memory
        self.x_src, self.plan, self.sampler, self.noise = x_src, plan, sampler, noise
        self.n_run, self.n_sample = n_run, n_sample
        self.latent_shape = self.family.latent_shape(*size)
        timesteps, self.sigmas = self.family.schedule(config.steps, self.latent_shape)
        self.all_timesteps = timesteps
        self.first_index = config.steps - n_run  # FlowEdit skips steps with T - i > n_max
        self.timesteps = [float(t) for t in timesteps[self.first_index:]]
        self.sample_from = config.steps - n_sample  # steps from here on sample plainly
        self.y = torch.zeros((len(prompts), *x_src.shape))  # (P, n_r, ...): the edit so far (or the target)
        self.sample_noise: Optional[torch.Tensor] = None  # the draw that started plain sampling
        self.keyframe_log: list[list[int]] = []
        self.first = 0
        self.trail: Optional[list[torch.Tensor]] = None
        self._text_rows()

    def _text_rows(self) -> None:
        """Branch texts: SD3 ``[source, negative, (negative, prompt_p)...]`` (classifier-free guidance on
        both sides), FLUX ``[source, prompt_p...]`` with the guidance embedding's values."""
        pipe, cfg, config = self.pipe, self.family.uses_cfg, self.config
        source, negative = pipe.prompt_embeds(config.inversion_prompt), pipe.prompt_embeds(config.negative_prompt)
        source_gs = config.source_guidance_scale
        if source_gs is None:
            source_gs = self.family.defaults.source_guidance_scale
        if cfg:
            rows = [source, negative, *(e for p in self.prompts for e in (negative, pipe.prompt_embeds(p)))]
            self.n_source, guidance = 2, None
        else:
            rows = [source, *(pipe.prompt_embeds(p) for p in self.prompts)]
            self.n_source = 1
            guidance = torch.tensor([source_gs] + [config.guidance_scale] * len(self.prompts), dtype=torch.float32)
        self.text, self.guidance, self.source_gs = PromptEmbeds.cat(rows), guidance, source_gs
        self.n_branches = len(rows)

    # ------------------------------------------------------------------ one step
    def model(self, mode: str):
        """The network on a batch of branches (see editing.UNetCall): source branches at ``source``
        (z_src), target branches at x + z_src (FlowEdit) or x (plain sampling)."""
        family, state = self.family, self.state

        def call(x, source, t, branches=None, frames=None):
            branches = tuple(range(self.n_branches)) if branches is None else branches
            n = x.shape[1]
            inputs = [source if b < self.n_source else
                      x[self.prompt_of(b)] + source if mode == "delta" else x[self.prompt_of(b)] for b in branches]
            rows = [b for b in branches for _ in range(n)]
            text = self.text.rows(rows)
            state.text_tokens = family.text_tokens(text)
            guidance = None if self.guidance is None else self.guidance[rows]
            return family.velocity(torch.cat(inputs), t, text, guidance)

        return call

    def prompt_of(self, branch: int) -> int:
        """The prompt a target branch edits towards."""
        return (branch - self.n_source) // (2 if self.family.uses_cfg else 1)

    def update(self, mode: str, dt: float):
        cfg, g_src, g_tar, n_src = self.family.uses_cfg, self.source_gs, self.config.guidance_scale, self.n_source

        def step(v, x, frames):  # v: per branch (F, ...); x: (P, F, ...)
            v_src = v[1] + g_src * (v[0] - v[1]) if cfg else v[0]
            out = []
            for p in range(len(x)):
                v_tar = v[n_src + 2 * p] + g_tar * (v[n_src + 2 * p + 1] - v[n_src + 2 * p]) if cfg else v[n_src + p]
                out.append(x[p] + dt * (v_tar - v_src if mode == "delta" else v_tar))
            return torch.stack(out)

        return step

    def _noised_source(self, eps: torch.Tensor, sigma: float) -> torch.Tensor:
        return (1 - sigma) * self.x_src + sigma * eps  # eps (1, ...) broadcast over the frames

    def _draw(self) -> torch.Tensor:
        return torch.randn((1, *self.latent_shape), generator=self.noise)

    def step(self, i: int, keyframes: torch.Tensor) -> None:
        config, pipe = self.config, self.pipe
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        t = self.all_timesteps[i]
        mode = "delta" if i < self.sample_from else "sample"
        if mode == "sample" and self.sample_noise is None:  # the switch: z_tar = x_src + y noised, sampled on
            self.sample_noise = self._draw()
            self.y = self.y + self._noised_source(self.sample_noise, sigma)
        draws = config.n_avg if mode == "delta" else 1
        kwargs = dict(keyframes=keyframes, state=self.state, scheduler=None, guidance_scale=0.0,
                      batch_size=config.batch_size, propagation=config.propagation, qk_injection=False,
                      feature_injection=False, memory=self.memory, plan=self.plan,
                      group=pipe.group if pipe.group.distributed else None,
                      update=self.update(mode, sigma_next - sigma), n_branches=self.n_branches,
                      keyframe_window=config.keyframe_window)
        total = None
        for _ in range(draws):
            eps = self._draw() if mode == "delta" else self.sample_noise
            out = denoise_step(self.model(mode), self.y, t, self._noised_source(eps, sigma), **kwargs)
            total = out if total is None else total + out
        self.y = total if draws == 1 else total / draws

    # ------------------------------------------------------------------ the loop
    def run(self, progress: bool, callback, saver, return_latents: bool) -> torch.Tensor:
        """Every step from the first (or the one resumed at); returns the latents (P, n_r, ...)."""
        self.state = TokenFlowState(n_branches=self.n_branches, n_source_branches=self.n_source)
        self.trail = [self.result()] if return_latents else None
        n, total = self.plan.n_frames, len(self.timesteps)
        group = self.pipe.group
        with joint_tokenflow_hooks(self.family.transformer, self.state, self.pipe.layers, self.family.text_first):
            bar = tqdm(range(self.first, total), desc="Editing", unit="step", initial=self.first, total=total,
                       disable=not progress or not group.is_main, leave=False)
            clock = StageClock("the edit", "--steps (or --n-max), --max-frames or --height/--width",
                               announce=progress and group.is_main, already=self.first,
                               what=f"{n} frames, {total} steps")
            for k in bar:
                started = time.perf_counter()
                keyframes = self.sampler(k, n, self.config.batch_size) if self.config.propagation in POLICIES \
                    else torch.empty(0, dtype=torch.long)
                self.keyframe_log.append(keyframes.tolist())
                group.check_same(self.keyframe_log[-1], f"keyframes of step {k + 1}")
                self.step(self.first_index + k, keyframes)
                bar.set_postfix_str(f"{n * len(self.y) / (time.perf_counter() - started):.2f} frames/s",
                                    refresh=False)
                clock.update(k + 1, total)
                if saver:
                    saver.after_step(self.y, self.keyframe_log, total, time.perf_counter() - started)
                if self.trail is not None:
                    self.trail.append(self.result())
                if callback:
                    callback("editing", k + 1, total)
        return self.result()

    def result(self) -> torch.Tensor:
        """The latents now: x_src + y while FlowEdit runs, the sampled target after the switch."""
        return self.y.clone() if self.sample_noise is not None else self.y + self.x_src

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {} if self.sample_noise is None else {"sample_noise": self.sample_noise}

    def restore(self, saver: EditCheckpoints) -> None:
        found = saver.restore(len(self.timesteps))
        if found is not None:
            self.y, self.keyframe_log = found
            self.first = len(self.keyframe_log)
            self.sample_noise = saver.restored.get("sample_noise")


TINY_MODELS = {"tiny-sd3": "sd3", "tiny-flux": "flux"}  # --model names of the tiny random models built in code


def _model_identity(model: str, loras: Sequence[str], model_config: Optional[str], variant: Optional[str],
                    revision: Optional[str]) -> str:
    """What a resume checkpoint's key says of the weights: the source and everything that changes them."""
    import json

    from .models import path_identity

    base = path_identity(model) if os.path.exists(model) else f"hub:{model}"
    extra = {k: v for k, v in (("loras", list(loras)), ("config", model_config), ("variant", variant),
                               ("revision", revision)) if v}
    return base if not extra else f"{base}|{json.dumps(extra, sort_keys=True)}"


def flow_kind(model: Optional[str]) -> Optional[str]:
    """``sd3``/``flux`` when ``model`` (a --model value) is a rectified-flow model, else None. Cheap: reads
    at most a ``model_index.json``."""
    if not model:
        return None
    if model in TINY_MODELS:
        return TINY_MODELS[model]
    from .families import detect_family

    kind = detect_family(model) if not os.path.isfile(model) else _file_kind(model)
    return kind if kind in ("sd3", "flux") else None


def _file_kind(path: str) -> Optional[str]:
    """A single checkpoint's family from its tensor names (the safetensors header only): SD3's MM-DiT
    has ``joint_blocks``, FLUX's ``double_blocks``."""
    if not path.lower().endswith(".safetensors"):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            keys = list(f.keys())
    except Exception:
        return None  # the UNet loader gives the error
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys):
        return "sd3"
    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys):
        return "flux"
    return None


def flow_defaults(kind: str) -> dict[str, Any]:
    """The edit settings a family starts from: FlowEdit with its published settings (and FlowEdit's empty
    negative prompt)."""
    d = _family_class(kind).defaults
    return dict(editor="flowedit", steps=d.steps, guidance_scale=d.guidance_scale, negative_prompt="",
                source_guidance_scale=d.source_guidance_scale, n_max=d.n_max)


def _family_class(kind: str):
    from .families.flux import FluxFamily
    from .families.sd3 import SD3Family

    return {"sd3": SD3Family, "flux": FluxFamily}[kind]


def _pipeline_class(family: str):
    from .models import quiet_pipeline_import

    with quiet_pipeline_import():
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]


def _family(name: str, pipe) -> FlowFamily:
    return _family_class(name)(pipe)
