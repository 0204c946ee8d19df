"""BatchTopK SAE (Bussmann et al. 2024) = Mutual Choice SAE (Ayonrinde 2024): one implementation,
registered under both names.

Parameters (checkpoint names and shapes): those of TopK (W_enc, b_enc, W_dec, b_dec,
tokens_since_fired) plus the buffer ``threshold`` [] — the global inference threshold θ.

π = ReLU(W_enc (x − b_dec) + b_enc)  [B, M].
- **Training** (``self.training``): keep the k·B largest entries of the whole B × M matrix, so
  tokens share one budget and a token may get more or fewer than k latents (its code depends on
  the batch). θ tracks the smallest kept value: θ ← β θ + (1 − β) min(kept > 0), β = threshold_decay
  (θ starts at the first batch's value, set in ``init_from_batch``).
- **Inference** (eval mode): z = π · 1[π > θ], per token, no batch dependence; on data like the
  training data the mean L0 is ≈ k.
x̂ = W_decᵀ z + b_dec. AuxK for dead latents as in TopK.

The count per token varies, so the sparse code (``top_values``/``top_indices``) is padded to the
batch's largest count with zeros. As in TopK, only the kept latents get gradients (sparse backward)
and only their decoder rows are read (sparse decode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SAEOutput, _check, geometric_median, reconstruction_mse, sparse_decode
from .registry import register
from .topk import TopKConfig, TopKSAE


def batch_topk(scores: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """Flat positions and values of the ``budget`` largest entries of the whole ``scores``.

    Exact, and faster than one ``topk`` over every entry: the 2·budget/17-th largest of every 17th
    entry is a threshold that about 2·budget entries reach; when at least ``budget`` do (checked),
    the largest ``budget`` are all among them. The stride is odd so that the sample walks through
    every column of a ``[B, 2^n]`` matrix (a stride of 16 would sample the same 1/16 of the
    features in every row, a biased estimate that missed for half the steps of a k = 32 BatchTopK
    SAE). Otherwise the entries above 0 are the candidates when there are enough of them (ReLU
    scores are mostly 0), and only then the full ``topk``.
    """
    flat = scores.reshape(-1)
    budget = min(budget, flat.numel())
    stride = 17
    if flat.numel() >= 32 * budget and budget > 0:
        sample = flat[::stride]
        rank = min(sample.numel(), 2 * -(-budget // stride) + 64)
        cut = sample.topk(rank, sorted=False).values.min()
        candidates = (flat >= cut).nonzero().squeeze(1) if cut > 0 else None
        if candidates is None or candidates.numel() < budget:
            candidates = (flat > 0).nonzero().squeeze(1)
        if candidates.numel() >= budget:
            values, j = flat.index_select(0, candidates).topk(budget, sorted=False)
            return candidates.index_select(0, j), values
    values, positions = flat.topk(budget, sorted=False)
    return positions, values


def batch_topk_mask(scores: Tensor, budget: int) -> Tensor:
    """Boolean mask of the ``budget`` largest entries of the whole ``scores`` matrix."""
    positions, _ = batch_topk(scores, budget)
    return torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device).index_fill_(0, positions, True).view_as(scores)


@torch.no_grad()
def update_threshold(threshold: Tensor, kept_values: Tensor, decay: float) -> None:
    """EMA of the smallest positive kept value; a negative threshold means 'not yet set'."""
    positive = kept_values[kept_values > 0]
    if positive.numel() == 0:
        return
    smallest = positive.min().to(threshold.dtype)
    if float(threshold) < 0:
        threshold.copy_(smallest)
    else:
        threshold.mul_(decay).add_((1 - decay) * smallest)


@dataclass
class FlatCode:
    """A code with a variable count per token, flat: entry p is (row ``rows[p]``, column
    ``columns[p]``), sorted by row then column; token t's entries start at ``offsets[t]``.
    ``padded`` / ``keep`` / ``slot``: the same code as ``[B, width]`` columns padded with distinct
    unkept ones, its mask, and each entry's place in its row (see :func:`rows_of_positions`)."""

    positions: Tensor
    rows: Tensor
    columns: Tensor
    offsets: Tensor
    padded: Tensor
    keep: Tensor
    slot: Tensor

    def to_padded(self, values: Tensor) -> Tensor:
        """Flat ``values`` ``[n]`` as ``[B, width]`` rows matching ``padded`` (zeros on the padding)."""
        return values.new_zeros(self.padded.shape).index_put((self.rows, self.slot), values)


def flat_code(positions: Tensor, shape: tuple[int, int]) -> FlatCode:
    """:class:`FlatCode` of flat positions into a ``[B, W]`` matrix."""
    padded, keep, (positions, rows, slot, counts) = _rows_of_positions(positions, shape)
    offsets = torch.cumsum(counts, 0) - counts
    return FlatCode(positions, rows, positions - rows * shape[1], offsets, padded, keep, slot)


