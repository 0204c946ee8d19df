"""Where the ``train`` stage trains: in its own process (``train.launcher: local``, the default)
or fanned out as submitit jobs (``train.launcher: submitit``): SLURM on a cluster, one local
process per GPU on a multi-GPU machine, or in-process (``debug``). See docs/distributed.md.

With submitit, a family stage splits its pending variants into jobs of
``train.submitit.variants_per_job`` (one GPU each by default; several variants per job share one
pass over the activation cache), submits them, waits, and checks that every variant was saved
with its fingerprint. Each job runs the local stage itself (:func:`~.stage.train_variants` with
``launcher="local"``), so the output folders, fingerprints and logs are the local stage's; as the
batches are a deterministic function of the step, a variant ends bit-identical to the same
variant trained locally on the same kind of device.

Preemption and timeouts follow submitit's checkpointing protocol: on the preemption signal
(SIGUSR2 by default, also SIGTERM) a job stops at the next step boundary, writes every SAE's
checkpoint, and is requeued (:meth:`TrainJob.checkpoint`); the requeued job resumes from those
checkpoints bit for bit. A job that fails is reported with its log path once all jobs are over;
variants already trained are never retrained (they are skipped before submission, and again
inside a requeued job).

``train.launcher`` and ``train.submitit`` say where an SAE is trained, not what it is: they are
not part of the training fingerprint (:data:`LAUNCHER_KEYS`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ..params import ParamsError

LAUNCHERS = ("local", "submitit")
EXECUTORS = ("auto", "slurm", "local", "debug")
LAUNCHER_KEYS = ("launcher", "submitit")
"""``train`` keys that choose where training runs; removed before the fingerprint and the
:class:`~.trainer.TrainConfig` see the section."""


@dataclass
class SubmititConfig:
    """``train.submitit``: how the pending variants of a stage become jobs."""

    executor: str = "auto"
    """auto (SLURM when sbatch is found, else local) | slurm | local (one process per job on this
    machine, at most one job per free GPU) | debug (in this process, one job after the other)."""
    variants_per_job: int = 1
    """Variants trained together in one job (one pass over the cache feeds them all)."""
    timeout_min: int = 720
    """Wall-clock limit of one job; it is signalled before, checkpoints and is requeued."""
    max_requeue: int = 3
    """Timeouts after which a job is given up (preemptions are always requeued)."""
    gpus_per_node: int = 1
    """GPUs per job."""
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    """SLURM partition (slurm only)."""
    max_parallel: int | None = None
    """Jobs running at once. None: SLURM decides; local: one per free GPU (one at a time on CPU)."""
    folder: str = "logs/submitit"
    """Job scripts, pickles and logs (one sub-folder per job id), relative to the repository root."""
    poll_seconds: float = 5.0
    """How often job states are polled while waiting."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """Further sbatch parameters in submitit's names without the ``slurm_`` prefix, e.g.
    ``{account: myproj, qos: high, constraint: a100, setup: ["module load cuda"]}``."""

    def __post_init__(self) -> None:
        def positive_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        checks = [
            ("executor", self.executor in EXECUTORS, f"must be one of {', '.join(EXECUTORS)}"),
            ("variants_per_job", positive_int(self.variants_per_job), "must be a positive integer"),
            ("timeout_min", positive_int(self.timeout_min), "must be a positive number of minutes"),
            ("max_requeue", isinstance(self.max_requeue, int) and self.max_requeue >= 0, "must be >= 0"),
            ("gpus_per_node", isinstance(self.gpus_per_node, int) and self.gpus_per_node >= 0, "must be >= 0"),
            ("cpus_per_task", self.cpus_per_task is None or positive_int(self.cpus_per_task),
             "must be a positive integer or null"),
            ("mem_gb", self.mem_gb is None or (isinstance(self.mem_gb, (int, float)) and self.mem_gb > 0),
             "must be positive or null"),
            ("max_parallel", self.max_parallel is None or positive_int(self.max_parallel),
             "must be a positive integer or null"),
            ("folder", isinstance(self.folder, str) and bool(self.folder), "must be a folder path"),
            ("poll_seconds", isinstance(self.poll_seconds, (int, float)) and self.poll_seconds > 0, "must be positive"),
            ("slurm", isinstance(self.slurm, dict), "must be a mapping of sbatch parameters"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"'train.submitit.{name}' {message}; got {getattr(self, name)!r}")


@dataclass
class LaunchSettings:
    launcher: str = "local"
    submitit: SubmititConfig = field(default_factory=SubmititConfig)


def pop_launch_settings(train_section: dict[str, Any]) -> LaunchSettings:
    """Remove :data:`LAUNCHER_KEYS` from ``train_section`` (in place) and validate them; errors
    name ``train.<key>``."""
    launcher = train_section.pop("launcher", "local")
    sub = train_section.pop("submitit", None) or {}
    if launcher not in LAUNCHERS:
        raise ParamsError(f"params.yaml: 'train.launcher' must be one of {', '.join(LAUNCHERS)}; got {launcher!r}")
    if not isinstance(sub, dict):
        raise ParamsError(f"params.yaml: 'train.submitit' must be a mapping; got {sub!r}")
    known = {f.name for f in fields(SubmititConfig)}
    unknown = sorted(set(sub) - known)
    if unknown:
        raise ParamsError(f"params.yaml: unknown key 'train.submitit.{unknown[0]}' (known keys: {', '.join(sorted(known))})")
    try:
        return LaunchSettings(launcher, SubmititConfig(**sub))
    except ValueError as exc:
        raise ParamsError(f"params.yaml: {exc}") from exc


def chunks(names: list[str], size: int) -> list[list[str]]:
    return [names[i:i + size] for i in range(0, len(names), size)]


# ---- the job ----------------------------------------------------------------------------------
class _StopFlag:
    """Inside a submitit job: the preemption signal (and SIGTERM) only raise a flag; the trainer
    stops at the next step boundary, writes its checkpoints, and then submitit's own handler (which
    calls :meth:`TrainJob.checkpoint` and requeues) runs, outside any training step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> bool:
        try:
            from submitit import JobEnvironment

            env = JobEnvironment()
        except Exception:
            return False
        if not env.activated() or type(env).__name__ == "DebugJobEnvironment":
            return False  # not a submitit job process (or the in-process debug executor)
        self.usr = env._usr_sig()
        try:
            for sig in {self.usr, signal.SIGTERM}:
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._raise)
        except ValueError:  # not the main thread: leave submitit's handlers alone
            self.uninstall()
            return False
        return True

    def _raise(self, signum, frame) -> None:  # noqa: ANN001
        self.signum = signum
        print(f"[train] caught {signal.Signals(signum).name}: stopping at the next step boundary", flush=True)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def hand_over(self) -> None:
        """Call submitit's preemption handler: checkpoint (requeue) and exit."""
        handler = self.previous.get(self.usr)
        if callable(handler):
            handler(self.usr, None)


