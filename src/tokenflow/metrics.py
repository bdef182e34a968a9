"""Temporal-consistency and text-alignment metrics (paper Sec. 5, Table 1).

Warp error: the optical flow of the *source* video between consecutive frames warps every edited
frame onto the next one; the error is the mean squared difference (RGB in [0, 1]) over the pixels
that a forward-backward consistency check marks as visible (Sundaram et al., ECCV 2010; Lai et al.,
ECCV 2018). The same number for the source video itself is the floor a perfect edit could reach.

CLIP-T: mean cosine similarity of each frame's CLIP image embedding with the prompt's text
embedding. CLIP-F: mean cosine similarity of consecutive frames' image embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch

from .errors import TokenFlowError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# OpenAI CLIP's image normalisation (used when a model folder has no preprocessor config)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FlowEstimator(Protocol):
    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Flow (H, W, 2) float32 in pixels from uint8 RGB frame ``a`` to ``b``: a[p] ~ b[p + flow[p]]."""


class DISFlow:
    """OpenCV's Dense Inverse Search optical flow: fast, no weights."""

    def __init__(self, preset: str = "medium"):
        import cv2

        presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                   "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
        self.dis = cv2.DISOpticalFlow_create(presets[preset])

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        import cv2

        ga = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)
        gb = cv2.cvtColor(np.ascontiguousarray(b), cv2.COLOR_RGB2GRAY)
        return self.dis.calc(ga, gb, None).astype(np.float32)


def backward_warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """out[p] = image[p + flow[p]] with bilinear sampling (border replicated). image (H, W, C) float."""
    import cv2

    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image.astype(np.float32), gx + flow[..., 0], gy + flow[..., 1],
                     interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def visibility_mask(flow_fw: np.ndarray, flow_bw: np.ndarray, alpha: float = 0.01, beta: float = 0.5) -> np.ndarray:
    """Pixels of frame t+1 whose backward flow is confirmed by the forward flow (not occluded).

    flow_fw: t -> t+1, flow_bw: t+1 -> t. A pixel p of t+1 is visible when
    |bw(p) + fw(p + bw(p))|^2 < alpha (|bw(p)|^2 + |fw(p + bw(p))|^2) + beta.
    """
    fw_at = backward_warp(flow_fw, flow_bw)
    h, w = flow_bw.shape[:2]
    gx, gy = np.meshgrid(np.arange(w), np.arange(h))
    tx, ty = gx + flow_bw[..., 0], gy + flow_bw[..., 1]
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    diff = np.sum((flow_bw + fw_at) ** 2, axis=-1)
    bound = alpha * (np.sum(flow_bw ** 2, axis=-1) + np.sum(fw_at ** 2, axis=-1)) + beta
    return (diff < bound) & inside


@dataclass
class SourceFlows:
    """Flows and visibility between consecutive source frames, computed once for many edits."""

    backward: list[np.ndarray]  # t+1 -> t
    visible: list[np.ndarray]  # (H, W) bool for frame t+1

    @classmethod
    def compute(cls, source: np.ndarray, flow: Optional[FlowEstimator] = None) -> "SourceFlows":
        flow = flow or DISFlow()
        backward, visible = [], []
        for a, b in zip(source[:-1], source[1:]):
            fw, bw = flow(a, b), flow(b, a)
            backward.append(bw)
            visible.append(visibility_mask(fw, bw))
        return cls(backward, visible)


def warp_errors(frames: np.ndarray, flows: SourceFlows) -> np.ndarray:
    """Per-pair warp error (N-1,) of uint8 frames (N, H, W, 3) under the source's flows."""
    x = frames.astype(np.float32) / 255
    errors = []
    for t, (bw, vis) in enumerate(zip(flows.backward, flows.visible)):
        warped = backward_warp(x[t], bw)  # frame t moved onto frame t+1
        sq = np.mean((warped - x[t + 1]) ** 2, axis=-1)
        errors.append(float(sq[vis].mean()) if vis.any() else float("nan"))
    return np.array(errors)


