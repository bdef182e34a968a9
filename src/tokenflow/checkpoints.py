"""Checkpoints that let a long job resume: a partly done inversion and the editing loop.

They live next to the inversion cache (``<cache root>/checkpoints/``), one safetensors file
each, written atomically (:func:`tokenflow.atomic.atomic_path`) with the sha256 of its
tensors and the key it belongs to in its metadata. A file that does not verify is ignored
and the work redone, never trusted. Keys hash everything the result depends on, so a
checkpoint is only ever picked up by the run that would have produced it.

- ``inversion-<key>/x0`` and ``inversion-<key>/frames-<start>-<end>``: the clean latents and
  each finished batch of frames (all kept timesteps); removed when the inversion is complete.
- ``edit-<key>``: the latents after the last checkpointed step, the keyframe sampler's
  generator state and the keyframes drawn so far; removed once the output is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Callable, Optional

import torch

from .atomic import atomic_path
from .cache import bytes_digest, content_key, default_cache_dir
from .tensorfiles import bytes_of, write_safetensors
from .correspondence import POLICIES
from .distributed import Group
from .keyframes import windowed

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


def checkpoint_root(cache_dir: Optional[str] = None) -> str:
    return os.path.join(os.fspath(cache_dir) if cache_dir else default_cache_dir(), "checkpoints")


def key_of(**fields: Any) -> str:
    return content_key({"format": FORMAT_VERSION, **fields})


def edit_key(kind: str, config, model_id: str, dtype: torch.dtype, device: torch.device,
             generator_state: Optional[torch.Tensor] = None, n_frames: Optional[int] = None, **fields: Any) -> str:
    """The identity of an edit's result, its resume checkpoint's key: every setting (and a keyframe
    schedule file's content), the model and its numerics, a given generator's state, and ``fields``
    (the inversion or the frames, the prompts, the ranks). With ``n_frames``, a keyframe window that does
    not bound this edit (no more keyframes than the window, or no TokenFlow propagation) is keyed as none:
    those runs are the exact pass bit for bit, so a run resumed with another such window finds its checkpoint."""
    settings = config.to_dict()
    if n_frames is not None and not (config.propagation in POLICIES and
                                     windowed(-(-n_frames // config.batch_size), config.keyframe_window)):
        settings["keyframe_window"] = None
    schedule = None
    if config.keyframe_schedule:
        with open(config.keyframe_schedule, "rb") as f:
            schedule = bytes_digest(f.read())
    generator = None if generator_state is None else bytes_digest(generator_state.numpy().tobytes())
    return key_of(kind=kind, config=settings, schedule=schedule, model=model_id, dtype=str(dtype),
                  device=device.type, generator=generator, **fields)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(bytes_of(t))  # the tensor's own memory: no copy of a long video's latents
    return h.hexdigest()


class CheckpointStore:
    """Named checkpoints under one folder; ``save`` is atomic, ``load`` verifies."""

    def __init__(self, root: str):
        self.root = root

    def path(self, name: str) -> str:
        return os.path.join(self.root, name + ".safetensors")

    def save(self, name: str, key: str, tensors: dict[str, torch.Tensor], meta: Optional[dict] = None,
             label: Optional[dict] = None) -> str:
        """``label``: what ``tokenflow cache list`` shows of the checkpoint (the video, the model); not verified,
        never read back by a run."""
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        metadata = {"key": key, "sha256": tensors_digest(tensors), "meta": json.dumps(meta or {})}
        if label:
            metadata["label"] = json.dumps(label)
        with atomic_path(path) as tmp:
            write_safetensors(tmp, tensors, metadata)
        return path

    def load(self, name: str, key: str) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
        """The tensors and meta saved under ``name`` for ``key``; None if absent or not verified."""
        from safetensors import safe_open

        path = self.path(name)
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if metadata.get("key") != key:
                raise ValueError("it belongs to other settings")
            if metadata.get("sha256") != tensors_digest(tensors):
                raise ValueError("its contents do not match their checksum")
            return tensors, json.loads(metadata.get("meta") or "{}")
        except Exception as e:  # a damaged file is redone, never trusted
            logger.warning("ignoring checkpoint %s (%s)", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None

    def remove(self, name: str) -> None:
        """Remove a checkpoint file, or a folder of them."""
        path, folder = self.path(name), os.path.join(self.root, name)
        try:
            for p in (path, folder):
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                elif os.path.lexists(p):
                    os.remove(p)
        except OSError as e:
            logger.warning("could not remove checkpoint %s: %s", path, e.strerror or e)
        try:  # the folder goes with its last checkpoint
            os.rmdir(self.root)
        except OSError:
            pass


class Checkpointer:
    """One job's checkpoints (``inversion-<key>/...``, ``edit-<key>``). Writing one never fails
    the job: a full disk or another OS error warns once and the job goes on without them."""

    def __init__(self, store: CheckpointStore, key: str, label: Optional[dict] = None):
        self.store, self.key, self.disabled = store, key, False
        self.label = label or {}  # the video and model, for `tokenflow cache list`

    def name(self, kind: str, part: Optional[str] = None) -> str:
        return f"{kind}-{self.key}" + (f"/{part}" if part else "")

    def save(self, kind: str, part: Optional[str], tensors: dict[str, torch.Tensor],
             meta: Optional[dict] = None) -> bool:
        if self.disabled:
            return False
        from .errors import TokenFlowError

        try:
            self.store.save(self.name(kind, part), self.key, tensors, meta, self.label)
            return True
        except (OSError, TokenFlowError) as e:
            self.disabled = True
            logger.warning("could not write a checkpoint in %s (%s); going on without: an interruption "
                           "from here on means starting over", self.store.root, e)
            return False

    def load(self, kind: str, part: Optional[str] = None) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
        return self.store.load(self.name(kind, part), self.key)

    def load_tensor(self, kind: str, part: str) -> Optional[torch.Tensor]:
        found = self.load(kind, part)
        return None if found is None else found[0].get(part)

    def save_rows(self, first: int, end: int, rows: dict[int, torch.Tensor]) -> None:
        """A finished batch of an inversion: frames [first, end) at every kept timestep."""
        self.save("inversion", f"frames-{first:06d}-{end:06d}", {f"t{t:04d}": v for t, v in rows.items()})

    def find_rows(self, first: int) -> Optional[tuple[int, dict[int, torch.Tensor]]]:
        """The batch of an inversion that starts at frame ``first``, if an earlier run finished it."""
        folder = os.path.join(self.store.root, self.name("inversion"))
        prefix = f"frames-{first:06d}-"
        try:
            names = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".safetensors"))
        except OSError:
            return None
        for file in names:
            part = file[:-len(".safetensors")]
            found = self.load("inversion", part)
            if found is not None:
                return int(part[len(prefix):]), {int(k[1:]): v for k, v in found[0].items()}
        return None

    def remove(self, kind: str) -> None:
        self.store.remove(self.name(kind))


class EditCheckpoints:
    """The editing loop's checkpoint: the latents after a step, the sampler's generator and the
    keyframes drawn. Saved every few steps, as often as keeps its cost under 2% of the steps'."""

    OVERHEAD = 0.02

    def __init__(self, checkpointer: Checkpointer, sampler, group: Optional[Group] = None,
                 extra: Optional[Callable[[], dict[str, torch.Tensor]]] = None):
        self.checkpointer, self.sampler = checkpointer, sampler
        self.extra = extra  # more state to keep (e.g. a noise generator's): tensors by name, given back by restore
        self.group = group or Group()  # across ranks: every rank saves at the same steps, resumes from the same
        self.every, self.since = 1, 0
        self.restored: dict[str, torch.Tensor] = {}  # the tensors of the checkpoint resumed from

    def restore(self, total: int) -> Optional[tuple[torch.Tensor, list[list[int]]]]:
        found = self.checkpointer.load("edit")
        keyframe_log = found[1].get("keyframes", []) if found is not None else []
        if found is not None and (found[1].get("total") != total or not 0 < len(keyframe_log) <= total):
            found, keyframe_log = None, []
        done = {v[0] for v in self.group.all_ints([len(keyframe_log)])}
        if len(done) > 1:  # e.g. one rank's disk filled up: the ranks must start from the same step
            logger.warning("the ranks' edit checkpoints are of different steps (%s); starting over",
                           sorted(done))
            return None
        if found is None:
            return None
        tensors = found[0]
        if "generator" in tensors and hasattr(self.sampler, "set_state"):
            self.sampler.set_state(tensors["generator"])
        logger.info("resuming the edit after step %d of %d", len(keyframe_log), total)
        self.restored = tensors
        return tensors["x"], keyframe_log

    def after_step(self, x: torch.Tensor, keyframe_log: list[list[int]], total: int, step_seconds: float) -> None:
        self.since += 1
        if self.since < self.every and len(keyframe_log) < total:
            return
        started = time.perf_counter()
        tensors = {"x": x}
        if hasattr(self.sampler, "get_state"):
            tensors["generator"] = self.sampler.get_state()
        if self.extra is not None:
            tensors.update(self.extra())
        self.checkpointer.save("edit", None, tensors, {"keyframes": keyframe_log, "total": total})
        cost = time.perf_counter() - started
        self.since = 0
        every = max(1, math.ceil(cost / (self.OVERHEAD * max(step_seconds, 1e-9))))
        self.every = max(v[0] for v in self.group.all_ints([every]))  # the same interval on every rank

    def handle(self) -> tuple[CheckpointStore, str]:
        return self.checkpointer.store, self.checkpointer.name("edit")
