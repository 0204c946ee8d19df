"""Switch SAE (Mudide et al. 2024), the original: top-1 routing, output scaled by the router
probability (docs/method.md#architectures).

Parameters (checkpoint names and shapes; N experts of m = M/N features):
  W_router [N, d]  router weights (no router bias);  b_router [d] router pre-bias;
  W_enc [N, m, d]  expert encoders (no encoder bias);
  W_dec [M, d]     unit-norm decoder rows, expert i owns rows i·m … (i+1)·m − 1;
  b_dec [d]        pre-bias;  tokens_since_fired [M] (buffer).

p = softmax(W_router (x − b_router)); i* = argmax p;
a = TopK_k(ReLU(W_enc[i*] (x − b_dec)));  z = p_{i*} · a (gate folded into the code);
x̂ = W_decᵀ z + b_dec.  Loss = MSE + α · d · N Σ f_i P_i.

Options (moe.py): ``router="moex"`` routes by the sparsest expected code, gate weight 1, no
balancing loss; ``shared_expert=True`` adds the always-on expert 0 (weight 1) and keeps the TopK_k
over the routed and the shared expert's 2·m candidates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SAEOutput, _check, reconstruction_mse, sparse_decode
from .moe import SHARED_EXPERT, MoEConfig, MoESAE, load_balance_loss
from .registry import register


@dataclass
class SwitchConfig(MoEConfig):
    def __post_init__(self) -> None:
        super().__post_init__()
        width = (1 + int(self.shared_expert)) * self.expert_size
        _check(
            self.k <= width,
            "k",
            f"k={self.k} exceeds the active width (1 + shared_expert)*num_latents/num_experts={width}",
        )


@register("switch")
class SwitchSAE(MoESAE):
    config_class = SwitchConfig
    display_name = "Switch"

    @classmethod
    def experts_per_token(cls, cfg: SwitchConfig) -> int:  # type: ignore[override]
        return 1

    @classmethod
    def config_label(cls, cfg: SwitchConfig) -> str:  # type: ignore[override]
        return f"{cls.display_name}-{cfg.num_experts}{cls.routing_suffix(cfg)}"

    def select_top_k(self, candidates: Tensor) -> tuple[Tensor, None]:
        """TopK_k over the candidates (the routed expert's m, or 2·m with the shared expert)."""
        return candidates.topk(self.cfg.k, dim=-1, sorted=False).indices, None

    def router_probs(self, x: Tensor) -> Tensor:
        if self.cfg.router == "moex":  # type: ignore[attr-defined]
            return torch.softmax(self.mask_shared_expert(self.moex_router_logits(x)), dim=-1)
        return torch.softmax(self.mask_shared_expert((x - self.b_router) @ self.W_router.T), dim=-1)

    def forward(self, x: Tensor) -> SAEOutput:
        cfg: SwitchConfig = self.cfg  # type: ignore[assignment]
        probs = self.router_probs(x)
        top_prob, top_expert = probs.max(dim=-1)
        # The gate is the router probability (the original design); with moex there is no router
        # to train through it, so the routed expert is ungated (weight 1).
        gate = top_prob if cfg.router == "learned" else torch.ones_like(top_prob)
        if cfg.shared_expert:
            return self._forward_with_shared_expert(x, probs, top_expert, gate)
        values, indices = self.encode_selected(x - self.b_dec, top_expert[:, None], gate[:, None], self.select_top_k)
        x_hat = sparse_decode(values, indices, self.W_dec, self.b_dec)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        if cfg.balance_coefficient > 0 and cfg.router == "learned":
            losses["load_balance"] = cfg.balance_coefficient * cfg.d_in * load_balance_loss(probs, top_expert)
        extras = {"router_probs": probs, "selected_experts": top_expert[:, None], "gate_weights": gate[:, None]}
        return SAEOutput(x_hat=x_hat, losses=losses, top_values=values, top_indices=indices, extras=extras)

    def _forward_with_shared_expert(self, x: Tensor, probs: Tensor, top_expert: Tensor, gate: Tensor) -> SAEOutput:
        """Routed expert (gated) + the always-on expert (weight 1); TopK_k over their 2·m candidates."""
        cfg: SwitchConfig = self.cfg  # type: ignore[assignment]
        experts = torch.stack([top_expert, torch.full_like(top_expert, SHARED_EXPERT)], 1)  # [B, 2]
        gates = torch.stack([gate, torch.ones_like(gate)], 1)
        values, indices = self.encode_selected(x - self.b_dec, experts, gates, self.select_top_k)
        x_hat = sparse_decode(values, indices, self.W_dec, self.b_dec)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        if cfg.balance_coefficient > 0 and cfg.router == "learned":
            losses["load_balance"] = cfg.balance_coefficient * cfg.d_in * self.routed_balance_loss(probs, top_expert)
        extras = {"router_probs": probs, "selected_experts": experts, "gate_weights": gates}
        return SAEOutput(x_hat=x_hat, losses=losses, top_values=values, top_indices=indices, extras=extras)