def match_frames(source: np.ndarray, edited: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same frame count (the shorter) and the edited video's size for both."""
    from .video import resize_frames

    n = min(len(source), len(edited))
    return resize_frames(source[:n], *edited.shape[1:3]), edited[:n]


class ClipScorer:
    """CLIP image and text embeddings through ``transformers``; loaded when used."""

    def __init__(self, model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD, device: str = "cpu"):
        self.model, self.tokenizer = model.eval().to(device), tokenizer
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.size = int(model.config.vision_config.image_size)
        self.device = device

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_CLIP, device: str = "cpu") -> "ClipScorer":
        from transformers import CLIPModel, CLIPTokenizer

        from .models import hub_kwargs

        kwargs = hub_kwargs(model_id, "CLIP model")
        try:
            model = CLIPModel.from_pretrained(model_id, **kwargs)
            tokenizer = CLIPTokenizer.from_pretrained(model_id, **kwargs)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenFlowError(f"cannot load CLIP model '{model_id}': {reason[:200]} (use --no-clip offline)") from None
        return cls(model, tokenizer, device=device)

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> (N, 3, S, S): shorter side to S (bicubic), centre crop, normalise."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = torch.nn.functional.interpolate(x, (nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def image_embeddings(self, frames: np.ndarray, batch_size: int = 16) -> torch.Tensor:
        out = []
        for i in range(0, len(frames), batch_size):
            pixels = self.preprocess(frames[i:i + batch_size]).to(self.device)
            out.append(_features(self.model.get_image_features(pixel_values=pixels)).cpu())
        e = torch.cat(out)
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.tokenizer.model_max_length)
        e = _features(self.model.get_text_features(input_ids=ids.input_ids.to(self.device),
                                                   attention_mask=ids.attention_mask.to(self.device))).cpu()
        return (e / e.norm(dim=-1, keepdim=True))[0]

    def scores(self, frames: np.ndarray, prompt: str) -> tuple[float, float]:
        """(CLIP-T, CLIP-F) of uint8 frames (N, H, W, 3)."""
        img = self.image_embeddings(frames)
        clip_t = float((img @ self.text_embedding(prompt)).mean())
        clip_f = float((img[:-1] * img[1:]).sum(-1).mean()) if len(img) > 1 else float("nan")
        return clip_t, clip_f


def _features(output) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class Evaluation:
    name: str
    n_frames: int
    warp_error: Optional[float]
    warp_error_floor: Optional[float]
    clip_t: Optional[float]
    clip_f: Optional[float]
    per_frame_warp_error: list[float]

    def to_dict(self) -> dict:
        return {"edited": self.name, "n_frames": self.n_frames, "warp_error": self.warp_error,
                "warp_error_floor": self.warp_error_floor, "clip_t": self.clip_t, "clip_f": self.clip_f,
                "per_frame_warp_error": self.per_frame_warp_error}


def evaluate(source: np.ndarray, edited: dict[str, np.ndarray], prompt: Optional[str] = None,
             clip: Optional[ClipScorer] = None, flow: Optional[FlowEstimator] = None) -> list[Evaluation]:
    """Warp error (and floor) of every edited video against the source's motion; CLIP scores if given."""
    results = []
    flows_by_shape: dict[tuple, tuple[SourceFlows, float]] = {}
    for name, frames in edited.items():
        src, ed = match_frames(source, frames)
        if len(ed) < 2:
            raise TokenFlowError(f"'{name}' has {len(ed)} frame(s) in common with the source; warp error needs 2")
        key = src.shape
        if key not in flows_by_shape:
            flows = SourceFlows.compute(src, flow)
            flows_by_shape[key] = (flows, float(np.nanmean(warp_errors(src, flows))))
        flows, floor = flows_by_shape[key]
        per_frame = warp_errors(ed, flows)
        clip_t = clip_f = None
        if clip is not None and prompt is not None:
            clip_t, clip_f = clip.scores(ed, prompt)
        results.append(Evaluation(name, len(ed), float(np.nanmean(per_frame)), floor, clip_t, clip_f,
                                  [float(v) for v in per_frame]))
    return results


def plot_warp_errors(path: str, results: list[Evaluation], width: int = 720, height: int = 360) -> str:
    """A PNG line chart of per-frame warp error for every edited video (Pillow only)."""
    from PIL import Image, ImageDraw

    from .atomic import atomic_path

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    values = [v for r in results for v in r.per_frame_warp_error if np.isfinite(v)]
    y_max = max(values + [r.warp_error_floor or 0 for r in results] + [1e-6]) * 1.1
    n_max = max(len(r.per_frame_warp_error) for r in results)
    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(5):
        y = bottom - (bottom - top) * k / 4
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{y_max * k / 4:.4f}", fill="black")
    draw.text((left, 4), "per-frame warp error (MSE over visible pixels, RGB in [0, 1])", fill="black")
    draw.text(((left + right) // 2 - 30, bottom + 12), "frame pair t -> t+1", fill="black")

    def xy(i, v):
        return (left + (right - left) * i / max(1, n_max - 1), bottom - (bottom - top) * v / y_max)

    for c, r in enumerate(results):
        colour = colours[c % len(colours)]
        pts = [xy(i, v) for i, v in enumerate(r.per_frame_warp_error) if np.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        draw.text((right - 230, top + 6 + 14 * c), f"{r.name[-28:]}: {r.warp_error:.5f}", fill=colour)
    floor = results[0].warp_error_floor if results else None
    if floor is not None:
        y = xy(0, floor)[1]
        draw.line([left, y, right, y], fill=(128, 128, 128))
        draw.text((right - 230, top + 6 + 14 * len(results)), f"source floor: {floor:.5f}", fill=(128, 128, 128))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
