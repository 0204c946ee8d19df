"""One SAE trained data-parallel across processes (``torchrun``), see docs/distributed.md.

``torchrun --nproc_per_node N $(which moesae) train --variant NAME`` starts N processes; each
builds the same SAE, and :func:`from_environment` joins them into one process group (gloo on
CPU, NCCL on CUDA). Every step, each rank takes a disjoint contiguous slice of the step's batch
(rows ``[B·r/N, B·(r+1)/N)``: the batches stay a deterministic function of the step), and the
trainer calls the hooks of :class:`DataParallel`:

- :meth:`~DataParallel.reduce_gradients` after ``backward``: the ranks' gradients are summed,
  each weighted by its share of the batch, so every rank holds the gradient of the full-batch
  mean loss (for losses that are means over tokens) before clipping and the Adam step. The
  ranks stay bit-identical to each other.
- :meth:`~DataParallel.reduce_statistics` after the step: a latent that fired on any rank fired
  in the batch (``tokens_since_fired``: the minimum over ranks after each rank counted the whole
  batch), and the floating-point buffers a step updates (thresholds, calibrated sparsity
  coefficients, firing densities) are averaged.
- :meth:`~DataParallel.reduce_log` on the logged numbers: weighted means over the ranks.

Rank 0 alone writes checkpoints and the trained SAE. What is batch-level in an architecture (the
TopK budget of BatchTopK or Scale's batch TopK, Feature Choice capacities, load-balancing and AuxK
normalisations, the sparsity calibration's batch L0) is computed per slice, so a DDP run is close
to, not bit-identical with, one process on the full batch; the world size is therefore part of
the training fingerprint (:func:`fingerprint_recipe`).

This module is used only when ``WORLD_SIZE`` > 1; the one-process path never imports it.
"""
from __future__ import annotations

import atexit
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as tdist
from torch import Tensor

NOT_REDUCED_LOG_KEYS = ("lr", "dead_fraction")
"""Logged numbers already identical on every rank (no average, so no rounding)."""


def world_size_from_environment() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from exc


