"""Per-frame conditioning of the UNet beyond the prompt: depth channels, ControlNet, SDXL.

Everything that a UNet call needs besides latents, timestep and prompt embeddings lives in one
:class:`Conditioning` built once per video. The pipeline's single UNet entry point
(``TokenFlowPipeline._predict``) applies it to any batch by frame index, so inversion,
reconstruction, the keyframe pass and the propagation pass all see the same conditions:

- SD 2 depth models (5-channel UNet): the frame's depth map, from the model's own depth
  estimator, at latent size and scaled to [-1, 1] per frame, concatenated to the latents
  (as the official preprocessing and diffusers' depth-to-image pipeline do);
- ControlNet: residuals from that frame's condition image (canny edges, estimated depth, or
  images the user gives), for every branch, in inversion as in editing (as the official
  preprocessing does for its ControlNet inversion);
- SDXL: the pooled text embedding of each branch and the size/crop time ids.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .errors import TokenFlowError
from .models import short_error

CONTROL_TYPES = ("canny", "depth")
DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"
# ControlNet 1.1 (lllyasviel) for SD 1.x; the usual community ports for SD 2.x; diffusers' for SDXL
DEFAULT_CONTROLNETS = {
    "sd1": {"canny": "lllyasviel/control_v11p_sd15_canny", "depth": "lllyasviel/control_v11f1p_sd15_depth"},
    "sd2": {"canny": "thibaud/controlnet-sd21-canny-diffusers", "depth": "thibaud/controlnet-sd21-depth-diffusers"},
    "sdxl": {"canny": "diffusers/controlnet-canny-sdxl-1.0", "depth": "diffusers/controlnet-depth-sdxl-1.0"},
}


@dataclass
class PromptEmbeds:
    """Text conditioning of the UNet branches: embeds (S, 77, D), SDXL's pooled (S, P) or None."""

    embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def rows(self, index: list[int]) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return PromptEmbeds(torch.cat([p.embeds for p in parts]), pooled)


@dataclass
class Conditioning:
    """Per-frame conditions of one video (all on the CPU; rows are moved per UNet call)."""

    depth: Optional[torch.Tensor] = None  # (N, 1, h, w) in [-1, 1]: SD 2 depth models
    control: Optional[torch.Tensor] = None  # (N, 3, H, W) in [0, 1]: ControlNet condition images
    controlnet: Any = None
    control_scale: float = 1.0
    controlnet_id: str = ""
    time_ids: Optional[torch.Tensor] = None  # (6,) SDXL: original size, crop, target size

    def identity(self) -> dict[str, Any]:
        """What changes the UNet's predictions, for the inversion cache key."""
        out: dict[str, Any] = {}
        if self.depth is not None:
            out["depth"] = tensor_digest(self.depth)
        if self.control is not None:
            out["control"] = {"images": tensor_digest(self.control), "controlnet": self.controlnet_id,
                              "scale": self.control_scale}
        if self.time_ids is not None:
            out["time_ids"] = self.time_ids.tolist()
        return out


def tensor_digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def model_family(unet) -> Optional[str]:
    """sd1 / sd2 / sdxl from the UNet's text width, None for other (e.g. tiny) models."""
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(unet.config.cross_attention_dim)


def canny_maps(frames: torch.Tensor, low: int = 100, high: int = 200) -> torch.Tensor:
    """Canny edges of float frames (N, 3, H, W) in [0, 1] as 3-channel images in {0, 1}.

    As the official preprocessing: frames to uint8 by truncation, OpenCV Canny with the given
    thresholds, edges repeated on three channels.
    """
    import cv2

    if not 0 <= low <= high:
        raise TokenFlowError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    images = (frames.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    edges = np.stack([cv2.Canny(np.ascontiguousarray(im), low, high) for im in images])
    return torch.from_numpy(edges.astype(np.float32) / 255.0)[:, None].repeat(1, 3, 1, 1)


@torch.no_grad()
def estimate_depth(model: Any, processor: Any, frames: torch.Tensor, size: tuple[int, int],
                   batch_size: int = 8) -> torch.Tensor:
    """Relative depth (N, 1, h, w) of float frames (N, 3, H, W) with a transformers depth model
    (DPT, Depth Anything), resized bicubically to ``size``."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
    for i in range(0, len(frames), batch_size):
        images = [(f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for f in frames[i:i + batch_size]]
        pixels = processor(images=images, return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
        depth = model(pixel_values=pixels).predicted_depth.float()
        if depth.ndim == 3:
            depth = depth[:, None]
        out.append(torch.nn.functional.interpolate(depth, size=size, mode="bicubic", align_corners=False).cpu())
    return torch.cat(out)


def normalise_per_frame(depth: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Scale every frame's map to [low, high] (a flat map becomes ``low``)."""
    d_min = depth.amin(dim=(1, 2, 3), keepdim=True)
    d_max = depth.amax(dim=(1, 2, 3), keepdim=True)
    span = d_max - d_min
    return low + (high - low) * (depth - d_min) / torch.where(span > 0, span, torch.ones_like(span))


def load_depth_model(model_id: str, device: torch.device):
    """A transformers depth-estimation model and its processor, from a hub id or folder."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from .models import hub_kwargs

    kwargs = hub_kwargs(model_id, "depth model")
    try:
        model = AutoModelForDepthEstimation.from_pretrained(model_id, **kwargs)
        processor = AutoImageProcessor.from_pretrained(model_id, **kwargs)
    except Exception as e:
        raise TokenFlowError(f"cannot load depth model '{model_id}': {short_error(e)}") from None
    return model.to(device).eval().requires_grad_(False), processor


def control_images(control: str, frames: torch.Tensor, *, canny_low: int = 100, canny_high: int = 200,
                   depth_model: Optional[str] = None, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """ControlNet condition images (N, 3, H, W) in [0, 1] for fitted frames (N, 3, H, W).

    ``control`` is ``canny``, ``depth``, or a folder/video of condition images (one per frame,
    resized to the frames' size).
    """
    n, _, h, w = frames.shape
    if control == "canny":
        return canny_maps(frames, canny_low, canny_high)
    if control == "depth":
        model, processor = load_depth_model(depth_model or DEFAULT_DEPTH_MODEL, device)
        depth = normalise_per_frame(estimate_depth(model, processor, frames, (h, w)), 0.0, 1.0)
        return depth.repeat(1, 3, 1, 1)
    if not os.path.exists(control):
        raise TokenFlowError(f"--control must be {' or '.join(CONTROL_TYPES)}, or a folder or video of "
                             f"condition images; '{control}' is neither")
    from .video import fit_frames, read_video

    images = read_video(control, max_frames=n, size=(h, w)).frames  # fitted as decoded: bounded memory
    if len(images) < n:
        raise TokenFlowError(f"'{control}' has {len(images)} condition images for {n} frames")
    return fit_frames(images, h, w)
