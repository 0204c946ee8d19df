"""The training loop (docs/method.md#training-recipe): any list of SAEs from one stream of activation batches.

Recipe: Adam (0.9, 0.999), no weight decay, lr = 2e-4 / sqrt(M / 2^14) unless set, constant then
linear decay to 0 over the last 20% of steps, global grad-norm clip 1.0. Order inside a step:
renormalise decoder → loss → backward → clip → project decoder gradients → Adam step.

One pass over the data feeds the whole list (each SAE sees exactly the same batches). Batches
come from a *deterministic* source: ``batches(step)`` returns the batch for a step, so a run that
is interrupted and resumed from its checkpoint sees the same data and ends with the same weights.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

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
    steps: int = 300
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
    checkpoint_every: int = 100
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

    def __post_init__(self) -> None:
        self.base_lr = self.config.lr or lr_for_width(self.sae.cfg.num_latents)
        frozen = self.sae.frozen_parameter_names()
        params = [p for n, p in self.sae.named_parameters() if n not in frozen]
        self.optimizer = make_adam(params, self.base_lr, self.config.betas)
        maybe_compile(self.sae, self.config.compile)
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)

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
        return int(state["step"])


def _check_finite(run: TrainingRun, step: int, what: str, value: Tensor) -> None:
    if not torch.isfinite(value).all():
        raise TrainingDiverged(
            f"[{run.name}] {what} became {value.item() if value.numel() == 1 else 'non-finite'} at step {step}. "
            "Lower its learning rate ('lr' in params.yaml), check the activation cache for NaNs, "
            f"or delete {run.checkpoint_path() or 'its checkpoint'} to restart it."
        )


def train_step(run: TrainingRun, x: Tensor, step: int, dist=None) -> dict[str, float]:
    """One optimiser step of ``run`` on the batch ``x``.

    ``dist``: the data-parallel hook (:class:`.distributed.DataParallel`, None for one process):
    ``x`` is this rank's slice; gradients, dead-latent statistics and logged numbers are reduced
    over the ranks.
    """
    sae, cfg = run.sae, run.config
    sae.train()
    lr = run.base_lr * lr_multiplier(step, cfg.steps, cfg.decay_fraction)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sae.normalize_decoder()
    with autocast_context(x.device, resolve_autocast(cfg.autocast, x.device)):
        out = sae(x)
        loss = out.loss
    _check_finite(run, step, "the loss", loss.detach())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dist is not None:
        dist.reduce_gradients(sae)  # data parallel: every rank gets the full batch's gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    _check_finite(run, step, "the gradient norm", grad_norm.detach())
    sae.project_decoder_grad()
    run.optimizer.step()
    tokens = x.shape[0] if dist is None else dist.batch_tokens
    sae.update_dead_statistics(out, tokens)
    if dist is not None:
        dist.reduce_statistics(sae)  # a latent that fired on any rank fired in the batch
    run.tokens_seen += tokens
    stats = {name: float(v.detach()) for name, v in out.losses.items()}
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
    stop_after=None,
    dist=None,
) -> list[TrainingRun]:
    """Train every run on the same batches. ``batch_at(step)`` must be deterministic.

    Each run resumes from its own checkpoint (if any). ``stop_after`` stops early after that many
    steps of this call (used to test interruption). Returns the runs; the caller saves the models.

    ``stop_after`` may also be a callable ``(steps done) -> bool`` polled after every step (a
    requested stop, e.g. a preempted job): when it returns True before the last step, every
    run's checkpoint is written and :class:`TrainingInterrupted` is raised. ``dist``: train each
    SAE data-parallel across processes (:mod:`.distributed`); only its writer rank writes
    checkpoints.
    """
    if not runs:
        return list(runs)
    steps = {r.config.steps for r in runs}
    if len(steps) != 1:
        raise ValueError(f"invalid train config field 'steps': runs trained together need one step count, got {steps}")
    total = steps.pop()
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
            t0 = time.perf_counter()
            stats = train_step(r, x, step, dist=dist)
            r.seconds += time.perf_counter() - t0
            if step % r.config.log_every == 0 or step == total - 1:
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
            return list(runs)
    return list(runs)


def _stop_requested(stop_after, done_this_call: int, steps_done: int, total: int) -> bool:
    if stop_after is None:
        return False
    if callable(stop_after):
        return steps_done < total and bool(stop_after(steps_done))
    return done_this_call >= stop_after


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
