"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): learned per-feature thresholds,
straight-through estimator, L0 penalty.

Parameters (checkpoint names and shapes):
  W_enc [M, d], b_enc [M];  log_threshold [M] (θ = exp(log_threshold) > 0);
  W_dec [M, d], b_dec [d];  buffers input_scale, log_sparsity_coefficient, calibration_step,
  tokens_since_fired (see relu.py).

π = W_enc (x − b_dec) + b_enc;  z = π · H(π − θ);  x̂ = W_decᵀ z + b_dec;
loss = ‖x − x̂‖² + λ · s² · Σ_j H(π_j − θ_j)   (batch means; λ calibrated towards L0 = k unless
set, see relu.py).

The step H has no useful gradient, so θ learns through the paper's pseudo-derivatives with a
rectangle kernel K of bandwidth ε = bandwidth · s:
  ∂z_j/∂θ_j := −(θ_j/ε) K((π_j − θ_j)/ε),   ∂H(π_j − θ_j)/∂θ_j := −(1/ε) K((π_j − θ_j)/ε),
and π gets the ordinary gradient where the feature fires (none from the L0 term).
Thresholds start at the value that gives L0 ≈ k on the first batch (the paper starts at 0.001 on
normalised inputs; with our short runs a threshold that must climb from ~0 never arrives).

