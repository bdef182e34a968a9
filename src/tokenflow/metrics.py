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


def mismatch(name: str, source: np.ndarray, edited: np.ndarray) -> Optional[str]:
    """Why ``edited`` may not be an edit of ``source``: another frame count, or another aspect ratio
    (an edit's working size is usually another scale of the source's: that alone is no mismatch)."""
    notes = []
    if len(edited) != len(source):
        notes.append(f"{len(edited)} frames against the source's {len(source)} (the first "
                     f"{min(len(edited), len(source))} are compared)")
    (sh, sw), (eh, ew) = source.shape[1:3], edited.shape[1:3]
    if abs((ew / eh) / (sw / sh) - 1) > 0.02:
        notes.append(f"{ew}x{eh} against the source's {sw}x{sh} (another aspect ratio; the source is resized "
                     f"to {ew}x{eh})")
    if not notes:
        return None
    return f"'{name}' has {' and '.join(notes)}: is it an edit of this source?"


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
            raise TokenFlowError(f"cannot load CLIP model '{model_id}': {reason[:200]} (--no-clip scores the warp error alone)") from None
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


def axis_range(values: list[float], pad: float = 0.1) -> tuple[float, float]:
    """A y range around ``values`` that shows their differences (not pinned to 0), padded."""
    lo, hi = min(values), max(values)
    span = hi - lo if hi > lo else max(abs(hi), 1e-6) * 0.5
    return max(0.0, lo - pad * span), hi + pad * span


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values between lo and hi."""
    import math

    raw = (hi - lo) / max(1, count - 1)
    step = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * step:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def plot_warp_errors(path: str, results: list[Evaluation], width: int = 760, height: int = 400) -> str:
    """A PNG line chart of per-frame warp error for every edited video (Pillow only): labelled
    axes with ticks, a y range fitted to the values, and the legend below the plot, off the lines."""
    from PIL import Image, ImageDraw

    from .atomic import atomic_path

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    floor = results[0].warp_error_floor if results else None
    legend = [(f"{r.name[-40:]}: mean {r.warp_error:.5f}", colours[c % len(colours)]) for c, r in enumerate(results)]
    if floor is not None:
        legend.append((f"source video (the floor): mean {floor:.5f}", (128, 128, 128)))
    legend_rows = (len(legend) + 1) // 2
    height += 16 * legend_rows
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top = 80, width - 20, 28
    bottom = height - 56 - 16 * legend_rows
    values = [v for r in results for v in r.per_frame_warp_error if np.isfinite(v)]
    y_lo, y_hi = axis_range(values + ([floor] if floor is not None else []) or [0.0, 1e-6])
    n_max = max(len(r.per_frame_warp_error) for r in results)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 6), "Per-frame warp error: MSE of frame t+1 and frame t warped by the source's optical flow "
                         "(visible pixels, RGB in [0, 1])", fill="black")

    def xy(i, v):
        return (left + (right - left) * i / max(1, n_max - 1), bottom - (bottom - top) * (v - y_lo) / (y_hi - y_lo))

    for tick in nice_ticks(y_lo, y_hi):
        y = xy(0, tick)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.line([left + 1, y, right - 1, y], fill=(232, 232, 232))
        draw.text((6, y - 6), f"{tick:.4g}", fill="black")
    for tick in nice_ticks(0, max(1, n_max - 1), 8):
        if tick != int(tick):
            continue
        x = xy(tick, y_lo)[0]
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 6, bottom + 6), str(int(tick)), fill="black")
    draw.text((6, top - 16), "warp error", fill="black")
    draw.text(((left + right) // 2 - 60, bottom + 22), "frame pair (t, t+1), by t", fill="black")
    if floor is not None:
        y = xy(0, floor)[1]
        draw.line([left, y, right, y], fill=(128, 128, 128))
    for c, r in enumerate(results):
        pts = [xy(i, v) for i, v in enumerate(r.per_frame_warp_error) if np.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colours[c % len(colours)], width=2)
    for k, (label, colour) in enumerate(legend):  # below the plot, two columns
        x = left + (k % 2) * (right - left) // 2
        y = bottom + 40 + 16 * (k // 2)
        draw.line([x, y + 6, x + 18, y + 6], fill=colour, width=3)
        draw.text((x + 24, y), label, fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
