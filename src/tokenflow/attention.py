"""The self-attention processor that implements TokenFlow inside a diffusers UNet.

It is installed on every self-attention layer (``attn1``) through ``unet.set_attn_processor``
and reads what to do from one shared :class:`TokenFlowState` (the loop's plan); what the layers keep
for later calls goes into its :class:`LayerCaches` (``state.caches``), which the loop resets every step. The UNet batch is laid out
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
  The pass runs either as one UNet call on all branches (``keyframe_branch`` None) or, for
  many keyframes, as one call per branch, source first (``keyframe_branch`` 0, 1, 2): the
  branches only meet through the source's Q/K and features, which the source call keeps,
  so the UNet batch is K images instead of 3K and memory stays bounded.
  Bounded (``--keyframe-window``): the pass runs as several calls, the anchors' first
  (``anchor_role`` "keep": the edit branches' keys/values of the anchors are kept per layer and
  branch in ``caches.anchors``), then one per group (``anchor_role`` "use": the group's queries attend to
  the group's keys/values followed by the anchors').
- ``extended``: like ``keyframe`` over whatever frames are in the batch, keeping nothing
  (the paper's joint-attention ablation).
- ``propagate``: no attention is computed. The output of every frame is gathered from the
  keyframe outputs at the nearest neighbours of its source tokens (paper Eq. 5-6).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .correspondence import gather_blend, nearest_keyframe_tokens

MODES = ("plain", "keyframe", "extended", "propagate")


def host_empty(shape, dtype: torch.dtype, source: torch.device) -> torch.Tensor:
    """A CPU tensor for copies from ``source``: page-locked (pinned) when that is a CUDA GPU, so that
    the copies both ways run asynchronously; ordinary memory where pinning fails. A copy into it with
    ``non_blocking`` must be waited for (``wait_for_host_copies``) before the host reads it."""
    if torch.device(source).type == "cuda":
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # no page-locked memory left: the copies block instead
            pass
    return torch.empty(shape, dtype=dtype)


def release_host_cache() -> None:
    """Give the pinned blocks PyTorch keeps for reuse back to the system (after an edit: the caches'
    pinned memory is not held for the life of the process)."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty is not None and torch.cuda.is_available():
        empty()


