"""Tiny, randomly initialised SD3 and FLUX.1 components, built in code (no download).

The layouts are the real ones with tiny widths, as in diffusers' own tests
(``get_dummy_components``): an MM-DiT transformer with joint text-image attention (SD3.5 with
RMS q/k norms and one dual-attention block; FLUX with double-stream blocks, single-stream
blocks, rotary positions and the guidance embedding of FLUX.1-dev), a VAE with spatial factor 8
and 16 latent channels, CLIP text encoders and a T5 encoder. The tokenizers are written by this
code: the CLIP one of :mod:`tokenflow.tiny`, and a T5 (Unigram) one over the same words. The
weights are random and derive from a seed only: the output is noise, the machinery is real.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .tiny import VAE_CONFIG, _WORDS, _text_encoder, build_tokenizer

T5_MAX_LENGTH = 512
SD3_TRANSFORMER: dict[str, Any] = dict(
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
    pos_embed_max_size=48, qk_norm="rms_norm", dual_attention_layers=(0,))
SD3_VAE = dict(VAE_CONFIG, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # stabilityai/stable-diffusion-3.5-medium
FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
FLUX_VAE = dict(VAE_CONFIG, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev
KINDS = ("sd3", "flux")


def build_t5_tokenizer():
    """A T5 tokenizer (Unigram, SentencePiece-style word starts) over the tiny vocabulary; any
    other text falls back to single letters and ``<unk>``."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789,.'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS] + [(c, -5.0) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _t5_encoder(seed: int, vocab_size: int, width: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=width, d_ff=2 * width, d_kv=width // 4, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config)


def build_tiny_sd3(seed: int = 0) -> dict[str, Any]:
    """The components of a tiny SD3.5-shaped ``StableDiffusion3Pipeline`` (two CLIPs with projection, T5)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tokenizer, t5_tokenizer = build_tokenizer(), build_t5_tokenizer()
    vocab = tokenizer.get_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**SD3_TRANSFORMER)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**SD3_VAE)
        text_encoder = _text_encoder(seed + 2, vocab, with_projection=True)
        text_encoder_2 = _text_encoder(seed + 3, vocab, with_projection=True)
        text_encoder_3 = _t5_encoder(seed + 4, len(t5_tokenizer), 64)
    parts = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                 text_encoder_3=text_encoder_3)
    for module in parts.values():
        module.eval().requires_grad_(False)
    return dict(parts, tokenizer=tokenizer, tokenizer_2=build_tokenizer(), tokenizer_3=t5_tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER))


def build_tiny_flux(seed: int = 0) -> dict[str, Any]:
    """The components of a tiny FLUX.1-dev-shaped ``FluxPipeline`` (CLIP for the pooled embedding, T5)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tokenizer, t5_tokenizer = build_tokenizer(), build_t5_tokenizer()
    vocab = tokenizer.get_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**FLUX_VAE)
        text_encoder = _text_encoder(seed + 2, vocab)
        text_encoder_2 = _t5_encoder(seed + 3, len(t5_tokenizer), 32)
    parts = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    for module in parts.values():
        module.eval().requires_grad_(False)
    return dict(parts, tokenizer=tokenizer, tokenizer_2=t5_tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER))


def build_tiny_pipeline(kind: str, seed: int = 0):
    """A diffusers ``StableDiffusion3Pipeline`` (``sd3``) or ``FluxPipeline`` (``flux``) of tiny components."""
    from .models import quiet_pipeline_import

    with quiet_pipeline_import():
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if kind == "sd3":
        return StableDiffusion3Pipeline(**build_tiny_sd3(seed))
    if kind == "flux":
        return FluxPipeline(**build_tiny_flux(seed))
    raise ValueError(f"unknown tiny model kind '{kind}'; allowed: {', '.join(KINDS)}")


def save_tiny_flow_model(out_dir: str | os.PathLike, kind: str, seed: int = 0) -> str:
    """Write a tiny SD3 or FLUX model as a diffusers folder that ``from_pretrained`` loads offline."""
    out_dir = os.fspath(out_dir)
    build_tiny_pipeline(kind, seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir
