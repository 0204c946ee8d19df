"""The ground-truth generator: a known dictionary and a seeded stream of activations built from it
(see docs/method.md, "Ground-truth recovery").

n true features are unit vectors in d dimensions, exactly orthonormal when n ≤ d, otherwise
independent random directions. Feature i fires with a Zipf-distributed probability
p_i ∝ (i + 1)^-zipf_exponent, scaled so that Σ p_i = ``mean_l0``. Firing can be correlated through a
Gaussian copula: a latent g = √ρ·F·h + √(1−ρ)·ε (F: n × r unit rows, h ~ N(0, I_r), ε ~ N(0, I_n))
fires feature i when g_i < Φ⁻¹(q_i), which keeps every marginal firing rate exact. With a
hierarchy, a fraction of the features are children of a more frequent parent: a child fires only
when its parent does, then with an independent coin of probability q = p_child / p_parent (so its
marginal rate is still p_child; children correlate with the rest only through their parent).
Magnitudes are non-negative (|N(magnitude_mean, magnitude_std)|), and a fixed bias vector is
added: x = Σ_i a_i·f_i + b.

The stream is deterministic: ``batch(step, batch_size, stream)`` is a pure function of the seed,
the stream and the step (stream 1 trains, stream 2 is the held-out evaluation set).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

TRAIN_STREAM = 1
EVAL_STREAM = 2


@dataclass
class SyntheticDataConfig:
    """A known dictionary and how its features fire (``synthetic.data`` plus the seed).

    Every field is required: the values live in the profile (``profiles/default.yaml``).
    """

    d_in: int
    """Activation width d."""
    num_features: int
    """Number n of true features."""
    mean_l0: float
    """Expected number of active true features per token (Σ of the firing probabilities)."""
    zipf_exponent: float
    """Firing probability of the i-th feature ∝ (i + 1)^-zipf_exponent (0 = uniform)."""
    magnitude_mean: float
    """Mean of the normal whose absolute value is an active feature's magnitude."""
    magnitude_std: float
    """Its standard deviation."""
    correlation_rank: int
    """Rank r of the Gaussian-copula factor model correlating firing (0 = independent)."""
    correlation_strength: float
    """Share ρ ∈ [0, 1) of each copula latent's variance coming from the r shared factors."""
    hierarchy_fraction: float
    """Share of the features that are children (fire only with their parent)."""
    bias_norm: float
    """Norm of the bias vector added to every activation."""
    seed: int
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
        if not isinstance(self.seed, int):
            bad("seed", f"must be an integer, got {self.seed!r}")


def seed_of(*ints: int) -> int:
    """A 63-bit seed from a tuple of integers (independent streams per (seed, stream, step))."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2**32], dtype=np.uint64)) & np.uint64(2**63 - 1))


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
        g = torch.Generator().manual_seed(seed_of(cfg.seed, 0, 0))
        rng = np.random.default_rng(seed_of(cfg.seed, 0, 1))
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

    def batch(self, step: int, batch_size: int, stream: int = TRAIN_STREAM) -> tuple[Tensor, Tensor]:
        """The batch for ``step`` of ``stream``: a pure function of (seed, stream, step)."""
        g = torch.Generator(device=self.device).manual_seed(seed_of(self.cfg.seed, stream, step))
        return self.sample(batch_size, g)

    def batch_fn(self, batch_size: int, stream: int = TRAIN_STREAM) -> Callable[[int], Tensor]:
        """``batch_at(step) -> x`` for :func:`moesae.training.train_saes` (the training stream)."""
        return lambda step: self.batch(step, batch_size, stream)[0]

    def eval_set(self, num_tokens: int, chunk: int = 8192) -> tuple[Tensor, Tensor]:
        """Held-out tokens (the evaluation stream, never used for training) with their true codes."""
        parts = [self.batch(i, min(chunk, num_tokens - i * chunk), stream=EVAL_STREAM)
                 for i in range(math.ceil(num_tokens / chunk))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


__all__ = ["SyntheticDataConfig", "SyntheticData", "seed_of", "true_dictionary", "zipf_probabilities"]