class TrainJob:
    """A submitit job: train ``names`` with the local stage in ``root``; checkpointable.

    ``preempt_at_step`` is a drill: on the first attempt the job sends itself the preemption
    signal once that step is reached, to exercise the checkpoint-and-requeue path."""

    def __init__(self, names: list[str], params_path: str, root: str, force: bool = False, attempt: int = 0,
                 preempt_at_step: int | None = None) -> None:
        self.names = list(names)
        self.params_path = str(params_path)
        self.root = str(root)
        self.force = force
        self.attempt = attempt
        self.preempt_at_step = preempt_at_step
        self._flag = _StopFlag()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_flag", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._flag = _StopFlag()

    def __repr__(self) -> str:
        return f"TrainJob({'+'.join(self.names)}, attempt {self.attempt})"

    def _should_stop(self, step: int) -> bool:
        if (self.preempt_at_step is not None and self.attempt == 0 and step >= self.preempt_at_step
                and self._flag.signum is None and self._flag.previous):
            os.kill(os.getpid(), self._flag.usr)
        return self._flag.signum is not None

    def __call__(self) -> list[str]:
        from .stage import train_variants
        from .trainer import TrainingInterrupted

        watching = self._flag.install()
        try:
            with contextlib.chdir(self.root):
                if self.attempt:
                    print(f"[train] {self!r}: resuming from the checkpoints", flush=True)
                return train_variants(self.names, self.params_path, progress=False, force=self.force,
                                      launcher="local", should_stop=self._should_stop if watching else None)
        except TrainingInterrupted:
            if not watching:
                raise
            self._flag.hand_over()  # requeues through checkpoint() and exits
            raise
        finally:
            self._flag.uninstall()

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's protocol: what to run when this job is requeued. The checkpoints are on
        disk already; the requeued job never retrains a variant it finished (no ``force``)."""
        from submitit.helpers import DelayedSubmission

        print(f"[train] {self!r}: checkpointed, requeued", flush=True)
        return DelayedSubmission(TrainJob(self.names, self.params_path, self.root, force=False,
                                          attempt=self.attempt + 1, preempt_at_step=self.preempt_at_step))


# ---- executors ----------------------------------------------------------------------------------
def visible_gpus() -> list[int]:
    """GPU ids this process may hand to local jobs (CUDA_VISIBLE_DEVICES if it lists ids)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [s.strip() for s in listed.split(",") if s.strip()]
        if all(s.isdigit() for s in ids):
            return [int(s) for s in ids]
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # pragma: no cover - torch always importable here
        return []


