"""Ground-truth benchmark: do the SAEs find the *right* features? (issue #9)

Reconstruction error and redundancy cannot say whether an SAE recovered the features that made
the data. Here the data is built from a known dictionary, so recovery is measured directly.

**Generator** (:class:`SyntheticData`, seeded and streamed: ``batch_fn(batch_size)(step)`` is a
pure function of the seed and the step). n true features are unit vectors in d dimensions, exactly
orthonormal when n ≤ d, otherwise independent random directions. Feature i fires with a
Zipf-distributed probability p_i ∝ (i + 1)^-zipf_exponent, scaled so that Σ p_i = ``mean_l0``.
Firing can be correlated through a Gaussian copula: a latent g = √ρ·F·h + √(1−ρ)·ε (F: n × r unit
rows, h ~ N(0, I_r), ε ~ N(0, I_n)) fires feature i when g_i < Φ⁻¹(q_i), which keeps every
marginal firing rate exact. With a hierarchy, a fraction of the features are children of a more
frequent parent: a child fires only when its parent does, then with an independent coin of
probability q = p_child / p_parent (so its marginal rate is still p_child; children correlate with
the rest only through their parent). Magnitudes are non-negative
(|N(magnitude_mean, magnitude_std)|), and a fixed bias vector is added:
x = Σ_i a_i·f_i + b.

**Training** every architecture family in ``synthetic.families`` (a grid like ``grid.families``,
any registry name) at each L0 = k in ``synthetic.l0``, one pass per seed through
:func:`moesae.train.train_saes` (all SAEs of a seed see the same batches). The seed changes the
true dictionary, the data stream and the SAE initialisation, so the spread over seeds covers all
three.

**Matched L0** compares families at the same k. **Matched active compute** compares families
computing the same number of encoder rows per token (``active_width``): a dense SAE computes all
of its M rows, a Switch SAE the m = M/N rows of one expert, a Scale SAE e·M/N. So TopK at width
e·M/N is the compute-matched baseline of Scale (N, e) (router N·d aside), and TopK at M/N that of
Switch N. Both columns (``active_width``, ``flops_per_token``) are in the table.

**Metrics** (pure functions below), on a held-out batch of ``eval_tokens`` tokens with their true
codes:

- ``mmcs_learned_to_true`` / ``mmcs_true_to_learned``: mean over decoder rows of the max cosine to
  any true feature, and the reverse (signed cosine: features and codes are non-negative);
- ``matched_cosine``: one-to-one (Hungarian) matching of decoder rows to true features maximising
  the summed cosine; the summed matched cosine divided by the number of *true* features (a
  dictionary narrower than the truth cannot match them all, and unmatched features count 0);
- ``fraction_recovered``: share of true features with some decoder row at cos ≥ 0.9;
- ``precision`` / ``recall`` / ``f1``: each matched latent as a detector of its true feature
  (fires ⇔ feature active), averaged over matched pairs whose feature fires in the eval batch;
- ``redundancy_<τ>``, ``mean_max_cos``: decoder redundancy, :func:`moesae.metrics.decoder_redundancy`;
- ``dead_fraction``: latents that never fire on the eval batch; ``l0``, ``fvu``: for context.

``chance_*`` values in ``summary.json`` are the same metrics for random unit-norm decoders of the
same width against the same truth (and random firing for the detector scores), so every number
has its floor next to it.

Outputs: ``results/synthetic/metrics.csv`` (one row per family × k × seed) and
``results/synthetic/summary.json`` (config, per-family means and seed spread, chance levels, the
ranking), both written atomically. Finished cells are kept in ``results/synthetic/cells/`` keyed
by a hash of everything that determines them, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .metrics import decoder_redundancy
from .params import ParamsError, load_params, section_to

OUTPUT_DIR = Path("results/synthetic")
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
CELLS_DIR = "cells"
# Above this many (latent, feature) pairs the exact Hungarian matching (O(n³), dense cost matrix)
# is replaced by a greedy one-to-one matching; the summary records which was used.
HUNGARIAN_MAX_PAIRS = 64_000_000
IDENTITY_COLUMNS = ["family", "architecture", "k", "seed", "num_latents", "num_experts", "active_experts",
                    "feature_scaling", "active_width", "flops_per_token"]


# =============================================================================================
# The generator
# =============================================================================================
@dataclass
class SyntheticDataConfig:
    """A known dictionary and how its features fire."""

    d_in: int = 32
    """Activation width d."""
    num_features: int = 128
    """Number n of true features."""
    mean_l0: float = 4.0
    """Expected number of active true features per token (Σ of the firing probabilities)."""
    zipf_exponent: float = 1.0
    """Firing probability of the i-th feature ∝ (i + 1)^-zipf_exponent (0 = uniform)."""
    magnitude_mean: float = 1.0
    """Mean of the normal whose absolute value is an active feature's magnitude."""
    magnitude_std: float = 0.25
    """Its standard deviation."""
    correlation_rank: int = 0
    """Rank r of the Gaussian-copula factor model correlating firing (0 = independent)."""
    correlation_strength: float = 0.0
    """Share ρ ∈ [0, 1) of each copula latent's variance coming from the r shared factors."""
    hierarchy_fraction: float = 0.0
    """Share of the features that are children (fire only with their parent)."""
    bias_norm: float = 1.0
    """Norm of the bias vector added to every activation."""
    seed: int = 0
    """Seed of the dictionary, the probabilities, the hierarchy and the data stream."""

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise ValueError(f"invalid synthetic data field '{name}': {msg}")

        if not isinstance(self.d_in, int) or self.d_in < 2:
            bad("d_in", f"must be an integer >= 2, got {self.d_in!r}")
        if not isinstance(self.num_features, int) or self.num_features < 1:
            bad("num_features", f"must be a positive integer, got {self.num_features!r}")
        if not 0 < self.mean_l0 < self.num_features:
            bad("mean_l0", f"must be in (0, num_features={self.num_features}), got {self.mean_l0!r}")
        if self.zipf_exponent < 0:
            bad("zipf_exponent", f"must be >= 0, got {self.zipf_exponent!r}")
        if self.magnitude_mean < 0 or self.magnitude_std < 0 or self.magnitude_mean + self.magnitude_std == 0:
            bad("magnitude_mean", "magnitude_mean and magnitude_std must be >= 0 and not both 0")
        if not isinstance(self.correlation_rank, int) or not 0 <= self.correlation_rank <= self.num_features:
            bad("correlation_rank", f"must be an integer in [0, num_features], got {self.correlation_rank!r}")
        if not 0 <= self.correlation_strength < 1:
            bad("correlation_strength", f"must be in [0, 1), got {self.correlation_strength!r}")
        if not 0 <= self.hierarchy_fraction < 1:
            bad("hierarchy_fraction", f"must be in [0, 1), got {self.hierarchy_fraction!r}")
        if self.bias_norm < 0:
            bad("bias_norm", f"must be >= 0, got {self.bias_norm!r}")


