"""One run of one experiment, wherever it happens: the step every worker shares.

`run_job` checks the experiment's commit out in a worker's worktree, runs it under the runner (its
process group, the outside clock, the sandbox) beside the trusted evaluator, and returns what the
ledger records about the run. It writes nothing but the run's log, scratch folder and model copy, so
the same function runs in the orchestrator's thread for a local worker and in a Ray task on another
node (ray_backend.py); the orchestrator alone writes the ledger and git.

A worker's share of a machine is a `Slot`: one GPU, or a disjoint set of cores. Every run of a tag
gets the same kind of share (`Slot.regime`), so its metrics stay comparable; the judge never mixes
runs of two regimes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from . import compile_cache
from . import runner as runner_mod
from .errors import AutoresearchError
from .gitrepo import Git
from .gpus import RunDevice, run_device
from .handoff import BUDGET_ENV
from .lab import Lab
from .measurement import (
    TrustedEval,
    hidden_paths,
    is_trusted,
    read_metric,
    readable_paths,
    write_trusted_toml,
)
from .sandbox import Mode

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS", "RAYON_NUM_THREADS")


@dataclass(frozen=True)
class Slot:
    """A worker and its resources. `gpu`: the CUDA_VISIBLE_DEVICES entry it owns (None: no GPU of its
    own); `cpus`: the cores it is bound to (None: the machine's, shared by nobody else)."""

    name: str = "w0"
    node: str = "local"
    gpu: str | None = None
    cpus: tuple[int, ...] | None = None

    def env(self) -> dict[str, str]:
        """Thread counts for a worker bound to cores: every pool a run or its evaluator starts gets
        exactly its share (torch, BLAS, tokenizers' Rayon)."""
        if self.cpus is None:
            return {}
        n = str(len(self.cpus))
        return {name: n for name in THREAD_VARIABLES}

    def bind(self) -> None:
        """Bind the calling thread to the slot's cores: the processes it starts (the run, its
        evaluator) inherit the binding. A no-op where the platform has no affinity (macOS)."""
        if self.cpus is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.cpus)

    def describe(self, device: str = "cpu") -> str:
        where = "" if self.node == "local" else f" on {self.node}"
        if self.gpu is not None:
            return f"GPU {self.gpu}{where}"
        if self.cpus is not None:
            return f"{_ranges(self.cpus)}{where}"
        return f"{device}{where}"

    def regime(self, device: str) -> str:
        """What makes two runs comparable: the device, and for a CPU share its number of cores."""
        if device == "cpu" and self.cpus is not None:
            return f"cpu x{len(self.cpus)}"
        return device


