"""TopK SAE (Gao et al. 2024), with AuxK for dead latents (docs/method.md#architectures).

Parameters (checkpoint names and shapes):
  W_enc [M, d]   encoder rows;  b_enc [M] encoder bias;
  W_dec [M, d]   unit-norm decoder rows;  b_dec [d] pre-bias;
  tokens_since_fired [M] (buffer) training tokens since each latent last fired.

z = TopK_k(ReLU(W_enc (x − b_dec) + b_enc));  x̂ = W_decᵀ z + b_dec.
AuxK: the residual e = x − x̂ is reconstructed from the k_aux largest pre-activations of the dead
latents; loss = aux_coefficient · ‖e − ê‖² / ‖e − ē‖² (both summed over the batch).

Training cost (issue #7): the pre-activations that choose the code are computed without autograd;
only the k kept latents (and the AuxK ones) are recomputed with autograd through ``kept_dot``, so
the backward costs k·d per token instead of M·d. ``pre_activations`` is the dense autograd form,
the reference the tests compare against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SAE, SAEConfig, SAEOutput, _check, kept_dot, reconstruction_mse, sparse_decode, take
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


def auxk_select(pre: Tensor, latents: Tensor, aux_k: int) -> Tensor | None:
    """``[B, min(aux_k, n)]`` ids of the largest pre-activations among ``latents`` (n of them), or None.

    The ``topk`` runs over the n selected columns only (gathered), not over all M with the others
    masked to −inf: the same selection at a cost proportional to n.
    """
    columns = latents.nonzero().squeeze(1)
    num = columns.numel()
    if num == 0:
        return None
    if num == latents.numel():
        return pre.topk(min(aux_k, num), dim=-1, sorted=False).indices
    picked = pre.index_select(1, columns).topk(min(aux_k, num), dim=-1, sorted=False).indices
    return columns[picked]


def auxk_loss(x: Tensor, x_hat: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """AuxK loss: reconstruct the residual from the selected dead latents' pre-activations."""
    residual = (x - x_hat).detach()
    residual_hat = F.embedding_bag(indices, W_dec, per_sample_weights=values.clamp_min(0).to(W_dec.dtype), mode="sum")
    denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-8)
    return (residual_hat - residual).pow(2).sum() / denom


@register("topk")
class TopKSAE(SAE):
    config_class = TopKConfig
    display_name = "TopK"

    @classmethod
    def config_label(cls, cfg: TopKConfig) -> str:
        return f"{cls.display_name}-{cfg.num_latents}"

    def __init__(self, cfg: TopKConfig) -> None:
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self._initial_encoder.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.num_latents))
        del self._initial_encoder

    def pre_activations(self, x: Tensor) -> Tensor:
        """Dense ``ReLU(W_enc (x − b_dec) + b_enc)`` ``[B, M]`` with autograd (the reference path)."""
        return torch.relu(F.linear(x - self.b_dec, self.W_enc, self.b_enc))

    def forward(self, x: Tensor) -> SAEOutput:
        # Select the k latents from pre-activations computed without autograd, then recompute
        # only the kept ones with autograd (kept_dot): the backward costs k·d per token, not M·d.
        x_c = x - self.b_dec
        raw, pre = self.selection_preactivations(x_c)
        indices = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
        return self.sparse_output(x, x_c, indices, raw, pre)

    @torch.no_grad()
    def selection_preactivations(self, x_c: Tensor) -> tuple[Tensor, Tensor]:
        """``raw = x_c W_encᵀ`` and ``pre = ReLU(raw + b_enc)``, both ``[B, M]``, without autograd.

        They only choose the code (bf16 under autocast); the kept values get their gradients
        from :meth:`kept_values`.
        """
        raw = F.linear(x_c, self.W_enc)
        return raw, torch.relu(raw + self.b_enc.to(raw.dtype))

    def sparse_output(
        self, x: Tensor, x_c: Tensor, indices: Tensor, raw: Tensor, pre: Tensor, keep: Tensor | None = None
    ) -> SAEOutput:
        """The code at ``indices`` ``[B, width]`` (times the mask ``keep`` if given), decoded, with its losses."""
        values = self.kept_values(x_c, indices, raw)
        if keep is not None:
            values = values * keep
        x_hat = sparse_decode(values, indices, self.W_dec, self.b_dec)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        if self.training and self.cfg.aux_coefficient > 0:  # type: ignore[attr-defined]
            losses["auxk"] = self.aux_loss(
                x, x_hat, pre, self.dead_mask(), values_of=lambda ids: self.kept_values(x_c, ids, raw)
            )
        return SAEOutput(x_hat=x_hat, losses=losses, top_values=values, top_indices=indices)

    def kept_values(self, x_c: Tensor, indices: Tensor, raw: Tensor | None = None) -> Tensor:
        """``ReLU(W_enc[i] · x_c + b_enc[i])`` for the ids ``indices`` ``[B, k]``, sparse backward.

        ``raw`` is the no-grad ``x_c @ W_encᵀ`` ``[B, M]`` when the caller has it.
        """
        dots = kept_dot(x_c, self.W_enc, indices, None if raw is None else raw.gather(1, indices))
        return torch.relu(dots + take(self.b_enc, indices))

    def flat_kept_values(self, x_c: Tensor, raw: Tensor, positions: Tensor, columns: Tensor, offsets: Tensor) -> Tensor:
        """:meth:`kept_values` for a flat code (a variable count per token, see :func:`~.base.flat_support`):
        the entries at the flat ``positions`` of ``raw`` ``[B, M]``, i.e. ``columns`` from ``offsets``."""
        dots = kept_dot(x_c, self.W_enc, columns, raw.reshape(-1).index_select(0, positions), offsets)
        return torch.relu(dots + take(self.b_enc, columns))

    def aux_loss(
        self, x: Tensor, x_hat: Tensor, pre: Tensor, latents: Tensor, values_of: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """AuxK over the given ``latents`` mask (dead ones here; subclasses pass their own).

        The aux_k largest of ``pre`` among ``latents`` are selected without autograd; their values
        come from ``values_of(ids)`` (sparse backward) or, by default, from ``pre`` itself.
        """
        cfg: TopKConfig = self.cfg  # type: ignore[assignment]
        aux_k = cfg.aux_k or max(1, cfg.d_in // 2)
        ids = auxk_select(pre.detach(), latents, aux_k)
        if ids is None:
            return x.new_zeros(())
        values = pre.gather(1, ids) if values_of is None else values_of(ids)
        return cfg.aux_coefficient * auxk_loss(x, x_hat, values, ids, self.W_dec)