**Calibration moves the thresholds too.** The pre-activations get no gradient where a feature
does not fire, so a feature whose pre-activations fall below θ early (the tied initialisation
overshoots the reconstruction, and the first steps shrink the encoder) stays silent, and the
pseudo-derivatives move log θ by only about the learning rate per step (a factor ~2 over a
1,200-step run). With only λ calibrated, λ fell to ~1e-25 and L0 still collapsed, to 2.6 at
k = 8 and 3.8 at k = 32 in the default run. So while λ is calibrated, every log θ_j also takes the
controller's step, log θ_j ← log θ_j + threshold_calibration_rate · log((L0_batch + 1) / (k + 1))
(a common shift: the thresholds' differences are still learned); both are frozen afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import SAEOutput, _check, fired_latents, kept_dot, reconstruction_mse, scatter_code, sparse_decode, take
from .registry import register
from .relu import CoefficientSparsityConfig, CoefficientSparsitySAE, float_mask


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(pre.dtype)
        grad_threshold = (-(threshold / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return torch.zeros_like(pre), grad_threshold, None


class _JumpReLUWithCount(torch.autograd.Function):
    """``(pre · H(pre − θ), Σ H(pre − θ))`` in one forward and both pseudo-derivatives in one
    backward: the same gradients as :func:`jumprelu` and ``step(...).sum()`` together, in about
    a third of the ``[B, M]`` passes (float masks written by the comparisons, one column sum)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float):  # type: ignore[override]
        mask = float_mask(torch.gt, pre, threshold)
        ctx.save_for_backward(pre, threshold, mask)
        ctx.bandwidth = bandwidth
        return pre * mask, mask.sum()

    @staticmethod
    def backward(ctx, grad_z: Tensor | None, grad_count: Tensor | None):  # type: ignore[override]
        pre, threshold, mask = ctx.saved_tensors
        eps = ctx.bandwidth
        if grad_z is None:
            grad_z = torch.zeros_like(pre)
        grad_pre = grad_z * mask
        band = float_mask(torch.lt, ((pre - threshold) / eps).abs_(), 0.5)  # rectangle K((π − θ)/ε)
        # ∂z/∂θ = −(θ/ε) K and ∂H/∂θ = −(1/ε) K: one masked column sum for both
        weighted = grad_z * threshold if grad_count is None else torch.addcmul(grad_count, grad_z, threshold)
        grad_threshold = weighted.mul_(band)
        if threshold.dim() < pre.dim():  # one threshold per column: summed over the batch
            grad_threshold = grad_threshold.sum(0)
        grad_threshold = grad_threshold / -eps
        return grad_pre, grad_threshold, None


def jumprelu_with_count(pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """``(jumprelu(pre, θ, ε), step(pre, θ, ε).sum())`` fused (same straight-through gradients)."""
    return _JumpReLUWithCount.apply(pre, threshold, bandwidth)


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``pre · H(pre − threshold)`` with the straight-through gradient for ``threshold``."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``H(pre − threshold)`` with the straight-through gradient for ``threshold``."""
    return _Step.apply(pre, threshold, bandwidth)


@dataclass
class JumpReLUConfig(CoefficientSparsityConfig):
    initial_sparsity_coefficient: float = 1e-3
    """Starting λ for the calibration (the L0 penalty needs a much smaller λ than L1)."""
    bandwidth: float = 0.05
    """Kernel width ε of the straight-through estimator, in units of the input scale s."""
    threshold_calibration_rate: float = 0.01
    """While λ is calibrated, every log θ_j also moves by this × log((L0_batch + 1) / (k + 1)) per
    step (0: only λ is calibrated); see the module docstring."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.bandwidth > 0, "bandwidth", f"must be positive, got {self.bandwidth!r}")
        _check(self.threshold_calibration_rate >= 0, "threshold_calibration_rate",
               f"must be non-negative, got {self.threshold_calibration_rate!r}")


@register("jumprelu")
class JumpReLUSAE(CoefficientSparsitySAE):
    config_class = JumpReLUConfig
    display_name = "JumpReLU"

    def __init__(self, cfg: JumpReLUConfig) -> None:
        super().__init__(cfg)
        self.b_enc = nn.Parameter(torch.zeros(cfg.num_latents))
        self.log_threshold = nn.Parameter(torch.full((cfg.num_latents,), math.log(1e-3)))

    def init_biases(self, quantile: Tensor) -> None:
        self.log_threshold.fill_(math.log(max(float(quantile), 1e-6)))

    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    @torch.no_grad()
    def calibrate(self, batch_l0: Tensor) -> None:
        """λ's controller step, and the same correction applied to every threshold (module docstring)."""
        cfg: JumpReLUConfig = self.cfg  # type: ignore[assignment]
        if self.training and self.calibrating() and cfg.threshold_calibration_rate > 0:
            error = torch.log((batch_l0.float() + 1) / (cfg.k + 1))
            self.log_threshold.add_(cfg.threshold_calibration_rate * error.to(self.log_threshold.dtype))
        super().calibrate(batch_l0)

    def forward(self, x: Tensor) -> SAEOutput:
        if self.sparse_step(x):
            return self.sparse_forward(x)
        cfg: JumpReLUConfig = self.cfg  # type: ignore[assignment]
        pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T)
        theta = self.threshold()
        eps = cfg.bandwidth * float(self.input_scale)
        z, count = jumprelu_with_count(pre, theta, eps)  # = jumprelu(...), step(...).sum(), fused
        x_hat = torch.addmm(self.b_dec, z, self.W_dec)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        l0 = count / x.shape[0]
        losses["l0"] = self.sparsity_coefficient() * self.input_scale**2 * l0
        if self.training and self.calibrating():
            self.calibrate(l0.detach())
        # z ≥ 0: a latent fired on the batch iff its column maximum is > 0 (one pass, no abs)
        return SAEOutput(x_hat=x_hat, losses=losses, latents=z, extras={"fired": z.detach().amax(0) > 0})

    def sparse_forward(self, x: Tensor) -> SAEOutput:
        """The training step on the entries above θ − ε (:meth:`sparse_step`): those that fire
        and those in the pseudo-derivatives' band |π − θ| < ε/2; every gradient is zero below."""
        cfg: JumpReLUConfig = self.cfg  # type: ignore[assignment]
        B, M = x.shape[0], cfg.num_latents
        x_c = x - self.b_dec
        theta = self.threshold()
        eps = cfg.bandwidth * float(self.input_scale)
        raw, positions, columns, offsets = self.support(x_c, self.b_enc, theta.detach() - eps)
        pre = kept_dot(x_c, self.W_enc, columns, raw, offsets) + take(self.b_enc, columns)
        z, count = jumprelu_with_count(pre, take(theta, columns), eps)  # flat: one threshold per entry
        x_hat = sparse_decode(z, columns, self.W_dec, self.b_dec, offsets)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        l0 = count / B
        losses["l0"] = self.sparsity_coefficient() * self.input_scale**2 * l0
        if self.calibrating():
            self.calibrate(l0.detach())
        return SAEOutput(x_hat=x_hat, losses=losses, latents=scatter_code(positions, z, (B, M)),
                         extras={"fired": fired_latents(columns[z.detach() > 0], M)})
