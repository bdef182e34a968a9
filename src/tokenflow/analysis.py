"""Pictures of the diffusion features (the paper's Figures 2 and 3).

Figure 3: the self-attention input tokens of the highest-resolution decoder layer, for every frame
at one timestep of the inverted video, projected on their first three principal components
(shared by all frames) and shown as RGB beside the frames, plus an x-t slice through both.
Figure 2: a target frame rebuilt from a source frame by the nearest-neighbour field of those
features, against a rebuild by nearest neighbours of the plain RGB patches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from .atomic import atomic_path
from .correspondence import cosine_nearest_neighbours
from .inversion import Inversion, psnr


@dataclass
class FeatureAnalysis:
    timestep: int
    layer: str
    features: torch.Tensor  # (N, h, w, D)
    pca: np.ndarray  # (N, h, w, 3) in [0, 1]


def highest_resolution_decoder_layer(layers) -> str:
    decoder = [n for n in layers.self_attention if n.startswith("up_blocks.")]
    return decoder[-1]


@torch.no_grad()
def capture_features(pipe, inversion: Inversion, timestep: int, prompt: str = "", layer: str | None = None,
                     batch_size: int = 8, conditioning=None) -> tuple[torch.Tensor, str]:
    """Tokens fed to ``layer``'s self-attention (N, L, D) when the UNet denoises x_t of every frame."""
    layer = layer or highest_resolution_decoder_layer(pipe.layers)
    module = dict(pipe.unet.named_modules()).get(layer)
    if module is None:
        raise ValueError(f"the UNet has no layer '{layer}'")
    captured: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].float().cpu()))
    try:
        x_t = inversion.latents[timestep]
        embeds = pipe.prompt_embeds(prompt)
        t = torch.tensor(timestep)
        with pipe._on_device(*pipe._denoisers()):
            for b in range(0, len(x_t), batch_size):
                x = x_t[b:b + batch_size]
                pipe._predict(x, t, embeds.rows([0] * len(x)), torch.arange(b, b + len(x)), conditioning)
    finally:
        handle.remove()
    return torch.cat(captured), layer


def pca_rgb(features: torch.Tensor) -> np.ndarray:
    """(N, L, D) -> (N, L, 3): the first three principal components over all frames, in [0, 1]."""
    n, length, dim = features.shape
    x = features.reshape(-1, dim).double()
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    proj = x @ v[:3].T  # (N*L, 3)
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    proj = ((proj - lo) / (hi - lo).clamp(min=1e-8)).clamp(0, 1)
    return proj.reshape(n, length, 3).float().numpy()


def analyze_features(pipe, inversion: Inversion, latent_hw: tuple[int, int], timestep: int, prompt: str = "",
                     layer: str | None = None, conditioning=None) -> FeatureAnalysis:
    feats, layer = capture_features(pipe, inversion, timestep, prompt, layer, conditioning=conditioning)
    n, length, dim = feats.shape
    h, w = latent_hw
    scale = int(round((h * w / length) ** 0.5))
    fh, fw = h // scale, w // scale
    return FeatureAnalysis(timestep, layer, feats.reshape(n, fh, fw, dim), pca_rgb(feats).reshape(n, fh, fw, 3))