def code_digest() -> str:
    """Hash of this module: with more than one rank, its reductions decide the weights."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def fingerprint_recipe(recipe: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The ``train`` recipe as fingerprinted: unchanged for one process (so every SAE trained
    before data parallelism existed stays up to date), plus the world size and this module's code
    for more than one."""
    if world_size <= 1:
        return dict(recipe)
    return {**recipe, "world_size": int(world_size), "distributed_code": code_digest()}


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of an ``n``-row batch that ``rank`` trains on (disjoint, covering)."""
    return n * rank // world_size, n * (rank + 1) // world_size


class ShardedBatches:
    """``batch_at(step)`` over an activation cache that can also read one rank's slice alone.

    ``batch_at(step)`` is the whole batch (the trainer's data-dependent initialisation uses it);
    ``local(step, rank, world_size)`` reads only that rank's rows, equal to
    ``batch_at(step)[start:stop]``."""

    def __init__(self, reader, batch_size: int, seed: int = 0) -> None:
        self.reader = reader
        self.indices = reader.batch_index_fn(batch_size, seed)

    def __call__(self, step: int) -> Tensor:
        return self.reader.rows(self.indices(step))

    def local(self, step: int, rank: int, world_size: int) -> tuple[Tensor, int]:
        idx = self.indices(step)
        start, stop = shard_bounds(len(idx), rank, world_size)
        return self.reader.rows(idx[start:stop]), len(idx)


@dataclass
class DataParallel:
    """The trainer's distributed hook: one process group, this process's rank."""

    rank: int
    world_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_tokens: int = 0
    """Rows of the current step's batch on this rank."""
    batch_tokens: int = 0
    """Rows of the current step's whole batch (all ranks)."""

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes checkpoints, the trained SAE and the log."""
        return self.rank == 0

    # ---- data ----------------------------------------------------------------------------
    def init_batch(self, batch_at: Callable[[int], Tensor]) -> Tensor:
        """The whole first batch, on every rank: the data-dependent initialisation is the same."""
        return batch_at(0).to(self.device)

    def local_batch(self, batch_at: Callable[[int], Tensor], step: int) -> Tensor:
        local = getattr(batch_at, "local", None)
        if local is not None:
            x, n = local(step, self.rank, self.world_size)
        else:
            full = batch_at(step)
            n = full.shape[0]
            start, stop = shard_bounds(n, self.rank, self.world_size)
            x = full[start:stop]
        if x.shape[0] == 0:
            raise ValueError(
                f"invalid train config field 'batch_size': {n} rows cannot be split over {self.world_size} ranks"
            )
        self.local_tokens, self.batch_tokens = int(x.shape[0]), int(n)
        return x.to(self.device)

    def prepare(self, runs: Sequence[Any]) -> None:
        """Put every SAE on this rank's device (its optimiser keeps the same parameters)."""
        if self.device.type != "cpu":
            for run in runs:
                run.sae.to(self.device)

    # ---- trainer hooks -------------------------------------------------------------------
    def start(self, runs: Sequence[Any]) -> None:
        """Check that every rank trains the same SAEs, then give all of them rank 0's weights and
        buffers (the same by construction; this makes it certain)."""
        self.check_same([r.name for r in runs], "SAEs")
        for run in runs:
            with torch.no_grad():
                for tensor in list(run.sae.parameters()) + list(run.sae.buffers()):
                    tdist.broadcast(tensor.data, src=0)

    def reduce_gradients(self, sae: torch.nn.Module) -> None:
        """Every rank's gradient ← Σ_r (n_r / B) · grad_r: the gradient of the full-batch mean."""
        params = [p for p in sae.parameters() if p.requires_grad]
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=self.device)
        tdist.all_reduce(has, op=tdist.ReduceOp.MAX)
        grads = []
        for p, present in zip(params, has.tolist()):
            if present:
                if p.grad is None:  # this slice did not reach p; other ranks' did
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        weight = self.local_tokens / self.batch_tokens
        for dtype in sorted({g.dtype for g in grads}, key=str):
            group = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in group])
            flat.mul_(weight)
            tdist.all_reduce(flat)
            offset = 0
            for g in group:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    @torch.no_grad()
    def reduce_statistics(self, sae: torch.nn.Module) -> None:
        """After each rank ran ``update_dead_statistics`` with the whole batch's token count:
        dead-latent counters ← minimum over ranks (a latent that fired anywhere has fired), the
        other floating-point buffers ← their mean (exact where all ranks agree)."""
        counters = getattr(sae, "tokens_since_fired", None)
        if isinstance(counters, Tensor):
            tdist.all_reduce(counters, op=tdist.ReduceOp.MIN)
        buffers = [b for name, b in sae.named_buffers() if name != "tokens_since_fired" and b.is_floating_point()]
        for dtype in sorted({b.dtype for b in buffers}, key=str):
            group = [b for b in buffers if b.dtype == dtype]
            flat = torch.cat([b.reshape(-1) for b in group])
            # mean = rank 0's value + mean of the differences: exactly rank 0's value wherever
            # every rank holds the same number (constant buffers never drift by rounding)
            reference = flat.clone()
            tdist.broadcast(reference, src=0)
            flat.sub_(reference)
            tdist.all_reduce(flat)
            flat.div_(self.world_size).add_(reference)
            offset = 0
            for b in group:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()

    def reduce_log(self, stats: dict[str, float]) -> dict[str, float]:
        """The logged losses, L0 etc. as weighted means over the ranks (= the full batch's)."""
        keys = [k for k in stats if k not in NOT_REDUCED_LOG_KEYS]
        if not keys:
            return stats
        weight = self.local_tokens / self.batch_tokens
        values = torch.tensor([stats[k] * weight for k in keys], dtype=torch.float64, device=self.device)
        tdist.all_reduce(values)
        return {**stats, **dict(zip(keys, values.tolist()))}

    # ---- coordination --------------------------------------------------------------------
    def check_same(self, value: Any, what: str = "variants") -> None:
        """Raise (on every rank, instead of hanging) when the ranks disagree on ``value``."""
        values: list[Any] = [None] * self.world_size
        tdist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise RuntimeError(
                f"the {self.world_size} ranks disagree on the {what} to train ({values}); "
                "they must read the same params.yaml and model folders"
            )

    def barrier(self) -> None:
        tdist.barrier()


_CURRENT: DataParallel | None = None


def from_environment(device: str | None = None) -> DataParallel | None:
    """The process group of a ``torchrun`` launch (created once per process), or None for one
    process. ``device``: ``cuda`` puts rank r on ``cuda:LOCAL_RANK`` with NCCL; otherwise CPU
    and gloo. ``MOESAE_DIST_BACKEND`` overrides the backend."""
    global _CURRENT
    world_size = world_size_from_environment()
    if world_size <= 1:
        return None
    if _CURRENT is not None:
        return _CURRENT
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None and str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("data-parallel training on 'cuda' requested but torch sees no CUDA GPU")
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    backend = os.environ.get("MOESAE_DIST_BACKEND", backend)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        atexit.register(_close)
    _CURRENT = DataParallel(rank=rank, world_size=world_size, device=dev)
    return _CURRENT


def _close() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
