"""On-disk cache of inversions, so a video is inverted once for any number of edits.

An entry is a folder named by its key: ``latents.safetensors`` (``x0`` and ``t0981``-style
tensors) and ``manifest.json`` (the key's fields, shapes, and the sha256 of the tensor
file). The key hashes everything the inverted latents depend on: the fitted frames, the
model identity, the size, the inversion steps and prompt, the timesteps kept, the scheduler
config and the dtype. Files are written under temporary names and renamed, the manifest
last; an entry whose manifest does not match or whose tensors fail to load is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .errors import shown
from .stored import EntryWriter, StoredInversion, tensor_name

if TYPE_CHECKING:  # torch is imported by the readers and writers, not by `tokenflow cache list`
    import torch

    from .inversion import Inversion

logger = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: the frames' hash takes their shape last; one file per timestep


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "tokenflow", "inversions")


class FramesHash:
    """The cache key's hash of fitted frames, fed a batch at a time (float (B, 3, H, W) in [0, 1], quantised
    to 8 bits so it is exact): the frames in order, then their shape, so a stream can be hashed as it is
    read and gives the hash of the whole tensor."""

    def __init__(self):
        self._hash = hashlib.sha256()
        self._rows, self._frame = 0, None

    def update(self, frames: "torch.Tensor") -> None:
        import torch

        q = (frames.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
        self._hash.update(q.numpy().tobytes())
        self._rows, self._frame = self._rows + len(q), tuple(q.shape[1:])

    def hexdigest(self) -> str:
        h = self._hash.copy()
        h.update(str((self._rows, *(self._frame or ()))).encode())
        return h.hexdigest()


def frames_digest(frames) -> str:
    """sha256 of the fitted frames (N, 3, H, W): a tensor's, or the one a
    :class:`~tokenflow.inputs.FrameStream` computed as it was first read (the same for the same frames)."""
    if hasattr(frames, "digest"):
        return frames.digest
    digest = FramesHash()
    for i in range(0, len(frames), 64):
        digest.update(frames[i:i + 64])
    if not len(frames):
        digest.update(frames)
    return digest.hexdigest()


def content_key(fields: dict[str, Any]) -> str:
    """The one hash of the project's content keys (inversion cache entries, resume checkpoints):
    everything a result depends on, as sorted JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def bytes_digest(data: bytes) -> str:
    """sha256 of raw bytes (a generator's state, a schedule file) for a content key."""
    return hashlib.sha256(data).hexdigest()


def inversion_key(**fields: Any) -> tuple[str, dict[str, Any]]:
    fields = {"format": FORMAT_VERSION, **fields}
    return content_key(fields), fields


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# what a manifest holds, and of which JSON type: anything else makes the entry unusable
MANIFEST_TYPES = {"fields": dict, "files": dict, "timesteps": list, "final_timestep": int, "shape": list}


