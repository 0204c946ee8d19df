"""Evaluation metrics (docs/method.md#metrics) as pure functions of tensors.

Every function here takes tensors (or plain numbers) and returns numbers or tensors; nothing reads
files, models or global state, so each one is tested against hand-computed values
(``tests/test_metrics.py``). The evaluation stage (``moesae.evaluate``) streams data through the
SAE and calls these.

Two known pitfalls are handled on purpose:
- the fraction of variance unexplained divides by the variance *centred on the mean*
  (Σ‖x − x̄‖², not Σ‖x‖², a bug elsewhere);
- activation overlap averages over unordered pairs i < j, each counted once, never i = j.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

# ---- reconstruction ---------------------------------------------------------------------------


def mse(x: Tensor, x_hat: Tensor) -> float:
    """The paper's MSE: Σ over dims of (x − x̂)², averaged over tokens (not normalised)."""
    _same_shape(x, x_hat)
    return float((x.double() - x_hat.double()).pow(2).sum(-1).mean())


def fvu_from_sums(sum_squared_error: float, sum_x: Tensor, sum_squared_norm: float, num_tokens: int) -> float:
    """Fraction of variance unexplained from running sums, so it can be accumulated over batches.

    Σ‖x − x̄‖² = Σ‖x‖² − n‖x̄‖² with x̄ = Σx / n (centred on the mean). Returns NaN when the
    data has no variance (FVU undefined).
    """
    if num_tokens <= 0:
        return math.nan
    mean = sum_x.double() / num_tokens
    total_variance = float(sum_squared_norm) - num_tokens * float(mean.pow(2).sum())
    if total_variance <= 1e-12 * max(float(sum_squared_norm), 1e-300):  # constant data (up to rounding)
        return math.nan
    return float(sum_squared_error) / total_variance


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Normalised MSE = Σ‖x − x̂‖² / Σ‖x − x̄‖² (variance centred on the mean)."""
    _same_shape(x, x_hat)
    x64 = x.double()
    sse = float((x64 - x_hat.double()).pow(2).sum())
    return fvu_from_sums(sse, x64.sum(0), float(x64.pow(2).sum()), x.shape[0])


def l0(code: Tensor) -> float:
    """Mean number of non-zero latents per token actually used in decoding.

    ``code`` is either the dense code ``[tokens, M]`` or the kept values ``[tokens, k]`` of a
    sparse code: zeros (e.g. a TopK slot whose ReLU output was 0) are not counted in either.
    """
    if code.dim() != 2:
        raise ValueError(f"l0 expects a [tokens, latents] code, got shape {tuple(code.shape)}")
    return float((code != 0).sum(1).double().mean())


def feature_fire_counts(indices: Tensor, values: Tensor, num_latents: int) -> Tensor:
    """``[M]`` int64: on how many tokens each feature was non-zero (sparse code ``values/indices``)."""
    _same_shape(indices, values)
    active = values != 0
    return torch.bincount(indices[active].reshape(-1).long(), minlength=num_latents)


def dead_fraction(fire_counts: Tensor) -> float:
    """Share of latents that never fired (count 0) over the evaluated tokens."""
    if fire_counts.numel() == 0:
        return math.nan
    return float((fire_counts == 0).double().mean())


def loss_recovered(ce_clean: float, ce_recon: float, ce_ablate: float) -> float:
    """(CE_ablate − CE_recon) / (CE_ablate − CE_clean): 1 = as good as the clean model, 0 = as bad
    as the ablation. Equal to (CE_recon − CE_zero) / (CE_orig − CE_zero). NaN when the
    ablation does not change the loss (nothing to recover)."""
    denominator = float(ce_ablate) - float(ce_clean)
    if denominator == 0 or not math.isfinite(denominator):
        return math.nan
    return (float(ce_ablate) - float(ce_recon)) / denominator


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN std for fewer than two values)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


# ---- the SAEBench core metrics (sae_bench/evals/core/main.py) --------------------------------
# Pure functions of tensors; the evaluate stage streams its held-out tokens through them. Where a
# metric is a ratio of averages, a ``*_from_sums`` form takes the running sums.


def explained_variance_from_sums(sum_squared_error: float, sum_x: Tensor, sum_squared_norm: float, num_tokens: int) -> float:
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²: the corrected (mean-centred) explained variance, = 1 − FVU.

    SAEBench's ``explained_variance`` means this (its ``explained_variance_legacy`` divides per
    token, and v0.6's code squares the per-dimension mean of x² where it means ‖x̄‖²)."""
    value = fvu_from_sums(sum_squared_error, sum_x, sum_squared_norm, num_tokens)
    return math.nan if math.isnan(value) else 1.0 - value


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over the tokens of ``x`` ``[tokens, d]``."""
    value = fvu(x, x_hat)
    return math.nan if math.isnan(value) else 1.0 - value


def token_cosine_similarity(x: Tensor, x_hat: Tensor, eps: float = 1e-12) -> Tensor:
    """``[tokens]``: cos(x, x̂) per token (SAEBench ``cossim`` is its mean); 0 where either is 0."""
    _same_shape(x, x_hat)
    x64, y64 = x.double(), x_hat.double()
    denominator = (x64.norm(dim=-1) * y64.norm(dim=-1)).clamp_min(eps)
    return (x64 * y64).sum(-1) / denominator


def cosine_similarity(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of cos(x, x̂)."""
    return float(token_cosine_similarity(x, x_hat).mean())


