"""Tiny, randomly initialised Stable-Diffusion-shaped components, built in code.

The layout is SD 2.1-base's (three cross-attention down blocks and a plain one, a
cross-attention mid block, a plain up block and three cross-attention up blocks, two
layers per block, linear projections, a VAE with spatial factor 8, a CLIP text encoder,
a DDIM scheduler with SD 2.1-base's values); only the widths are tiny. The weights are
random, so pictures are noise: these components exist to check the machinery (tests,
``tokenflow demo``) without a download. ``full_size=True`` keeps SD 2.1-base's real
widths with random weights, for benchmarks whose compute must be representative.

Everything derives from a seed, so the same library versions give the same weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

# Words the tokenizer knows as whole tokens; any other text still tokenizes byte by byte.
_WORDS = (
    "a an the of in on and woman running marble statue sculpture wolf shiny silver robotic "
    "ugly blurry low res unrealistic unaesthetic photo painting cat dog car snow"
).split()

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=(2, 2, 4, 4),  # diffusers' legacy name: the number of heads
    use_linear_projection=True,
    flip_sin_to_cos=True,
    freq_shift=0,
)
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=256,
    scaling_factor=0.18215,
)
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="gelu",
)
# SD 2.1-base's real widths, for benchmarks (random weights, real compute).
FULL_SIZE = dict(
    unet=dict(block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32, sample_size=64,
              cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20)),
    vae=dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2,
             sample_size=512),
    text=dict(hidden_size=1024, intermediate_size=4096, projection_dim=512,
              num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"),
)
SCHEDULER_CONFIG: dict[str, Any] = dict(  # stabilityai/stable-diffusion-2-1-base
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@dataclass
class TinyComponents:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


def _byte_alphabet() -> list[str]:
    """Byte-level BPE's reversible map from the 256 byte values to printable characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return [chr(c) for c in codes]


def tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-layout byte-level BPE vocabulary with merges that spell out ``_WORDS``."""
    symbols = _byte_alphabet()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    known = set(vocab_list)
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in known:
                merges.append((left, right))
                vocab_list.append(merged)
                known.add(merged)
            left = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    # SD 2.x pads with "!" rather than the end token.
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)


def build_tiny_components(seed: int = 0, full_size: bool = False) -> TinyComponents:
    """Build the components; weights depend only on ``seed`` (the global RNG is left as it was)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = dict(UNET_CONFIG), dict(VAE_CONFIG), dict(TEXT_CONFIG)
    if full_size:
        unet_cfg.update(FULL_SIZE["unet"])
        vae_cfg.update(FULL_SIZE["vae"])
        text_cfg.update(FULL_SIZE["text"])
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    # diffusers and transformers initialise from the global RNG; fork it so that building
    # a model never changes the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_cfg)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["!"], **text_cfg))
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return TinyComponents(unet, vae, text_encoder, tokenizer, scheduler)


def save_tiny_model(out_dir: str | os.PathLike, seed: int = 0, full_size: bool = False) -> str:
    """Write the components as a diffusers folder that ``from_pretrained`` loads offline."""
    import diffusers

    out_dir = os.fspath(out_dir)
    c = build_tiny_components(seed, full_size)
    os.makedirs(out_dir, exist_ok=True)
    c.unet.save_pretrained(os.path.join(out_dir, "unet"))
    c.vae.save_pretrained(os.path.join(out_dir, "vae"))
    c.text_encoder.save_pretrained(os.path.join(out_dir, "text_encoder"))
    c.tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    c.scheduler.save_pretrained(os.path.join(out_dir, "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return out_dir