def _ranges(cpus: tuple[int, ...]) -> str:
    """`cores 0-3,8` for (0, 1, 2, 3, 8); `core 5` for one."""
    parts: list[str] = []
    ordered = sorted(cpus)
    start = prev = ordered[0]
    for c in [*ordered[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return f"core{'s' if len(cpus) > 1 else ''} {','.join(parts)}"


def local_slots(workers: int, device: str, gpus: list[str] | None = None,
                cpus: tuple[int, ...] | None = None) -> list[Slot]:
    """The workers of one machine. On CUDA, one per GPU (`workers` of them, 0: every visible one);
    elsewhere the cores split evenly between `workers` (0: one worker), the remainder unused so
    every worker has the same share."""
    from .errors import ConfigError

    if device == "cuda":
        visible = gpus or ["0"]
        n = len(visible) if workers == 0 else workers
        if n > len(visible):
            raise ConfigError(f"--workers {n} asks for more GPUs than this machine shows ({len(visible)})",
                              f"use --workers {len(visible)} or fewer (one experiment per GPU)")
        return [Slot(f"w{i}", gpu=visible[i]) for i in range(n)]
    n = workers or 1
    if n == 1:
        return [Slot("w0")]
    cores = tuple(sorted(cpus if cpus is not None else _available_cpus()))
    if n > len(cores):
        raise ConfigError(f"--workers {n} asks for more workers than this machine has cores ({len(cores)})",
                          f"use --workers {len(cores)} or fewer: each worker needs a core of its own")
    share = len(cores) // n
    return [Slot(f"w{i}", cpus=cores[i * share:(i + 1) * share]) for i in range(n)]


def _available_cpus() -> tuple[int, ...]:
    if hasattr(os, "sched_getaffinity"):
        return tuple(os.sched_getaffinity(0))
    return tuple(range(os.cpu_count() or 1))


def visible_gpus() -> list[str]:
    """The GPUs this machine lets a run use: $CUDA_VISIBLE_DEVICES's entries, else the driver's."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    from .gpus import PROC_GPUS

    try:
        count = len(os.listdir(PROC_GPUS))
    except OSError:
        count = 0
    if count == 0:
        try:
            import torch

            count = torch.cuda.device_count()
        except Exception:  # noqa: BLE001  (no torch, no driver: one GPU, as before)
            count = 1
    return [str(i) for i in range(max(count, 1))]


@dataclass(frozen=True)
class Job:
    """One run of one experiment: picklable, so it can travel to another node."""

    eid: int
    tag: str
    commit: str
    parent: str | None
    budget: float
    trusted_toml: bytes | None = None  # the baseline commit's autoresearch.toml (None: untrusted metric)
    startup: float | None = None  # the tag's measured start-up (measurement.champion_startup)


def device_of(lab: Lab, slot: Slot) -> RunDevice:
    device = run_device(lab.config, gpu=slot.gpu)
    env = {**device.env, **slot.env()}
    return RunDevice(device.type, device.gpu, env, device.dev, device.proc)


def run_job(lab: Lab, wt: Git, worktree: Path, slot: Slot, job: Job, log: Path,
            on_start: Callable[[int, int], None] | None = None,
            on_tick: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Run `job` in `worktree` (its Git is `wt`) on `slot`; returns the ledger's fields for the run.

    KeyboardInterrupt passes through (the run is ended by the runner first)."""
    c = lab.config
    device = device_of(lab, slot)
    slot.bind()
    wt.reset_to(job.commit)
    scratch = lab.scratch(job.eid)
    trusted = None
    if is_trusted(c):
        if job.trusted_toml is None:
            raise AutoresearchError(f"experiment {job.eid} needs the baseline's autoresearch.toml for its evaluator")
        trusted = TrustedEval(scratch, write_trusted_toml(lab.trusted(job.tag), job.trusted_toml), job.budget,
                              c.startup_allowance, c.eval_allowance, device.type, device.env, job.startup)
    _, cache_env = compile_cache.for_run(lab.state_dir, job.tag, (job.commit, job.parent), scratch)
    extra_env = {BUDGET_ENV: f"{job.budget:g}", **device.env, **cache_env,
                 **(trusted.env() if trusted else {})}
    if os.environ.get("PYTHONPATH"):  # the run starts in the worktree: relative entries would break
        extra_env["PYTHONPATH"] = os.pathsep.join(
            str(Path(p).resolve()) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
    spec = runner_mod.RunSpec(
        handoff_dir=trusted.folder if trusted else None, on_handoff=trusted.evaluate if trusted else None,
        handoff_copy=trusted.model if trusted else None,
        sandbox=cast(Mode, c.sandbox), writable=(scratch,), hidden=hidden_paths(lab),
        readable=(*readable_paths(lab), worktree / ".git"),  # bound read-only over the writable worktree
        device_nodes=device.nodes(),
        command=c.run, cwd=worktree, log_path=log, budget=job.budget,
        startup_allowance=c.startup_allowance, eval_allowance=c.eval_allowance,
        env=dict(os.environ), extra_env=extra_env,
        secret_patterns=c.secret_env, pass_env=c.pass_env,
        log_cap_bytes=int(c.log_cap_mb * 2**20),
        memory_limit_bytes=int(c.memory_limit_gb * 2**30) if c.memory_limit_gb else None,
        on_start=on_start, on_tick=on_tick, python=sys.executable,
    )
    with trusted or contextlib.nullcontext():  # the evaluator prepares while the run trains
        result = runner_mod.run_experiment(spec)
    metric = read_metric(c, worktree, result)
    memory = result.summary.get("peak_vram_mb")
    outcome: str = result.outcome  # or "invalid", which only the orchestrator's checks can make a run
    reason, printed = result.error, None
    if trusted is not None:
        printed, metric = metric, trusted.bpb
        if trusted.rejection or result.handoff_error or outcome == "ok":  # these make the run exit 1 too
            problem = trusted.problem(result, printed)
            if problem:
                outcome, reason = "invalid", problem
    tampered = wt.restore_gitfile()  # before any git command reads the worktree again
    if tampered:
        outcome, reason = "invalid", (f"the run replaced the worktree's .git file with {tampered}: git must "
                                      "never read what a run wrote (restored)")
    return dict(
        outcome=outcome, sandbox=result.sandbox, run_seconds=result.wall_seconds, summary=result.summary,
        cpu_seconds=result.cpu_seconds, eval_seconds=trusted.seconds if trusted else None,
        causal_seconds=trusted.causal_seconds if trusted else None,
        metric=metric, printed_metric=printed, handoff_seconds=result.handoff_seconds,
        memory_gb=(memory / 1024 if isinstance(memory, float) else result.peak_rss_mb / 1024), reason=reason,
    )
