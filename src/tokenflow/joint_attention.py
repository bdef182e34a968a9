"""TokenFlow inside an MM-DiT's joint text-image attention (SD3, FLUX.1).

In a joint block every frame's text and image tokens attend together. TokenFlow acts on the image
tokens only; text tokens always stay with their own frame:

- ``plain``: the model's own attention, per frame.
- ``keyframe`` / ``extended``: the edit branches' queries (text and image) of every keyframe attend to
  that frame's own text keys and to the image keys of *all* keyframes of the branch (extended
  attention over image tokens; across ranks the keyframes' image keys/values are gathered). The
  source branches (the first ``state.n_source_branches``) attend per frame. ``keyframe`` keeps the
  source branch's image input tokens and every branch's image outputs of the layer.
- ``propagate``: a frame's image outputs are the keyframes' outputs gathered at the nearest
  neighbours of its source image tokens (paper Eq. 5-6); its text queries attend per frame.

One processor class serves the three layouts diffusers uses (see :class:`families.base.AttentionLayer`):
``joint`` (image in ``hidden_states``, text in ``encoder_hidden_states``), ``image`` (no text) and
``single`` (FLUX's single-stream blocks: ``[text, image]`` in one sequence; the text length comes from
the state). Sequences are concatenated in the model's own order, so a frame that is its own keyframe
computes what the model computes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import LayerCache, TokenFlowState, release_host_cache, rows_to
from .correspondence import gather_blend, nearest_keyframe_tokens


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (B, S, H*d) -> (B, S, H, d)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n, Sq, H, d) x (n, Sk, H, d) -> (n, Sq, H*d)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class JointTokenFlowProcessor:
    """Extended attention and token propagation on the image tokens of a joint attention layer."""

    def __init__(self, name: str, state: TokenFlowState, role: str, text_first: bool):
        if role not in ("joint", "image", "single"):
            raise ValueError(f"unknown attention role '{role}'")
        self.name, self.state, self.role, self.text_first = name, state, role, text_first

    # ------------------------------------------------------------------ projections
    def _project(self, attn, hidden_states, encoder_hidden_states, rotary):
        """Queries, keys, values (B, S, H, d) of the text (None without text) and image tokens."""
        d = attn.head_dim if hasattr(attn, "head_dim") else attn.to_k.out_features // attn.heads
        if self.role == "single":
            n_text = self.state.text_tokens
            text_in, image_in = hidden_states[:, :n_text], hidden_states[:, n_text:]
        else:
            text_in, image_in = encoder_hidden_states, hidden_states
        q, k, v = (_heads(f(hidden_states), d) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if self.role == "joint":
            tq, tk, tv = (_heads(f(text_in), d) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
            q, k, v = (self._join(t, i) for t, i in ((tq, q), (tk, k), (tv, v)))
        if rotary is not None:  # FLUX: positions over the whole [text, image] sequence, per frame
            from diffusers.models.embeddings import apply_rotary_emb

            q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
        n_text = 0 if text_in is None else text_in.shape[1]
        return q, k, v, n_text, image_in

    def _join(self, text: Optional[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        if text is None:
            return image
        return torch.cat([text, image] if self.text_first else [image, text], dim=1)

    def _split(self, x: torch.Tensor, n_text: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        if not n_text:
            return None, x
        if self.text_first:
            return x[:, :n_text], x[:, n_text:]
        return x[:, -n_text:], x[:, :-n_text]

    # ------------------------------------------------------------------ attention
    def _extended(self, q, k, v, n_text: int, gather: bool, branch: int = 0) -> torch.Tensor:
        """The K frames of one edit branch: each frame's queries attend to its own text keys and to
        the image keys of every keyframe (of every rank with ``gather``). (K, S, H, d) -> (K, S, H*d).
        In a bounded keyframe pass (``gather``: the keyframe pass) the anchors' image keys/values are
        kept per branch, or follow the group's (see ``TokenFlowState.anchor_role``)."""
        tk, ik = self._split(k, n_text)
        tv, iv = self._split(v, n_text)
        if gather and self.state.gather is not None:
            both = self.state.gather(torch.stack([ik, iv]))  # (2, K_r, L, H, d) -> (2, K, L, H, d)
            ik, iv = both[0], both[1]
        if gather and self.state.anchor_role == "keep":
            self.state.caches.anchors[(self.name, branch)] = (ik, iv)
        elif gather and self.state.anchor_role == "use":
            anchor_k, anchor_v = self.state.caches.anchors[(self.name, branch)]
            ik, iv = torch.cat([ik, anchor_k]), torch.cat([iv, anchor_v])
        n = len(q)
        shared_k = ik.reshape(1, -1, *ik.shape[2:]).expand(n, -1, -1, -1)  # (K, K*L, H, d)
        shared_v = iv.reshape(1, -1, *iv.shape[2:]).expand(n, -1, -1, -1)
        return _sdpa(q, self._join(tk, shared_k), self._join(tv, shared_v))

    def _by_branch(self, q, k, v, n_text: int, branches: Sequence[int], n_frames: int) -> torch.Tensor:
        """Source branches per frame, edit branches with extended attention; rows branch-major."""
        out = []
        for row, branch in enumerate(branches):
            s = slice(row * n_frames, (row + 1) * n_frames)
            if branch < self.state.n_source_branches:
                out.append(_sdpa(q[s], k[s], v[s]))
            else:
                out.append(self._extended(q[s], k[s], v[s], n_text, gather=self.state.mode == "keyframe",
                                          branch=branch))
        return torch.cat(out)

    def _propagated(self, image_in: torch.Tensor, batch: int) -> torch.Tensor:
        """Image outputs (B*F, L, D) gathered from the keyframes at the nearest source tokens."""
        state = self.state
        cache = state.caches.layers[self.name]
        tokens, outputs = cache.source_tokens, cache.outputs
        if state.cache_rows is not None:  # offloaded: only this batch's keyframes come over
            tokens = rows_to(tokens, 0, state.cache_rows, image_in.device)
            outputs = rows_to(outputs, 1, state.cache_rows, image_in.device)
        n_frames = batch // state.n_branches
        nn = nearest_keyframe_tokens(image_in[:n_frames], tokens, state.slots, state.nn_max_elements,
                                     state.slot_groups)  # (F, 2, L)
        out = gather_blend(outputs, state.slots, nn, state.weights, state.blend)  # (B, F, L, D)
        return out.reshape(batch, *out.shape[2:])

    # ------------------------------------------------------------------ the call
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None, **kwargs):
        if attention_mask is not None:
            raise RuntimeError(f"TokenFlow's processor on '{self.name}' takes no attention mask")
        state = self.state
        q, k, v, n_text, image_in = self._project(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        batch = len(q)
        if state.mode == "propagate":
            text_out = None
            if n_text:  # text queries attend within their own frame
                tq, _ = self._split(q, n_text)
                text_out = _sdpa(tq, k, v)
            return self._finish(attn, text_out, self._propagated(image_in, batch), project_image=False)
        if state.mode == "plain":
            out = _sdpa(q, k, v)
        elif state.mode == "keyframe" and state.keyframe_branch is not None:  # one branch per call
            out = self._by_branch(q, k, v, n_text, [state.keyframe_branch], batch)
        else:
            n_frames = batch // state.n_branches
            out = self._by_branch(q, k, v, n_text, range(state.n_branches), n_frames)
        text_out, image_out = self._split(out, n_text)
        image_out = self._project_image(attn, image_out)
        if state.mode == "keyframe":
            self._keep(image_in, image_out)
        return self._finish(attn, text_out, image_out, project_image=False)

    def _project_image(self, attn, image_out: torch.Tensor) -> torch.Tensor:
        to_out = getattr(attn, "to_out", None)
        if to_out is None:  # FLUX single-stream blocks project after the MLP, outside attention
            return image_out
        return to_out[1](to_out[0](image_out))

    def _finish(self, attn, text_out, image_out, project_image: bool):
        if project_image:
            image_out = self._project_image(attn, image_out)
        if self.role == "single":
            return torch.cat([text_out, image_out], dim=1)
        if text_out is None:
            return image_out
        if getattr(attn, "to_add_out", None) is not None and not getattr(attn, "context_pre_only", False):
            text_out = attn.to_add_out(text_out)
        return image_out, text_out

    def _keep(self, image_in: torch.Tensor, image_out: torch.Tensor) -> None:
        """Keyframe pass: the source image tokens and every branch's image outputs of this layer."""
        state = self.state
        branch = state.keyframe_branch
        n_frames = len(image_out) if branch is not None else len(image_out) // state.n_branches
        device = state.cache_device or image_out.device

        def keep(x: torch.Tensor) -> torch.Tensor:
            return x.detach().to(device, copy=True)

        if branch is None:
            state.caches.layers[self.name] = LayerCache(
                source_tokens=keep(image_in[:n_frames]),
                outputs=keep(image_out.reshape(state.n_branches, n_frames, *image_out.shape[1:])))
            return
        if branch == 0:
            outputs = torch.empty((state.n_branches, n_frames, *image_out.shape[1:]), dtype=image_out.dtype,
                                  device=device)
            state.caches.layers[self.name] = LayerCache(source_tokens=keep(image_in), outputs=outputs)
        state.caches.layers[self.name].outputs[branch].copy_(image_out)


@contextlib.contextmanager
def joint_tokenflow_hooks(transformer: torch.nn.Module, state: TokenFlowState, layers,
                          text_first: bool) -> Iterator[None]:
    """Install the processor on ``layers`` (:class:`families.base.AttentionLayer`) for the block; the
    original processors are put back on exit, leaving the transformer as it was."""
    original = transformer.attn_processors
    processors = dict(original)
    for layer in layers:
        processors[f"{layer.name}.processor"] = JointTokenFlowProcessor(layer.name, state, layer.role, text_first)
    transformer.set_attn_processor(processors)
    try:
        yield
    finally:
        transformer.set_attn_processor(original)
        state.end_step()
        if state.cache_device is not None:
            release_host_cache()