def zipf_probabilities(num_features: int, mean_l0: float, exponent: float) -> np.ndarray:
    """Firing probabilities p_i = min(1, c·(i + 1)^-exponent) with Σ p_i = mean_l0 (c by bisection)."""
    if not 0 < mean_l0 < num_features:
        raise ValueError(f"mean_l0={mean_l0} must be in (0, num_features={num_features})")
    ranks = np.arange(1, num_features + 1, dtype=np.float64) ** -exponent
    lo, hi = 0.0, 1.0 / ranks[-1]  # hi: every feature fires with probability 1
    for _ in range(200):
        c = (lo + hi) / 2
        if np.minimum(1.0, c * ranks).sum() < mean_l0:
            lo = c
        else:
            hi = c
    return np.minimum(1.0, (lo + hi) / 2 * ranks)


def true_dictionary(num_features: int, d_in: int, generator: torch.Generator) -> Tensor:
    """``[n, d]`` unit rows: orthonormal when n ≤ d, otherwise independent random directions."""
    if num_features <= d_in:
        q, _ = torch.linalg.qr(torch.randn(d_in, num_features, generator=generator, dtype=torch.float64))
        return q.T.float().contiguous()
    w = torch.randn(num_features, d_in, generator=generator, dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).float()


class SyntheticData:
    """The fixed parts of a synthetic dataset, and a deterministic stream of batches from it."""

    def __init__(self, cfg: SyntheticDataConfig, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(_seed_of(cfg.seed, 0, 0))
        rng = np.random.default_rng(_seed_of(cfg.seed, 0, 1))
        n = cfg.num_features
        self.dictionary = true_dictionary(n, cfg.d_in, g).to(self.device)
        self.bias = torch.randn(cfg.d_in, generator=g)
        self.bias = (self.bias / self.bias.norm() * cfg.bias_norm).to(self.device)
        p = zipf_probabilities(n, cfg.mean_l0, cfg.zipf_exponent)
        # Hierarchy: children draw a parent among the more frequent non-children.
        parent = np.full(n, -1, dtype=np.int64)
        num_children = int(round(cfg.hierarchy_fraction * n))
        if num_children:
            children = np.sort(rng.choice(np.arange(1, n), size=min(num_children, n - 1), replace=False))
            is_child = np.zeros(n, dtype=bool)
            is_child[children] = True
            for j in children:
                candidates = np.flatnonzero(~is_child[:j])
                if candidates.size == 0:  # nothing more frequent to hang it on: stays a root
                    is_child[j] = False
                    continue
                parent[j] = rng.choice(candidates)
        conditional = p.copy()
        has_parent = parent >= 0
        conditional[has_parent] = np.minimum(1.0, p[has_parent] / p[parent[has_parent]])
        self.firing_probability = torch.as_tensor(p, dtype=torch.float32, device=self.device)
        self.parent = torch.as_tensor(parent, device=self.device)
        self.conditional_probability = torch.as_tensor(conditional, dtype=torch.float32, device=self.device)
        self.threshold = torch.special.ndtri(self.conditional_probability.double()).float()
        if cfg.correlation_rank > 0 and cfg.correlation_strength > 0:
            loadings = torch.randn(n, cfg.correlation_rank, generator=g)
            self.loadings: Tensor | None = (loadings / loadings.norm(dim=1, keepdim=True)).to(self.device)
        else:
            self.loadings = None

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(x [B, d], codes [B, n])``: activations and the true non-negative feature magnitudes."""
        cfg, n, dev = self.cfg, self.cfg.num_features, self.device
        if self.loadings is None:
            fires = torch.rand(batch_size, n, generator=generator, device=dev) < self.conditional_probability
        else:
            rho = cfg.correlation_strength
            shared = torch.randn(batch_size, cfg.correlation_rank, generator=generator, device=dev) @ self.loadings.T
            own = torch.randn(batch_size, n, generator=generator, device=dev)
            fires = (math.sqrt(rho) * shared + math.sqrt(1 - rho) * own) < self.threshold
        has_parent = self.parent >= 0
        if bool(has_parent.any()):
            # A child's own draw is an independent coin (not the copula), so that its marginal rate
            # is exactly p_parent · q = p_child; parents are roots, so one pass settles every child.
            children = has_parent.nonzero().squeeze(1)
            own_coin = torch.rand(batch_size, children.numel(), generator=generator, device=dev)
            fires[:, children] = (own_coin < self.conditional_probability[children]) & fires[:, self.parent[children]]
        noise = torch.randn(batch_size, n, generator=generator, device=dev)
        magnitude = (cfg.magnitude_mean + cfg.magnitude_std * noise).abs()
        codes = magnitude * fires
        return codes @ self.dictionary + self.bias, codes

    def batch(self, step: int, batch_size: int, stream: int = 1) -> tuple[Tensor, Tensor]:
        """The batch for ``step`` of ``stream``: a pure function of (seed, stream, step)."""
        g = torch.Generator(device=self.device).manual_seed(_seed_of(self.cfg.seed, stream, step))
        return self.sample(batch_size, g)

    def batch_fn(self, batch_size: int, stream: int = 1) -> Callable[[int], Tensor]:
        """``batch_at(step) -> x`` for :func:`moesae.train.train_saes` (training stream 1)."""
        return lambda step: self.batch(step, batch_size, stream)[0]

    def eval_set(self, num_tokens: int, chunk: int = 8192) -> tuple[Tensor, Tensor]:
        """Held-out tokens (stream 2, never used for training) with their true codes."""
        parts = [self.batch(i, min(chunk, num_tokens - i * chunk), stream=2) for i in range(math.ceil(num_tokens / chunk))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _seed_of(*ints: int) -> int:
    """A 63-bit seed from a tuple of integers (independent streams per (seed, stream, step))."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2**32], dtype=np.uint64)) & np.uint64(2**63 - 1))


# =============================================================================================
# Metrics (pure functions of tensors)
# =============================================================================================
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
    g = torch.Generator().manual_seed(_seed_of(seed, 3, num_latents))
    d = data.cfg.d_in
    rate = min(1.0, data.cfg.mean_l0 / num_latents)
    rows = []
    for _ in range(repeats):
        W = torch.randn(num_latents, d, generator=g).to(data.device)
        active = torch.rand(feature_active.shape[0], num_latents, generator=g) < rate
        m = recovery_metrics(W, data.dictionary, active.to(feature_active.device), feature_active, recovery_threshold, ())
        rows.append(m)
    keys = ["mmcs_learned_to_true", "mmcs_true_to_learned", "matched_cosine", "fraction_recovered",
            "precision", "recall", "f1"]
    return {key: float(np.mean([r[key] for r in rows])) for key in keys}


# =============================================================================================
# The benchmark
# =============================================================================================
PRESETS: dict[str, dict[str, Any]] = {
    # CPU default: a few minutes on 2 cores for the whole grid.
    "default": {},
    # Paper scale (issue #9): d = 768, 16,384 true features, mean L0 ≈ 30; for a GPU.
    "paper": {
        "data": {"d_in": 768, "num_features": 16384, "mean_l0": 30.0, "correlation_rank": 32,
                 "correlation_strength": 0.3, "hierarchy_fraction": 0.1, "bias_norm": 1.0},
        "num_latents": 24576, "l0": [8, 16, 32, 64], "steps": 10000, "batch_size": 4096,
        "eval_tokens": 32768, "dead_tokens_threshold": 10_000_000, "device": "auto",
    },
}


@dataclass
class SyntheticConfig:
    """The ``synthetic`` section of params.yaml."""

    families: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Family name → SAE config (``architecture`` plus fields; ``width_fraction`` scales M), as in ``grid``."""
    data: dict[str, Any] = field(default_factory=dict)
    """Generator fields (see :class:`SyntheticDataConfig`); ``seed`` comes from ``seeds``."""
    preset: str = "default"
    """default | paper: starting values; keys given here override them."""
    num_latents: int = 128
    """SAE width M before ``width_fraction``."""
    l0: list[int] = field(default_factory=lambda: [2, 4, 8])
    """The k values every family is trained at (matched L0)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds: each changes the true dictionary, the data stream and the SAE initialisation."""
    steps: int = 600
    batch_size: int = 256
    lr: float | None = None
    """null: the recipe's 2e-4 / sqrt(M / 2^14)."""
    dead_tokens_threshold: int = 200_000
    """Training tokens without firing before AuxK treats a latent as dead."""
    eval_tokens: int = 8192
    recovery_threshold: float = 0.9
    redundancy_thresholds: list[float] = field(default_factory=lambda: [0.7, 0.8, 0.9])
    matching: str = "auto"
    """auto | hungarian | greedy (see :func:`match_features`)."""
    device: str = "cpu"
    """cpu | cuda | auto (cuda when available)."""
    output_dir: str = str(OUTPUT_DIR)

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise ValueError(f"invalid field 'synthetic.{name}': {msg}")

        if self.preset not in PRESETS:
            bad("preset", f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if not self.families:
            bad("families", "list at least one family, e.g. {topk: {architecture: topk}}")
        for name, fam in self.families.items():
            if not isinstance(fam, dict) or "architecture" not in fam:
                bad(f"families.{name}", "must be a mapping with an 'architecture' key")
        if not self.l0 or any(not isinstance(k, int) or k <= 0 for k in self.l0):
            bad("l0", f"must be a non-empty list of positive integers, got {self.l0!r}")
        if not self.seeds or any(not isinstance(s, int) for s in self.seeds):
            bad("seeds", f"must be a non-empty list of integers, got {self.seeds!r}")
        for name in ("steps", "batch_size", "eval_tokens", "dead_tokens_threshold", "num_latents"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                bad(name, f"must be a positive integer, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            bad("lr", f"must be positive or null, got {self.lr!r}")
        if not 0 < self.recovery_threshold <= 1:
            bad("recovery_threshold", f"must be in (0, 1], got {self.recovery_threshold!r}")
        if self.matching not in ("auto", "hungarian", "greedy"):
            bad("matching", f"must be auto, hungarian or greedy, got {self.matching!r}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            bad("device", f"must be cpu, cuda, cuda:<i> or auto, got {self.device!r}")
        if "seed" in self.data:
            bad("data.seed", "set the seeds with 'synthetic.seeds' instead")
        try:
            self.data_config(0)
        except (ValueError, TypeError) as exc:
            bad("data", str(exc))

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("synthetic.device is 'cuda' but torch sees no GPU; set synthetic.device: cpu (or auto)")
        return torch.device(self.device)

    def data_config(self, seed: int) -> SyntheticDataConfig:
        return SyntheticDataConfig(**{**self.data, "seed": seed})


def load_config(params: dict[str, Any]) -> SyntheticConfig:
    """The ``synthetic`` section, on top of its preset (explicit keys win, ``data`` key by key)."""
    section = dict(params.get("synthetic") or {})
    if not section:
        raise ParamsError("params.yaml has no 'synthetic' section; see profiles/default.yaml for one")
    preset = dict(PRESETS.get(section.get("preset", "default"), {}))
    merged = {**preset, **section}
    merged["data"] = {**preset.get("data", {}), **(section.get("data") or {})}
    return section_to(SyntheticConfig, merged, "synthetic")


def active_width(sae: Any) -> int:
    """Encoder rows computed per token: M for dense SAEs, e·M/N for multi-expert ones."""
    if hasattr(sae, "active_experts_per_token"):
        return int(sae.active_experts_per_token() * sae.cfg.expert_size)
    return int(sae.cfg.num_latents)


def _cells(cfg: SyntheticConfig, seed: int) -> dict[str, dict[str, Any]]:
    from .grid import GridSpec, expand_grid

    variants = expand_grid(GridSpec(num_latents=cfg.num_latents, l0=list(cfg.l0), families=cfg.families, seeds=[seed]))
    return variants


def _code_fingerprint() -> str:
    """Hash of the source that produces a cell (this module, the trainer, the metrics, the SAEs)."""
    root = Path(__file__).resolve().parent
    files = [root / "synthetic.py", root / "train.py", root / "metrics.py", *sorted((root / "saes").glob("*.py"))]
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _cell_key(cfg: SyntheticConfig, variant: dict[str, Any], seed: int) -> str:
    """Hash of everything that determines a cell's result, code included (stale cells are never reused)."""
    spec = {"code": _code_fingerprint(), "variant": variant, "data": dataclasses.asdict(cfg.data_config(seed)),
            "steps": cfg.steps,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "dead": cfg.dead_tokens_threshold,
            "eval_tokens": cfg.eval_tokens, "recovery": cfg.recovery_threshold,
            "redundancy": list(cfg.redundancy_thresholds), "matching": cfg.matching}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@torch.no_grad()
def evaluate_sae(sae: Any, x: Tensor, codes: Tensor, dictionary: Tensor, cfg: SyntheticConfig) -> dict[str, float]:
    """Recovery metrics plus L0 and FVU of one trained SAE on the held-out tokens."""
    sae.eval()
    M = sae.cfg.num_latents
    active, sq_err = [], 0.0
    for xb in torch.split(x, 4096):
        out = sae(xb)
        active.append(out.active_mask(M))
        sq_err += float((xb - out.x_hat).pow(2).sum())
    latent_active = torch.cat(active)
    metrics = recovery_metrics(sae.W_dec.detach(), dictionary, latent_active, codes > 0, cfg.recovery_threshold,
                               cfg.redundancy_thresholds, cfg.matching)
    metrics["l0"] = float(latent_active.sum(1).double().mean())
    metrics["fvu"] = sq_err / float((x - x.mean(0)).pow(2).sum())
    return metrics


def run_benchmark(cfg: SyntheticConfig, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Train and score every family × k × seed; write metrics.csv and summary.json. Resumable."""
    import pandas as pd

    from .grid import build_variant
    from .train import TrainConfig, TrainingRun, train_saes

    out_dir = Path(cfg.output_dir)
    cells_dir = out_dir / CELLS_DIR
    rows: list[dict[str, Any]] = []
    chance: dict[str, dict[str, float]] = {}
    start = time.time()
    device = cfg.torch_device()
    for seed in cfg.seeds:
        data = SyntheticData(cfg.data_config(seed), device)
        variants = _cells(cfg, seed)
        todo, runs = [], []
        for name, variant in variants.items():
            cell_path = cells_dir / f"{name}_s{seed}.json"
            key = _cell_key(cfg, variant, seed)
            if cell_path.is_file():
                try:
                    cached = json.loads(cell_path.read_text())
                except json.JSONDecodeError:
                    cached = {}
                if cached.get("key") == key:
                    rows.append(cached["row"])
                    continue
            sae = build_variant(variant, cfg.data_config(seed).d_in, cfg.dead_tokens_threshold).to(device)
            train_cfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, log_every=max(1, cfg.steps // 10), checkpoint_every=0)
            runs.append(TrainingRun(name=name, sae=sae, config=train_cfg))
            todo.append((name, variant, cell_path, key))
        x_eval, codes_eval = data.eval_set(cfg.eval_tokens)
        if runs:
            print(f"[synthetic] seed {seed}: training {len(runs)} SAEs for {cfg.steps} steps "
                  f"(d={data.cfg.d_in}, n={data.cfg.num_features} true features, mean L0 {data.cfg.mean_l0})")
            train_saes(runs, data.batch_fn(cfg.batch_size), progress=progress)
        for run, (name, variant, cell_path, key) in zip(runs, todo):
            sae = run.sae
            row = {
                "family": variant["family"], "architecture": variant["architecture"], "k": variant["k"], "seed": seed,
                "num_latents": sae.cfg.num_latents,
                "num_experts": getattr(sae.cfg, "num_experts", math.nan),
                "active_experts": sae.active_experts_per_token() if hasattr(sae, "active_experts_per_token") else math.nan,
                "feature_scaling": getattr(sae.cfg, "feature_scaling", ""),
                "active_width": active_width(sae), "flops_per_token": int(sae.flops_per_token()),
                **evaluate_sae(sae, x_eval, codes_eval, data.dictionary, cfg),
                "train_seconds": run.seconds,
            }
            _atomic_write(cell_path, json.dumps({"key": key, "row": row}, indent=1) + "\n")
            rows.append(row)
        for width in sorted({r["num_latents"] for r in rows if r["seed"] == seed}):
            chance.setdefault(str(width), {})
            levels = chance_levels(data, width, codes_eval > 0, cfg.recovery_threshold, seed=seed)
            for key, value in levels.items():
                chance[str(width)].setdefault(key, []).append(value)  # type: ignore[arg-type]
    df = pd.DataFrame(rows).sort_values(["family", "k", "seed"]).reset_index(drop=True)
    chance_mean = {w: {k: float(np.mean(v)) for k, v in levels.items()} for w, levels in chance.items()}
    summary = summarize(df, cfg, chance_mean, time.time() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (METRICS_FILE + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(out_dir / METRICS_FILE)
    _atomic_write(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2, default=_json_default) + "\n")
    return df, summary


RANKING_METRIC = "matched_cosine"
MOE_ARCHITECTURES = ("scale", "switch", "authors_switch")  # compared with dense baselines at equal active width
TABLE_METRICS = ["matched_cosine", "fraction_recovered", "mmcs_true_to_learned", "mmcs_learned_to_true",
                 "f1", "precision", "recall", "redundancy_0.9", "dead_fraction", "l0", "fvu"]


def summary_table(df: Any) -> Any:
    """Per family × k: mean and standard deviation over seeds of the headline metrics."""
    metrics = [m for m in TABLE_METRICS if m in df.columns]
    grouped = df.groupby(["family", "k"])
    table = grouped[metrics].agg(["mean", "std"])
    table.columns = [f"{m}_{stat}" for m, stat in table.columns]
    table["seeds"] = grouped.size()
    table["active_width"] = grouped["active_width"].first()
    return table.reset_index()


def summarize(df: Any, cfg: SyntheticConfig, chance: dict[str, dict[str, float]], seconds: float) -> dict[str, Any]:
    """The summary: config, the table, chance levels, and the ranking by matched cosine (at matched L0)."""
    table = summary_table(df)
    # Rank by the metric averaged over the L0 grid, over the k values every family was trained at.
    common_k = sorted(set.intersection(*[set(g["k"]) for _, g in df.groupby("family")]))
    at_common = df[df["k"].isin(common_k)]
    per_seed = at_common.groupby(["family", "seed"])[RANKING_METRIC].mean()
    ranking = per_seed.groupby("family").agg(["mean", "std"]).sort_values("mean", ascending=False)
    widths = df.groupby("family")["active_width"].first()
    archs = df.groupby("family")["architecture"].first()
    compute_matched = [
        {"family": a, "baseline": b, "active_width": int(widths[a])}
        for a in widths.index for b in widths.index
        if a != b and widths[a] == widths[b] and archs[a] in MOE_ARCHITECTURES and archs[b] not in MOE_ARCHITECTURES
    ]
    return {
        "ranking_metric": RANKING_METRIC,
        "ranking_k": common_k,
        "ranking": [{"family": f, "mean": float(r["mean"]), "std": float(r["std"]) if not math.isnan(r["std"]) else None}
                    for f, r in ranking.iterrows()],
        "best_family": str(ranking.index[0]),
        "compute_matched_pairs": compute_matched,
        "chance": chance,
        "table": table.to_dict(orient="records"),
        "config": dataclasses.asdict(cfg),
        "data": {str(s): dataclasses.asdict(cfg.data_config(s)) for s in cfg.seeds},
        "seconds": seconds,
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if math.isnan(value) else float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# =============================================================================================
# The figure
# =============================================================================================
PLOT_METRICS = [
    ("matched_cosine", "matched cosine (Hungarian)"),
    ("fraction_recovered", "true features recovered (cos ≥ 0.9)"),
    ("mmcs_true_to_learned", "mean max cos, true → learned"),
    ("f1", "detection F1 of matched latents"),
    ("fvu", "FVU (reconstruction, for contrast)"),
]


def plot_recovery(df: Any, chance: dict[str, dict[str, float]] | None = None,
                  metrics: Sequence[tuple[str, str]] = PLOT_METRICS, compute_metric: str | None = "matched_cosine"):
    """Recovery vs L0 per family (mean ± std over seeds), plus one panel vs active encoder width.

    ``chance`` (``summary["chance"]``: width → metric → value) draws each metric's random-decoder
    level as a dashed line labelled with the width. Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    from .plotting import set_style

    set_style()
    panels = list(metrics) + ([(compute_metric, "")] if compute_metric else [])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    families = sorted(df["family"].unique())
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {f: cycle[i % len(cycle)] for i, f in enumerate(families)}
    ks = sorted(df["k"].unique())
    for ax, (metric, label) in zip(axes.flat, metrics):
        for fam in families:
            g = df[df["family"] == fam].groupby("k")[metric].agg(["mean", "std"]).reset_index()
            ax.errorbar(g["k"], g["mean"], yerr=g["std"].fillna(0), marker="o", ms=4, capsize=2,
                        color=colors[fam], label=fam)
        lines: list[tuple[float, list[str]]] = []  # chance levels closer than 0.02 share one line
        for width, levels in sorted((chance or {}).items(), key=lambda item: int(item[0])):
            if metric in levels and math.isfinite(levels[metric]):
                near = [entry for entry in lines if abs(entry[0] - levels[metric]) < 0.02]
                near[0][1].append(width) if near else lines.append((levels[metric], [width]))
        for value, widths in lines:
            ax.axhline(value, color="0.5", ls="--", lw=0.8)
            ax.annotate(f"random, M={'/'.join(widths)}", (1, value), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7, color="0.4")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("L0 (k)")
        ax.set_title(label)
    if compute_metric:
        ax = axes.flat[len(metrics)]
        for fam in families:
            g = df[df["family"] == fam].groupby("active_width")[compute_metric].agg(["mean", "std"]).reset_index()
            ax.errorbar(g["active_width"], g["mean"], yerr=g["std"].fillna(0), marker="s", ms=5, ls="none",
                        capsize=2, color=colors[fam], label=fam)
        widths = sorted(df["active_width"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(int(w)) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("encoder rows computed per token")
        ax.set_title(f"{compute_metric} vs active compute (mean over k)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(families), 4), frameon=False)
    seeds = int(df.groupby(["family", "k"])["seed"].nunique().max())
    fig.suptitle(f"Ground-truth feature recovery on synthetic data (mean ± std over {seeds} seed(s))")
    legend_rows = math.ceil(len(families) / 4)
    fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.02, 1, 0.97))
    return fig


# =============================================================================================
# The stage
# =============================================================================================
def _timer(stage: str):
    try:
        from .timing import record
    except ImportError:  # moesae.timing not there yet: run untimed
        return contextlib.nullcontext()
    return record(stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae synthetic", description="Ground-truth feature-recovery benchmark")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(load_params(args.params))
    with _timer("synthetic"):
        df, summary = run_benchmark(cfg, progress=not args.no_progress)
    print(f"[synthetic] wrote {Path(cfg.output_dir) / METRICS_FILE} ({len(df)} rows); best by "
          f"{summary['ranking_metric']}: {summary['best_family']} ({summary['ranking'][0]['mean']:.3f})")
    return 0


__all__ = [
    "SyntheticDataConfig", "SyntheticData", "SyntheticConfig", "zipf_probabilities", "true_dictionary",
    "cosine_matrix", "mean_max_cosine", "match_features", "matched_cosine", "fraction_recovered",
    "detection_scores", "chance_max_cosine", "recovery_metrics", "chance_levels",
    "load_config", "run_benchmark", "summary_table", "plot_recovery", "main",
]