def _patches(frame: np.ndarray, fh: int, fw: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (fh*fw, ph*pw*3) float patches on the feature grid."""
    h, w = frame.shape[:2]
    ph, pw = h // fh, w // fw
    x = frame[:fh * ph, :fw * pw].astype(np.float32) / 255
    return x.reshape(fh, ph, fw, pw, 3).transpose(0, 2, 1, 3, 4).reshape(fh * fw, -1), (ph, pw)


def _unpatch(p: np.ndarray, fh: int, fw: int, ph: int, pw: int) -> np.ndarray:
    return p.reshape(fh, fw, ph, pw, 3).transpose(0, 2, 1, 3, 4).reshape(fh * ph, fw * pw, 3)


def nearest_neighbour_rebuild(frames: np.ndarray, features: torch.Tensor, source: int, target: int) -> dict:
    """Rebuild frame ``target`` from frame ``source`` by the feature NN field and by RGB NN.

    frames uint8 (N, H, W, 3); features (N, fh, fw, D). Returns the images and their PSNRs (dB).
    """
    _, fh, fw, dim = features.shape
    src_p, (ph, pw) = _patches(frames[source], fh, fw)
    tgt_p, _ = _patches(frames[target], fh, fw)
    nn_feat = cosine_nearest_neighbours(features[target].reshape(1, -1, dim), features[source].reshape(-1, dim))[0]
    # plain RGB nearest neighbours: closest source patch in L2
    d = torch.cdist(torch.from_numpy(tgt_p), torch.from_numpy(src_p))
    nn_rgb = d.argmin(dim=1)
    target_img = _unpatch(tgt_p, fh, fw, ph, pw)
    by_feat = _unpatch(src_p[nn_feat.numpy()], fh, fw, ph, pw)
    by_rgb = _unpatch(src_p[nn_rgb.numpy()], fh, fw, ph, pw)
    as_t = lambda a: torch.from_numpy(a)  # noqa: E731
    return {"source": _unpatch(src_p, fh, fw, ph, pw), "target": target_img, "features": by_feat, "rgb": by_rgb,
            "psnr_features": psnr(as_t(by_feat), as_t(target_img)), "psnr_rgb": psnr(as_t(by_rgb), as_t(target_img))}


def _to_u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def _upsample(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(_to_u8(img)).resize((w, h), Image.Resampling.NEAREST))


def _with_header(img: np.ndarray, lines: list[str], column_labels: Optional[list[str]] = None,
                 column_width: int = 0) -> np.ndarray:
    """The picture under a white header of title lines, and labels over its columns."""
    rows = len(lines) + (1 if column_labels else 0)
    width = max(img.shape[1], 8 * max(len(t) for t in lines) + 8)
    canvas = Image.new("RGB", (width, img.shape[0] + 14 * rows + 6), "white")
    canvas.paste(Image.fromarray(img), (0, 14 * rows + 6))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 2 + 14 * i), line, fill="black")
    for i, label in enumerate(column_labels or []):
        draw.text((i * column_width + 2, 2 + 14 * len(lines)), label, fill=(80, 80, 80))
    return np.asarray(canvas)


def _save_png(path: str, img: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


FIGURES = ("pca_frames.png", "xt_slice.png", "nn_rebuild.png", "pca.mp4", "analysis.json")  # what it writes


def write_figures(out_dir: str, frames: np.ndarray, fps: float, analysis: FeatureAnalysis, rebuild: dict,
                  source: int, target: int) -> dict:
    """Write pca_frames.png, xt_slice.png, nn_rebuild.png, pca.mp4 and analysis.json into out_dir."""
    from .video import write_video

    os.makedirs(out_dir, exist_ok=True)
    n, h, w, _ = frames.shape
    pca = np.stack([_upsample(p, h, w) for p in analysis.pca])  # (N, H, W, 3) uint8
    shown = np.linspace(0, n - 1, min(n, 8)).round().astype(int)
    grid = np.concatenate([np.concatenate(list(frames[shown]), axis=1), np.concatenate(list(pca[shown]), axis=1)])
    about = f"layer {analysis.layer}, t={analysis.timestep}"
    grid = _with_header(grid, ["Frames (top) and the first 3 PCA components of their diffusion features as RGB "
                               "(bottom)", about], [f"frame {i}" for i in shown], w)
    _save_png(os.path.join(out_dir, "pca_frames.png"), grid)
    row = h // 2
    reps = max(1, 4 * h // max(n, 1) // 4)
    xt = np.concatenate([np.repeat(frames[:, row], reps, axis=0), np.repeat(pca[:, row], reps, axis=0)], axis=1)
    xt = _with_header(xt, [f"x-t slice of row {row}: x across, time (frame 0 to {n - 1}) down", about],
                      ["RGB", "feature PCA"], w)
    _save_png(os.path.join(out_dir, "xt_slice.png"), xt)
    panels = [_to_u8(rebuild[k]) for k in ("source", "target", "features", "rgb")]
    strip = np.concatenate(panels, axis=1)
    canvas = Image.fromarray(np.concatenate([np.full((16, strip.shape[1], 3), 255, np.uint8), strip]))
    draw = ImageDraw.Draw(canvas)
    pw = panels[0].shape[1]
    for i, label in enumerate([f"source {source}", f"target {target}",
                               f"features NN {rebuild['psnr_features']:.2f} dB", f"RGB NN {rebuild['psnr_rgb']:.2f} dB"]):
        draw.text((i * pw + 2, 2), label, fill="black")
    _save_png(os.path.join(out_dir, "nn_rebuild.png"), np.asarray(canvas))
    write_video(os.path.join(out_dir, "pca.mp4"), np.concatenate([frames, pca], axis=2), fps)
    summary = {"timestep": analysis.timestep, "layer": analysis.layer, "n_frames": int(n),
               "feature_grid": list(analysis.pca.shape[1:3]), "source_frame": source, "target_frame": target,
               "psnr_features_nn": rebuild["psnr_features"], "psnr_rgb_nn": rebuild["psnr_rgb"]}
    with atomic_path(os.path.join(out_dir, "analysis.json")) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


@torch.no_grad()
def analyze_flow_features(pipe, frames: torch.Tensor, timestep: int, prompt: str = "", layer: str | None = None,
                          seed: int = 1, batch_size: int = 8, source_guidance: Optional[float] = None) -> FeatureAnalysis:
    """SD3/FLUX: the image tokens fed to ``layer``'s attention (default: the middle hooked layer) when the
    transformer denoises FlowEdit's source branch, ``(1 - sigma) x_src + sigma eps`` with one noise draw
    for every frame, at the schedule's timestep nearest ``timestep`` (0-999). frames (N, 3, H, W) in [0, 1]."""
    family = pipe.family
    names = [hooked.name for hooked in pipe.layers]
    layer = layer or names[len(names) // 2]
    if layer not in names:
        raise ValueError(f"unknown layer '{layer}'; attention layers are e.g. {names[0]}, {names[-1]}")
    role = next(hooked.role for hooked in pipe.layers if hooked.name == layer)
    height, width = frames.shape[-2:]
    if hasattr(family, "set_frame_size"):
        family.set_frame_size(height, width)
    with pipe._on_device(family.vae):
        x_src = family.encode(frames, pipe.vae_batch_size)
    timesteps, sigmas = family.schedule(1000, family.latent_shape(height, width))
    i = int((timesteps - timestep).abs().argmin())
    eps = torch.randn((1, *x_src.shape[1:]), generator=torch.Generator().manual_seed(seed))
    z = (1 - sigmas[i]) * x_src + sigmas[i] * eps
    text = pipe.prompt_embeds(prompt)
    n_text = text.embeds.shape[1]
    captured: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        tokens = kwargs.get("hidden_states", args[0] if args else None)
        captured.append((tokens[:, n_text:] if role == "single" else tokens).float().cpu())

    handle = dict(family.transformer.named_modules())[layer].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with pipe._on_device(family.transformer):
            for b in range(0, len(z), batch_size):
                rows = z[b:b + batch_size]
                guidance = torch.full((len(rows),), float(family.defaults.source_guidance_scale
                                                          if source_guidance is None else source_guidance))
                family.velocity(rows, timesteps[i], text.rows([0] * len(rows)), guidance)
    finally:
        handle.remove()
    feats = torch.cat(captured)  # (N, L, D), L = (H/16) (W/16) tokens in row order
    fh, fw = height // 16, width // 16
    return FeatureAnalysis(int(timesteps[i]), layer, feats.reshape(len(feats), fh, fw, -1),
                           pca_rgb(feats).reshape(len(feats), fh, fw, 3))
