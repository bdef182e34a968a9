"""Test helper: write a tiny diffusers SD model as an original (LDM / A1111-style) single file.

diffusers reads such files (``from_single_file``); this writes one from components built in
code, so the single-file path is tested without a download. Key layout of the original
Stable Diffusion checkpoints: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(VAE), ``cond_stage_model.transformer.*`` (CLIP text encoder, SD 1.x style).
"""

from __future__ import annotations

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(sd, src, dst, out, table=_RESNET):
    for key, value in sd.items():
        if key.startswith(src + "."):
            first, rest = key[len(src) + 1:].split(".", 1)
            out[f"{dst}.{table.get(first, first)}.{rest}"] = value


def _copy(sd, src, dst, out):
    for key, value in sd.items():
        if key.startswith(src + "."):
            out[dst + key[len(src):]] = value


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    sd, out, cfg = unet.state_dict(), {}, unet.config
    p = "model.diffusion_model."
    _copy(sd, "time_embedding.linear_1", p + "time_embed.0", out)
    _copy(sd, "time_embedding.linear_2", p + "time_embed.2", out)
    _copy(sd, "conv_in", p + "input_blocks.0.0", out)
    layers = cfg.layers_per_block
    for i, block in enumerate(unet.down_blocks):
        for j in range(layers):
            n = i * (layers + 1) + j + 1
            _resnet(sd, f"down_blocks.{i}.resnets.{j}", f"{p}input_blocks.{n}.0", out)
            if getattr(block, "attentions", None):
                _copy(sd, f"down_blocks.{i}.attentions.{j}", f"{p}input_blocks.{n}.1", out)
        if block.downsamplers:
            _copy(sd, f"down_blocks.{i}.downsamplers.0.conv", f"{p}input_blocks.{(i + 1) * (layers + 1)}.0.op", out)
    _resnet(sd, "mid_block.resnets.0", p + "middle_block.0", out)
    _copy(sd, "mid_block.attentions.0", p + "middle_block.1", out)
    _resnet(sd, "mid_block.resnets.1", p + "middle_block.2", out)
    for i, block in enumerate(unet.up_blocks):
        has_attn = bool(getattr(block, "attentions", None))
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            _resnet(sd, f"up_blocks.{i}.resnets.{j}", f"{p}output_blocks.{n}.0", out)
            if has_attn:
                _copy(sd, f"up_blocks.{i}.attentions.{j}", f"{p}output_blocks.{n}.1", out)
        if block.upsamplers:
            n = i * (layers + 1) + layers
            _copy(sd, f"up_blocks.{i}.upsamplers.0.conv", f"{p}output_blocks.{n}.{2 if has_attn else 1}.conv", out)
    _copy(sd, "conv_norm_out", p + "out.0", out)
    _copy(sd, "conv_out", p + "out.2", out)
    assert len(out) == len(sd), (len(out), len(sd))
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    sd, out = vae.state_dict(), {}
    p = "first_stage_model."
    table = {"conv_shortcut": "nin_shortcut"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    n = len(vae.encoder.down_blocks)
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            _copy(sd, f"{part}.{name}", f"{p}{part}.{name}", out)
        _copy(sd, f"{part}.conv_norm_out", f"{p}{part}.norm_out", out)
        for r in range(2):
            _resnet(sd, f"{part}.mid_block.resnets.{r}", f"{p}{part}.mid.block_{r + 1}", out, table)
        for src, dst in attn.items():
            for kind in ("weight", "bias"):
                key = f"{part}.mid_block.attentions.0.{src}.{kind}"
                value = sd[key]
                out[f"{p}{part}.mid.attn_1.{dst}.{kind}"] = value[..., None, None] if value.ndim == 2 else value
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            _resnet(sd, f"encoder.down_blocks.{i}.resnets.{j}", f"{p}encoder.down.{i}.block.{j}", out, table)
        if block.downsamplers:
            _copy(sd, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"{p}encoder.down.{i}.downsample.conv", out)
    for i, block in enumerate(vae.decoder.up_blocks):
        k = n - 1 - i
        for j in range(len(block.resnets)):
            _resnet(sd, f"decoder.up_blocks.{i}.resnets.{j}", f"{p}decoder.up.{k}.block.{j}", out, table)
        if block.upsamplers:
            _copy(sd, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"{p}decoder.up.{k}.upsample.conv", out)
    for name in ("quant_conv", "post_quant_conv"):
        _copy(sd, name, p + name, out)
    assert len(out) == len(sd), (len(out), len(sd))
    return out


def text_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    # original checkpoints keep transformers 4's layout, with the ``text_model.`` level
    return {f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
            for k, v in text_encoder.state_dict().items()}


def write_single_file(path, unet, vae, text_encoder) -> str:
    from safetensors.torch import save_file

    tensors = {**unet_to_ldm(unet), **vae_to_ldm(vae), **text_to_ldm(text_encoder)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)
