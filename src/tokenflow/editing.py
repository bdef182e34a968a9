"""TokenFlow's denoising step (paper Alg. 1) as a function over one UNet call and a sharding plan.

Per denoising step ``t``:

1. the keyframes (drawn by the caller, identical on every rank);
2. keyframe pass: the UNet on this rank's keyframes with extended self-attention under the base
   editor; every self-attention layer keeps the keyframes' source tokens and outputs (and, across
   ranks, gathers the keys/values of every rank's keyframes: :mod:`tokenflow.distributed`). Past
   ``keyframe_window`` keyframes it is bounded: anchors first, then groups of at most the window,
   each attending to its own keyframes and the anchors (``docs/long-videos.md``);
3. the caches of the neighbouring keyframes this rank's first and last batches read;
4. propagation pass, batch by batch over this rank's frames: self-attention outputs are replaced
   by the keyframes' outputs at the nearest neighbours of the source tokens (the TokenFlow);
5. classifier-free guidance and the DDIM step.

The UNet batch is ``[source, uncond, cond]``: the source branch denoises the inverted source
latents at ``t`` with the inversion prompt; it gives the tokens for the correspondences and the
features that Plug-and-Play injects. Several prompts share the source branch and the keyframes
(neither depends on the prompt): ``[source, uncond_1, cond_1, ..., uncond_P, cond_P]``, 1 + 2P
image-forwards per frame instead of 3P. A single process is the one-rank plan of the same code.

Out of memory, the failing part is retried with smaller UNet batches (a run's :class:`~tokenflow.memory.MemoryPlan`): the
keyframe pass one branch at a time (one process only: the ranks' collectives must line up), the
propagation pass in smaller chunks from the chunk that failed (no collective there, so also per rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from .attention import LayerCache, TokenFlowState, host_empty, wait_for_host_copies
from .correspondence import POLICIES, propagation_plan, slot_groups
from .distributed import Group, ShardPlan
from .keyframes import n_anchors, window_groups, windowed
from .memory import MemoryPlan, halve, retry_smaller


class UNetCall(Protocol):
    def __call__(self, x: torch.Tensor, source: torch.Tensor, t: torch.Tensor,
                 branches: Optional[tuple[int, ...]] = None, frames: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise (len(branches)*F, C, h, w) float32 for F frames (global indices ``frames``) of the
        given branches (all 1 + 2P by default), branch-major. x: (P, F, C, h, w), the latents of P prompts; branch 0 is
        ``source``, branches 2p+1 / 2p+2 are prompt p's unconditional / conditional (latents ``x[p]``)."""


class Update(Protocol):
    def __call__(self, noise: tuple[torch.Tensor, ...], x: torch.Tensor, frames: range) -> torch.Tensor:
        """The latents (P, F, ...) after the step, from the model's output per branch (F, ...) and the
        latents x (P, F, ...) of ``frames`` (global indices)."""


@dataclass(frozen=True)
class _Step:
    """What every pass of one step reads: the model call, this rank's latents, the step's keyframes, the
    hooks' plan and the run's memory plan and sharding."""

    unet: UNetCall
    x: torch.Tensor  # (P, n_r, ...) this rank's latents
    t: torch.Tensor
    source: torch.Tensor  # (n_r, ...) the inverted source latents at t
    keyframes: torch.Tensor  # (K,) global frame indices
    state: TokenFlowState
    batch_size: int
    memory: MemoryPlan
    plan: ShardPlan
    group: Group

    @property
    def offload(self) -> bool:  # the keyframe caches on the host
        offload = self.memory.offload_cache
        return offload if offload is not None else self.memory.device.type != "cpu"


