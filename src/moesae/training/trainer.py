"""The training loop (docs/method.md#training-recipe): any list of SAEs from one stream of activation batches.

Recipe: Adam (0.9, 0.999), no weight decay, lr = 2e-4 / sqrt(M / 2^14) unless set, constant then
linear decay to 0 over the last 20% of steps, global grad-norm clip 1.0. Order inside a step:
renormalise decoder → loss → backward → clip → project decoder gradients → Adam step.

One pass over the data feeds the whole list (each SAE sees exactly the same batches). Batches
come from a *deterministic* source: ``batches(step)`` returns the batch for a step, so a run that
is interrupted and resumed from its checkpoint sees the same data and ends with the same weights.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..io import atomic_path, atomic_write_text
from ..precision import AUTOCAST_MODES, autocast_context, make_adam, maybe_compile, resolve_autocast
from ..saes.base import SAE, lr_for_width

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; the message names the SAE and the step."""


class TrainingInterrupted(RuntimeError):
    """A requested stop (``stop_after`` callable, e.g. a preempted job): checkpoints are written."""


@dataclass
class TrainConfig:
    steps: int = 1200
    """Optimiser steps."""
    lr: float | None = None
    """Learning rate; None = 2e-4 / sqrt(M / 2^14)."""
    decay_fraction: float = 0.2
    """Linear decay to 0 over this final fraction of the steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    betas: tuple[float, float] = (0.9, 0.999)
    log_every: int = 50
    """Log loss / MSE / L0 / dead fraction every this many steps."""
    checkpoint_every: int = 400
    """Write a resumable checkpoint every this many steps (0 = only at the end)."""
    autocast: str = "auto"
    """bf16 autocast of the forward pass: auto (on CUDA only) | bf16 | off; weights stay fp32."""
    compile: bool = False
    """Compile the SAE with torch.compile (optional speed-up; same checkpoint names)."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.steps, int) or self.steps <= 0:
            problems.append(("steps", f"must be a positive integer, got {self.steps!r}"))
        if self.lr is not None and not (self.lr > 0):
            problems.append(("lr", f"must be positive or null, got {self.lr!r}"))
        if not 0 <= self.decay_fraction <= 1:
            problems.append(("decay_fraction", f"must be in [0, 1], got {self.decay_fraction!r}"))
        if not self.grad_clip > 0:
            problems.append(("grad_clip", f"must be positive, got {self.grad_clip!r}"))
        if self.log_every <= 0:
            problems.append(("log_every", "must be positive"))
        if self.checkpoint_every < 0:
            problems.append(("checkpoint_every", "must be >= 0"))
        if self.autocast not in AUTOCAST_MODES:
            problems.append(("autocast", f"must be one of {AUTOCAST_MODES}, got {self.autocast!r}"))
        if problems:
            name, msg = problems[0]
            raise ValueError(f"invalid train config field '{name}': {msg}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]


def lr_multiplier(step: int, steps: int, decay_fraction: float) -> float:
    """1 until the last ``decay_fraction`` of training, then linear to 0 at the final step."""
    decay_steps = int(steps * decay_fraction)
    if decay_steps == 0 or step < steps - decay_steps:
        return 1.0
    return max(0.0, (steps - step) / decay_steps)


@dataclass
class TrainingRun:
    """One SAE being trained: its model, optimiser and output folder."""

    name: str
    sae: SAE
    config: TrainConfig
    out_dir: Path | None = None
    optimizer: torch.optim.Optimizer = field(init=False)
    base_lr: float = field(init=False)
    history: list[dict] = field(default_factory=list)
    tokens_seen: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    """CPU time of this run's steps (thread time: what it costs on a shared or busy machine)."""
    parameters: list[torch.nn.Parameter] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_lr = self.config.lr or lr_for_width(self.sae.cfg.num_latents)
        frozen = self.sae.frozen_parameter_names()
        params = [p for n, p in self.sae.named_parameters() if n not in frozen]
        self.optimizer = make_adam(params, self.base_lr, self.config.betas)
        self.parameters = list(self.sae.parameters())  # what the gradient clip sees, listed once
        self._autocast: dict[torch.device, torch.dtype | None] = {}
        maybe_compile(self.sae, self.config.compile)
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        if device not in self._autocast:
            self._autocast[device] = resolve_autocast(self.config.autocast, device)
        return self._autocast[device]

    # ---- checkpoints ---------------------------------------------------------------------
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT_FILE

    def save_checkpoint(self, step: int) -> None:
        path = self.checkpoint_path()
        if path is None:
            return
        state = {
            "step": step,
            "model": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "tokens_seen": self.tokens_seen,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "config": self.sae.config_dict(),
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self) -> int:
        """Resume from the checkpoint if there is one; returns the step to continue from."""
        path = self.checkpoint_path()
        if path is None or not path.exists():
            return 0
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise RuntimeError(
                f"[{self.name}] the checkpoint {path} is unreadable ({exc}); delete it to restart this SAE from scratch"
            ) from exc
        if state.get("config") != self.sae.config_dict():
            raise RuntimeError(
                f"[{self.name}] the checkpoint {path} was written for a different configuration; "
                "delete it to retrain with the new parameters"
            )
        self.sae.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = state["history"]
        self.tokens_seen = state["tokens_seen"]
        self.seconds = state["seconds"]
        self.cpu_seconds = state.get("cpu_seconds", 0.0)
        return int(state["step"])


def _check_finite(run: TrainingRun, step: int, loss: Tensor, grad_norm: Tensor) -> None:
    """One cheap check per step (one add, one scalar read): a non-finite loss or gradient stops
    training before the optimiser step, naming the SAE and the step."""
    if math.isfinite(float(loss.detach().float() + grad_norm)):
        return
    what = "the loss" if not math.isfinite(float(loss.detach())) else "the gradient norm"
    value = float(loss.detach()) if what == "the loss" else float(grad_norm)
    raise TrainingDiverged(
        f"[{run.name}] {what} became {value} at step {step}. "
        "Lower its learning rate ('lr' in params.yaml), check the activation cache for NaNs, "
        f"or delete {run.checkpoint_path() or 'its checkpoint'} to restart it."
    )


def train_step(run: TrainingRun, x: Tensor, step: int, log: bool = True, dist=None) -> dict[str, float] | None:
    """One optimiser step of ``run`` on the batch ``x``; the logged statistics when ``log``.

    The statistics (each loss term, L0, dead fraction) cost a dozen small ops and scalar reads,
    so the training loop asks for them only on the steps it logs.

    ``dist``: the data-parallel hook (:class:`.distributed.DataParallel`, None for one process):
    ``x`` is this rank's slice; gradients, dead-latent statistics and logged numbers are reduced
    over the ranks.
    """
    sae, cfg = run.sae, run.config
    if not sae.training:
        sae.train()
    lr = run.base_lr * lr_multiplier(step, cfg.steps, cfg.decay_fraction)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sae.normalize_decoder()
    with autocast_context(x.device, run.autocast_dtype(x.device)):
        out = sae(x)
        loss = out.loss
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dist is not None:
        dist.reduce_gradients(sae)  # data parallel: every rank gets the full batch's gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(run.parameters, cfg.grad_clip, foreach=True)
    _check_finite(run, step, loss, grad_norm)
    sae.project_decoder_grad()
    run.optimizer.step()
    tokens = x.shape[0] if dist is None else dist.batch_tokens
    sae.update_dead_statistics(out, tokens)
    if dist is not None:
        dist.reduce_statistics(sae)  # a latent that fired on any rank fired in the batch
    run.tokens_seen += tokens
    if not log:
        return None
    with torch.no_grad():
        stats = {name: float(v) for name, v in out.losses.items()}
        stats["loss"] = float(loss.detach())
        stats["l0"] = float(out.l0())
        stats["dead_fraction"] = float(sae.dead_mask().float().mean())
    stats["lr"] = lr
    return stats if dist is None else dist.reduce_log(stats)


def train_saes(
    runs: Sequence[TrainingRun],
    batch_at: Callable[[int], Tensor],
    *,
    progress: bool = True,
    stop_after: int | None = None,
    workers: int = 1,
    threads: int | None = None,
    dist=None,
) -> list[TrainingRun]:
    """Train every run on the same batches. ``batch_at(step)`` must be deterministic.

    Each run resumes from its own checkpoint (if any). ``stop_after`` stops early after that many
    steps of this call (used to test interruption). Returns the runs; the caller saves the models.

    ``threads``: torch threads while training (None: leave torch's setting). ``workers`` > 1
    splits the runs among that many forked processes (CPU only), each with ``threads`` threads
    (1 when None) and every batch from the same ``batch_at``; the trained weights, optimiser
    state, history and timings come back into ``runs``. A run's arithmetic depends only on its own
    state, its batches and the thread count, so the split does not change any result: ``workers=2,
    threads=1`` ends bit for bit where ``workers=1, threads=1`` does.

    ``stop_after`` may also be a callable ``(steps done) -> bool`` polled after every step (a
    requested stop, e.g. a preempted job): when it returns True before the last step, every
    run's checkpoint is written and :class:`TrainingInterrupted` is raised. ``dist``: train each
    SAE data-parallel across processes (:mod:`.distributed`; one group, no workers); only its
    writer rank writes checkpoints.
    """
    if not runs:
        return list(runs)
    steps = {r.config.steps for r in runs}
    if len(steps) != 1:
        raise ValueError(f"invalid train config field 'steps': runs trained together need one step count, got {steps}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"invalid train config field 'workers': must be a positive integer, got {workers!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"invalid train config field 'threads': must be a positive integer or None, got {threads!r}")
    total = steps.pop()
    on_cpu = all(p.device.type == "cpu" for r in runs for p in r.sae.parameters())
    groups = partition_runs(runs, workers) if on_cpu and hasattr(os, "fork") and dist is None else [list(runs)]
    if len(groups) == 1:
        with torch_threads(threads):
            _train_together(runs, batch_at, total, progress, stop_after, dist=dist)
    else:
        _train_in_workers(groups, batch_at, total, progress, stop_after, threads or 1)
    return list(runs)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the duration (nothing when None)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def step_cost(run: TrainingRun) -> float:
    """A run's estimated time per step, relative (used only to balance workers).

    At the default size a step is mostly fixed per-op overhead plus work proportional to the
    kept latents (k·d gathers and scatters) and the encoder rows evaluated per token.
    """
    cfg = run.sae.cfg
    return 4.0 + cfg.k / 8 + run.sae.flops_per_token() / (cfg.d_in * 1024)


def partition_runs(runs: Sequence[TrainingRun], workers: int) -> list[list[TrainingRun]]:
    """Split ``runs`` into at most ``workers`` groups of about equal :func:`step_cost` (longest
    first onto the least loaded group; deterministic). Each group keeps the order of ``runs``."""
    count = min(workers, len(runs))
    if count <= 1:
        return [list(runs)]
    loads, members = [0.0] * count, [[] for _ in range(count)]
    order = sorted(range(len(runs)), key=lambda i: (-step_cost(runs[i]), i))
    for i in order:
        g = min(range(count), key=lambda j: (loads[j], j))
        loads[g] += step_cost(runs[i])
        members[g].append(i)
    return [[runs[i] for i in sorted(m)] for m in members if m]


def _stop_requested(stop_after, done_this_call: int, steps_done: int, total: int) -> bool:
    if stop_after is None:
        return False
    if callable(stop_after):
        return steps_done < total and bool(stop_after(steps_done))
    return done_this_call >= stop_after


def _train_together(
    runs: Sequence[TrainingRun], batch_at: Callable[[int], Tensor], total: int, progress: bool, stop_after,
    dist=None,
) -> None:
    """The training loop proper, all ``runs`` in this process, step by step."""
    writer = dist is None or dist.is_writer
    starts = [r.load_checkpoint() for r in runs]
    start = min(starts)
    if start == 0:
        x0 = batch_at(0) if dist is None else dist.init_batch(batch_at)
        for r, s in zip(runs, starts):
            if s == 0:
                r.sae.init_from_batch(x0)
    if dist is not None:
        dist.start(runs)
    done_this_call = 0
    bar = tqdm(range(start, total), initial=start, total=total, disable=not progress or not writer, desc="train",
               unit="step")
    for step in bar:
        x = batch_at(step) if dist is None else dist.local_batch(batch_at, step)
        for r, s in zip(runs, starts):
            if step < s:
                continue  # this run was further along; it already saw this batch
            log = step % r.config.log_every == 0 or step == total - 1
            t0, c0 = time.perf_counter(), time.thread_time()
            stats = train_step(r, x, step, log=log, dist=dist)
            r.seconds += time.perf_counter() - t0
            r.cpu_seconds += time.thread_time() - c0
            if stats is not None:
                r.history.append({"step": step, "tokens": r.tokens_seen, **stats})
            every = r.config.checkpoint_every
            if every and (step + 1) % every == 0 and step + 1 < total and writer:
                r.save_checkpoint(step + 1)
        if progress and runs[0].history:
            last = runs[0].history[-1]
            bar.set_postfix(mse=f"{last['mse']:.4g}", l0=f"{last['l0']:.1f}", dead=f"{last['dead_fraction']:.2f}")
        done_this_call += 1
        if _stop_requested(stop_after, done_this_call, step + 1, total):
            for r in runs:
                if writer:
                    r.save_checkpoint(step + 1)
            if callable(stop_after):
                raise TrainingInterrupted(f"training stopped on request after step {step + 1} of {total}; "
                                          "checkpoints written")
            return


def _worker(
    runs: Sequence[TrainingRun], batch_at: Callable[[int], Tensor], total: int, progress: bool,
    stop_after, threads: int, stop_event, conn,
) -> None:
    """Body of a forked worker: train its runs, send back what the parent's runs need.

    It also stops (checkpoints written, :class:`TrainingInterrupted`) when the parent sets
    ``stop_event``: a stop requested in the parent, or another worker that failed."""
    try:
        torch.set_num_threads(threads)
        if callable(stop_after):
            requested = stop_after
            stop_after = lambda steps: stop_event.is_set() or bool(requested(steps))  # noqa: E731
        elif stop_after is None:
            stop_after = lambda steps: stop_event.is_set()  # noqa: E731
        _train_together(runs, batch_at, total, progress, stop_after)
        payload: Any = ("ok", [
            {"model": r.sae.state_dict(), "optimizer": r.optimizer.state_dict(), "history": r.history,
             "tokens_seen": r.tokens_seen, "seconds": r.seconds, "cpu_seconds": r.cpu_seconds}
            for r in runs
        ])
    except BaseException as exc:  # re-raised in the parent
        payload = ("error", exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}"))
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    conn.send_bytes(buffer.getvalue())
    conn.close()


def _picklable(exc: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
        return True
    except Exception:
        return False


def _train_in_workers(
    groups: list[list[TrainingRun]], batch_at: Callable[[int], Tensor], total: int, progress: bool,
    stop_after, threads: int,
) -> None:
    """Fork one worker per group and wait for all; the first error stops the others (at their
    next step, checkpoints written) and is raised here. A callable ``stop_after`` is polled here
    too (a stop requested to this process, e.g. a signal) and forwarded to the workers."""
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")
    stop_event = ctx.Event()
    procs, pipes = [], []
    results: dict[int, Any] = {}
    try:
        for i, group in enumerate(groups):
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, name=f"moesae-train-{i}", daemon=True,
                               args=(group, batch_at, total, progress and i == 0, stop_after, threads, stop_event, send))
            proc.start()
            send.close()
            procs.append(proc)
            pipes.append(receive)
        pending = dict(enumerate(pipes))
        while pending:
            for receive in wait(list(pending.values()), timeout=0.5):
                i = next(j for j, r in pending.items() if r is receive)
                del pending[i]
                try:
                    data = receive.recv_bytes()
                except EOFError:
                    procs[i].join()
                    names = ", ".join(r.name for r in groups[i])
                    results[i] = ("error", RuntimeError(
                        f"the training worker for {names} died (exit code {procs[i].exitcode}) without a result; "
                        "rerun to resume from the checkpoints, or set train.workers: 1"))
                else:
                    results[i] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
                if results[i][0] == "error":
                    stop_event.set()
            if callable(stop_after) and pending and not stop_event.is_set() and stop_after(0):
                stop_event.set()
        for proc in procs:
            proc.join()
    finally:
        stop_event.set()
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    errors = [results[i][1] for i in sorted(results) if results[i][0] == "error"]
    if errors:  # the root cause first: a worker that failed, not one stopped because of it
        raise next((e for e in errors if not isinstance(e, TrainingInterrupted)), errors[0])
    for i, group in enumerate(groups):
        for run, state in zip(group, results[i][1]):
            run.sae.load_state_dict(state["model"])
            run.optimizer.load_state_dict(state["optimizer"])
            run.history = state["history"]
            run.tokens_seen = state["tokens_seen"]
            run.seconds = state["seconds"]
            run.cpu_seconds = state["cpu_seconds"]


def finish(run: TrainingRun, extra_log: dict | None = None) -> Path:
    """Save the trained SAE (cfg.json + weights + train_log.jsonl) and drop the checkpoint."""
    assert run.out_dir is not None
    run.sae.save(run.out_dir)
    lines = [json.dumps(h) for h in run.history]
    summary = {
        "summary": True,
        "tokens_seen": run.tokens_seen,
        "train_seconds": run.seconds,
        "tokens_per_second": run.tokens_seen / run.seconds if run.seconds > 0 else math.nan,
        "lr": run.base_lr,
        "dead_tokens_threshold": getattr(run.sae.cfg, "dead_tokens_threshold", None),
        "train_config": asdict(run.config),
        **(extra_log or {}),
    }
    atomic_write_text(run.out_dir / LOG_FILE, "\n".join(lines + [json.dumps(summary)]) + "\n")
    ckpt = run.checkpoint_path()
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    return run.out_dir


def read_train_log(model_dir: str | Path) -> tuple[list[dict], dict]:
    """The per-step log rows and the closing summary of a finished training."""
    rows = [json.loads(line) for line in (Path(model_dir) / LOG_FILE).read_text().splitlines() if line.strip()]
    summary = next((r for r in rows if r.get("summary")), {})
    return [r for r in rows if not r.get("summary")], summary


def tensor_batches(data: Tensor, batch_size: int, seed: int = 0) -> Callable[[int], Tensor]:
    """A deterministic ``batch_at(step)`` over an in-memory tensor (one permutation per epoch)."""
    n = data.shape[0]
    if batch_size > n:
        raise ValueError(f"invalid train config field 'batch_size': {batch_size} exceeds the {n} cached tokens")
    per_epoch = n // batch_size
    cache: dict[int, Tensor] = {}

    def batch_at(step: int) -> Tensor:
        epoch, i = divmod(step, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        idx = cache[epoch][i * batch_size : (i + 1) * batch_size]
        return data[idx]

    return batch_at