def read_manifest(folder: str) -> dict[str, Any]:
    """An entry's manifest, checked for shape; ``ValueError`` saying what is wrong when it is malformed
    (a list where a mapping belongs, a shape of three numbers...), ``OSError`` when it cannot be read.
    Every reader of the cache goes through here, so none of them trips over a damaged entry."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict):
        raise ValueError(f"the manifest is a {type(manifest).__name__}, not a mapping")
    if "files" not in manifest and isinstance(manifest.get("sha256"), str):
        raise OldFormat("an entry of an earlier format (one file of every timestep), never read again")
    for key, kind in MANIFEST_TYPES.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"manifest field '{key}' is {type(value).__name__}, not {kind.__name__}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in manifest["timesteps"]):
        raise ValueError("manifest field 'timesteps' holds something other than whole numbers")
    if not all(isinstance(d, str) for d in manifest["files"].values()):
        raise ValueError("manifest field 'files' holds something other than checksums")
    shape = manifest["shape"]
    if len(shape) != 4 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"manifest field 'shape' is {shown(shape)}, not four sizes (N, C, h, w)")
    return manifest


class OldFormat(ValueError):
    """An entry an earlier version wrote: its key can no longer be asked for."""


class InversionCache:
    def __init__(self, root: Optional[str] = None):
        self.root = os.fspath(root) if root else default_cache_dir()

    def entry(self, key: str) -> str:
        return os.path.join(self.root, key)

    def load(self, key: str, fields: dict[str, Any]) -> Optional["StoredInversion"]:
        """The cached inversion, read by rows when used; None when missing, mismatched or unreadable.
        Every file is checked against its checksum first, a megabyte at a time (nothing is held)."""
        folder = self.entry(key)
        if not os.path.exists(os.path.join(folder, "manifest.json")):
            return None
        try:
            manifest = read_manifest(folder)
            if json.loads(json.dumps(fields, default=str)) != manifest.get("fields"):
                raise ValueError("manifest fields differ from the key")
            names = [tensor_name(t) for t in [None, *manifest["timesteps"]]]
            if int(manifest["final_timestep"]) not in manifest["timesteps"] or sorted(names) != sorted(manifest["files"]):
                raise ValueError("the files or timesteps do not match the manifest")
            for name in names:
                if _sha256_file(os.path.join(folder, name + ".safetensors")) != manifest["files"][name]:
                    raise ValueError(f"{name}.safetensors does not match its manifest")
            stored = StoredInversion(folder, manifest, key)
            if any(r.shape != manifest["shape"] for r in stored.readers.values()):
                raise ValueError("tensor shapes do not match the manifest")
        except Exception as e:
            logger.warning("inversion cache entry %s is unusable (%s); recomputing", key, e)
            return None
        return stored

    def writer(self, key: str, fields: dict[str, Any], shape, timesteps: list[int], final_timestep: int,
               label: Optional[dict[str, str]] = None, keep: bool = True) -> EntryWriter:
        """A new entry, written while the inversion runs (see :class:`EntryWriter`; ``keep``: its fallback to
        memory on a failed write). ``label`` (``input``:
        the video's path, ``model_name``: the model as the user named it; see
        :meth:`tokenflow.common.PipelineCommon.cache_label`) is for ``tokenflow cache list`` only, not part of
        the key: the same frames from another file, or the same weights by another name, are the same
        inversion."""
        return EntryWriter(self.entry(key), key, fields, list(shape), timesteps, final_timestep, label, keep)

    def save_gathered(self, key: str, fields: dict[str, Any], part: "Inversion", group,
                      label: Optional[dict] = None) -> None:
        """Every rank's share of an inversion (``part``: this rank's, in rank order) written as one entry by
        rank 0 of ``group`` (a :class:`~tokenflow.distributed.Group`): a timestep at a time, so rank 0 holds
        one timestep of the whole video, not the inversion. Every rank calls it (the gathers are collective)."""
        counts = [c[0] for c in group.all_ints([part.n_frames])]
        writer = None
        if group.is_main:
            writer = self.writer(key, fields, [sum(counts), *part.shape[1:]], sorted(part.latents),
                                 part.final_timestep, label, keep=False)
        for t in sorted(part.latents):
            rows = group.gather_rows(part.latents[t], counts)
            if writer is not None:
                writer.rows(0, len(rows), {t: rows})
        x0 = group.gather_rows(part.x0, counts)
        if writer is not None:
            writer.finish(x0)

    def load_agreed(self, key: str, fields: dict[str, Any], group) -> Optional[Inversion]:
        """The entry when every rank of ``group`` finds it (one rank's miss makes every rank recompute,
        so that the ranks' collectives stay in step); None otherwise."""
        cached = self.load(key, fields)
        if not group.agree(cached is not None):
            return None
        logger.info("inversion cache hit: %s", self.entry(key))
        cached.key = key
        return cached

@dataclass
class CacheEntry:
    """One thing in the cache folder: an inversion, or a resume checkpoint."""

    kind: str  # "inversion", "edit checkpoint" or "inversion checkpoint"
    key: str
    path: str
    bytes: int
    modified: float  # seconds since the epoch
    frames: Optional[int] = None
    size: Optional[tuple[int, int]] = None  # (H, W) of the frames
    model: str = ""
    prompt: str = ""
    input: str = ""  # the video's path when the entry was written ("" for entries from before it was recorded)


def _bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _modified(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getmtime(path)
    times = [os.path.getmtime(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files]
    return max(times, default=os.path.getmtime(path))


def list_entries(root: Optional[str] = None) -> list[CacheEntry]:
    """The inversions and checkpoints under ``root`` (default: the user's cache), newest first."""
    root = os.fspath(root) if root else default_cache_dir()
    entries: list[CacheEntry] = []
    if not os.path.isdir(root):
        return entries
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name == "checkpoints" and os.path.isdir(path):
            for item in sorted(os.listdir(path)):
                kind, _, key = item.partition("-")
                if kind in ("edit", "inversion") and key:
                    sub = os.path.join(path, item)
                    entry = CacheEntry(f"{kind} checkpoint", key.split(".")[0], sub, _bytes(sub), _modified(sub))
                    label = _checkpoint_label(sub)
                    entry.input, entry.model = label.get("input", ""), label.get("model_name", "")
                    entries.append(entry)
            continue
        if not os.path.isdir(path) or name.startswith("."):
            continue
        entries.append(_inversion_entry(name, path))
    return sorted(entries, key=lambda e: e.modified, reverse=True)


def _checkpoint_label(path: str) -> dict[str, str]:
    """The label a checkpoint was written with (its video, its model), read from the safetensors header of
    the file or of the first file in the folder: no tensors are read. {} when there is none (checkpoints
    from before labels were written) or it cannot be read."""
    try:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            if not names:
                return {}
            path = os.path.join(path, names[0])
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 1 << 24:  # a header is a few KB; anything else is not one
                return {}
            header = json.loads(f.read(size))
        label = json.loads(header.get("__metadata__", {}).get("label", "{}"))
    except (OSError, ValueError, AttributeError, TypeError):
        return {}
    return {k: v for k, v in label.items() if isinstance(v, str)} if isinstance(label, dict) else {}


def _inversion_entry(key: str, path: str) -> CacheEntry:
    """An inversion's folder as listed: 'incomplete' without a manifest, 'unusable' with a malformed one,
    'old format' when an earlier version wrote it (``cache clear`` removes those)."""
    entry = CacheEntry("inversion", key, path, _bytes(path), _modified(path))
    try:
        manifest = read_manifest(path)
    except OSError:
        entry.kind = "inversion (incomplete)"
        return entry
    except OldFormat:
        entry.kind = "inversion (old format)"
        return entry
    except ValueError:  # JSON that does not parse, or fields of the wrong shape
        entry.kind = "inversion (unusable)"
        return entry
    n, _, h, w = manifest["shape"]
    entry.frames, entry.size = n, (h * 8, w * 8)
    label = manifest.get("model_name")
    entry.model = label if isinstance(label, str) and label else readable_model(manifest["fields"].get("model", ""))
    entry.prompt = str(manifest["fields"].get("inversion_prompt", ""))
    source = manifest.get("input")
    entry.input = source if isinstance(source, str) else ""
    return entry


def readable_model(model_id: Any) -> str:
    """A model identity (``hub:ID``, ``file:NAME:SIZE:MTIME``, ``folder:HASH``, ``weights:HASH``) as a name to
    show, for entries written before the manifest recorded the name: the hub id, the file's name; a folder or
    in-memory weights only have their hash."""
    text = str(model_id or "")
    kind, _, rest = text.partition(":")
    if kind == "hub" and rest:
        return rest
    if kind == "file" and rest:
        return rest.rsplit(":", 2)[0] if rest.count(":") >= 2 else rest
    return text


def remove_entry(entry: CacheEntry) -> None:
    """Remove an entry: renamed out of the way first, so nothing ever reads half of one."""
    import shutil

    doomed = os.path.join(os.path.dirname(entry.path), f".removing-{os.getpid()}-{os.path.basename(entry.path)}")
    os.rename(entry.path, doomed)
    if os.path.isdir(doomed):
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        os.remove(doomed)