def resolve_executor(name: str) -> str:
    if name != "auto":
        return name
    from submitit import AutoExecutor

    return "slurm" if AutoExecutor.which() == "slurm" else "local"


def make_executor(cfg: SubmititConfig, kind: str, folder: Path, name: str, gpus: list[int] | None = None):
    """A configured submitit executor of ``kind`` (slurm | local | debug)."""
    import submitit

    job_folder = folder / "%j"
    if kind == "debug":
        return submitit.DebugExecutor(job_folder)
    if kind == "local":
        executor = submitit.LocalExecutor(job_folder, max_num_timeout=cfg.max_requeue)
        params: dict[str, Any] = {"timeout_min": cfg.timeout_min, "gpus_per_node": len(gpus or [])}
        if gpus:
            params["visible_gpus"] = list(gpus)
        executor.update_parameters(**params)
        return executor
    if kind == "slurm":
        executor = submitit.AutoExecutor(job_folder, cluster="slurm", slurm_max_num_timeout=cfg.max_requeue)
        params = {"name": name, "timeout_min": cfg.timeout_min, "gpus_per_node": cfg.gpus_per_node,
                  "cpus_per_task": cfg.cpus_per_task, "mem_gb": cfg.mem_gb, "tasks_per_node": 1, "nodes": 1,
                  "slurm_partition": cfg.partition, "slurm_array_parallelism": cfg.max_parallel}
        params.update({f"slurm_{k}": v for k, v in cfg.slurm.items()})
        executor.update_parameters(**params)
        return executor
    raise ParamsError(f"params.yaml: 'train.submitit.executor' must be one of {', '.join(EXECUTORS)}; got {kind!r}")


@dataclass
class JobOutcome:
    names: list[str]
    job_id: str
    log: str
    error: str | None = None
    trained: list[str] = field(default_factory=list)


def _outcome(job, names: list[str]) -> JobOutcome:
    # the debug executor runs jobs in this process: what they print is on this console
    log = "this console (debug executor)" if type(job).__name__ == "DebugJob" else str(job.paths.stderr)
    try:
        error = job.exception()
    except Exception as exc:  # submitit.core.utils.UncompletedJobError: killed without a result
        error = exc
    if error is not None:
        return JobOutcome(names, str(job.job_id), log, error=f"{type(error).__name__}: {error}")
    return JobOutcome(names, str(job.job_id), log, trained=list(job.result() or []))


