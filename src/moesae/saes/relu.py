"""ReLU SAE with a decoder-norm-weighted L1 penalty, and the coefficient machinery shared by the
coefficient-sparsity SAEs (ReLU, JumpReLU, Gated).

Parameters (checkpoint names and shapes):
  W_enc [M, d], b_enc [M];  W_dec [M, d], b_dec [d];
  input_scale [] (buffer) per-dimension RMS s of the centred first batch, sqrt(E‖x − b_dec‖² / d);
  log_sparsity_coefficient [] (buffer) log λ;  calibration_step [] (buffer) steps calibrated so far;
  tokens_since_fired [M] (buffer).

z = ReLU(W_enc (x − b_dec) + b_enc);  x̂ = W_decᵀ z + b_dec;
loss = ‖x − x̂‖² + λ · s · Σ_j z_j ‖W_dec,j‖   (batch means).

**Sparsity is set by a coefficient, L0 is measured.** These SAEs have no k in their forward pass.
The penalty is scaled by the data scale s (s for L1, s² for L0) so that λ is dimensionless and does
not change when the activations are rescaled. ``k`` is the *target* L0 the coefficient is chosen
for: with ``sparsity_coefficient: null`` (default) λ is *calibrated* during the first
``calibration_steps`` training steps by a multiplicative controller on the batch L0,

    log λ ← log λ + calibration_rate · log((L0_batch + 1) / (k + 1)),

and then frozen (stored in the checkpoint) for the rest of training, so the grid can ask for an L0
and the coefficient that lands near it is found once, like a per-variant line search; results
report the L0 actually measured. Give ``sparsity_coefficient`` a number to fix λ instead.
Biases start data-dependent (every feature fires on about k/M of the first batch), so calibration
starts near its target.

With the shared recipe's unit-norm decoder rows the norm weight is 1 (up to one Adam step's drift);
it matters with ``unit_norm_decoder: false`` (Anthropic's April 2024 recipe, unconstrained decoder),
where it stops the L1 term being cheated by shrinking codes and growing decoder rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (SAE, SAEConfig, SAEOutput, _check, fired_latents, flat_support, geometric_median, kept_dot,
                   reconstruction_mse, scatter_code, sparse_decode, take)
from .registry import register


def weighted_code_sum(z: Tensor, weights: Tensor, column_sums: Tensor | None = None) -> Tensor:
    """Batch mean of ``Σ_j z[:, j] · weights[j]`` (``(z * weights).sum(1).mean()``), computed as
    ``z.sum(0) · weights / B``: one column reduction over ``[B, M]``, and a backward that is a
    broadcast instead of two more ``[B, M]`` passes. ``column_sums``: ``z.sum(0)`` if at hand."""
    sums = z.sum(0) if column_sums is None else column_sums
    return torch.dot(sums, weights.to(z.dtype)) / z.shape[0]


def float_mask(compare, a: Tensor, b: Tensor | float) -> Tensor:
    """``compare(a, b)`` (``torch.gt``, ``torch.lt``...) as 1.0 / 0.0 in ``a``'s dtype, written by the
    comparison directly: on CPU several times faster than a bool mask that is then converted or
    multiplied. No gradient (a mask)."""
    return compare(a.detach(), b.detach() if isinstance(b, Tensor) else b, out=torch.empty_like(a, memory_format=torch.contiguous_format))


def batch_l0(code: Tensor) -> Tensor:
    """Mean number of non-zero entries per row of ``code`` (as float; exact: integer counts)."""
    return torch.count_nonzero(code).to(torch.float32) / code.shape[0]


@dataclass
class CoefficientSparsityConfig(SAEConfig):
    """Fields of the SAEs whose sparsity is set by a penalty coefficient (``k`` = target L0)."""

    sparsity_coefficient: float | None = None
    """λ (dimensionless). null: calibrated towards L0 = k during the first calibration_steps."""
    initial_sparsity_coefficient: float = 1.0
    """Starting λ for the calibration (near where it lands on real and synthetic data)."""
    calibration_steps: int = 1000
    """Training steps during which λ is adapted towards the target L0 (then frozen)."""
    calibration_rate: float = 0.05
    """Controller gain: change of log λ per step per unit of log(L0 / k)."""
    unit_norm_decoder: bool = True
    """Keep decoder rows at unit norm (the shared recipe); false = unconstrained decoder."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity_coefficient is not None:
            _check(self.sparsity_coefficient > 0, "sparsity_coefficient", "must be positive or null (calibrate)")
        _check(self.initial_sparsity_coefficient > 0, "initial_sparsity_coefficient", "must be positive")
        _check(
            isinstance(self.calibration_steps, int) and self.calibration_steps >= 0,
            "calibration_steps",
            f"must be a non-negative integer, got {self.calibration_steps!r}",
        )
        _check(self.calibration_rate > 0, "calibration_rate", "must be positive")


