"""Ground-truth recovery metrics: pure functions of a learned decoder, the true dictionary and
who fired (see docs/method.md, "Ground-truth recovery").

- ``mmcs_learned_to_true`` / ``mmcs_true_to_learned``: mean over decoder rows of the max cosine to
  any true feature, and the reverse (signed cosine: features and codes are non-negative);
- ``matched_cosine``: one-to-one (Hungarian) matching of decoder rows to true features maximising
  the summed cosine; the summed matched cosine divided by the number of *true* features (a
  dictionary narrower than the truth cannot match them all, and unmatched features count 0);
- ``fraction_recovered``: share of true features with some decoder row at cos ≥ 0.9;
- ``precision`` / ``recall`` / ``f1``: each matched latent as a detector of its true feature
  (fires ⇔ feature active), averaged over matched pairs whose feature fires in the eval batch;
- ``redundancy_<τ>``, ``mean_max_cos``: decoder redundancy, :func:`moesae.metrics.decoder_redundancy`;
- ``dead_fraction``: latents that never fire on the eval batch.

:func:`chance_levels` gives the same metrics for random unit-norm decoders (and random firing), the
floor every number is read against.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..metrics import decoder_redundancy
from .generator import SyntheticData, seed_of

MATCHING_METHODS = ("auto", "hungarian", "greedy")
# Above this many (latent, feature) pairs the exact Hungarian matching (O(n³), dense cost matrix)
# is replaced by a greedy one-to-one matching.
HUNGARIAN_MAX_PAIRS = 64_000_000
CHANCE_STREAM = 3
CHANCE_METRICS = ["mmcs_learned_to_true", "mmcs_true_to_learned", "matched_cosine", "fraction_recovered",
                  "precision", "recall", "f1"]


def cosine_matrix(learned: Tensor, true: Tensor) -> Tensor:
    """``[L, n]`` cosine between every learned direction (row) and every true feature (row)."""
    a = learned.double() / learned.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = true.double() / true.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def mean_max_cosine(cos: Tensor) -> tuple[float, float]:
    """(learned → true, true → learned): mean over rows (columns) of the row (column) maximum."""
    return float(cos.max(1).values.mean()), float(cos.max(0).values.mean())


def match_features(cos: Tensor, method: str = "auto") -> tuple[Tensor, Tensor]:
    """One-to-one matching maximising the summed cosine: ``(latent_ids, feature_ids)``.

    ``hungarian`` is exact (scipy's linear_sum_assignment); ``greedy`` takes the best remaining pair
    until one side is used up (for paper-scale sizes); ``auto`` picks by size.
    """
    if method == "auto":
        method = "hungarian" if cos.numel() <= HUNGARIAN_MAX_PAIRS else "greedy"
    if method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cos.cpu().numpy(), maximize=True)
        return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    if method != "greedy":
        raise ValueError(f"unknown matching method '{method}'; use auto, hungarian or greedy")
    order = torch.argsort(cos.flatten(), descending=True).cpu()
    L, n = cos.shape
    used_l, used_n = torch.zeros(L, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    rows, cols = [], []
    for flat in order.tolist():
        i, j = divmod(flat, n)
        if used_l[i] or used_n[j]:
            continue
        used_l[i] = used_n[j] = True
        rows.append(i)
        cols.append(j)
        if len(rows) == min(L, n):
            break
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def matched_cosine(cos: Tensor, latent_ids: Tensor, feature_ids: Tensor) -> float:
    """Summed cosine of the matched pairs over the number of true features (unmatched count 0)."""
    return float(cos[latent_ids, feature_ids].sum() / cos.shape[1])


def fraction_recovered(cos: Tensor, threshold: float = 0.9) -> float:
    """Share of true features with some learned direction at cosine ≥ ``threshold``."""
    return float((cos.max(0).values >= threshold).double().mean())


def detection_scores(
    latent_active: Tensor, feature_active: Tensor, latent_ids: Tensor, feature_ids: Tensor
) -> dict[str, float]:
    """Each matched latent as a detector of its feature: mean precision, recall, F1 over pairs.

    ``latent_active [T, L]`` and ``feature_active [T, n]`` are boolean. Pairs whose feature never
    fires in the T tokens are skipped (recall undefined); a latent that never fires has precision 0.
    """
    a = latent_active[:, latent_ids].bool()
    t = feature_active[:, feature_ids].bool()
    both = (a & t).sum(0).double()
    fired, present = a.sum(0).double(), t.sum(0).double()
    keep = present > 0
    if not bool(keep.any()):
        return {"precision": math.nan, "recall": math.nan, "f1": math.nan}
    precision = torch.where(fired > 0, both / fired.clamp_min(1), torch.zeros_like(both))[keep]
    recall = (both / present.clamp_min(1))[keep]
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(recall))
    return {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}


def chance_max_cosine(d: int, n: int) -> float:
    """E[max_j cos(u, v_j)] for a fixed unit u and n independent uniform unit vectors v_j in ℝ^d.

    cos(u, v) has (1 + c)/2 ~ Beta((d−1)/2, (d−1)/2); E[max] = ∫₋₁¹ (1 − F(c)ⁿ) dc − 1.
    """
    from scipy import integrate, stats

    a = (d - 1) / 2
    value, _ = integrate.quad(lambda c: 1 - stats.beta.cdf((1 + c) / 2, a, a) ** n, -1, 1, limit=200)
    return value - 1


def recovery_metrics(
    W_dec: Tensor,
    dictionary: Tensor,
    latent_active: Tensor,
    feature_active: Tensor,
    recovery_threshold: float = 0.9,
    redundancy_thresholds: Sequence[float] = (0.7, 0.8, 0.9),
    matching: str = "auto",
) -> dict[str, float]:
    """Every ground-truth metric for one decoder (``[L, d]``) against the truth (``[n, d]``)."""
    cos = cosine_matrix(W_dec, dictionary)
    l2t, t2l = mean_max_cosine(cos)
    latent_ids, feature_ids = match_features(cos, matching)
    return {
        "mmcs_learned_to_true": l2t,
        "mmcs_true_to_learned": t2l,
        "matched_cosine": matched_cosine(cos, latent_ids, feature_ids),
        "fraction_recovered": fraction_recovered(cos, recovery_threshold),
        **detection_scores(latent_active, feature_active, latent_ids, feature_ids),
        **decoder_redundancy(W_dec, redundancy_thresholds),  # the main evaluation's definition
        "dead_fraction": float((~latent_active.bool().any(0)).double().mean()),
    }


def chance_levels(
    data: SyntheticData,
    num_latents: int,
    feature_active: Tensor,
    recovery_threshold: float = 0.9,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """The metrics of random unit-norm decoders with latents firing at random at the true L0.

    Each latent fires independently with probability (true mean L0) / L, so the detector scores
    land at their chance values (precision ≈ the feature's rate, recall ≈ the latent's rate).
    """
    g = torch.Generator().manual_seed(seed_of(seed, CHANCE_STREAM, num_latents))
    d = data.cfg.d_in
    rate = min(1.0, data.cfg.mean_l0 / num_latents)
    rows = []
    for _ in range(repeats):
        W = torch.randn(num_latents, d, generator=g).to(data.device)
        active = torch.rand(feature_active.shape[0], num_latents, generator=g) < rate
        m = recovery_metrics(W, data.dictionary, active.to(feature_active.device), feature_active, recovery_threshold, ())
        rows.append(m)
    return {key: float(np.mean([r[key] for r in rows])) for key in CHANCE_METRICS}


__all__ = [
    "HUNGARIAN_MAX_PAIRS", "MATCHING_METHODS", "chance_levels", "chance_max_cosine", "cosine_matrix",
    "detection_scores", "fraction_recovered", "match_features", "matched_cosine", "mean_max_cosine",
    "recovery_metrics",
]
