"""safetensors files written and read without whole copies: a tensor's bytes straight from its memory, a
file of one tensor appended to a batch of rows at a time, and rows of it read back with one seek. The files
are the format ``safetensors`` reads (an 8-byte header length, a JSON header, the data), so any of its tools
open them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

TENSOR = "latents"  # the one tensor of each file of an entry


_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32",
          "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def safetensors_header(tensors: dict[str, tuple[str, list[int], int]], metadata: Optional[dict[str, str]] = None
                       ) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file whose tensors (name -> (dtype code,
    shape, bytes)) follow in name order; padded to 8 bytes as the format asks."""
    header, offset = {}, 0
    for name in sorted(tensors):
        code, shape, nbytes = tensors[name]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def bytes_of(tensor: "torch.Tensor") -> memoryview:
    """A CPU tensor's bytes without a copy (a contiguous one's own memory)."""
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy() if flat.numel() else b"").cast("B")


def write_safetensors(path: str, tensors: dict[str, "torch.Tensor"], metadata: Optional[dict[str, str]] = None
                      ) -> None:
    """A safetensors file (read by ``safetensors.safe_open`` as any other) written a tensor at a time from the
    tensors' own memory: no serialised copy of them all, which for a long video's latents is as big again."""
    entries = {name: (_CODES[str(t.dtype).replace("torch.", "")], list(t.shape), t.numel() * t.element_size())
               for name, t in tensors.items()}
    with open(path, "wb") as f:
        f.write(safetensors_header(entries, metadata))
        for name in sorted(tensors):
            f.write(bytes_of(tensors[name]))


def rows_header(shape: list[int]) -> bytes:
    """The header of an entry's file: one float32 tensor ``latents`` of ``shape``."""
    return safetensors_header({TENSOR: ("F32", shape, 4 * math.prod(shape))})


class RowFile:
    """One tensor's file being written: a safetensors header, then rows appended in order, hashed as they go
    (unbuffered: a row counted as written is in the file)."""

    def __init__(self, path: str, shape: list[int]):
        from .atomic import _tmp_name, clean_stale

        clean_stale(path, ".safetensors")
        self.path, self.shape, self.rows = path, list(shape), 0
        self.current = _tmp_name(path, ".safetensors")  # where the file is: its temporary name until renamed
        self.file = open(self.current, "xb", buffering=0)
        self.hash = hashlib.sha256()
        try:
            self.start = self._write(rows_header(self.shape))
        except BaseException:
            self.discard()
            raise

    def _write(self, data) -> int:
        view, done = memoryview(data), 0
        while done < len(view):
            done += self.file.write(view[done:])
        self.hash.update(view)
        return done

    def append(self, first: int, rows: "torch.Tensor") -> None:
        if first != self.rows or list(rows.shape[1:]) != self.shape[1:] or first + len(rows) > self.shape[0]:
            raise ValueError(f"rows {first}..{first + len(rows)} of {self.path} out of order ({self.rows} written)")
        self._write(bytes_of(rows.float()))
        self.rows += len(rows)

    def written(self) -> "torch.Tensor":
        """The rows written so far, read back."""
        import torch

        out = torch.empty(self.rows, *self.shape[1:])
        with open(self.current, "rb") as f:
            f.seek(self.start)
            f.readinto(memoryview(out.numpy()).cast("B"))
        return out

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(OSError):
            os.remove(self.current)


class RowReader:
    """Rows of one tensor file of an entry, read with one seek and one read per range. The file stays open:
    the reads are of the file that was checked, whatever happens to its name meanwhile (a ``cache clear``,
    another run writing the same entry)."""

    def __init__(self, path: str, counter: list):
        self.path, self.counter = path, counter
        self.file = f = open(path, "rb")
        try:
            size = int.from_bytes(f.read(8), "little")
            info = json.loads(f.read(size))[TENSOR]
        except BaseException:
            f.close()
            raise
        if info["dtype"] != "F32":
            raise ValueError(f"{path} holds {info['dtype']}, not float32")
        self.shape, self.offset = info["shape"], 8 + size + info["data_offsets"][0]
        self.row_bytes = 4 * math.prod(self.shape[1:])

    def read(self, frames: range) -> "torch.Tensor":
        import torch

        out = torch.empty(len(frames), *self.shape[1:])
        self.file.seek(self.offset + frames.start * self.row_bytes)
        got = self.file.readinto(memoryview(out.numpy()).cast("B"))
        if got != len(frames) * self.row_bytes:
            raise ValueError(f"{self.path} ends early")
        self.counter[0] += got
        self.counter[1] = max(self.counter[1], got)
        return out
