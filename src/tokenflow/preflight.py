"""Checks that run before any model loads, so a run that cannot finish fails in a second, not
after an hour: outputs that would overwrite an input, names too long for the file system,
disks too full for the result, settings or files that are wrong.

Everything here is cheap: the input is probed (header and first frame), nothing is decoded
in full and no model is touched.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Iterable, Optional

from .config import EditConfig
from .errors import TokenFlowError, human_bytes  # noqa: F401 (human_bytes: public here before)
from .models import check_exists, parse_lora
from .video import Selection, VideoInfo, working_size

logger = logging.getLogger(__name__)

# rough upper bounds of what a run writes, in bytes per output pixel
VIDEO_BYTES_PER_PIXEL = 1.0  # H.264 at crf 18 stays far below (raw yuv420p is 1.5)
PNG_BYTES_PER_PIXEL = 3.0  # PNG never needs much more than raw RGB
MARGIN = 1 << 20


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def same_path(a: str, b: str) -> bool:
    """The same file or folder, through symlinks, relative paths and hard links."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def inside(path: str, folder: str) -> bool:
    """``path`` lies in ``folder`` (or is it)."""
    p, f = _real(path), _real(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def protected_paths(input_path: Optional[str], config_file: Optional[str], config: EditConfig,
                    run: dict) -> list[str]:
    """Every local file or folder a run reads: none of them may be written to."""
    paths = [input_path, config_file, config.keyframe_schedule, config.controlnet, config.depth_model,
             run.model, run.model_config]
    if config.control not in (None, "canny", "depth"):
        paths.append(config.control)
    loras = run.lora or []
    for spec in [loras] if isinstance(loras, str) else loras:
        paths.append(parse_lora(spec)[0])
    return [p for p in paths if p and os.path.exists(os.path.expanduser(p))]


def check_no_overwrite(files: Iterable[str], folder: Optional[str], protected: Iterable[str]) -> None:
    """Refuse an output file that is an input, and a frames folder that is or holds an input
    (or an output file: replacing the folder would take it along)."""
    check_runs_apart([RunPaths("", list(protected), [(f, "output") for f in files if f], folder)])


@dataclass
class RunPaths:
    """What one run (an edit, one job of a batch) reads and writes, to check runs against each other."""

    name: str  # "job 2 (b.mp4)"; "" for a command's only run
    reads: list[str]  # inputs: none may be written
    writes: list[tuple[str, str]]  # (path, what: "output", "settings file", "cache folder")
    frames_dir: Optional[str] = None  # replaced whole when the frames are written

    def who(self, other: "RunPaths", thing: str) -> str:
        """How ``self``'s message names ``other``'s thing: 'the input', 'job 2 (b.mp4)'s input'."""
        return f"the {thing}" if other is self or not other.name else f"{other.name}'s {thing}"


def _identities(path: str) -> list:
    """The real path, and (device, inode) for an existing file: a hard link is the same file."""
    real = _real(path)
    try:
        st = os.stat(real)
        return [real, (st.st_dev, st.st_ino)] if os.path.isfile(real) else [real]
    except OSError:
        return [real]


def _folders_above(path: str) -> list[str]:
    """``path``'s real path and every folder above it."""
    p, out = _real(path), []
    while True:
        out.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            return out
        p = parent


def check_runs_apart(runs: list[RunPaths]) -> None:
    """No run writes over what any run reads, or over what another run writes, before any work.

    Every output (video, settings file, cache folder) against every input and every other run's
    output; every frames folder (replaced whole) against every input, output and other frames
    folder. Paths compare through symlinks, relative paths and hard links. Runs may share a cache folder.
    """
    reads, read_dirs, writes, frames = {}, {}, {}, {}
    for run in runs:
        for p in run.reads:
            for ident in _identities(p):
                reads.setdefault(ident, (run, p))
            if os.path.isdir(p):
                read_dirs.setdefault(_real(p), (run, p))
        for p, what in run.writes:
            for ident in _identities(p):
                writes.setdefault(ident, (run, p, what))
        if run.frames_dir:
            frames.setdefault(_real(run.frames_dir), (run, run.frames_dir))
    for run in runs:
        for out, what in run.writes:
            _check_write(run, out, what, reads, read_dirs, writes)
        for p, kind in [*((p, "input") for p in run.reads), *((p, "output") for p, _ in run.writes)]:
            for folder in _folders_above(p):
                if folder in frames:
                    owner, given = frames[folder]
                    raise TokenFlowError(f"{_prefix(owner)}frames folder '{given}' holds {owner.who(run, kind)} "
                                         f"'{p}', which writing the frames would replace: choose another --frames-dir")
        if run.frames_dir:
            _check_frames_dir(run, frames)


def _prefix(run: RunPaths) -> str:
    return f"{run.name}: " if run.name else ""


def _check_write(run: RunPaths, out: str, what: str, reads: dict, read_dirs: dict, writes: dict) -> None:
    for ident in _identities(out):
        if ident in reads:
            owner, p = reads[ident]
            raise TokenFlowError(f"{_prefix(run)}{what} '{out}' is {run.who(owner, 'input')} '{p}'; writing it "
                                 f"would destroy the input: choose another output name")
        other = writes.get(ident)
        if other and other[0] is not run and not (what == other[2] == "cache folder"):
            raise TokenFlowError(f"{_prefix(run)}{what} '{out}' is also {run.who(other[0], other[2])} '{other[1]}'; "
                                 f"one would overwrite the other: choose other output names")
    for folder in _folders_above(out)[1:]:
        if folder in read_dirs:
            owner, p = read_dirs[folder]
            raise TokenFlowError(f"{_prefix(run)}{what} '{out}' is inside {run.who(owner, 'input folder')} '{p}'; "
                                 f"writing there would change the input: choose another place")


def _check_frames_dir(run: RunPaths, frames: dict) -> None:
    """Two runs' frames folders are neither the same nor one inside the other (each replaces its whole
    folder); a folder that holds another run's is found from that run's side, as the one it lies in."""
    mine = _real(run.frames_dir)
    for folder in _folders_above(mine):
        owner, given = frames.get(folder, (run, None))
        if owner is not run:
            how = "is also" if folder == mine else "lies in"
            raise TokenFlowError(f"{_prefix(run)}frames folder '{run.frames_dir}' {how} {run.who(owner, 'frames folder')} "
                                 f"'{given}'; writing one would replace the other: choose another --frames-dir")


def _free(path: str) -> tuple[int, float]:
    """(device id, free bytes) of the file system that will hold ``path``."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return os.stat(folder).st_dev, shutil.disk_usage(folder).free


def expected_frames(info: VideoInfo, config: EditConfig) -> Optional[int]:
    """How many frames an edit of ``info``'s input will have, from what the input declares."""
    if not info.n_frames:
        return config.max_frames
    select = Selection(config.max_frames, config.start_frame, config.start_time, config.frame_stride)
    n = len(range(select.first(info.fps), info.n_frames, config.frame_stride))
    return min(n, config.max_frames) if config.max_frames else n


def check_free_space(info: VideoInfo, config: EditConfig, output: Optional[str], frames_dir: Optional[str],
                     cache_root: Optional[str], area: int = 512 * 512, latent_channels: int = 4) -> None:
    """Enough free space for the output (an error if not) and for the cache and checkpoints
    (a warning: they are skipped when they cannot be written). A rough bound from the declared
    frame count and the working size; nothing when the container does not say how long it is."""
    n = expected_frames(info, config)
    if not n:
        return
    h, w = working_size(info.size, config.height, config.width, area)
    needs: dict[int, list] = {}
    for path, size in ((output, n * h * w * VIDEO_BYTES_PER_PIXEL),
                       (frames_dir, n * h * w * PNG_BYTES_PER_PIXEL)):
        if path:
            dev, free = _free(path)
            entry = needs.setdefault(dev, [0.0, free, path])
            entry[0] += size + MARGIN
    for need, free, path in needs.values():
        if need > free:
            raise TokenFlowError(f"not enough free space for the output at '{path}': about {human_bytes(need)} "
                                 f"needed, {human_bytes(free)} free")
    if cache_root:
        latent = n * latent_channels * (h // 8) * (w // 8) * 4
        # inversion cache (kept timesteps + x0 + final) + its checkpoints while it runs + the edit's
        need = latent * (2 * (config.steps + 2) + 1)
        dev, free = _free(cache_root)
        if dev in needs:
            free -= needs[dev][0]
        if need > free:
            logger.warning("the inversion cache and resume checkpoints need about %s in '%s' and only %s is "
                           "free: they will be skipped if the disk fills", human_bytes(need), cache_root, human_bytes(free))


def check_local_paths(config: EditConfig, run: dict) -> None:
    """Paths given for models, LoRAs and ControlNets exist (a hub id is looked up later)."""
    check_exists("model", run.model)
    check_exists("model config", run.model_config)
    check_exists("ControlNet", config.controlnet)
    check_exists("depth model", config.depth_model)
    loras = run.lora or []
    for spec in [loras] if isinstance(loras, str) else loras:
        check_exists("LoRA", parse_lora(spec)[0])
    if config.keyframe_schedule and not os.path.isfile(config.keyframe_schedule):
        raise TokenFlowError(f"keyframe schedule '{config.keyframe_schedule}' does not exist")


def check_port(host: str, port: int) -> None:
    """The web page's address can be listened on (not taken by another server)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise TokenFlowError(f"cannot listen on host '{host}': {e.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            s.bind(address)
        except OSError as e:
            raise TokenFlowError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server may use "
                                 f"it; choose another --port)") from None
