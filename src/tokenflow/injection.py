"""Install TokenFlow into a UNet, and take it out again, through public extension points.

- every self-attention layer gets a :class:`TokenFlowAttnProcessor` (``set_attn_processor``
  keyed by module name), all sharing one :class:`TokenFlowState`;
- Plug-and-Play's residual-feature injection is a forward hook on one decoder ``conv2``.

:func:`tokenflow_hooks` is a context manager: on exit the original processors are put back
and the hook removed, so the same UNet computes exactly what it computed before.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch

from .attention import TokenFlowAttnProcessor, TokenFlowState, release_host_cache

_SELF_ATTN = re.compile(r"^(.*\.transformer_blocks\.\d+\.attn1)\.processor$")
_DECODER = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.")


@dataclass(frozen=True)
class InjectionLayers:
    """Where Plug-and-Play injects, resolved from module names by role."""

    self_attention: tuple[str, ...]  # every attn1, in module order
    qk: tuple[str, ...]  # decoder self-attention layers that take the source's Q/K
    feature: str  # the conv2 whose output takes the source's features


def resolve_layers(unet: torch.nn.Module) -> InjectionLayers:
    """Select layers by role from the UNet's module names; fail loudly if one is missing.

    Roles, not indices: the decoder's attention blocks (``up_blocks.*.attentions.*``, each a
    stack of one or more transformer layers), from the lowest resolution up.

    - Q/K injection: the self-attention of every decoder attention block except the first
      one. For SD 1.x/2.x (one layer per block) these are PnP's and TokenFlow's "decoder
      blocks 4-11": ``up_blocks.1.attentions.1-2``, ``up_blocks.2.attentions.0-2``,
      ``up_blocks.3.attentions.0-2``. For SDXL (no attention at the highest resolution;
      10 layers per block at 1/32, 2 at 1/16) the same rule gives ``up_blocks.0.attentions.1-2``
      and ``up_blocks.1.attentions.0-2`` with all their layers: the same resolutions relative
      to the image (1/32 to 1/8 of it) and the same position in the decoder, skipping the
      first block whose layout is still close to the noisy encoder output.
    - Feature injection: the second resnet of the first decoder block that has attention
      (``up_blocks.1.resnets.1`` in SD 1.x/2.x, ``up_blocks.0.resnets.1`` in SDXL): in both
      the first 1/32-resolution decoder features after a full residual block, PnP's layer 4.
    """
    names = [m.group(1) for key in unet.attn_processors if (m := _SELF_ATTN.match(key))]
    if not names:
        raise ValueError("the UNet has no transformer self-attention layers (attn1) for TokenFlow")
    decoder = [n for n in names if _DECODER.match(n)]
    blocks = list(dict.fromkeys(_DECODER.match(n).group(0) for n in decoder))  # attention blocks, in order
    if len(blocks) < 2:
        raise ValueError("the UNet has fewer than two decoder attention blocks; "
                         "Plug-and-Play injection needs the decoder's attention blocks")
    first_block = int(_DECODER.match(decoder[0]).group(1))
    qk = tuple(n for n in decoder if not n.startswith(blocks[0]))
    feature = f"up_blocks.{first_block}.resnets.1.conv2"
    modules = dict(unet.named_modules())
    if feature not in modules:
        raise ValueError(f"the UNet has no module '{feature}' for Plug-and-Play feature injection")
    return InjectionLayers(tuple(names), qk, feature)


def _feature_hook(state: TokenFlowState):
    def hook(module, args, output: torch.Tensor) -> torch.Tensor:
        if not state.feature_injection:
            return output
        if state.mode == "keyframe" and state.keyframe_branch is not None:
            # split keyframe pass: the source call keeps its features, the edit calls take them
            if state.keyframe_branch == 0:
                state.caches.features = output
                return output
            return state.caches.features
        # (B*F, C, h, w): every branch takes the source branch's features, before the skip
        n = output.shape[0] // state.n_branches
        return output[:n].repeat(state.n_branches, 1, 1, 1)

    return hook


@contextlib.contextmanager
def tokenflow_hooks(unet: torch.nn.Module, state: TokenFlowState,
                    layers: InjectionLayers | None = None) -> Iterator[InjectionLayers]:
    """Install TokenFlow's processors and PnP's feature hook for the duration of the block."""
    layers = layers or resolve_layers(unet)
    original = unet.attn_processors  # name -> processor, for every attention layer
    qk = set(layers.qk)
    processors = dict(original)
    for name in layers.self_attention:
        processors[f"{name}.processor"] = TokenFlowAttnProcessor(name, state, inject_qk=name in qk)
    handle = dict(unet.named_modules())[layers.feature].register_forward_hook(_feature_hook(state))
    unet.set_attn_processor(processors)
    try:
        yield layers
    finally:
        handle.remove()
        unet.set_attn_processor(original)
        state.end_step()
        if state.cache_device is not None:
            release_host_cache()