def run_jobs(groups: list[list[str]], make_job: Callable[[list[str]], TrainJob], cfg: SubmititConfig,
             folder: Path, name: str = "moesae-train", kind: str | None = None) -> list[JobOutcome]:
    """Submit one job per group, wait for all of them, return what became of each."""
    kind = resolve_executor(cfg.executor) if kind is None else kind
    outcomes: list[JobOutcome] = []
    if kind in ("slurm", "debug"):
        executor = make_executor(cfg, kind, folder, name)
        with executor.batch() if kind == "slurm" and len(groups) > 1 else contextlib.nullcontext():
            jobs = [executor.submit(make_job(g)) for g in groups]
        for job, group in zip(jobs, groups):
            if kind == "slurm":
                print(f"[train] submitted {'+'.join(group)} as SLURM job {job.job_id}", flush=True)
        for job, group in zip(jobs, groups):
            outcomes.append(_report(_outcome(job, group)))
        return outcomes
    # local: one process per job, each on its own GPU(s); jobs wait for a free slot
    pool, per_job = visible_gpus(), cfg.gpus_per_node
    if pool and per_job:
        slots = [pool[i:i + per_job] for i in range(0, len(pool) - per_job + 1, per_job)] or [pool]
    else:
        slots = [[]]
    if cfg.max_parallel is not None:
        slots = slots[:cfg.max_parallel] if pool and per_job else [[] for _ in range(cfg.max_parallel)]
    pending = list(groups)
    running: list[tuple[Any, list[str], list[int]]] = []
    free = list(slots)
    while pending or running:
        while pending and free:
            group, gpus = pending.pop(0), free.pop(0)
            job = make_executor(cfg, "local", folder, name, gpus).submit(make_job(group))
            where = f"GPU {','.join(map(str, gpus))}" if gpus else "CPU"
            print(f"[train] started {'+'.join(group)} as local job {job.job_id} ({where})", flush=True)
            running.append((job, group, gpus))
        time.sleep(min(cfg.poll_seconds, 1.0) if not running else cfg.poll_seconds)
        still = []
        for job, group, gpus in running:
            if job.done():
                outcomes.append(_report(_outcome(job, group)))
                free.append(gpus)
            else:
                still.append((job, group, gpus))
        running = still
    return outcomes


def _report(outcome: JobOutcome) -> JobOutcome:
    what = "+".join(outcome.names)
    if outcome.error is None:
        print(f"[train] job {outcome.job_id} ({what}) finished; log: {outcome.log}", flush=True)
    else:
        print(f"[train] job {outcome.job_id} ({what}) FAILED; log: {outcome.log}", file=sys.stderr, flush=True)
    return outcome


def submit_variants(names: list[str], params_path: str | Path, settings: SubmititConfig, *, force: bool,
                    is_trained: Callable[[str], bool], label: str = "train",
                    family_of: Callable[[str], str] | None = None) -> list[str]:
    """Train the pending ``names`` as submitit jobs; returns those trained. Raises (after every
    job is over) naming each variant that did not end trained and its job's log.

    A job holds variants of one family only (``family_of``), which share a step count."""
    root = Path.cwd().resolve()
    params = str(Path(params_path).resolve())
    folder = (root / settings.folder) if not Path(settings.folder).is_absolute() else Path(settings.folder)
    by_family: dict[str, list[str]] = {}
    for name in names:
        by_family.setdefault(family_of(name) if family_of else "", []).append(name)
    groups = [g for members in by_family.values() for g in chunks(members, settings.variants_per_job)]
    print(f"[train] {len(names)} variant(s) in {len(groups)} submitit job(s), executor "
          f"{resolve_executor(settings.executor)}, logs under {folder}", flush=True)
    outcomes = run_jobs(groups, lambda g: TrainJob(g, params, str(root), force=force), settings, folder,
                        name=f"moesae-{label}")
    problems = []
    for outcome in outcomes:
        missing = [n for n in outcome.names if not is_trained(n)]
        if outcome.error is not None:
            problems.append(f"job {outcome.job_id} ({', '.join(outcome.names)}) failed: "
                            f"{outcome.error.strip().splitlines()[-1] if outcome.error.strip() else outcome.error}; "
                            f"log: {outcome.log}")
        elif missing:
            problems.append(f"job {outcome.job_id} ended but {', '.join(missing)} not saved; log: {outcome.log}")
    if problems:
        raise RuntimeError(
            "training jobs did not all finish (variants already saved stay; rerunning the stage resubmits only "
            "the others, resuming from their checkpoints):\n  " + "\n  ".join(problems)
        )
    return [n for o in outcomes for n in o.trained]