def wait_for_host_copies(device: torch.device) -> None:
    """Wait until the GPU's asynchronous copies into host caches are done (one sync, per step)."""
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def rows_to(cache: torch.Tensor, dim: int, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``cache``'s ``rows`` along ``dim``, on ``device``. From a pinned cache they are gathered into a
    pinned buffer and copied asynchronously (PyTorch's pinned-memory cache keeps the buffer from
    being reused until the copy is done)."""
    if torch.device(device).type != "cuda" or not cache.is_pinned():
        return cache.index_select(dim, rows).to(device)
    shape = list(cache.shape)
    shape[dim] = len(rows)
    staged = host_empty(shape, cache.dtype, device)
    torch.index_select(cache, dim, rows, out=staged)
    return staged.to(device, non_blocking=True)


@dataclass
class LayerCache:
    source_tokens: torch.Tensor  # (K, L, D) source-branch attn1 input of the keyframes
    outputs: torch.Tensor  # (B, K, L, D) attn1 output of every branch at the keyframes
    query: Optional[torch.Tensor] = None  # source Q/K, only while a split keyframe pass needs them
    key: Optional[torch.Tensor] = None


@dataclass
class LayerCaches:
    """What the layers write during a step, and only the layers (the processors and the feature hook): the
    editing loop reads it between the passes and :meth:`reset` s it, once at the end of every step (and of
    every failed keyframe call, and when the hooks come off), as diffusers' hook states are reset."""

    # layer name -> the keyframe pass's cache of that layer, read by the propagation pass
    layers: dict[str, LayerCache] = field(default_factory=dict)
    features: Optional[torch.Tensor] = None  # split keyframe pass: the source call's injected features
    # bounded keyframe pass: (layer name, branch) -> the anchors' keys and values (A, L, D) in that edit branch
    anchors: dict = field(default_factory=dict)

    def take(self) -> dict[str, LayerCache]:
        """The layers' caches of the call that just ran, handed to the loop; the next call starts empty."""
        layers, self.layers = self.layers, {}
        return layers

    def reset(self) -> None:
        self.layers, self.features, self.anchors = {}, None, {}


# the fields the loop sets for one UNet call (or one set of calls) only; see TokenFlowState.during
_PER_CALL = ("mode", "keyframe_branch", "gather", "anchor_role")


@dataclass
class TokenFlowState:
    """The editing loop's plan for the processors and hooks: set only by the loops (``editing.denoise_step``
    and its passes, the transformer loop of ``flow.py``), read by the layers. What the layers write lives in
    ``caches`` (:class:`LayerCaches`). :meth:`end_step` puts both back to rest after every step."""

    n_branches: int = 3
    n_source_branches: int = 1  # the first branches describe the source: per-frame attention in the keyframe pass
    text_tokens: Optional[int] = None  # joint attention (MM-DiT): text tokens per frame in a single-stream block
    mode: str = "plain"
    qk_injection: bool = False  # Plug-and-Play Q/K injection in this step
    feature_injection: bool = False  # Plug-and-Play residual-feature injection in this step
    slots: Optional[torch.Tensor] = None  # (F, 2) propagation plan of the current batch
    weights: Optional[torch.Tensor] = None  # (F,)
    slot_groups: Optional[list] = None  # correspondence.slot_groups of ``slots`` (made once per batch: no sync per layer)
    blend: Optional[bool] = None  # False when every weight is 1
    nn_max_elements: int = 1 << 26  # bound on similarities held at once per layer
    keyframe_branch: Optional[int] = None  # split keyframe pass: the one branch in this UNet call
    cache_device: Optional[torch.device] = None  # keep the caches here (the CPU, off the accelerator)
    cache_rows: Optional[torch.Tensor] = None  # offloaded caches: the keyframe rows this batch uses
    # one edit across ranks: (S, K_r, L, D) of this rank's keyframes -> (S, K, L, D) of all of them
    # (see distributed.Group.gather_keyframes); None on a single process
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # bounded keyframe pass: "keep" in the anchors' call, "use" in a group's call, None otherwise
    anchor_role: Optional[str] = None
    caches: LayerCaches = field(default_factory=LayerCaches)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown attention mode '{mode}'; allowed: {', '.join(MODES)}")
        self.mode = mode

    @contextlib.contextmanager
    def during(self, **fields) -> Iterator["TokenFlowState"]:
        """Set per-call fields (``mode``, ``keyframe_branch``, ``gather``, ``anchor_role``) for the block
        and put the previous values back after it, whatever happens inside."""
        unknown = set(fields) - set(_PER_CALL)
        if unknown:
            raise ValueError(f"not per-call state: {', '.join(sorted(unknown))}")
        if "mode" in fields and fields["mode"] not in MODES:
            raise ValueError(f"unknown attention mode '{fields['mode']}'; allowed: {', '.join(MODES)}")
        before = {name: getattr(self, name) for name in fields}
        for name, value in fields.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in before.items():
                setattr(self, name, value)

    def end_step(self) -> None:
        """After a step (or when the hooks come off): no caches held, no batch plan left for a later call."""
        self.caches.reset()
        self.mode = "plain"
        self.slots = self.weights = self.slot_groups = self.blend = self.cache_rows = None
        self.keyframe_branch = self.gather = self.anchor_role = None


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
            cache = state.caches.layers[self.name]
            keyframe_tokens, keyframe_outputs = cache.source_tokens, cache.outputs
            if state.cache_rows is not None:  # offloaded: bring only this batch's keyframes over
                rows, device = state.cache_rows, hidden_states.device
                keyframe_tokens = rows_to(keyframe_tokens, 0, rows, device)
                keyframe_outputs = rows_to(keyframe_outputs, 1, rows, device)
            source = hidden_states[:n_frames]  # (F, L, D) source branch, same frames
            nn = nearest_keyframe_tokens(source, keyframe_tokens, state.slots,
                                         state.nn_max_elements, state.slot_groups)  # (F, 2, L)
            out = gather_blend(keyframe_outputs, state.slots, nn, state.weights, state.blend)  # (B, F, L, D)
            return self._finish(attn, out.reshape(batch, n_tokens, -1), residual)

        split_branch = state.keyframe_branch if state.mode == "keyframe" else None
        if split_branch is not None:
            return self._keyframe_branch(attn, hidden_states, split_branch)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if state.qk_injection and self.inject_qk:
            # Plug-and-Play: the edit branches take the source branch's queries and keys
            query = query[:n_frames].repeat(n_branches, 1, 1)
            key = key[:n_frames].repeat(n_branches, 1, 1)

        if state.mode == "plain":
            out = self._attend(attn, query, key, value, n_tokens, 1)
        else:
            s = slice(0, n_frames)
            e = slice(n_frames, batch)
            key_e, value_e, kv_frames = key[e], value[e], n_frames
            if state.mode == "keyframe" and state.gather is not None:  # keyframes on other ranks too
                key_e, value_e = self._gathered(key[e], value[e], n_branches - 1, state.qk_injection and self.inject_qk)
                kv_frames = len(key_e) // (n_branches - 1)
            if state.mode == "keyframe" and state.anchor_role is not None:
                key_e, value_e, kv_frames = self._anchored(key_e, value_e, n_branches - 1, kv_frames, 1)
            # source branch: per frame; edit branches: all keyframes of a branch in one sequence
            out = torch.cat([self._attend(attn, query[s], key[s], value[s], n_tokens, 1),
                             self._attend(attn, query[e], key_e, value_e, n_tokens, n_frames, kv_frames)])
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if state.mode == "keyframe":
            # kept before the residual: a propagated frame adds its own residual, not the keyframe's
            state.caches.layers[self.name] = LayerCache(
                source_tokens=self._keep(hidden_states[:n_frames]),
                outputs=self._keep(out.reshape(n_branches, n_frames, n_tokens, -1)))
        return self._finish(attn, out, residual)

    def _cache_empty(self, shape, like: torch.Tensor) -> torch.Tensor:
        """An empty cache tensor: on ``like``'s device, or on the host when the caches are offloaded."""
        device = self.state.cache_device
        if device is None or torch.device(device) == like.device:
            return like.new_empty(shape)
        return host_empty(shape, like.dtype, like.device)

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        """A copy for the cache (never a view of the UNet batch), on the cache device."""
        return self._cache_empty(x.shape, x).copy_(x, non_blocking=x.is_cuda)  # from a GPU to pinned: async

    def _keyframe_branch(self, attn, hidden_states: torch.Tensor, branch: int) -> torch.Tensor:
        """Split keyframe pass: this call holds one branch's K keyframes (the source first)."""
        state = self.state
        n_frames, n_tokens, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inject = state.qk_injection and self.inject_qk
        if branch == 0:
            cache = LayerCache(source_tokens=self._keep(hidden_states), outputs=None)
            if inject:  # the edit branches' calls take these
                cache.query, cache.key = query, key
            state.caches.layers[self.name] = cache
            out = self._attend(attn, query, key, value, n_tokens, 1)
        else:
            cache = state.caches.layers[self.name]
            if inject:
                query, key = cache.query, cache.key
            kv_frames = n_frames
            if state.gather is not None:  # keyframes on other ranks too
                key, value = self._gathered(key, value, 1, False)
                kv_frames = len(key)
            if state.anchor_role is not None:
                key, value, kv_frames = self._anchored(key, value, 1, kv_frames, branch)
            out = self._attend(attn, query, key, value, n_tokens, n_frames, kv_frames)
        out = attn.to_out[1](attn.to_out[0](out))
        if cache.outputs is None:
            cache.outputs = self._cache_empty((state.n_branches, n_frames, n_tokens, out.shape[-1]), out)
        cache.outputs[branch].copy_(out.reshape(n_frames, n_tokens, -1), non_blocking=out.is_cuda)
        if branch == state.n_branches - 1:
            cache.query = cache.key = None
        return self._finish(attn, out, hidden_states)

    def _anchored(self, key: torch.Tensor, value: torch.Tensor, n_branches: int, kv_frames: int,
                  first_branch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Bounded keyframe pass. Keys/values (n_branches*kv_frames, L, D) of the edit branches
        ``first_branch``, ... of this call: kept as the anchors' (``anchor_role`` "keep", returned as
        they are), or followed by the anchors' per branch ("use": (n_branches*(kv_frames+A), L, D))."""
        state = self.state
        key = key.reshape(n_branches, kv_frames, *key.shape[1:])
        value = value.reshape(n_branches, kv_frames, *value.shape[1:])
        if state.anchor_role == "keep":
            for i in range(n_branches):
                state.caches.anchors[(self.name, first_branch + i)] = (key[i], value[i])
            return key.flatten(0, 1), value.flatten(0, 1), kv_frames
        kept = [state.caches.anchors[(self.name, first_branch + i)] for i in range(n_branches)]
        key = torch.cat([key, torch.stack([k for k, _ in kept])], dim=1)
        value = torch.cat([value, torch.stack([v for _, v in kept])], dim=1)
        return key.flatten(0, 1), value.flatten(0, 1), key.shape[1]

    def _gathered(self, key: torch.Tensor, value: torch.Tensor, n_branches: int,
                  shared_key: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (n_branches*K_r, L, D) of this rank's keyframes -> those of every rank's
        keyframes (n_branches*K, L, D), in one collective. ``shared_key``: every branch has the same
        keys (the source's, under Q/K injection), so they travel once."""
        k_r = len(key) // n_branches
        key = key.reshape(n_branches, k_r, *key.shape[1:])
        value = value.reshape(n_branches, k_r, *value.shape[1:])
        both = self.state.gather(torch.cat([key[:1] if shared_key else key, value]))  # (S, K, L, D)
        n_keys = 1 if shared_key else n_branches
        key, value = both[:n_keys], both[n_keys:]
        if shared_key:
            key = key.expand(n_branches, *key.shape[1:])
        return key.reshape(-1, *key.shape[2:]), value.reshape(-1, *value.shape[2:])

    @staticmethod
    def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_tokens: int,
                frames_per_seq: int, kv_frames_per_seq: Optional[int] = None) -> torch.Tensor:
        """SDPA over S sequences: the queries of ``frames_per_seq`` frames attend to the keys/values of
        ``kv_frames_per_seq`` frames (the same frames by default): (S*f, L, H*d) -> (S*f, L, H*d)."""
        heads = attn.heads
        head_dim = k.shape[-1] // heads

        def split(x: torch.Tensor, frames: int) -> torch.Tensor:
            # (S*frames, L, H*d) -> (S, H, frames*L, d)
            return x.reshape(-1, frames * n_tokens, heads, head_dim).transpose(1, 2)

        kv_frames = kv_frames_per_seq or frames_per_seq
        qh, kh, vh = split(q, frames_per_seq), split(k, kv_frames), split(v, kv_frames)
        if attn.norm_q is not None:
            qh = attn.norm_q(qh)
        if attn.norm_k is not None:
            kh = attn.norm_k(kh)
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=attn.scale)
        return out.transpose(1, 2).reshape(-1, n_tokens, heads * head_dim)

    @staticmethod
    def _finish(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The attention module's own residual connection and output rescaling (no-ops in SD)."""
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
