"""One edit split across ranks: the sharding plan and the few collectives it needs.

TokenFlow couples frames in two places only, which is what makes it split well:

- the keyframe pass: every keyframe attends to the keys/values of all keyframes (extended
  attention). Each rank runs the UNet on its own keyframes; in every self-attention layer the
  edit branches' keys and values (and, under Plug-and-Play, the source's keys) are all-gathered,
  so each keyframe attends to the same sequence as on one device;
- the propagation pass: a batch of frames reads the caches of its own keyframe and a
  neighbouring one (``original``: the previous; ``paper``: previous and next). A rank owns a
  contiguous run of whole batches, so only the keyframes at the edges of its run come from a
  neighbour, sent point to point.

Everything else (VAE, inversion, the propagation batches, the DDIM step) is per frame and runs on
the rank that owns the frame. Keyframe ``b`` lies in batch ``b``: keyframe indices are batch indices.

World size 1 is the same code: a :class:`Group` of one rank makes no collective call, the plan
gives it every batch, and the gather functions return their input.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import TokenFlowError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this ends the run (a dead or stuck peer)


@dataclass(frozen=True)
class ShardPlan:
    """Which frames and batches each rank owns: contiguous runs of whole batches, balanced to within
    one batch (rank ``r`` owns batches ``[r*B//W, (r+1)*B//W)``; with more ranks than batches some own none).

    ``unit`` > 1: the runs are made of whole units of ``unit`` batches, balanced to within one unit (a
    bounded keyframe pass: a rank owns whole groups of keyframes, see :func:`keyframes.window_groups`)."""

    n_frames: int
    batch_size: int
    world_size: int = 1
    rank: int = 0
    unit: int = 1

    @property
    def n_batches(self) -> int:
        return -(-self.n_frames // self.batch_size)

    def batches(self, rank: Optional[int] = None) -> range:
        r = self.rank if rank is None else rank
        if self.unit > 1:
            units = -(-self.n_batches // self.unit)
            return range(min(r * units // self.world_size * self.unit, self.n_batches),
                         min((r + 1) * units // self.world_size * self.unit, self.n_batches))
        return range(r * self.n_batches // self.world_size, (r + 1) * self.n_batches // self.world_size)

    def frames(self, rank: Optional[int] = None) -> range:
        b = self.batches(rank)
        return range(min(b.start * self.batch_size, self.n_frames), min(b.stop * self.batch_size, self.n_frames))

    def frame_counts(self) -> list[int]:
        return [len(self.frames(r)) for r in range(self.world_size)]

    def keyframe_counts(self) -> list[int]:
        """Keyframes per rank in the keyframe pass: one per batch it owns."""
        return [len(self.batches(r)) for r in range(self.world_size)]

    def owner(self, batch: int) -> int:
        return next(r for r in range(self.world_size) if batch in self.batches(r))

    def window(self, policy: str, rank: Optional[int] = None) -> range:
        """The keyframes (= batches) whose caches the rank's frames read in the propagation pass."""
        b = self.batches(rank)
        if not len(b):
            return b
        extra = 1 if policy == "paper" else 0  # paper also blends with the next keyframe
        return range(max(0, b.start - 1), min(self.n_batches, b.stop + extra))


class Group:
    """The ranks of one edit. ``Group()`` is a single process: no collective is ever called."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None):
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")  # where collectives run
        self.bytes_sent = 0  # payload this rank put into collectives (the benchmark reads it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def plan(self, n_frames: int, batch_size: int, keyframe_window: Optional[int] = None) -> ShardPlan:
        """This rank's share. Under a bounded keyframe pass (more keyframes than ``keyframe_window``)
        ranks own whole windows of batches, so every group of keyframes lies on one rank."""
        from .keyframes import windowed

        n_batches = -(-n_frames // batch_size)
        unit = keyframe_window if windowed(n_batches, keyframe_window) else 1
        return ShardPlan(n_frames, batch_size, self.world_size, self.rank, unit)

    def _comm(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device).contiguous()

    # ---------------------------------------------------------------- small agreements
    def all_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (the same length on every rank), in rank order."""
        if not self.distributed:
            return [values]
        import torch.distributed as dist

        mine = torch.tensor(values, dtype=torch.long, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        self.bytes_sent += mine.numel() * 8
        return [o.tolist() for o in out]

    def agree(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        return all(v[0] for v in self.all_ints([int(flag)]))

    def check_same(self, values: list[int], what: str) -> None:
        """Fail loudly when ranks disagree (e.g. on the keyframes drawn): one checksum, not the list."""
        if not self.distributed:
            return
        digest = hash(tuple(values)) & ((1 << 62) - 1)
        seen = [v[0] for v in self.all_ints([digest])]
        if len(set(seen)) != 1:
            from .errors import RunFailed

            raise RunFailed(f"the ranks disagree on the {what} (rank {self.rank} has {values[:8]}): every rank "
                            f"must run the same command with the same settings")

    # ---------------------------------------------------------------- tensors
    def gather_keyframes(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(S, K_r, L, D) of this rank's keyframes -> (S, K, L, D) of all ranks' keyframes, in order.

        ``counts`` is every rank's K_r; a rank without keyframes passes a dummy row and counts 0.
        """
        if not self.distributed:
            return x
        import torch.distributed as dist

        k_max, mine = max(counts), counts[self.rank]
        padded = x.new_zeros((x.shape[0], k_max, *x.shape[2:]), device=self.device)
        padded[:, :mine] = x[:, :mine]
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        self.bytes_sent += padded.numel() * padded.element_size()
        return torch.cat([o[:, :c] for o, c in zip(out, counts)], dim=1).to(x.device)

    def gather_rows(self, x: torch.Tensor, counts: list[int], rows_per_call: int = 16) -> Optional[torch.Tensor]:
        """Rows (n_r, ...) of every rank concatenated in rank order on rank 0 (on ``x``'s device);
        None on the others. A few rows per collective, each piece moved off the communication device
        at once: rank 0 never holds the whole gathered video on a GPU."""
        if not self.distributed:
            return x
        import torch.distributed as dist

        n_max, mine = max(counts), counts[self.rank]
        pieces: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        for start in range(0, max(n_max, 1), rows_per_call):
            stop = min(start + rows_per_call, max(n_max, 1))
            padded = torch.zeros((stop - start, *x.shape[1:]), dtype=x.dtype, device=self.device)
            if start < mine:
                padded[:min(stop, mine) - start] = x[start:min(stop, mine)]
            out = [torch.empty_like(padded) for _ in range(self.world_size)] if self.is_main else None
            dist.gather(padded, out, dst=0)
            self.bytes_sent += padded.numel() * padded.element_size()
            if self.is_main:
                for r, o in enumerate(out):
                    if start < counts[r]:
                        pieces[r].append(o[:min(stop, counts[r]) - start].to(x.device))
        if not self.is_main:
            return None
        return torch.cat([p for rank_pieces in pieces for p in rank_pieces]) if any(pieces) else x[:0]

    def exchange_boundaries(self, cache: dict, plan: ShardPlan, policy: str) -> int:
        """Give every rank the caches of the neighbouring keyframes its first and last batches read.

        ``cache``: layer name -> :class:`~tokenflow.attention.LayerCache` of this rank's keyframes
        (rows in keyframe order). On return the caches hold the keyframes of
        ``plan.window(policy)`` in order; returns the window's first keyframe index (the offset
        of local cache rows from global keyframe indices).
        """
        mine, window = plan.batches(), plan.window(policy)
        if not self.distributed or not len(mine):
            return mine.start
        layers = list(cache.values())
        received = self.exchange_keyframes(
            lambda b: [(c.source_tokens[b - mine.start], c.outputs[:, b - mine.start]) for c in layers], plan, policy)
        _join_boundaries(layers, [received[b] for b in window if b < mine.start],
                         [received[b] for b in window if b >= mine.stop])
        return window.start

    def exchange_keyframes(self, row, plan: ShardPlan, policy: str) -> dict[int, list]:
        """The keyframes of this rank's window (``plan.window(policy)``) that other ranks own, from them:
        keyframe -> per layer (source tokens (L, D), outputs (B, L, D)). ``row(b)`` gives the same of this
        rank's keyframe ``b`` (asked for those other ranks' windows read, at least the first). Every rank calls
        it (point-to-point, each keyframe once: every layer's rows in one flat buffer); {} in one process."""
        mine, window = plan.batches(), plan.window(policy)
        if not self.distributed or not len(mine):
            return {}
        import torch.distributed as dist

        ops, shapes = [], [(t.shape, o.shape) for t, o in row(mine.start)]
        for r in range(self.world_size):
            if r == self.rank:
                continue
            for b in plan.window(policy, r):
                if b in mine:
                    buf = self._comm(torch.cat([torch.cat([t.flatten(), o.flatten()]) for t, o in row(b)]))
                    ops.append(dist.P2POp(dist.isend, buf, r))
                    self.bytes_sent += buf.numel() * buf.element_size()
        dtype = row(mine.start)[0][1].dtype
        size = sum(tokens.numel() + outputs.numel() for tokens, outputs in shapes)
        received = {b: torch.empty(size, dtype=dtype, device=self.device) for b in window if b not in mine}
        ops += [dist.P2POp(dist.irecv, buf, plan.owner(b)) for b, buf in received.items()]
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return {b: _unpack(buf, shapes) for b, buf in received.items()}


def _unpack(buf: torch.Tensor, shapes: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A received keyframe's flat buffer as per-layer (source tokens, outputs) of ``shapes``."""
    out, start = [], 0
    for tokens, outputs in shapes:
        t = buf[start:start + tokens.numel()].view(tokens)
        start += tokens.numel()
        o = buf[start:start + outputs.numel()].view(outputs)
        start += outputs.numel()
        out.append((t, o))
    return out


def _join_boundaries(layers: list, before: list[list], after: list[list]) -> None:
    """Each layer's cache with the received keyframes (per layer (tokens, outputs) each) before and after its
    own rows, in keyframe order."""
    for i, c in enumerate(layers):
        pre = [k[i] for k in before]
        post = [k[i] for k in after]
        c.source_tokens = torch.cat([*(t[None].to(c.source_tokens.device) for t, _ in pre), c.source_tokens,
                                     *(t[None].to(c.source_tokens.device) for t, _ in post)])
        c.outputs = torch.cat([*(o[:, None].to(c.outputs.device) for _, o in pre), c.outputs,
                               *(o[:, None].to(c.outputs.device) for _, o in post)], dim=1)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return default if raw is None or raw == "" else int(raw)
    except ValueError:
        raise TokenFlowError(f"environment variable {name} must be an integer, got {raw!r}") from None


def environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) alone.

    Each must be an integer in range: a rank no group can hold would wait for peers that never come.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    launch = "launch with torchrun, which sets them, or unset them to run in one process"
    if world < 1:
        raise TokenFlowError(f"WORLD_SIZE must be at least 1, got {world}; {launch}")
    if not 0 <= rank < world:
        raise TokenFlowError(f"RANK={rank} is out of range for WORLD_SIZE={world} (0 to {world - 1}); {launch}")
    if not 1 <= local_world <= world:
        raise TokenFlowError(f"LOCAL_WORLD_SIZE={local_world} must be in 1 to WORLD_SIZE={world}; {launch}")
    if not 0 <= local_rank < local_world:
        raise TokenFlowError(f"LOCAL_RANK={local_rank} is out of range for {local_world} rank(s) on this machine "
                             f"(0 to {local_world - 1}); {launch}")
    return rank, world, local_rank


def check_launch() -> tuple[int, int, int]:
    """:func:`environment`, and for several ranks what starting their process group needs:
    ``MASTER_ADDR`` and ``MASTER_PORT`` (torchrun sets them). Cheap: call it before the model loads."""
    rank, world, local_rank = environment()
    import torch.distributed as dist

    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise TokenFlowError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: launch with torchrun "
                                 f"(torchrun --nproc-per-node {world} -m tokenflow ...), or set MASTER_ADDR and "
                                 f"MASTER_PORT (rank 0's host and a free port), or unset WORLD_SIZE to run alone")
        port = os.environ["MASTER_PORT"]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise TokenFlowError(f"MASTER_PORT must be a port number in 1..65535, got {port!r}")
    return rank, world, local_rank


def start_process_group(backend: str, timeout: float) -> None:
    """Join the ranks of a launch (``env://``). Every wait is bounded by ``timeout`` seconds: a rank
    whose peers do not all come ends with one line instead of waiting forever."""
    import torch.distributed as dist

    rank, world, _ = check_launch()
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError, OSError) as e:  # torch's DistStoreError and friends are RuntimeErrors
        from .models import short_error

        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise TokenFlowError(f"rank {rank} of {world} could not join the other ranks at {where} within "
                             f"{timeout:.0f}s ({short_error(e)[:120]}): start every rank (torchrun does), or raise "
                             f"TOKENFLOW_DIST_TIMEOUT") from None


def timeout_seconds() -> float:
    """How long a collective may wait for a peer (``TOKENFLOW_DIST_TIMEOUT``, seconds)."""
    raw = os.environ.get("TOKENFLOW_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 1 <= value <= 7 * 24 * 3600:
        raise TokenFlowError(f"TOKENFLOW_DIST_TIMEOUT must be seconds between 1 and 604800, got {raw!r}")
    return value


def local_device(device: str, local_rank: int) -> str:
    """Under torchrun each rank takes its own GPU: ``auto``/``cuda`` become ``cuda:LOCAL_RANK``."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


def init_group(device: torch.device, timeout: Optional[float] = None) -> Group:
    """The process group of a ``torchrun`` launch (``nccl`` on CUDA devices, ``gloo`` otherwise),
    with an explicit timeout; a single process gets ``Group()`` and no process group."""
    rank, world, _ = environment()
    device = torch.device(device)
    if world <= 1:
        return Group()
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        start_process_group("nccl" if device.type == "cuda" else "gloo", timeout or timeout_seconds())
    backend = dist.get_backend()  # the caller's group, if it made one: collectives go where it expects them
    return Group(dist.get_rank(), dist.get_world_size(), device if backend == "nccl" else "cpu")


def shutdown(group: Group) -> None:
    """End the process group once every rank is done with it. The barrier first: a rank that tears
    its connections down while a peer still has traffic on them can abort that peer (gloo)."""
    if group.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
