"""Feature Choice SAE (Ayonrinde 2024): features choose tokens. Each feature j keeps at most m_j
tokens of the batch, with uniform or Zipf-distributed capacities, plus the ``aux_zipf`` loss.

Parameters (checkpoint names and shapes): those of TopK (W_enc, b_enc, W_dec, b_dec,
tokens_since_fired) plus buffers ``thresholds`` [M] (per-feature inference thresholds θ_j) and
``firing_density`` [M] (EMA of each feature's measured firing density d_j).

Capacities for a batch of B tokens, weights w_j = (j + 1)^(−s) (s = zipf_exponent for ``zipf``,
s = 0 for ``uniform``):  m_j = clamp(round(k · B · w_j / Σ_i w_i), 1, B), so Σ_j m_j ≈ k·B
(mean L0 ≈ k) and the expected firing density of feature j is ρ_j = min(1, k · w_j / Σ_i w_i).
Features are ranked by index; training decides which feature becomes frequent.

π = ReLU(W_enc (x − b_dec) + b_enc)  [B, M].
- **Training**: feature j keeps its m_j largest positive entries of column j (never more); its
  batch threshold t_j is the m_j-th largest value of the column (0 when fewer are positive), and
  θ_j ← β θ_j + (1 − β) t_j (β = threshold_decay).
- **Inference** (eval mode): z_j = π_j · 1[π_j > θ_j], per token, no batch dependence.

**aux_zipf** (our design; the published formula is not public). With d_j ← β_d d_j + (1 − β_d) ·
(share of the batch's tokens on which j fired) and the under-firing set
U = {j : d_j < τ ρ_j}  (τ = aux_zipf_fraction),
    L_aux_zipf = α · ‖e − Σ_{j ∈ TopK_{k_aux}(π restricted to U)} π_j W_dec,j‖² / ‖e − ē‖²,
with e = x − x̂ (stop-gradient), ē its batch mean, α = aux_zipf_coefficient, k_aux = aux_k (d/2).
It is AuxK (Gao et al.) with "dead" replaced by "firing below τ times its Zipf-expected density":
with uniform capacities and d_j = 0 it is exactly AuxK over never-firing features; with Zipf
capacities it also revives a frequent-rank feature that fires far less than its rank promises.
d_j starts at ρ_j (no feature counts as under-firing before it has been observed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import (SAEOutput, _check, fired_latents, flat_support, geometric_median, reconstruction_mse, scatter_code,
                   sparse_decode)
from .registry import register
from .topk import TopKConfig, TopKSAE

CAPACITIES = ("uniform", "zipf")


def capacity_weights(num_latents: int, capacity: str, zipf_exponent: float) -> Tensor:
    """w_j: 1 for uniform capacities, (j + 1)^(−s) for Zipf."""
    if capacity == "uniform":
        return torch.ones(num_latents)
    return torch.arange(1, num_latents + 1, dtype=torch.float64).pow(-zipf_exponent).float()


def feature_capacities(weights: Tensor, k: int, batch_size: int) -> Tensor:
    """m_j = clamp(round(k · B · w_j / Σ w), 1, B) as a LongTensor [M]."""
    raw = k * batch_size * weights.double() / weights.double().sum()
    return raw.round().clamp(1, batch_size).long()


def expected_density(weights: Tensor, k: int) -> Tensor:
    """ρ_j = min(1, k · w_j / Σ w): the share of tokens feature j is expected to fire on."""
    return (k * weights / weights.sum()).clamp(max=1.0)


def feature_choice_mask(pre: Tensor, capacities: Tensor, as_float: bool = False) -> tuple[Tensor, Tensor]:
    """Keep, per column j, the ``capacities[j]`` largest positive entries.

    Returns the boolean keep mask ``[B, M]`` (with ``as_float``: 1.0 / 0.0 in ``pre``'s dtype,
    ready to multiply) and each column's batch threshold t_j (its m_j-th largest value, 0 when
    the column has fewer positive entries).

    Only the top m_j of each column are needed, not its full order: the columns are grouped by
    the power of two at or above their capacity, and each group takes one ``topk`` of that depth
    along the batch (on the transposed, contiguous block). With Zipf capacities most features
    keep one or two tokens, so this costs a small fraction of sorting every column.
    """
    B, M = pre.shape
    device = pre.device
    caps = capacities.to(device).clamp(1, B)
    depth = torch.clamp(2 ** torch.ceil(torch.log2(caps.double())).long(), max=B)
    rows = pre.detach().t().contiguous()  # [M, B]: the selections run along the contiguous dim
    keep = torch.zeros(B, M, dtype=pre.dtype, device=device)
    batch_threshold = pre.new_zeros(M)
    for K in torch.unique(depth).tolist():
        cols = (depth == K).nonzero().squeeze(1)
        block = rows if cols.numel() == M else rows.index_select(0, cols)
        if K == 1:  # capacity 1 (most features under Zipf capacities): the column's maximum
            values, order = block.max(dim=1, keepdim=True)
        else:
            values, order = block.topk(int(K), dim=1)  # [n, K], largest first
        cap = caps.index_select(0, cols)
        kept = (torch.arange(int(K), device=device)[None, :] < cap[:, None]) & (values > 0)
        # written straight into [B, M] at (token, feature): K entries per feature, all distinct
        keep.index_put_((order.reshape(-1), cols.repeat_interleave(int(K))), kept.reshape(-1).to(pre.dtype))
        batch_threshold.index_copy_(0, cols, values.gather(1, (cap - 1)[:, None])[:, 0])
    return (keep if as_float else keep.bool()), batch_threshold.clamp_min(0)


@dataclass
class FeatureChoiceConfig(TopKConfig):
    capacity: str = "uniform"
    """How the k·B token slots are shared among features: uniform | zipf."""
    zipf_exponent: float = 1.0
    """s in w_j = (j + 1)^(−s) for Zipf capacities."""
    threshold_decay: float = 0.99
    """β: EMA decay of the per-feature inference thresholds."""
    density_decay: float = 0.99
    """β_d: EMA decay of the measured firing densities d_j."""
    aux_zipf_fraction: float = 0.1
    """τ: a feature is under-firing when d_j < τ · ρ_j."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.capacity in CAPACITIES, "capacity", f"must be one of {CAPACITIES}, got {self.capacity!r}")
        _check(self.zipf_exponent >= 0, "zipf_exponent", "must be non-negative")
        _check(0 <= self.threshold_decay < 1, "threshold_decay", "must be in [0, 1)")
        _check(0 <= self.density_decay < 1, "density_decay", "must be in [0, 1)")
        _check(0 < self.aux_zipf_fraction <= 1, "aux_zipf_fraction", "must be in (0, 1]")


