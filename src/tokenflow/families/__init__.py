"""Model families: what TokenFlow's loop needs from a network, one module per family.

A family owns everything family-specific: prompt encoding, the latent layout and the VAE, the
network call for a batch of branches at one timestep, the schedule and the update, and which
attention layers TokenFlow hooks (by role). The loop (:mod:`tokenflow.editing`), the keyframes,
the correspondences, the ranks and the checkpoints only talk to this interface.

- ``unet`` (SD 1.x/2.x, SDXL, SD 2 depth, ControlNet): :mod:`.unet` (prompts, conditions, the UNet call),
  composed by :class:`tokenflow.pipeline.TokenFlowPipeline` with DDIM inversion and Plug-and-Play;
- ``sd3`` (SD3 / SD3.5) and ``flux`` (FLUX.1 dev / schnell): rectified-flow MM-DiT transformers
  (:mod:`.sd3`, :mod:`.flux`, on :class:`.base.FlowFamily`), edited by :class:`tokenflow.flow.FlowPipeline`
  with FlowEdit or SDEdit and no inversion.
"""

from __future__ import annotations

import json
import os
from typing import Optional

FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
# pipelines of other kinds people may point us at: the one-line refusal names what is supported
UNSUPPORTED_HINTS = ("Video", "I2V", "T2V", "Wan", "Hunyuan", "CogVideo", "LTX", "Mochi", "Kandinsky", "PixArt",
                     "Sana", "Lumina", "Cascade", "Kolors", "AuraFlow", "HiDream", "Qwen", "Chroma")
SUPPORTED = "SD 1.x/2.x, SD 2 depth, SDXL (UNet), SD3/SD3.5 and FLUX.1 (rectified flow)"


def family_of_class(class_name: Optional[str]) -> Optional[str]:
    """``sd3``/``flux`` for their diffusers pipelines, ``unet`` for Stable Diffusion's, None if unknown."""
    if not class_name:
        return None
    if class_name in FLOW_PIPELINES:
        return FLOW_PIPELINES[class_name]
    if class_name.startswith("StableDiffusion3"):
        return "sd3"
    if class_name.startswith("Flux"):
        return "flux"
    if class_name.startswith(("StableDiffusion", "StableUnCLIP")) or class_name == "DiffusionPipeline":
        return "unet"
    return "other"


def detect_family(model: str) -> str:
    """The family of a model source, from its ``model_index.json`` where there is one (a local folder or
    the hub cache), else from the id's name. Defaults to ``unet`` (the loader then checks for real)."""
    index = _model_index(model)
    if index is not None:
        family = family_of_class(index.get("_class_name"))
        if family and family != "other":
            return family
        if family == "other":
            from ..errors import TokenFlowError

            raise TokenFlowError(f"'{model}' is a {index.get('_class_name')}; TokenFlow edits with {SUPPORTED}")
    name = os.path.basename(model.rstrip("/")).lower()
    if "stable-diffusion-3" in name or name.startswith(("sd3", "sd3.5", "sd35")):
        return "sd3"
    if "flux" in name:
        return "flux"
    return "unet"


def _model_index(model: str) -> Optional[dict]:
    path = os.path.join(model, "model_index.json") if os.path.isdir(model) else None
    if path is None and "/" in model and not os.path.exists(model):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(model, "model_index.json")
            path = found if isinstance(found, str) else None
        except Exception:
            path = None
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
