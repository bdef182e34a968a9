"""Loading a diffusers model folder into another dtype with the least host memory.

diffusers reads a ``.safetensors`` file through a memory map and converts it tensor by tensor. With
the target dtype equal to the file's, the weights stay memory-mapped (no copy at all). Into another
dtype (a float32 SD 2.1 into bfloat16 on a CPU), every page of the mapping is touched and stays in
the process's resident set until the component is done: the whole float32 file *and* its converted
copy, 5.2 GB for the SD 2.1 UNet where 1.7 GB is kept. Here the tensors are read with plain reads
(the file's pages go to the kernel's page cache, not to the process), a few megabytes at a time,
straight into their converted copies: the peak is the converted weights plus one piece.

Only diffusers models (the UNet, the VAE) of a local folder or a hub snapshot go this way, and only
when their one safetensors file's keys match the model's exactly; anything else (legacy key names,
sharded or pickled weights) is left to diffusers. They are filled after the pipeline has loaded, so
their weights are not resident while transformers loads the text encoder.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
WEIGHTS_NAME = "diffusion_pytorch_model"


def safetensors_header(path: str) -> tuple[dict[str, Any], int]:
    """The header (tensor name -> dtype, shape, data_offsets) and the offset where the data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"'{path}' is not a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2 ** 20:
            raise ValueError(f"'{path}' has an implausible safetensors header ({size} bytes)")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


CHUNK_BYTES = 8 * 2 ** 20  # a tensor converted on the way in is read this much at a time


def read_safetensors(path: str, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, floating ones converted to ``dtype``. Tensors are read one
    at a time, and one to convert in pieces of ``CHUNK_BYTES`` straight into its converted copy: the
    peak is the result plus one piece."""
    header, start = safetensors_header(path)
    out: dict[str, torch.Tensor] = {}
    piece = None  # one buffer for every conversion: no churn of large blocks in the allocator
    with open(path, "rb", buffering=0) as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            stored = SAFETENSORS_DTYPES.get(info["dtype"])
            if stored is None:
                raise ValueError(f"tensor '{name}' has dtype {info['dtype']}, which is not read here")
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            if dtype is None or not stored.is_floating_point or stored == dtype:
                out[name] = _read_into(f, torch.empty(end - begin, dtype=torch.uint8), path, name).view(
                    stored).reshape(info["shape"])
                continue
            size = stored.itemsize
            tensor = torch.empty((end - begin) // size, dtype=dtype)
            step = max(CHUNK_BYTES // size, 1)
            if piece is None:
                piece = torch.empty(step * size, dtype=torch.uint8)
            for i in range(0, len(tensor), step):
                n = min(step, len(tensor) - i)
                tensor[i:i + n] = _read_into(f, piece[:n * size], path, name).view(stored)
            out[name] = tensor.reshape(info["shape"])
    return out


def _read_into(f, buffer: torch.Tensor, path: str, name: str) -> torch.Tensor:
    """Fill a uint8 tensor from the file's position, to its end."""
    view, done = memoryview(buffer.numpy()), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ValueError(f"'{path}' ends inside tensor '{name}'")
        done += n
    return buffer


def _weights_file(folder: str, variant: Optional[str]) -> Optional[str]:
    name = f"{WEIGHTS_NAME}.{variant}.safetensors" if variant else f"{WEIGHTS_NAME}.safetensors"
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) else None


def lean_skeleton(cls, folder: str, dtype: torch.dtype, variant: Optional[str] = None):
    """A weightless (meta-device) model of ``cls`` from ``folder``'s config, to be filled by
    :func:`fill_lean` from the folder's one safetensors file; None where that does not apply (then
    diffusers loads the model as usual)."""
    path = _weights_file(folder, variant)
    if path is None or not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    header, _ = safetensors_header(path)
    stored = {SAFETENSORS_DTYPES.get(i["dtype"]) for i in header.values()}
    floats = {d for d in stored if d is not None and d.is_floating_point}
    if None in stored or floats <= {dtype}:
        return None  # the floats in the target dtype already: diffusers keeps them memory-mapped, which
        # costs nothing; a dtype not read here (float8, ...): diffusers' job
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    state = set(model.state_dict())
    if set(header) != state or any(name not in state for name, _ in model.named_buffers()):
        return None  # other key names (a legacy layout), or buffers the file does not hold: diffusers' job
    model._tokenflow_lean = (path, dtype)
    model.register_to_config(_name_or_path=folder)
    return model


def fill_lean(model) -> None:
    """Read the weights of a :func:`lean_skeleton` model, tensor by tensor, into its dtype."""
    path, dtype = model.__dict__.pop("_tokenflow_lean")
    model.load_state_dict(read_safetensors(path, dtype), strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{os.path.basename(path)} left {left[0]} unset")
    model.eval()


def lean_skeletons(folder: str, dtype: torch.dtype, variant: Optional[str] = None) -> dict[str, Any]:
    """Skeletons of the pipeline's diffusers models that load leaner here, by component name, for
    ``Pipeline.from_pretrained(folder, **them)``; then :func:`fill_lean` each. Filling them after
    the pipeline is loaded keeps their weights off the memory peak of the text encoder's loading."""
    import diffusers

    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return {}
    skeletons = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] != "diffusers":
            continue
        cls = getattr(diffusers, str(spec[1]), None)
        if not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
            continue
        try:
            model = lean_skeleton(cls, os.path.join(folder, name), dtype, variant)
        except Exception as e:  # anything unexpected: diffusers' own loading decides
            logger.debug("lean loading of %s skipped: %s", name, e)
            model = None
        if model is not None:
            skeletons[name] = model
    return skeletons
