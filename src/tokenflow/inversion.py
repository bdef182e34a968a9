"""DDIM inversion and reconstruction of every frame (paper Sec. 3, Eq. 2 run backwards).

Inversion walks the DDIM timesteps upward. With ``t`` the next (noisier) timestep and
``a_prev`` the cumulative alpha of the step before it (``final_alpha_cumprod`` for the first):

    eps = unet(x, t, c);  x0 = (x - sqrt(1 - a_prev) eps) / sqrt(a_prev);  x = sqrt(a_t) x0 + sqrt(1 - a_t) eps

As in the official preprocessing, the noise is predicted at the *target* timestep ``t``,
the prompt is the inversion prompt and there is no guidance. The state right after every
timestep in ``keep`` is kept, plus the final (noisiest) one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol

import torch

from .memory import retry_smaller

ProgressFn = Callable[[int, int], None]
# restore(first frame) -> (end frame, {t: (end - first, C, h, w)}) of a batch done earlier, or None
RestoreFn = Callable[[int], Optional[tuple[int, dict[int, torch.Tensor]]]]
# on_batch(first frame, end frame, {t: rows}) after every finished batch (for checkpoints)
BatchFn = Callable[[int, int, dict[int, torch.Tensor]], None]
# predict(x (B, C, h, w) on the device, t, frame indices (B,)) -> eps float32
PredictFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RowSink(Protocol):
    """Where :func:`ddim_invert` puts each batch's kept states: in memory (:class:`InMemoryRows`) or
    straight into a cache entry (:class:`tokenflow.stored.EntryWriter`)."""

    def rows(self, first: int, end: int, rows: dict[int, torch.Tensor]) -> None: ...

    def finish(self, x0: torch.Tensor) -> "Inversion": ...


class InMemoryRows:
    """The kept states of every frame, in RAM (float32 on the CPU)."""

    def __init__(self, shape, timesteps, final_timestep: int):
        self.final_timestep = final_timestep
        self.latents = {int(t): torch.empty(tuple(shape), dtype=torch.float32) for t in timesteps}

    def rows(self, first: int, end: int, rows: dict[int, torch.Tensor]) -> None:
        for t, part in rows.items():
            self.latents[t][first:end] = part

    def finish(self, x0: torch.Tensor) -> "Inversion":
        return Inversion(x0.detach().float().cpu(), self.latents, self.final_timestep)


def unet_predictor(unet, text_embedding: torch.Tensor) -> PredictFn:
    """The plain predictor: the UNet with one prompt embedding for every frame."""
    def predict(x: torch.Tensor, t: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        cond = text_embedding.to(device=x.device, dtype=unet.dtype).repeat(len(x), 1, 1)
        return unet(x.to(unet.dtype), t.to(x.device), encoder_hidden_states=cond).sample.float()

    return predict


@dataclass
class Inversion:
    """Clean latents and the inverted latents kept at each timestep (all on the CPU, float32)."""

    x0: torch.Tensor  # (N, C, h, w)
    latents: dict[int, torch.Tensor]  # t -> (N, C, h, w) state right after timestep t
    final_timestep: int  # the noisiest inverted timestep
    key: Optional[str] = None  # the cache key, when the pipeline made or loaded it

    def __post_init__(self):
        # one memory layout whatever made the tensors (the VAE's output is channels-last
        # strided, a cache file's is contiguous): the edit must not depend on where it came from
        self.x0 = self.x0.contiguous()
        self.latents = {t: v.contiguous() for t, v in self.latents.items()}

    @property
    def n_frames(self) -> int:
        return int(self.x0.shape[0])

    @property
    def shape(self) -> torch.Size:
        """(N, C, h, w) of the latents."""
        return self.x0.shape

    @property
    def final(self) -> torch.Tensor:
        return self.latents[self.final_timestep]

    def rows(self, frames: range) -> "Inversion":
        """The inversion of the frames ``frames`` only (one rank's share of the video)."""
        if frames == range(self.n_frames):
            return self
        part = slice(frames.start, frames.stop)
        return Inversion(self.x0[part], {t: v[part] for t, v in self.latents.items()}, self.final_timestep, self.key)


def inversion_timesteps(scheduler, steps: int) -> torch.Tensor:
    """The DDIM schedule of ``steps`` steps, ascending."""
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.flip(0).clone()


def standard_scheduler():
    """DDIM as Stable Diffusion 1.x/2.x configure it: for checks before a model is loaded."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, steps_offset=1, timestep_spacing="leading", clip_sample=False,
                         set_alpha_to_one=False)


def missing_timesteps(steps: int, inversion_steps: int, scheduler=None) -> list[int]:
    """Editing timesteps of a ``steps`` schedule that an ``inversion_steps`` inversion does not pass."""
    scheduler = scheduler or standard_scheduler()
    scheduler.set_timesteps(steps)
    keep = set(scheduler.timesteps.tolist())
    return sorted(keep - set(inversion_timesteps(scheduler, inversion_steps).tolist()), reverse=True)


def steps_error(steps: int, inversion_steps: int, missing: list[int], scheduler=None):
    from .errors import TokenFlowError

    good = choose_inversion_steps(steps, inversion_steps, scheduler)
    return TokenFlowError(f"--inversion-steps {inversion_steps} does not pass the editing timesteps "
                          f"{missing[:3]}... of --steps {steps}; use e.g. --inversion-steps {good}, or leave "
                          f"it out to have one chosen")


def choose_inversion_steps(steps: int, default: int = 50, scheduler=None, limit: int = 1000) -> int:
    """The smallest multiple of ``steps`` that is at least ``default`` and passes every editing
    timestep (``steps`` itself always does, so that is the last resort)."""
    scheduler = scheduler or standard_scheduler()
    first = steps * max(1, -(-default // steps))
    for candidate in range(first, limit + 1, steps):
        if not missing_timesteps(steps, candidate, scheduler):
            return candidate
    return steps


@torch.no_grad()
def ddim_invert(unet, scheduler, x0: torch.Tensor, text_embedding: Optional[torch.Tensor], steps: int,
                keep: Iterable[int], batch_size: int = 8, progress: Optional[ProgressFn] = None,
                predict: Optional[PredictFn] = None, restore: Optional[RestoreFn] = None,
                on_batch: Optional[BatchFn] = None, first_frame: int = 0,
                sink: Optional[Callable[[list[int], int], RowSink]] = None) -> Inversion:
    """Invert clean latents x0 (N, C, h, w); returns the states at ``keep`` and the final one.

    Batches of ``batch_size`` frames are independent: each walks the whole schedule before the next
    starts; out of device memory, the batch is halved and retried. ``predict`` replaces the plain UNet
    call (depth, ControlNet, SDXL). ``restore`` gives batches an interrupted run finished, ``on_batch``
    sees every new one; ``progress(done, total)`` counts frame-steps. ``first_frame``: the video frame of
    row 0 (a rank's share): batches keep to the video's grid, so every frame is inverted in the same
    UNet batch as in one process (the same float rounding). ``sink(timesteps, final)`` makes where the
    kept states go, a batch at a time (default: memory; the cache's writer puts them straight on disk).
    """
    device = unet.device
    predict = predict or unet_predictor(unet, text_embedding)
    timesteps = inversion_timesteps(scheduler, steps)
    alphas = scheduler.alphas_cumprod
    keep = {int(t) for t in keep}
    final_t = int(timesteps[-1])
    kept = sorted(keep | {final_t})
    out = (sink or (lambda ts, final: InMemoryRows(x0.shape, ts, final)))(kept, final_t)
    n = len(x0)
    total = len(timesteps) * n

    def invert_batch(b: int, size: int) -> tuple[int, dict[int, torch.Tensor]]:
        """Frames from ``b`` to the end of their batch of ``size`` on the video's grid, through the whole
        schedule; returns where the batch ends and its kept states."""
        end = min(b + size - (first_frame + b) % size, n)
        x = x0[b:end].to(device=device, dtype=torch.float32)
        frames = torch.arange(b, end)
        states = {}
        for i, t in enumerate(timesteps):
            a_t = alphas[t]
            a_prev = alphas[timesteps[i - 1]] if i > 0 else scheduler.final_alpha_cumprod
            eps = predict(x, t, frames)
            x0_pred = (x - (1 - a_prev) ** 0.5 * eps) / a_prev ** 0.5
            x = a_t ** 0.5 * x0_pred + (1 - a_t) ** 0.5 * eps
            if int(t) in kept:
                states[int(t)] = x.cpu()
            if progress:
                progress(b * len(timesteps) + (i + 1) * (end - b), total)
        return end, states

    b = 0
    try:
        while b < n:
            restored = restore(b) if restore else None
            if restored is not None:
                end, rows = restored
                out.rows(b, end, {t: rows[t] for t in kept})
                if progress:
                    progress(end * len(timesteps), total)
            else:
                (end, rows), batch_size = _retrying(lambda size: invert_batch(b, size), batch_size, device)
                if on_batch:
                    on_batch(b, end, rows)
                out.rows(b, end, rows)
            b = end
        return out.finish(x0)
    except BaseException:  # interrupted or failed: a writer removes what it wrote
        getattr(out, "discard", lambda: None)()
        raise


def _retrying(invert_batch: Callable[[int], tuple], batch_size: int, device) -> tuple[tuple, int]:
    """One batch of the inversion, halved and retried out of device memory: (what it returned, the size
    that ran)."""
    return retry_smaller(invert_batch, batch_size, device=device,
                         fail=lambda size: "out of memory inverting even one frame at a time: lower --height/--width, "
                                           "or use --offload",
                         retrying=lambda size, lower: f"inverting {size} frames at once; retrying with {lower}")


@torch.no_grad()
def ddim_reconstruct(unet, scheduler, inversion: Inversion, text_embedding: Optional[torch.Tensor], steps: int,
                     batch_size: int = 8, progress: Optional[ProgressFn] = None,
                     predict: Optional[PredictFn] = None) -> torch.Tensor:
    """Run DDIM sampling from the final inverted state back to clean latents (N, C, h, w)."""
    device = unet.device
    predict = predict or unet_predictor(unet, text_embedding)
    timesteps = inversion_timesteps(scheduler, steps).flip(0)  # descending
    alphas = scheduler.alphas_cumprod
    n = inversion.n_frames
    result = torch.empty(tuple(inversion.shape))
    final = inversion.final  # read once (a stored inversion reads it from disk)
    total, done = len(timesteps) * ((n + batch_size - 1) // batch_size), 0
    for b in range(0, n, batch_size):
        x = final[b:b + batch_size].to(device)
        frames = torch.arange(b, b + len(x))
        for i, t in enumerate(timesteps):
            a_t = alphas[t]
            a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else scheduler.final_alpha_cumprod
            eps = predict(x, t, frames)
            x0_pred = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
            x = a_prev ** 0.5 * x0_pred + (1 - a_prev) ** 0.5 * eps
            done += 1
            if progress:
                progress(done, total)
        result[b:b + batch_size] = x.cpu()
    return result


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two frame tensors in [0, 1]."""
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()
