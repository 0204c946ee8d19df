"""TopK SAE (Gao et al. 2024), with AuxK for dead latents (SPEC §2).

Parameters (checkpoint names and shapes):
  W_enc [M, d]   encoder rows;  b_enc [M] encoder bias;
  W_dec [M, d]   unit-norm decoder rows;  b_dec [d] pre-bias;
  tokens_since_fired [M] (buffer) training tokens since each latent last fired.

z = TopK_k(ReLU(W_enc (x − b_dec) + b_enc));  x̂ = W_decᵀ z + b_dec.
AuxK: the residual e = x − x̂ is reconstructed from the k_aux largest pre-activations of the dead
latents; loss = aux_coefficient · ‖e − ê‖² / ‖e − ē‖² (both summed over the batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SAE, SAEConfig, SAEOutput, _check, reconstruction_mse, sparse_decode
from .registry import register


@dataclass
class TopKConfig(SAEConfig):
    aux_k: int | None = None
    """Latents used by AuxK; default d_in // 2."""
    aux_coefficient: float = 1.0 / 32
    """Weight of the AuxK loss."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aux_k is not None:
            _check(0 < self.aux_k <= self.num_latents, "aux_k", f"must be in 1..num_latents, got {self.aux_k}")
        _check(self.aux_coefficient >= 0, "aux_coefficient", "must be non-negative")


def auxk_loss(
    x: Tensor, x_hat: Tensor, pre_acts: Tensor, dead: Tensor, aux_k: int, W_dec: Tensor
) -> Tensor:
    """AuxK loss: reconstruct the residual from the top pre-activations of dead latents."""
    num_dead = int(dead.sum())
    if num_dead == 0:
        return x.new_zeros(())
    residual = (x - x_hat).detach()
    masked = torch.where(dead[None, :], pre_acts, torch.full_like(pre_acts, -torch.inf))
    values, indices = masked.topk(min(aux_k, num_dead), dim=-1, sorted=False)
    values = values.clamp_min(0)
    residual_hat = torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-8)
    return (residual_hat - residual).pow(2).sum() / denom


@register("topk")
class TopKSAE(SAE):
    config_class = TopKConfig

    def __init__(self, cfg: TopKConfig) -> None:
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self._initial_encoder.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.num_latents))
        del self._initial_encoder

    def pre_activations(self, x: Tensor) -> Tensor:
        return torch.relu(F.linear(x - self.b_dec, self.W_enc, self.b_enc))

    def forward(self, x: Tensor) -> SAEOutput:
        cfg: TopKConfig = self.cfg  # type: ignore[assignment]
        pre = self.pre_activations(x)
        values, indices = pre.topk(cfg.k, dim=-1, sorted=False)
        x_hat = sparse_decode(values, indices, self.W_dec, self.b_dec)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        if self.training and cfg.aux_coefficient > 0:
            losses["auxk"] = self.aux_loss(x, x_hat, pre, self.dead_mask())
        return SAEOutput(x_hat=x_hat, losses=losses, top_values=values, top_indices=indices)

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, latents: Tensor) -> Tensor:
        """AuxK over the given ``latents`` mask (dead ones here; subclasses pass their own)."""
        cfg: TopKConfig = self.cfg  # type: ignore[assignment]
        aux_k = cfg.aux_k or max(1, cfg.d_in // 2)
        return cfg.aux_coefficient * auxk_loss(x, x_hat, pre, latents, aux_k, self.W_dec)

    def flops_per_token(self) -> int:
        return self.cfg.num_latents * self.cfg.d_in + self.cfg.k * self.cfg.d_in
