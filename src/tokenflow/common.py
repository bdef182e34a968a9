"""What every pipeline shares, whatever the model family: taking a video in, modules on the device
for their stage only (offload), and the ranks one edit is split across."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch

from .distributed import Group
from .inputs import VideoInputs


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
