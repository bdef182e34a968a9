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
from typing import Any, Optional

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
# The default working area of the tiny models (the square of this side, aspect kept): a first try
# at the defaults (a 40-frame clip, 50 steps) finishes in minutes on two CPU cores. --height/--width win.
TINY_NATIVE_SIDE = 128

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
        text_encoder = _text_encoder(seed + 2, vocab, config=text_cfg)
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


# SDXL's layout (no attention at the highest resolution, several transformer layers per block,
# two text encoders side by side, size/crop conditioning added to the time embedding), tiny widths.
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 32, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 2),
    norm_num_groups=8,
    cross_attention_dim=64,  # the two text encoders' widths, 32 + 32
    attention_head_dim=(2, 2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text + six time ids
    flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_SCHEDULER_CONFIG: dict[str, Any] = dict(  # stabilityai/stable-diffusion-xl-base-1.0
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
DPT_CONFIG: dict[str, Any] = dict(
    image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=4,
    backbone_out_indices=[0, 1, 2, 3], num_attention_heads=4, intermediate_size=37,
    neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, is_hybrid=False)


def _text_encoder(seed: int, vocab: dict[str, int], with_projection: bool = False,
                  config: Optional[dict[str, Any]] = None):
    """A CLIP text encoder over the tiny vocabulary, seeded (``config``: TEXT_CONFIG by default)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    torch.manual_seed(seed)
    return cls(CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                              eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["!"],
                              **(config or TEXT_CONFIG)))


def build_tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """A tiny SDXL: UNet with text_time conditioning, two text encoders (the second with projection)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True))
        text_encoder = _text_encoder(seed + 2, vocab)
        text_encoder_2 = _text_encoder(seed + 3, vocab, with_projection=True)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=build_tokenizer(),
                scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG))


def build_tiny_depth_estimator(seed: int = 0):
    """A tiny DPT depth estimator and its image processor (32x32 input)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DPTForDepthEstimation(DPTConfig(**DPT_CONFIG)).eval().requires_grad_(False)
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    return model, processor


def build_tiny_controlnet(unet, seed: int = 0):
    """A ControlNet shaped like ``unet`` (its encoder copied, zero convs random so it acts)."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
        for name, p in net.named_parameters():  # zero-initialised outputs would make it a no-op
            if "controlnet_" in name and "cond_embedding" not in name:
                torch.nn.init.normal_(p, std=0.02)
    return net.eval().requires_grad_(False)


def save_tiny_variant(out_dir: str | os.PathLike, kind: str, seed: int = 0) -> str:
    """Write a tiny SDXL (``sdxl``) or SD 2 depth (``depth``) model as a diffusers folder."""
    from diffusers import (DDIMScheduler, StableDiffusionDepth2ImgPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    out_dir = os.fspath(out_dir)
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(**build_tiny_sdxl_components(seed))
    elif kind == "depth":
        c = build_tiny_components(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 5)
            unet = UNet2DConditionModel(**dict(UNET_CONFIG, in_channels=5)).eval()
        depth_estimator, processor = build_tiny_depth_estimator(seed + 6)
        pipe = StableDiffusionDepth2ImgPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                                unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
                                                depth_estimator=depth_estimator, feature_extractor=processor)
    else:
        raise ValueError(f"unknown tiny model kind '{kind}'; allowed: sdxl, depth")
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