@register("feature_choice")
class FeatureChoiceSAE(TopKSAE):
    """``aux_coefficient`` (inherited) weights the aux_zipf loss; ``aux_k`` its k_aux."""

    config_class = FeatureChoiceConfig
    display_name = "Feature Choice"

    @classmethod
    def config_label(cls, cfg: FeatureChoiceConfig) -> str:
        return f"{cls.display_name} ({cfg.capacity})"

    def __init__(self, cfg: FeatureChoiceConfig) -> None:
        super().__init__(cfg)
        weights = capacity_weights(cfg.num_latents, cfg.capacity, cfg.zipf_exponent)
        self.register_buffer("capacity_weights", weights, persistent=False)
        rho = expected_density(weights, cfg.k)
        self.register_buffer("expected_density", rho, persistent=False)
        self.register_buffer("thresholds", torch.zeros(cfg.num_latents))
        self.register_buffer("firing_density", rho.clone())

    def capacities(self, batch_size: int) -> Tensor:
        return feature_capacities(self.capacity_weights, self.cfg.k, batch_size)

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        self.b_dec.copy_(geometric_median(x).to(self.b_dec.dtype))
        _, t = feature_choice_mask(self.pre_activations(x), self.capacities(x.shape[0]))
        self.thresholds.copy_(t)

    def under_firing(self) -> Tensor:
        """Boolean [M]: features firing below aux_zipf_fraction times their expected density."""
        return self.firing_density < self.cfg.aux_zipf_fraction * self.expected_density  # type: ignore[attr-defined]

    def forward(self, x: Tensor) -> SAEOutput:
        cfg: FeatureChoiceConfig = self.cfg  # type: ignore[assignment]
        if self.sparse_step(x):
            return self.sparse_forward(x)
        pre = self.pre_activations(x)
        if self.training:
            keep, batch_threshold = feature_choice_mask(pre.detach(), self.capacities(x.shape[0]), as_float=True)
            with torch.no_grad():
                self.thresholds.mul_(cfg.threshold_decay).add_((1 - cfg.threshold_decay) * batch_threshold)
                fired = keep.mean(0)
                self.firing_density.mul_(cfg.density_decay).add_((1 - cfg.density_decay) * fired)
        else:
            keep = pre > self.thresholds
        z = pre * keep  # keep: float 1.0 / 0.0 in training (feature_choice_mask), bool at inference
        x_hat = torch.addmm(self.b_dec, z, self.W_dec)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        if self.training and cfg.aux_coefficient > 0:
            losses["aux_zipf"] = self.aux_loss(x, x_hat, pre, self.under_firing())
        # z ≥ 0: a latent fired on the batch iff its column maximum is > 0 (one pass, no abs)
        return SAEOutput(x_hat=x_hat, losses=losses, latents=z, extras={"fired": z.detach().amax(0) > 0})

    def sparse_forward(self, x: Tensor) -> SAEOutput:
        """The CPU training step on the kept entries only, as TopK's: the selection runs on
        pre-activations computed without autograd, the k·B kept entries (flat, a variable count
        per token) are recomputed with autograd (:func:`~.base.kept_dot`) and decoded
        (:func:`~.base.sparse_decode`), and aux_zipf reads its candidates' values the same way.
        Same gradients as the dense formulation (tested); GPUs use the dense one."""
        cfg: FeatureChoiceConfig = self.cfg  # type: ignore[assignment]
        B, M = x.shape[0], cfg.num_latents
        x_c = x - self.b_dec
        raw, pre = self.selection_preactivations(x_c)
        with torch.no_grad():
            keep, batch_threshold = feature_choice_mask(pre, self.capacities(B))
            self.thresholds.mul_(cfg.threshold_decay).add_((1 - cfg.threshold_decay) * batch_threshold)
            positions, columns, offsets = flat_support(keep)
            fired = torch.bincount(columns, minlength=M).to(self.firing_density.dtype) / B  # = keep.mean(0)
            self.firing_density.mul_(cfg.density_decay).add_((1 - cfg.density_decay) * fired)
        values = self.flat_kept_values(x_c, raw, positions, columns, offsets)
        x_hat = sparse_decode(values, columns, self.W_dec, self.b_dec, offsets)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        if cfg.aux_coefficient > 0:
            losses["aux_zipf"] = self.aux_loss(x, x_hat, pre, self.under_firing(),
                                               values_of=lambda ids: self.kept_values(x_c, ids, raw))
        return SAEOutput(x_hat=x_hat, losses=losses, latents=scatter_code(positions, values, (B, M)),
                         extras={"fired": fired_latents(columns[values.detach() > 0], M)})
