"""Pure tensor math of TokenFlow's propagation (paper Sec. 4.2, Eq. 5-6).

Every non-key frame takes its self-attention output from keyframes: for each token, the
keyframe token whose *source-video* feature is most similar (cosine), blended over two
keyframes. Which two keyframes and with what weight is the *propagation plan*:

``slots (F, 2)`` indices into the keyframe list and ``weights (F,)``, meaning
``out_f = w_f * kf[slots[f, 0]][nn] + (1 - w_f) * kf[slots[f, 1]][nn]``.

Two policies:

- ``original`` (the official code): frames of batch ``b`` blend keyframe ``b`` with keyframe
  ``b - 1`` (batch 0 uses keyframe 0 alone), ``w = sigmoid(d2 / (d1 + d2))`` where ``d1``,
  ``d2`` are the frame's distances to the *centres* of batches ``b`` and ``b - 1``; so
  ``w`` lies in [0.5, 0.73] and the next keyframe is never used.
- ``paper``: the nearest keyframe at or before the frame and the nearest at or after it,
  weighted linearly by distance (a keyframe takes its own output).
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import POLICIES  # noqa: F401 (the one list of the policies' names, with the settings')


def propagation_plan(frames: torch.Tensor, keyframes: torch.Tensor, batch_size: int,
                     policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots (F, 2) int64 into ``keyframes`` (K,) and weights (F,) float32 for ``frames`` (F,)."""
    frames = frames.long()
    keyframes = keyframes.long()
    if policy == "original":
        b = frames // batch_size  # (F,) interval of each frame; keyframe b lies in interval b
        prev = (b - 1).clamp(min=0)
        centre_b = b * batch_size + batch_size // 2
        centre_prev = (b - 1) * batch_size + batch_size // 2
        d1 = (frames - centre_b).abs()
        d2 = (frames - centre_prev).abs()
        w = torch.sigmoid(d2 / (d1 + d2))  # int / int -> float32, as in the official code
        w = torch.where(b > 0, w, torch.ones_like(w))
        return torch.stack([b, prev], dim=1), w
    if policy == "paper":
        # index of the last keyframe <= frame, and of the first keyframe >= frame
        after = torch.searchsorted(keyframes, frames, right=False).clamp(max=len(keyframes) - 1)
        before = (torch.searchsorted(keyframes, frames, right=True) - 1).clamp(min=0)
        k_before, k_after = keyframes[before], keyframes[after]
        span = (k_after - k_before).float()
        # outside the keyframes' range one side is missing: the other takes weight 1
        w = torch.where(span > 0, (k_after - frames).float() / span.clamp(min=1), torch.ones_like(span))
        only_after = frames < k_before
        before = torch.where(only_after, after, before)
        return torch.stack([before, after], dim=1), w
    raise ValueError(f"unknown propagation policy '{policy}'; allowed: {', '.join(POLICIES)}")


def cosine_nearest_neighbours(queries: torch.Tensor, keys: torch.Tensor,
                              max_elements: int = 1 << 26) -> torch.Tensor:
    """For every query token, the index of the most cosine-similar key token.

    queries (F, L, D), keys (L2, D) -> (F, L) int64. The (F, L, L2) similarity is computed
    a few frames at a time so that at most ``max_elements`` similarities exist at once.
    """
    q = queries / queries.norm(dim=-1, keepdim=True)
    k = keys / keys.norm(dim=-1, keepdim=True)
    n_frames, n_tokens, _ = q.shape
    chunk = max(1, max_elements // max(1, n_tokens * k.shape[0]))
    kt = k.transpose(0, 1)  # (D, L2)
    return torch.cat([(q[i:i + chunk] @ kt).argmax(dim=-1) for i in range(0, n_frames, chunk)])


SlotGroups = list  # [(keyframe slot j, rows (R,), positions in rows of slot 0 (R0,), of slot 1 (R1,))]


def slot_groups(slots: torch.Tensor, device: Optional[torch.device] = None) -> SlotGroups:
    """For each keyframe slot a batch uses: the frames that use it, and where it is their first or
    second slot, as index tensors on ``device``. Computed once per batch on the host, so the layers
    index with them and never ask the device for a data-dependent shape (no sync per layer)."""
    slots = slots.cpu()
    groups = []
    for j in slots.unique().tolist():
        uses = slots == j  # (F, 2)
        rows = uses.any(dim=1).nonzero().squeeze(1)
        positions = [uses[rows, s].nonzero().squeeze(1) for s in range(2)]
        groups.append((j, rows.to(device), positions[0].to(device), positions[1].to(device)))
    return groups


def nearest_keyframe_tokens(source_tokens: torch.Tensor, keyframe_tokens: torch.Tensor,
                            slots: torch.Tensor, max_elements: int = 1 << 26,
                            groups: Optional[SlotGroups] = None) -> torch.Tensor:
    """Nearest-neighbour field of every frame to each of its two keyframes.

    source_tokens (F, L, D): the frames' source-video tokens; keyframe_tokens (K, L, D);
    slots (F, 2). Returns (F, 2, L) int64 token indices into the slotted keyframe.
    The loop runs over the few keyframes a batch uses, never over frames. ``groups``
    (:func:`slot_groups` of ``slots``, made once per batch) spares the device syncs of finding them.
    """
    n_frames, n_tokens, _ = source_tokens.shape
    nn = torch.empty(n_frames, 2, n_tokens, dtype=torch.long, device=source_tokens.device)
    for j, rows, first, second in (groups if groups is not None else slot_groups(slots, source_tokens.device)):
        field = cosine_nearest_neighbours(source_tokens[rows], keyframe_tokens[j], max_elements)  # (R, L)
        nn[rows[first], 0] = field[first]
        nn[rows[second], 1] = field[second]
    return nn


def gather_blend(keyframe_outputs: torch.Tensor, slots: torch.Tensor, nn: torch.Tensor,
                 weights: torch.Tensor, blend: Optional[bool] = None) -> torch.Tensor:
    """Blend keyframe outputs gathered at the nearest neighbours (paper Eq. 6).

    keyframe_outputs (B, K, L, D) for B branches; slots (F, 2); nn (F, 2, L); weights (F,).
    Returns (B, F, L, D). ``blend=False`` says every weight is 1 (known beforehand: no device sync).
    """
    n_branches, n_kf, n_tokens, dim = keyframe_outputs.shape
    flat = keyframe_outputs.reshape(n_branches, n_kf * n_tokens, dim)
    index = slots.unsqueeze(-1) * n_tokens + nn  # (F, 2, L) into K*L
    first = flat[:, index[:, 0]]  # (B, F, L, D)
    if blend is None:
        blend = not bool((weights == 1).all())
    if not blend:
        return first
    second = flat[:, index[:, 1]]
    w = weights.to(flat.dtype).view(1, -1, 1, 1)
    return w * first + (1 - w) * second