def token_l2_ratio(x: Tensor, x_hat: Tensor) -> Tensor:
    """``[tokens]``: ‖x̂‖ / ‖x‖ per token (shrinkage below 1). As SAEBench, a token with
    ‖x‖ < 1e-4 is divided by 1 instead."""
    _same_shape(x, x_hat)
    norm_in = x.double().norm(dim=-1)
    norm_in = torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in)
    return x_hat.double().norm(dim=-1) / norm_in


def l2_ratio(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of ‖x̂‖ / ‖x‖ (SAEBench ``l2_ratio``)."""
    return float(token_l2_ratio(x, x_hat).mean())


def relative_reconstruction_bias_from_sums(sum_xhat_squared: float, sum_x_dot_xhat: float) -> float:
    """γ = Σ‖x̂‖² / Σ x·x̂: the γ minimising Σ‖x̂/γ − x‖² (Gated SAE paper, eq. 10; SAEBench
    ``relative_reconstruction_bias``). γ < 1: the reconstruction is shrunk; 1: unbiased. NaN when
    Σ x·x̂ = 0."""
    if sum_x_dot_xhat == 0 or not math.isfinite(sum_x_dot_xhat):
        return math.nan
    return float(sum_xhat_squared) / float(sum_x_dot_xhat)


def relative_reconstruction_bias(x: Tensor, x_hat: Tensor) -> float:
    """Σ‖x̂‖² / Σ x·x̂ over the tokens (see :func:`relative_reconstruction_bias_from_sums`)."""
    _same_shape(x, x_hat)
    x64, y64 = x.double(), x_hat.double()
    return relative_reconstruction_bias_from_sums(float(y64.pow(2).sum()), float((x64 * y64).sum()))


def kl_divergence(logits_clean: Tensor, logits_other: Tensor) -> Tensor:
    """``[positions]``: KL(P_clean ‖ P_other) = Σ_v p_clean (log p_clean − log p_other) of the
    next-token distributions (softmax over the last dim), from log-softmax (no log 0)."""
    _same_shape(logits_clean, logits_other)
    log_p = torch.log_softmax(logits_clean.double(), dim=-1)
    log_q = torch.log_softmax(logits_other.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_from_log_probs(log_p: Tensor, log_q: Tensor, p: Tensor | None = None, neg_entropy: Tensor | None = None) -> Tensor:
    """``[positions]``: :func:`kl_divergence` from log-probabilities (``log_softmax`` of each
    logits), as Σ p log p − Σ p log q. ``p`` = exp(log_p) and ``neg_entropy`` = Σ p log p may be
    given when one clean distribution is compared with several (the evaluate stage's splices); the
    per-position sums are combined in float64."""
    _same_shape(log_p, log_q)
    p = log_p.exp() if p is None else p
    if neg_entropy is None:
        neg_entropy = (p * log_p).sum(-1)
    return kl_from_clean(p, neg_entropy, log_q)


def kl_from_clean(p: Tensor, neg_entropy: Tensor, log_q: Tensor) -> Tensor:
    """``[positions]``: KL(p ‖ q) = Σ p log p − Σ p log q from the clean distribution ``p``, its
    ``neg_entropy`` = Σ p log p and the other's log-probabilities, combined in float64."""
    _same_shape(p, log_q)
    return neg_entropy.double() - (p * log_q).sum(-1).double()


def kl_div_score(kl_with_sae: float, kl_with_ablation: float) -> float:
    """(KL_ablation − KL_sae) / KL_ablation: 1 = the spliced model's predictions are the clean
    ones, 0 = as far off as zero ablation (SAEBench ``kl_div_score``). NaN when ablation changes
    nothing."""
    if kl_with_ablation == 0 or not math.isfinite(kl_with_ablation):
        return math.nan
    return (float(kl_with_ablation) - float(kl_with_sae)) / float(kl_with_ablation)


def ce_loss_score(ce_clean: float, ce_with_sae: float, ce_with_ablation: float) -> float:
    """(CE_ablation − CE_sae) / (CE_ablation − CE_clean) (SAEBench ``ce_loss_score``): the loss
    recovered formula, applied to token-averaged losses."""
    return loss_recovered(ce_clean, ce_with_sae, ce_with_ablation)


def feature_density(fire_counts: Tensor, num_tokens: int) -> Tensor:
    """``[M]`` float64: the share of tokens on which each latent fired."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return fire_counts.double() / num_tokens


DENSITY_BIN_EDGES = tuple(-8.0 + 0.25 * i for i in range(33))
"""log10 density bin edges, −8 … 0 in steps of 0.25 (fixed, so histograms compare across SAEs)."""


def log10_density_histogram(density: Tensor, edges: Sequence[float] = DENSITY_BIN_EDGES) -> tuple[Tensor, Tensor, int]:
    """(counts ``[len(edges) − 1]`` int64, edges, dead) of log10 density over the latents that fire.

    Bin i holds edges[i] ≤ log10 ρ < edges[i + 1], the last bin also its right edge; densities
    below the first edge fall in the first bin. Latents that never fire (ρ = 0, log10 = −∞) are
    not in the histogram: ``dead`` counts them."""
    edges_t = torch.tensor([float(e) for e in edges], dtype=torch.float64)
    if edges_t.numel() < 2 or not bool((edges_t[1:] > edges_t[:-1]).all()):
        raise ValueError("edges must be at least two increasing values")
    alive = density[density > 0].double()
    logs = alive.log10().clamp(min=float(edges_t[0]), max=float(edges_t[-1]))
    bins = (torch.bucketize(logs, edges_t, right=True) - 1).clamp(0, edges_t.numel() - 2)
    counts = torch.bincount(bins, minlength=edges_t.numel() - 1)
    return counts, edges_t, int((density <= 0).sum())


def density_summary(density: Tensor) -> dict[str, float]:
    """SAEBench's density scalars: ``freq_over_1_percent`` / ``freq_over_10_percent`` (share of
    latents firing on more than 1 % / 10 % of tokens), and the mean and median log10 density of
    the latents that fire (NaN when none does)."""
    if density.numel() == 0:
        return {"freq_over_1_percent": math.nan, "freq_over_10_percent": math.nan,
                "log10_density_mean": math.nan, "log10_density_median": math.nan}
    d = density.double()
    alive = d[d > 0]
    logs = alive.log10()
    return {
        "freq_over_1_percent": float((d > 0.01).double().mean()),
        "freq_over_10_percent": float((d > 0.1).double().mean()),
        "log10_density_mean": float(logs.mean()) if logs.numel() else math.nan,
        # the lower median for an even count, as torch.median
        "log10_density_median": float(logs.median()) if logs.numel() else math.nan,
    }


# ---- decoder redundancy -----------------------------------------------------------------------


def max_cosine_to_others(W: Tensor, chunk_size: int = 1024) -> Tensor:
    """``[M]``: for each row of ``W [M, d]``, the largest cosine similarity to any *other* row.

    Computed ``chunk_size`` rows at a time (a ``chunk × M`` block in memory), so M = 24576 fits
    easily. A matrix with a single row has no other row: its value is NaN.
    """
    if W.dim() != 2:
        raise ValueError(f"max_cosine_to_others expects a [rows, dims] matrix, got shape {tuple(W.shape)}")
    M = W.shape[0]
    if M < 2:
        return torch.full((M,), math.nan)
    Wn = W.detach().float()
    Wn = Wn / Wn.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = torch.empty(M)
    for start in range(0, M, chunk_size):
        stop = min(start + chunk_size, M)
        sims = Wn[start:stop] @ Wn.T  # [chunk, M]
        rows = torch.arange(stop - start)
        sims[rows, rows + start] = -math.inf  # exclude each row's similarity to itself
        out[start:stop] = sims.max(1).values.cpu()
    return out


def redundancy(max_cosines: Tensor, threshold: float) -> float:
    """Share of features whose maximum cosine to another feature exceeds ``threshold``."""
    if max_cosines.numel() == 0:
        return math.nan
    return float((max_cosines > threshold).double().mean())


def decoder_redundancy(W_dec: Tensor, thresholds: Sequence[float], chunk_size: int = 1024) -> dict[str, float]:
    """``redundancy_<τ>`` for each τ plus ``mean_max_cos`` over all M decoder rows."""
    max_cos = max_cosine_to_others(W_dec, chunk_size)
    result = {f"redundancy_{t:g}": redundancy(max_cos, t) for t in thresholds}
    result["mean_max_cos"] = float(max_cos.double().mean())
    return result


def in_expert_redundancy(W_dec: Tensor, expert_of_feature: Tensor, threshold: float) -> float:
    """Redundancy computed inside each expert (max cosine only to rows of the same expert),
    averaged over experts."""
    if expert_of_feature.shape[0] != W_dec.shape[0]:
        raise ValueError(
            f"expert_of_feature has {expert_of_feature.shape[0]} entries but W_dec has {W_dec.shape[0]} rows"
        )
    values = []
    for expert in torch.unique(expert_of_feature).tolist():
        rows = W_dec[expert_of_feature == expert]
        if rows.shape[0] >= 2:
            values.append(redundancy(max_cosine_to_others(rows), threshold))
    return sum(values) / len(values) if values else math.nan


def random_subset_redundancy(
    W_dec: Tensor, subset_size: int, threshold: float, num_subsets: int, seed: int = 0
) -> float:
    """The inter-expert baseline: the in-expert statistic on random subsets of the whole
    dictionary, each of one expert's size, averaged over ``num_subsets`` seeded draws."""
    M = W_dec.shape[0]
    if not 2 <= subset_size <= M:
        raise ValueError(f"subset_size must be between 2 and the {M} decoder rows, got {subset_size}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be positive, got {num_subsets}")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        idx = torch.randperm(M, generator=generator)[:subset_size]
        values.append(redundancy(max_cosine_to_others(W_dec[idx]), threshold))
    return sum(values) / len(values)


# ---- experts ----------------------------------------------------------------------------------


def expert_usage(selected_experts: Tensor, num_experts: int) -> Tensor:
    """``[N]``: share of (token, selected expert) assignments that went to each expert (sums to 1).

    With one active expert per token this is the share of tokens routed to each expert.
    """
    counts = torch.bincount(selected_experts.reshape(-1).long(), minlength=num_experts).double()
    total = counts.sum()
    return counts / total if total > 0 else counts.fill_(math.nan)


def specialisation_cdf(feature_experts: Tensor, num_experts: int) -> Tensor:
    """Cumulative share of probe features owned by the experts, experts sorted by that usage.

    ``feature_experts`` lists the expert owning each probe token's top features (any shape; −1
    entries are ignored, for slots that held no active feature). Experts are ranked by how many
    of those features they own, most first; entry r − 1 is the share owned by the top r experts,
    so a curve that reaches 1 after few ranks means the category is concentrated in few experts.
    """
    flat = feature_experts.reshape(-1).long()
    flat = flat[flat >= 0]
    counts = torch.bincount(flat, minlength=num_experts).double()
    if counts.sum() == 0:
        return torch.full((num_experts,), math.nan, dtype=torch.float64)
    ranked = counts.sort(descending=True).values
    return ranked.cumsum(0) / ranked.sum()


def activation_overlap(top_indices: Tensor, k: int, valid: Tensor | None = None) -> float:
    """Mean over probe-token pairs i < j of |top-k(i) ∩ top-k(j)| / k.

    ``top_indices [P, k]`` are each token's kept features; ``valid`` (same shape, bool) marks the
    ones that were actually non-zero (default: all). Uses Σ_{i<j} |S_i ∩ S_j| = Σ_f C(c_f, 2),
    c_f = number of tokens whose set contains f, so each unordered pair is counted once and the
    cost is O(P·k) instead of O(P²).
    """
    if top_indices.dim() != 2:
        raise ValueError(f"activation_overlap expects [tokens, k] indices, got shape {tuple(top_indices.shape)}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    P = top_indices.shape[0]
    if P < 2:
        return math.nan
    if valid is None:
        valid = torch.ones_like(top_indices, dtype=torch.bool)
    _same_shape(top_indices, valid)
    ids = torch.where(valid, top_indices.long(), torch.full_like(top_indices, -1, dtype=torch.long))
    ids = ids.sort(dim=1).values
    # a set per token: drop repeats inside a row and the invalid (−1) entries
    keep = ids >= 0
    keep[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    flat = ids[keep]
    counts = torch.bincount(flat).double() if flat.numel() else torch.zeros(1, dtype=torch.float64)
    shared_pairs = float((counts * (counts - 1) / 2).sum())
    num_pairs = P * (P - 1) / 2
    return shared_pairs / num_pairs / k


def omega_stats(omega: Tensor | None) -> dict[str, float]:
    """Raw ω statistics (the multiplier is 1 + ω): mean, std, min, max; NaN without ω."""
    if omega is None or omega.numel() == 0:
        return {"omega_mean": math.nan, "omega_std": math.nan, "omega_min": math.nan, "omega_max": math.nan}
    w = omega.detach().double().reshape(-1)
    return {
        "omega_mean": float(w.mean()),
        "omega_std": float(w.std()) if w.numel() > 1 else math.nan,
        "omega_min": float(w.min()),
        "omega_max": float(w.max()),
    }


def _same_shape(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