@torch.no_grad()
def denoise_step(unet: UNetCall, x: torch.Tensor, t: torch.Tensor, source: torch.Tensor, keyframes: torch.Tensor,
                 state: TokenFlowState, scheduler, guidance_scale: float, batch_size: int, propagation: str,
                 qk_injection: bool, feature_injection: bool, memory: MemoryPlan,
                 plan: Optional[ShardPlan] = None, group: Optional[Group] = None,
                 update: Optional[Update] = None, n_branches: Optional[int] = None,
                 keyframe_window: Optional[int] = None) -> torch.Tensor:
    """One TokenFlow step over this rank's frames.

    x: (n_r, C, h, w) float32, the frames ``plan.frames()`` (all frames on one process), or
    (P, n_r, C, h, w) for P prompts edited together; source: (n_r, C, h, w); keyframes (K,) global
    frame indices, one per batch of the whole video. Returns this rank's x at the next timestep,
    shaped as given (CPU, float32). The hooks must be installed (see ``tokenflow_hooks``).

    ``update`` replaces classifier-free guidance and the scheduler's step (another family's or editor's
    update, e.g. FlowEdit's); ``n_branches``: the branches per frame, 1 + 2P by default. Latents past the
    frame axis are opaque here: (P, n_r, ...) of any layout (FLUX's packed tokens too).

    ``keyframe_window``: at most this many keyframes per keyframe-pass call (the bounded pass, see
    :func:`_windowed_step`; across ranks ``plan`` must come from ``Group.plan(..., keyframe_window)``);
    None or at least the keyframe count: the exact pass.
    """
    one_prompt = update is None and x.ndim == 4  # with an update, x is always (P, n_r, ...)
    x = x[None] if one_prompt else x  # (P, n_r, C, h, w)
    step = _Step(unet, x, t, source, keyframes, state, batch_size, memory,
                 plan or ShardPlan(x.shape[1], batch_size), group or Group())
    state.n_branches = n_branches or 1 + 2 * len(x)
    state.qk_injection, state.feature_injection = qk_injection, feature_injection
    state.cache_device = torch.device("cpu") if step.offload else None
    try:
        out = _passes(step, scheduler, guidance_scale, propagation, keyframe_window, update)
    finally:
        state.end_step()  # the layers' caches and the batch plan go, whether the step finished or failed
    return out[0] if one_prompt else out


def _passes(step: _Step, scheduler, guidance_scale: float, propagation: str, window: Optional[int],
            update: Optional[Update]) -> torch.Tensor:
    """The step's passes: the bounded keyframe pass interleaved with the propagation, or the exact keyframe
    pass then the propagation (the baselines: the propagation pass's per-frame or extended attention alone)."""
    if propagation in POLICIES and windowed(len(step.keyframes), window):
        step.state.set_mode("propagate")
        return _windowed_step(step, scheduler, guidance_scale, propagation, window, update)
    kept, offset = _keyframes(step, propagation) if propagation in POLICIES else (None, 0)
    step.state.set_mode({"none": "plain", "extended": "extended"}.get(propagation, "propagate"))
    return _propagation_stage(step, scheduler, guidance_scale, propagation, offset, kept, update)


def _keyframes(step: _Step, propagation: str):
    """The exact keyframe pass and the caches the propagation pass reads (with the neighbouring ranks' boundary
    keyframes). Returns (frame -> its keyframe-pass prediction, where propagation may reuse it; the global
    keyframe index of the first local cache row)."""
    noise = _keyframe_call(step, list(step.plan.batches()), step.plan.keyframe_counts())
    if step.offload:  # the caches' copies to pinned host memory ran asynchronously: done before they are read
        wait_for_host_copies(step.memory.device)
    offset = step.group.exchange_boundaries(step.state.caches.layers, step.plan, propagation)
    if not _reuses(step, propagation) or noise is None:
        return None, offset
    # Under the paper's policy a keyframe blends its own cached outputs with weight 1 at its own tokens (its
    # nearest neighbours in itself), so its propagation pass recomputes, layer by layer, the keyframe pass's
    # prediction: take that instead of a second UNet call. (Only exactly identical source tokens could make a
    # token pick another one: then the keyframe's own attention output, reused here, is the better value.)
    mine = step.keyframes[step.plan.batches().start:step.plan.batches().stop]
    return {int(f): noise[:, i] for i, f in enumerate(mine)}, offset