class CoefficientSparsitySAE(SAE):
    """Shared parts: dense encoder, input scale, calibrated coefficient, quantile bias init."""

    l0_is_set = False  # a calibrated coefficient sets sparsity; FLOPs count k (the target L0) decoded rows

    def __init__(self, cfg: CoefficientSparsityConfig) -> None:
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self._initial_encoder.clone())
        del self._initial_encoder
        start = cfg.sparsity_coefficient or cfg.initial_sparsity_coefficient
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("log_sparsity_coefficient", torch.tensor(math.log(start)))
        self.register_buffer("calibration_step", torch.zeros((), dtype=torch.long))

    # ---- the coefficient -----------------------------------------------------------------
    def sparsity_coefficient(self) -> Tensor:
        return self.log_sparsity_coefficient.exp()

    def calibrating(self) -> bool:
        cfg: CoefficientSparsityConfig = self.cfg  # type: ignore[assignment]
        return cfg.sparsity_coefficient is None and int(self.calibration_step) < cfg.calibration_steps

    @torch.no_grad()
    def calibrate(self, batch_l0: Tensor) -> None:
        """One controller step towards L0 = k (training forward passes only)."""
        if not (self.training and self.calibrating()):
            return
        cfg: CoefficientSparsityConfig = self.cfg  # type: ignore[assignment]
        error = torch.log((batch_l0.float() + 1) / (cfg.k + 1))
        self.log_sparsity_coefficient.add_(cfg.calibration_rate * error)
        self.calibration_step.add_(1)

    # ---- the sparse training step ---------------------------------------------------------
    @torch.no_grad()
    def support(self, x_c: Tensor, bias: Tensor, above: Tensor | float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``raw = x_c W_encᵀ`` (no autograd) and the flat code (positions, columns, offsets) of
        the entries with ``raw + bias > above``; returns ``(raw at those positions, positions,
        columns, offsets)``. Compared as ``raw > above − bias``: one ``[B, M]`` pass, and for
        ``above = 0`` the same test as the rounded sum's sign."""
        raw = F.linear(x_c, self.W_enc)
        positions, columns, offsets = flat_support(torch.gt(raw, above - bias))
        return raw.reshape(-1).index_select(0, positions), positions, columns, offsets

    # ---- initialisation ------------------------------------------------------------------
    def encoder_projection(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc.T

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        """b_dec = geometric median; s from the centred batch; biases so L0 ≈ k on this batch."""
        self.b_dec.copy_(geometric_median(x).to(self.b_dec.dtype))
        centred = x - self.b_dec
        self.input_scale.fill_(float(centred.pow(2).sum(1).mean().div(self.cfg.d_in).sqrt().clamp_min(1e-8)))
        self.init_biases(self.firing_quantile(self.encoder_projection(x)))

    def firing_quantile(self, projection: Tensor) -> Tensor:
        """The value exceeded by k of the M projections per token on average (k·B largest)."""
        flat = projection.flatten()
        budget = min(self.cfg.k * projection.shape[0], flat.numel())
        return flat.topk(budget, sorted=False).values.min()

    def init_biases(self, quantile: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- decoder constraint --------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.cfg.unit_norm_decoder:  # type: ignore[attr-defined]
            super().normalize_decoder()

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        if self.cfg.unit_norm_decoder:  # type: ignore[attr-defined]
            super().project_decoder_grad()

    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)



@dataclass
class ReLUConfig(CoefficientSparsityConfig):
    pass


@register("relu")
class ReLUSAE(CoefficientSparsitySAE):
    config_class = ReLUConfig
    display_name = "ReLU (L1)"

    def __init__(self, cfg: ReLUConfig) -> None:
        super().__init__(cfg)
        self.b_enc = nn.Parameter(torch.zeros(cfg.num_latents))

    def init_biases(self, quantile: Tensor) -> None:
        self.b_enc.fill_(-float(quantile))

    def forward(self, x: Tensor) -> SAEOutput:
        if self.sparse_step(x):
            return self.sparse_forward(x)
        # Bias inside the matmul (addmm), the penalty from column sums (one [B, M] pass instead of
        # a product and a row sum, and a cheap backward), L0 only while calibrating.
        z = torch.relu(torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T))
        x_hat = torch.addmm(self.b_dec, z, self.W_dec)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        column_sums = z.sum(0)  # z ≥ 0: a latent fired on the batch iff its column sum is > 0
        losses["l1"] = self.sparsity_coefficient() * self.input_scale * weighted_code_sum(z, self.decoder_norms(), column_sums)
        if self.training and self.calibrating():
            self.calibrate(batch_l0(z))
        return SAEOutput(x_hat=x_hat, losses=losses, latents=z, extras={"fired": column_sums.detach() > 0})

    def sparse_forward(self, x: Tensor) -> SAEOutput:
        """The training step on the code's support only (:meth:`sparse_step`)."""
        B, M = x.shape[0], self.cfg.num_latents
        x_c = x - self.b_dec
        raw, positions, columns, offsets = self.support(x_c, self.b_enc)
        values = torch.relu(kept_dot(x_c, self.W_enc, columns, raw, offsets) + take(self.b_enc, columns))
        x_hat = sparse_decode(values, columns, self.W_dec, self.b_dec, offsets)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        penalty = (values * take(self.decoder_norms(), columns)).sum() / B
        losses["l1"] = self.sparsity_coefficient() * self.input_scale * penalty
        if self.calibrating():
            self.calibrate(torch.tensor(positions.numel() / B))
        return SAEOutput(x_hat=x_hat, losses=losses, latents=scatter_code(positions, values, (B, M)),
                         extras={"fired": fired_latents(columns, M)})
