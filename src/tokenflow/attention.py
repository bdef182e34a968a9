"""The self-attention processor that implements TokenFlow inside a diffusers UNet.

It is installed on every self-attention layer (``attn1``) through ``unet.set_attn_processor``
and reads what to do from one shared :class:`TokenFlowState`. The UNet batch is laid out
as branches of equal size, ``[source, uncond, cond]`` (the source branch denoises the
inverted source latents with the inversion prompt; the others are the edit's classifier-free
guidance pair). Modes:

- ``plain``: ordinary per-frame self-attention.
- ``keyframe``: the keyframe pass. Non-source branches use *extended attention*: the
  queries of every keyframe attend to the keys/values of all keyframes of the same branch
  (one sequence of K*L tokens, through ``scaled_dot_product_attention``, keys never
  repeated per frame). The source branch attends within its own frame. With Plug-and-Play
  Q/K injection on, the edit branches use the source branch's queries and keys. The layer
  keeps the source branch's input tokens and the output of every branch for propagation.
- ``extended``: like ``keyframe`` over whatever frames are in the batch, keeping nothing
  (the paper's joint-attention ablation).
- ``propagate``: no attention is computed. The output of every frame is gathered from the
  keyframe outputs at the nearest neighbours of its source tokens (paper Eq. 5-6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .correspondence import gather_blend, nearest_keyframe_tokens

MODES = ("plain", "keyframe", "extended", "propagate")


@dataclass
class LayerCache:
    source_tokens: torch.Tensor  # (K, L, D) source-branch attn1 input of the keyframes
    outputs: torch.Tensor  # (B, K, L, D) attn1 output of every branch at the keyframes


@dataclass
class TokenFlowState:
    """Everything the processors and hooks read; set by the editing loop, never by a module."""

    n_branches: int = 3
    mode: str = "plain"
    qk_injection: bool = False  # Plug-and-Play Q/K injection in this step
    feature_injection: bool = False  # Plug-and-Play residual-feature injection in this step
    slots: Optional[torch.Tensor] = None  # (F, 2) propagation plan of the current batch
    weights: Optional[torch.Tensor] = None  # (F,)
    keyframe_ids: Optional[list[int]] = None  # distinct slots of the batch (host side: no sync per layer)
    blend: Optional[bool] = None  # False when every weight is 1
    cache: dict[str, LayerCache] = field(default_factory=dict)
    nn_max_elements: int = 1 << 26  # bound on similarities held at once per layer

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown attention mode '{mode}'; allowed: {', '.join(MODES)}")
        self.mode = mode


class TokenFlowAttnProcessor:
    """Self-attention with extended attention, PnP Q/K injection and token propagation."""

    def __init__(self, name: str, state: TokenFlowState, inject_qk: bool = False):
        self.name = name
        self.state = state
        self.inject_qk = inject_qk  # this layer is one of Plug-and-Play's Q/K injection layers

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        state = self.state
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise RuntimeError(f"TokenFlow's processor on '{self.name}' expects plain self-attention")
        residual = hidden_states
        n_branches = state.n_branches
        batch, n_tokens, dim = hidden_states.shape  # (B*F, L, D)
        n_frames = batch // n_branches

        if state.mode == "propagate":
            cache = state.cache[self.name]
            source = hidden_states[:n_frames]  # (F, L, D) source branch, same frames
            nn = nearest_keyframe_tokens(source, cache.source_tokens, state.slots,
                                         state.nn_max_elements, state.keyframe_ids)  # (F, 2, L)
            out = gather_blend(cache.outputs, state.slots, nn, state.weights, state.blend)  # (B, F, L, D)
            return self._finish(attn, out.reshape(batch, n_tokens, -1), residual)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        if state.qk_injection and self.inject_qk:
            # Plug-and-Play: the edit branches take the source branch's queries and keys
            query = query[:n_frames].repeat(n_branches, 1, 1)
            key = key[:n_frames].repeat(n_branches, 1, 1)

        def split(x: torch.Tensor, frames_per_seq: int) -> torch.Tensor:
            # (S*frames_per_seq, L, H*d) -> (S, H, frames_per_seq*L, d)
            return x.reshape(-1, frames_per_seq * n_tokens, heads, head_dim).transpose(1, 2)

        def attend(q, k, v, frames_per_seq):
            qh, kh, vh = split(q, frames_per_seq), split(k, frames_per_seq), split(v, frames_per_seq)
            if attn.norm_q is not None:
                qh = attn.norm_q(qh)
            if attn.norm_k is not None:
                kh = attn.norm_k(kh)
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=attn.scale)
            return out.transpose(1, 2).reshape(-1, n_tokens, heads * head_dim)

        if state.mode == "plain":
            out = attend(query, key, value, 1)
        else:
            s = slice(0, n_frames)
            e = slice(n_frames, batch)
            # source branch: per frame; edit branches: all frames of a branch in one sequence
            out = torch.cat([attend(query[s], key[s], value[s], 1),
                             attend(query[e], key[e], value[e], n_frames)])
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if state.mode == "keyframe":
            # kept before the residual: a propagated frame adds its own residual, not the keyframe's
            state.cache[self.name] = LayerCache(
                source_tokens=hidden_states[:n_frames].clone(),  # not a view of the whole batch
                outputs=out.reshape(n_branches, n_frames, n_tokens, -1))
        return self._finish(attn, out, residual)

    @staticmethod
    def _finish(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The attention module's own residual connection and output rescaling (no-ops in SD)."""
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