def _reuses(step: _Step, propagation: str) -> bool:
    """Whether a keyframe takes its keyframe-pass prediction instead of a propagation call (see _keyframes)."""
    return propagation == "paper" and step.memory.reuse_keyframe_outputs


def _propagation_stage(step: _Step, scheduler, guidance_scale: float, propagation: str, offset: int,
                       kept: Optional[dict], update: Optional[Update], frames: Optional[range] = None,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The propagation pass over this rank's frames (or ``frames`` of them, written into ``out``), in chunks
    of at most the batch size, each retried smaller out of memory from the chunk that failed (frames are
    independent here, except under extended attention, which is not split)."""
    memory, batch_size = step.memory, step.batch_size
    frames = frames if frames is not None else step.plan.frames()
    out = out if out is not None else torch.empty(step.x.shape, dtype=torch.float32)
    first = step.plan.frames().start
    extended = propagation == "extended"

    def chunk_from(b: int):
        def run(size: int) -> int:  # frames b... in one UNet call of at most ``size`` frames
            end = min(b + size, frames.stop)
            out[:, b - first:end - first] = _propagation_batch(
                step, scheduler, guidance_scale, propagation, range(b, end), offset, kept, update)
            return end
        return run

    chunk = batch_size if extended else min(batch_size, memory.propagation_chunk or batch_size)
    b = frames.start
    while b < frames.stop:
        b, size = retry_smaller(
            chunk_from(b), chunk, device=memory.device, smaller=(lambda s: None) if extended else halve,
            fail=lambda s: (f"out of memory attending across {batch_size} frames: lower --batch-size or "
                            f"--height/--width") if extended else
            ("out of memory in the propagation pass even one frame per UNet call: lower --height/--width, "
             "or use --offload"),
            retrying=lambda s, lower: f"in the propagation pass; retrying {lower} frames per UNet call")
        if size < chunk:  # the rest of this run keeps the smaller chunk (results equal up to rounding)
            chunk = memory.propagation_chunk = size
    return out


def _windowed_step(step: _Step, scheduler, guidance_scale: float, propagation: str, window: int,
                   update: Optional[Update]) -> torch.Tensor:
    """The bounded keyframe pass, interleaved with the propagation pass so that the layers' caches hold a
    few groups' keyframes, never every keyframe of the video.

    The anchors run first (extended attention among themselves, across ranks their keys/values gathered),
    and every layer keeps their keys/values; then each of this rank's groups
    (:func:`tokenflow.keyframes.window_groups`) as its own call, attending to its own keyframes and the
    anchors, with no collective. After each group, the batches whose keyframes (their own and their
    neighbours) are all there are propagated, and the keyframes no batch left reads are dropped: one group,
    the anchors and a few neighbouring keyframes are held (across ranks also the groups that hold what other
    ranks read, which run first, before the boundary exchange). The same numbers as holding every keyframe:
    each group's call and each batch's propagation are independent of the order they run in.
    """
    mine, state = step.plan.batches(), step.state
    anchors, groups = window_groups(len(step.keyframes), window, n_anchors(window))
    for g in groups:
        if (g[0] in mine) != (g[-1] in mine):
            raise ValueError(f"keyframe group {g[0]}..{g[-1]} spans ranks: make the plan with the keyframe "
                             f"window (Group.plan(..., keyframe_window={window}))")
    rows = _KeyframeRows(step, propagation)
    with state.during(anchor_role="keep"):
        own = [p for p in anchors if p in mine]
        rows.add(own, _keyframe_call(step, own, [sum(p in step.plan.batches(r) for p in anchors)
                                                 for r in range(step.plan.world_size)]))
    out = torch.empty(step.x.shape, dtype=torch.float32)
    mine_groups = [g for g in groups if g[0] in mine]
    with state.during(anchor_role="use"):
        early = _boundary_groups(step, rows, mine_groups, propagation)
        pending = list(mine)
        for g in [*mine_groups, None]:
            if g is not None and g not in early:  # no collective: each rank runs its own groups
                rows.add(g, _keyframe_call(step, g, [len(g)], gather=False))
            pending = _propagate_ready(step, rows, pending, out, scheduler, guidance_scale, propagation, update)
    state.caches.anchors = {}
    if pending:
        raise RuntimeError(f"the bounded pass left batches {pending[:4]} of this rank unpropagated")
    return out


def _boundary_groups(step: _Step, rows: "_KeyframeRows", groups: list[list[int]], propagation: str) -> list:
    """Across ranks: this rank's groups that hold keyframes other ranks read (and its first keyframe, whose
    shapes the exchange takes) run first, then every rank sends and receives the boundary keyframes.
    Returns the groups run; none in one process, where there is nothing to exchange."""
    if not step.group.distributed:
        return []
    plan, mine = step.plan, step.plan.batches()
    others = {p for r in range(plan.world_size) if r != step.group.rank for p in plan.window(propagation, r)}
    early = [g for g in groups if set(g) & (others | {mine.start})]
    for g in early:
        rows.add(g, _keyframe_call(step, g, [len(g)], gather=False))
    if step.offload:  # the copies into page-locked host caches ran asynchronously: done before they are sent
        wait_for_host_copies(step.memory.device)
    if len(mine):
        rows.receive(step.group.exchange_keyframes(rows.of, plan, propagation))
    return early


class _KeyframeRows:
    """The keyframes of a bounded pass that the propagation pass may still read: keyframe position -> every
    layer's (source tokens (L, D), outputs (B, L, D)), views of the call that made them, and the keyframes'
    predictions where the propagation pass reuses them. A keyframe kept past its call's other keyframes is
    copied out, so that it does not keep its whole call's caches alive."""

    def __init__(self, step: _Step, propagation: str):
        self.step, self.reuse, self.extra = step, _reuses(step, propagation), 1 if propagation == "paper" else 0
        self.rows: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.noise: dict[int, torch.Tensor] = {}
        self.calls: dict[int, int] = {}  # keyframe -> the call it is a view of (absent: copied out)
        self.n_calls = 0

    def add(self, positions: list[int], noise: Optional[torch.Tensor]) -> None:
        """The keyframes at ``positions`` of the call that just ran (its caches taken from the layers)."""
        caches = self.step.state.caches.take()
        self.n_calls += 1
        for i, p in enumerate(positions):
            self.calls[p] = self.n_calls
            self.rows[p] = {name: (c.source_tokens[i], c.outputs[:, i]) for name, c in caches.items()}
            if self.reuse and noise is not None:
                self.noise[p] = noise[:, i]

    def of(self, p: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(self.rows[p].values())

    def receive(self, received: dict[int, list]) -> None:
        """Other ranks' keyframes (per layer, in this rank's layer order), moved to where this rank's are."""
        like = next(iter(self.rows.values()))
        for p, layers in received.items():
            self.rows[p] = {name: (t.to(like[name][0].device), o.to(like[name][1].device))
                            for name, (t, o) in zip(like, layers)}

    def reads(self, b: int) -> range:
        """The keyframes batch ``b``'s frames read: its own and its neighbours (the policy's)."""
        return range(max(0, b - 1), min(len(self.step.keyframes), b + 1 + self.extra))

    def layers(self, positions: range) -> dict[str, LayerCache]:
        """One cache per layer of the keyframes ``positions``, rows in keyframe order."""
        out = {}
        for name in self.rows[positions.start]:
            tokens = [self.rows[p][name][0] for p in positions]
            outputs = [self.rows[p][name][1] for p in positions]
            out[name] = LayerCache(source_tokens=_stacked(tokens, 0), outputs=_stacked(outputs, 1))
        return out

    def keep(self, positions: set[int]) -> None:
        """Only the keyframes ``positions``; an earlier call's last one or two are copied out of its caches
        (a neighbour or two are not worth the whole call's memory)."""
        self.rows = {p: v for p, v in self.rows.items() if p in positions}
        self.noise = {p: v for p, v in self.noise.items() if p in positions}
        for call in {self.calls[p] for p in self.rows if p in self.calls} - {self.n_calls}:
            left = [p for p in self.rows if self.calls.get(p) == call]
            if len(left) <= 2:
                for p in left:
                    self._copy_out(p)

    def _copy_out(self, p: int) -> None:
        self.rows[p] = {name: (t.clone(), o.clone()) for name, (t, o) in self.rows[p].items()}
        if p in self.noise:
            self.noise[p] = self.noise[p].clone()
        del self.calls[p]


def _stacked(rows: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Rows stacked along ``dim``; into page-locked host memory when they are there (offloaded caches)."""
    like = rows[0]
    shape = (*like.shape[:dim], len(rows), *like.shape[dim:])
    out = host_empty(shape, like.dtype, "cuda") if like.is_pinned() else like.new_empty(shape)
    return torch.stack(rows, dim=dim, out=out)


def _propagate_ready(step: _Step, rows: _KeyframeRows, pending: list[int], out: torch.Tensor, scheduler,
                     guidance_scale: float, propagation: str, update: Optional[Update]) -> list[int]:
    """Propagate the first of the ``pending`` batches whose keyframes are all in ``rows``, as one stretch of
    frames; drop the keyframes no batch left reads. Returns the batches still pending."""
    ready = 0
    while ready < len(pending) and all(p in rows.rows for p in rows.reads(pending[ready])):
        ready += 1
    if not ready:
        return pending
    if step.offload:  # the caches' copies to pinned host memory ran asynchronously: done before they are read
        wait_for_host_copies(step.memory.device)
    first, last = pending[0], pending[ready - 1]
    window = range(rows.reads(first).start, rows.reads(last).stop)
    step.state.caches.layers = rows.layers(window)
    kept = {int(step.keyframes[p]): v for p, v in rows.noise.items() if first <= p <= last} if rows.reuse else None
    frames = range(first * step.batch_size, min((last + 1) * step.batch_size, step.plan.frames().stop))
    _propagation_stage(step, scheduler, guidance_scale, propagation, window.start, kept, update, frames, out)
    step.state.caches.layers = {}
    pending = pending[ready:]
    rows.keep({p for b in pending for p in rows.reads(b)})
    return pending


def _keyframe_call(step: _Step, positions: list[int], counts: list[int], gather: bool = True) -> Optional[torch.Tensor]:
    """Extended attention on the keyframes at ``positions`` of this rank (among themselves and, with
    ``gather`` across ranks, those of every rank: ``counts`` per rank). Returns their prediction of every
    branch (B, len(positions), C, h, w), None for none (a rank without any still joins the collectives).

    One UNet call on all three branches while that is no bigger than a propagation batch
    (3 x batch_size images); beyond that (a rank with more than ``batch_size`` keyframes: long
    videos) one call per branch, so peak memory does not grow with the video's length.
    """
    state, memory, group, x = step.state, step.memory, step.group, step.x
    local = step.keyframes[positions] if len(positions) else step.keyframes[:0]
    rows = local - step.plan.frames().start
    if not len(local):  # no keyframe here: a dummy row keeps this rank in the layers' collectives
        local, rows = torch.zeros(1, dtype=torch.long), None
    x_k = x[:, rows] if rows is not None else x.new_zeros((len(x), 1, *x.shape[2:]))  # (P, K_r, C, h, w)
    s_k = step.source[rows] if rows is not None else x_k[0]
    split = memory.split_keyframe_pass
    if split is None:
        split = max(counts) > step.batch_size
    n_branches = state.n_branches
    collective = group.distributed and gather
    gathering = (lambda v: group.gather_keyframes(v, counts)) if collective else None

    def run(per_call: int) -> Optional[torch.Tensor]:  # all branches in one call, or one branch per call
        try:
            with state.during(mode="keyframe", gather=gathering):
                if per_call >= n_branches:
                    noise = step.unet(x_k, s_k, step.t, frames=local)
                else:
                    noise = []
                    for branch in range(n_branches):
                        with state.during(keyframe_branch=branch):
                            noise.append(step.unet(x_k, s_k, step.t, branches=(branch,), frames=local))
                    noise = torch.cat(noise)
        except BaseException:
            state.caches.layers.clear()  # a retry starts the layers' caches afresh
            raise
        finally:
            state.caches.features = None
        return None if rows is None else noise.reshape(n_branches, len(local), *noise.shape[1:])

    # a call with collectives cannot be replayed on one rank alone: no retry there
    noise, per_call = retry_smaller(
        run, 1 if split else n_branches, device=memory.device,
        smaller=lambda s: None if collective or s <= 1 else 1,
        fail=lambda s: (f"out of memory in the keyframe pass ({len(local)} keyframes"
                        f"{' in one call' if s > 1 else ''}): lower --height/--width, raise --batch-size (fewer "
                        f"keyframes), use --offload, or more ranks"),
        retrying=lambda s, lower: "in the keyframe pass; retrying one branch at a time")
    if per_call == 1 and not split and not group.distributed:
        # for the rest of this run; not across ranks, where every rank's anchors' calls must gather alike
        memory.split_keyframe_pass = True
    return noise


def _propagation_batch(step: _Step, scheduler, guidance_scale, propagation, frames: range, offset: int,
                       kept: Optional[dict[int, torch.Tensor]] = None, update: Optional[Update] = None) -> torch.Tensor:
    """Frames ``frames`` (global indices) through the UNet: propagation (TokenFlow), or the baselines'
    per-frame attention (none) or joint attention within the batch (extended); then guidance and the
    DDIM step. Returns (P, F, C, h, w). Frames in ``kept`` take that prediction and leave the UNet batch."""
    state, device, x, first = step.state, step.memory.device, step.x, step.plan.frames().start
    kept = kept or {}
    all_frames = list(frames)
    index = torch.tensor([f for f in all_frames if f not in kept], dtype=torch.long)
    if propagation in POLICIES:
        _plan_batch(step, index, propagation, offset)
    if len(index):
        computed = step.unet(x[:, index - first], step.source[index - first], step.t, frames=index)
        computed = computed.reshape(state.n_branches, len(index), *computed.shape[1:])  # (B, F', C, h, w)
    if len(index) == len(all_frames):
        noise = computed
    else:  # the batch in frame order: computed rows and kept keyframe predictions
        rows = iter(range(len(index)))
        noise = torch.stack([kept[f].to(device) if f in kept else computed[:, next(rows)] for f in all_frames],
                            dim=1)
    noise = noise.unbind(0)  # per branch: (F, C, h, w)
    x_b = x[:, frames.start - first:frames.stop - first].to(device=device, dtype=torch.float32)
    if update is not None:
        return update(noise, x_b, frames).cpu()
    out = []
    for p in range(len(x)):  # each prompt: classifier-free guidance and the DDIM step
        uncond, cond = noise[1 + 2 * p], noise[2 + 2 * p]
        guided = uncond + guidance_scale * (cond - uncond)
        out.append(scheduler.step(guided, step.t.to(device), x_b[p]).prev_sample.cpu())
    return torch.stack(out)


def _plan_batch(step: _Step, index: torch.Tensor, propagation: str, offset: int) -> None:
    """The propagation plan of the frames ``index`` for the layers: each frame's two keyframe slots
    (rows of this rank's caches) and blend weights, and the per-batch facts computed once here, on the
    CPU, not in every attention layer."""
    state, device = step.state, step.memory.device
    slots, weights = propagation_plan(index, step.keyframes, step.batch_size, propagation)
    slots = slots - offset  # into this rank's caches
    if step.offload:  # the layers bring over only these keyframes' caches, slots renumbered
        rows = slots.unique()
        state.cache_rows, slots = rows, torch.searchsorted(rows, slots)
    state.slot_groups = slot_groups(slots, device)
    state.blend = not bool((weights == 1).all())
    state.slots, state.weights = slots.to(device), weights.to(device)
