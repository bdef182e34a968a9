"""What every pipeline shares, whatever the model family: taking a video in, checking an edit's inputs,
modules on the device for their stage only (offload), and the ranks one edit is split across."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Optional, Sequence

import torch

from .config import EditConfig, check_prompts
from .distributed import Group, ShardPlan
from .errors import TokenFlowError
from .inputs import VideoInputs
from .results import OUTPUT_TYPES


class PipelineCommon(VideoInputs):
    """Needs ``_device`` (where the compute runs), ``offload`` (bool) and ``group`` (a :class:`Group`)."""

    _device: torch.device
    offload: bool = False
    group: Group
    # the model as the user named it ("tiny", a hub id, a path): the label of what this pipeline writes to
    # the cache folder (inversions, checkpoints), so that `tokenflow cache list` can name it
    model_name: Optional[str] = None

    def cache_label(self, video: Any = None) -> dict[str, str]:
        """What ``tokenflow cache list`` shows of an entry made from ``video``: its path (when it is one) and
        the model's name. A label only: no key depends on it."""
        label = {}
        if isinstance(video, (str, os.PathLike)):
            label["input"] = os.path.abspath(os.fspath(video))
        if self.model_name:
            label["model_name"] = self.model_name
        return label

    def __call__(self, video, prompt: Optional[str] = None, **kwargs: Any):
        """``pipe(video, prompt=...)``, as a diffusers pipeline is called: :meth:`edit`."""
        return self.edit(video, prompt, **kwargs)

    def to(self, device: Any = None, dtype: Any = None):
        """diffusers' ``pipe.to(device)``: the compute (and the models, unless offloaded) on ``device``.
        The dtype is chosen when loading (``from_pretrained(..., torch_dtype=...)``)."""
        from .models import resolve_device

        if isinstance(device, torch.dtype) or dtype is not None:
            raise TokenFlowError("pipe.to takes a device; choose the dtype when loading: "
                                 "from_pretrained(..., torch_dtype=...)")
        dev = resolve_device(device if device is not None else "auto")
        if not self.offload:
            for m in self._modules():
                torch.nn.Module.to(m, dev)  # not diffusers' .to, which warns about any dtype
        self._device = dev
        self._moved_to(dev)
        return self

    def _modules(self) -> list:
        return []

    def _moved_to(self, device: torch.device) -> None:
        """What else follows the device (embeddings kept on it)."""

    def distribute(self, group: Optional[Group] = None):
        """Split every edit across the ranks of a ``torchrun`` launch (or ``group``): each rank edits and
        decodes its own frames; rank 0 gets the whole result. Every rank must call ``edit`` with the same
        arguments. Results equal one process's up to float rounding."""
        if group is None:
            from .distributed import init_group

            group = init_group(self._device)
        self.group = group
        return self

    def check_inputs(self, config: EditConfig, prompt: Optional[str], prompts: Optional[Sequence[str]],
                     output_type: str, generator: Optional[torch.Generator]) -> tuple[EditConfig, list[str]]:
        """Every setting of an edit, checked before any work: (the settings, the prompts in order).
        The model family's own rules are :meth:`_check`'s."""
        if prompts is not None:
            if isinstance(prompts, str) or not len(prompts) or prompt is not None:
                raise TokenFlowError("prompts must be a non-empty list of prompts (and then no prompt)")
            prompt = prompts[0]
        config = (config.replace(prompt=prompt) if prompt is not None else config).validate()
        prompt_list = [config.prompt] if prompts is None else [config.replace(prompt=p).validate().prompt
                                                                for p in prompts]
        check_prompts(prompt_list, several=prompts is not None)  # the command's rule
        if output_type not in OUTPUT_TYPES:
            raise TokenFlowError(f"unknown output_type {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
        if generator is not None and generator.device.type != "cpu":
            raise TokenFlowError("generator must be a CPU torch.Generator (keyframes and noise are drawn on the CPU)")
        self._check(config, prompt_list)
        return config, prompt_list

    def _check(self, config: EditConfig, prompts: list[str]) -> None:
        """The model family's own checks of an edit's settings (cheap: no model call)."""

    def _gather(self, edited: list[torch.Tensor], trail: Optional[list[torch.Tensor]],
                plan: ShardPlan) -> tuple[list[Optional[torch.Tensor]], Optional[list[torch.Tensor]]]:
        """Every rank's frames of each prompt's edit (and of the latents' trail, (P, n_r, ...) per step) whole
        on rank 0; the other ranks get None. One process: as they are."""
        if not self.group.distributed:
            return edited, trail
        counts = plan.frame_counts()
        edited = [self.group.gather_rows(e, counts) for e in edited]
        if trail is not None:  # (P, n_r, ...) -> (P, N, ...): rows gathered along the frames
            trail = [self.group.gather_rows(v.transpose(0, 1), counts) for v in trail]
            trail = None if trail[0] is None else [v.transpose(0, 1) for v in trail]
        return edited, trail

    @contextlib.contextmanager
    def _on_device(self, *modules: torch.nn.Module):
        """With offload on: these modules on the compute device for the block, back to the CPU after."""
        if not self.offload or self._device.type == "cpu":
            yield
            return
        for m in modules:
            m.to(self._device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")
            if self._device.type == "cuda":
                torch.cuda.empty_cache()


def move_tensors(obj: Any, device: torch.device) -> Any:
    """A tensor, or a dataclass of tensors (prompt embeddings), on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: move_tensors(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj)
                                           if isinstance(getattr(obj, f.name), torch.Tensor)})
    return obj
