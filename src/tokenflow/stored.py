"""An inversion in its cache entry: written while the inversion runs (:class:`EntryWriter`), read back by rows
when used (:class:`StoredInversion`). One safetensors file per kept timestep (``t0981.safetensors``) and one
for the clean latents (``x0.safetensors``), each one float32 tensor (N, C, h, w); the manifest lists every
file's sha256 (see :mod:`tokenflow.cache`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

from .atomic import atomic_path
from .tensorfiles import RowFile, RowReader

if TYPE_CHECKING:
    import torch

    from .inversion import Inversion

logger = logging.getLogger("tokenflow.cache")


def tensor_name(t: Optional[int]) -> str:
    """The file of the clean latents (None) or of timestep ``t``'s, in an entry's folder."""
    return "x0" if t is None else f"t{int(t):04d}"


class EntryWriter:
    """An inversion written into its cache entry while it is computed, the sink of
    :func:`tokenflow.inversion.ddim_invert`: one safetensors file per timestep (and ``x0``), each batch's
    rows appended in frame order and hashed as written. :meth:`finish` renames the files into place and
    writes the manifest last, and returns a :class:`StoredInversion` that reads them back by rows. A write
    that fails (a full disk) is a warning, not a failed edit, and leaves no file of the entry behind: with
    ``keep`` the rows written so far are read back and the inversion goes on in memory (uncached); without,
    the writer only stops writing (it is a copy of an inversion held elsewhere)."""

    def __init__(self, folder: str, key: str, fields: dict[str, Any], shape: list[int],
                 timesteps: list[int], final_timestep: int, label: Optional[dict] = None, keep: bool = True):
        self.key, self.fields, self.label, self.keep = key, fields, label, keep
        self.shape, self.timesteps, self.final_timestep = list(shape), sorted(timesteps), final_timestep
        self.folder = folder
        self.files: dict[str, RowFile] = {}
        self.failed = False
        self.memory: Optional[dict[int, "torch.Tensor"]] = None  # the rows, once a write failed (with keep)
        try:
            os.makedirs(self.folder, exist_ok=True)
            _remove_quietly(os.path.join(self.folder, "manifest.json"))  # never describes half-written files
            for t in self.timesteps:
                self.files[tensor_name(t)] = RowFile(os.path.join(self.folder, tensor_name(t) + ".safetensors"),
                                                      self.shape)
        except OSError as e:
            self._failed(e)

    def _failed(self, error: BaseException) -> None:
        import torch

        logger.warning("could not write the inversion cache at %s (%s); %s", self.folder,
                       getattr(error, "strerror", None) or error,
                       "the inversion is kept in memory and not cached" if self.keep else "it is not cached")
        self.failed = True
        if self.keep:  # what was written is read back; the rows still to come go straight to memory
            self.memory = {}
            for t in self.timesteps:
                part, whole = self.files.get(tensor_name(t)), torch.empty(self.shape)
                if part is not None and part.rows:
                    whole[:part.rows] = part.written()
                self.memory[t] = whole
        self.discard()

    def rows(self, first: int, end: int, rows: dict[int, "torch.Tensor"]) -> None:
        """Frames ``first..end`` at the timesteps of ``rows`` (each timestep's rows come in frame order)."""
        if not self.failed:
            try:
                for t, part in rows.items():
                    self.files[tensor_name(t)].append(first, part)
                return
            except OSError as e:
                self._failed(e)
        if self.memory is not None:
            for t, part in rows.items():
                self.memory[t][first:end] = part

    def finish(self, x0: "torch.Tensor") -> Optional["Inversion"]:
        """The whole inversion: in its entry (renamed into place, manifest last), or in memory (None without
        ``keep`` once a write failed)."""
        from .errors import TokenFlowError
        from .inversion import Inversion

        if not self.failed:
            try:
                manifest = self._commit(x0)
            except (OSError, TokenFlowError) as e:  # atomic_path reports a failed write as a TokenFlowError
                self._failed(e)
            else:
                return StoredInversion(self.folder, manifest, self.key)
        if self.memory is None:
            return None
        return Inversion(x0.detach().float().cpu(), self.memory, self.final_timestep, self.key)

    def _commit(self, x0: "torch.Tensor") -> dict[str, Any]:
        from .atomic import _mode_from_umask

        missing = {name: part.rows for name, part in self.files.items() if part.rows != self.shape[0]}
        if missing:
            raise RuntimeError(f"the inversion left rows of {sorted(missing)} unwritten: {missing}")
        self.files["x0"] = RowFile(os.path.join(self.folder, "x0.safetensors"), self.shape)
        self.files["x0"].append(0, x0)
        for part in self.files.values():
            part.close()
            os.chmod(part.current, _mode_from_umask(0o666))
            os.replace(part.current, part.path)
            part.current = part.path
        manifest = {"fields": json.loads(json.dumps(self.fields, default=str)),
                    "files": {name: part.hash.hexdigest() for name, part in sorted(self.files.items())},
                    "timesteps": self.timesteps, "final_timestep": self.final_timestep, "shape": self.shape}
        manifest.update({k: str(v) for k, v in (self.label or {}).items() if k in ("input", "model_name") and v})
        with atomic_path(os.path.join(self.folder, "manifest.json")) as tmp, open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        self.files = {}  # the entry is complete: nothing of it is discarded from here
        return manifest

    def discard(self) -> None:
        """Remove what was written (an interrupted or failed inversion, or a commit that failed midway, whose
        files have no manifest): no half entry is left."""
        for part in self.files.values():
            part.discard()
        self.files = {}


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class _StoredLatents(Mapping):
    """t -> the latents of a :class:`StoredInversion`'s frames at t, read from disk at every access."""

    def __init__(self, inversion: "StoredInversion"):
        self.inversion = inversion

    def __getitem__(self, t: int) -> "torch.Tensor":
        if int(t) not in self.inversion.readers:
            raise KeyError(t)
        return self.inversion.readers[int(t)].read(self.inversion.frames)

    def __contains__(self, t) -> bool:
        return isinstance(t, int) and t in self.inversion.readers

    def __iter__(self):
        return iter(sorted(t for t in self.inversion.readers if t is not None))

    def __len__(self) -> int:
        return len(self.inversion.readers) - 1


class StoredInversion:
    """An inversion in its cache entry, read when used, never held: ``latents[t]`` reads timestep t's rows
    of these frames (one seek, one read), ``x0`` the clean latents' rows; :meth:`rows` is a view of part of
    the frames (a rank's share) that reads only those rows. ``bytes_read`` counts what every view of the
    entry has read, ``largest_read`` the most one read took."""

    def __init__(self, folder: str, manifest: dict[str, Any], key: Optional[str] = None,
                 frames: Optional[range] = None, counter: Optional[list] = None):
        self.folder, self.manifest, self.key = folder, manifest, key
        self.final_timestep = int(manifest["final_timestep"])
        self.frames = range(manifest["shape"][0]) if frames is None else frames
        self.counter = counter if counter is not None else [0, 0]  # bytes read in all, in the largest read
        self.readers = {t: RowReader(os.path.join(folder, tensor_name(t) + ".safetensors"), self.counter)
                        for t in [None, *manifest["timesteps"]]}
        self.latents = _StoredLatents(self)

    @property
    def bytes_read(self) -> int:
        return self.counter[0]

    @property
    def largest_read(self) -> int:
        return self.counter[1]

    @property
    def x0(self) -> "torch.Tensor":
        return self.readers[None].read(self.frames)

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    @property
    def shape(self) -> "torch.Size":
        import torch

        return torch.Size((self.n_frames, *self.manifest["shape"][1:]))

    @property
    def final(self) -> "torch.Tensor":
        return self.latents[self.final_timestep]

    def rows(self, frames: range) -> "StoredInversion":
        if frames == range(self.n_frames):
            return self
        part = StoredInversion.__new__(StoredInversion)
        part.__dict__.update(self.__dict__)
        part.frames = self.frames[frames.start:frames.stop]
        part.latents = _StoredLatents(part)
        return part

    def __repr__(self) -> str:
        return f"StoredInversion({self.folder!r}, frames {self.frames.start}..{self.frames.stop})"
