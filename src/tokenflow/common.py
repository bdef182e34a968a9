"""What every pipeline shares, whatever the model family: taking a video in, modules on the device
for their stage only (offload), and the ranks one edit is split across."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional

import torch

from .distributed import Group
from .inputs import VideoInputs


class PipelineCommon(VideoInputs):
    """Needs ``_device`` (where the compute runs), ``offload`` (bool) and ``group`` (a :class:`Group`)."""

    _device: torch.device
    offload: bool = False
    group: Group

    def __call__(self, video, prompt: Optional[str] = None, **kwargs: Any):
        """``pipe(video, prompt=...)``, as a diffusers pipeline is called: :meth:`edit`."""
        return self.edit(video, prompt, **kwargs)

    def to(self, device: Any = None, dtype: Any = None):
        """diffusers' ``pipe.to(device)``: the compute (and the models, unless offloaded) on ``device``.
        The dtype is chosen when loading (``from_pretrained(..., torch_dtype=...)``)."""
        from .errors import TokenFlowError
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