def rows_of_positions(positions: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Flat positions in a ``[B, W]`` matrix as per-row columns ``[B, width]`` and the mask of the
    real ones: row b holds its positions in column order, then padding (mask False).

    The padding of a row is made of distinct columns the row did not keep (the lowest-numbered
    ones), so a padded code scatters into ``[B, W]`` without two entries on one column.
    """
    padded, keep, _ = _rows_of_positions(positions, shape)
    return padded, keep


def _rows_of_positions(positions: Tensor, shape: tuple[int, int]):
    B, W = shape
    device = positions.device
    positions = positions.sort().values
    rows = torch.div(positions, W, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=B)
    width = max(1, int(counts.max())) if positions.numel() else 1
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(positions.numel(), device=device) - starts.index_select(0, rows)
    out = torch.empty(B, width, dtype=torch.long, device=device)
    out.index_put_((rows, slot), positions - rows * W)
    # padding: among the first min(W, 2·width) columns at least width − count are free in every row
    pool = min(W, 2 * width)
    kept = torch.zeros(B * W, dtype=torch.bool, device=device).index_fill_(0, positions, True).view(B, W)
    free = ~kept[:, :pool]
    rank = torch.cumsum(free, 1) - 1
    pad_rows, pad_cols = (free & (rank < (width - counts)[:, None])).nonzero(as_tuple=True)
    out.index_put_((pad_rows, counts.index_select(0, pad_rows) + rank[pad_rows, pad_cols]), pad_cols)
    keep = torch.arange(width, device=device)[None, :] < counts[:, None]
    return out, keep, (positions, rows, slot, counts)


@torch.no_grad()
def select_batch_topk(
    scores: Tensor, k: int, threshold: Tensor, decay: float, training: bool
) -> tuple[Tensor, Tensor]:
    """Kept positions ``[B, width]`` of each row and the mask of the real ones (padding: False).

    Training: the k·B largest entries of the whole matrix, and θ is updated from the smallest kept
    value; inference: the entries above θ. Rows keep different counts, so positions are padded to
    the largest count in the batch.
    """
    if training:
        positions, values = batch_topk(scores, k * scores.shape[0])
        update_threshold(threshold, values, decay)
        return rows_of_positions(positions, tuple(scores.shape))
    keep = scores > threshold.clamp_min(0)
    width = max(1, int(keep.sum(1).max()))
    positions = (scores * keep.to(scores.dtype)).topk(width, dim=-1, sorted=False).indices
    return positions, keep.gather(1, positions)


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_decay: float = 0.99
    """β: EMA decay of the inference threshold θ (per training step)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.threshold_decay < 1, "threshold_decay", f"must be in [0, 1), got {self.threshold_decay!r}")


@register("batchtopk", "mutual_choice")
class BatchTopKSAE(TopKSAE):
    config_class = BatchTopKConfig
    display_name = "BatchTopK"

    def __init__(self, cfg: BatchTopKConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((), -1.0))

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        self.b_dec.copy_(geometric_median(x).to(self.b_dec.dtype))
        pre = self.pre_activations(x)
        update_threshold(self.threshold, pre[batch_topk_mask(pre, self.cfg.k * x.shape[0])], 0.0)

    def forward(self, x: Tensor) -> SAEOutput:
        # As TopK: select without autograd, recompute only the kept latents with autograd
        # (sparse backward), decode the kept rows only. A token keeps a variable count, so the
        # code is padded to the batch's largest count with zeros (masked, no gradient).
        cfg: BatchTopKConfig = self.cfg  # type: ignore[assignment]
        x_c = x - self.b_dec
        raw, pre = self.selection_preactivations(x_c)
        if not self.training:
            indices, kept = select_batch_topk(pre, cfg.k, self.threshold, cfg.threshold_decay, False)
            return self.sparse_output(x, x_c, indices, raw, pre, kept)
        # Training: the k·B kept entries stay flat (embedding_bag bags of variable size), so the
        # sparse paths do k·B entries of work, not B × the largest count in the batch.
        with torch.no_grad():
            positions, values = batch_topk(pre, cfg.k * x.shape[0])
            update_threshold(self.threshold, values, cfg.threshold_decay)
            code = flat_code(positions, tuple(pre.shape))
        kept_values = self.flat_kept_values(x_c, raw, code.positions, code.columns, code.offsets)
        x_hat = sparse_decode(kept_values, code.columns, self.W_dec, self.b_dec, code.offsets)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        if cfg.aux_coefficient > 0:
            losses["auxk"] = self.aux_loss(
                x, x_hat, pre, self.dead_mask(), values_of=lambda ids: self.kept_values(x_c, ids, raw)
            )
        return SAEOutput(x_hat=x_hat, losses=losses, top_values=code.to_padded(kept_values), top_indices=code.padded)
