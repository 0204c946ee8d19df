"""Switch SAE (Mudide et al. 2024), the original: top-1 routing, output scaled by the router
probability (SPEC §2).

Parameters (checkpoint names and shapes; N experts of m = M/N features):
  W_router [N, d]  router weights (no router bias);  b_router [d] router pre-bias;
  W_enc [N, m, d]  expert encoders (no encoder bias);
  W_dec [M, d]     unit-norm decoder rows, expert i owns rows i·m … (i+1)·m − 1;
  b_dec [d]        pre-bias;  tokens_since_fired [M] (buffer).

p = softmax(W_router (x − b_router)); i* = argmax p;
a = TopK_k(ReLU(W_enc[i*] (x − b_dec)));  z = p_{i*} · a (gate folded into the code);
x̂ = W_decᵀ z + b_dec.  Loss = MSE + α · d · N Σ f_i P_i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SAEOutput, _check, reconstruction_mse, sparse_decode
from .moe import MoEConfig, MoESAE, dispatch_experts, load_balance_loss
from .registry import register


@dataclass
class SwitchConfig(MoEConfig):
    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.k <= self.expert_size,
            "k",
            f"k={self.k} exceeds the expert size num_latents/num_experts={self.expert_size}",
        )


@register("switch")
class SwitchSAE(MoESAE):
    config_class = SwitchConfig

    def active_experts_per_token(self) -> int:
        return 1

    def router_probs(self, x: Tensor) -> Tensor:
        return torch.softmax((x - self.b_router) @ self.W_router.T, dim=-1)

    def forward(self, x: Tensor) -> SAEOutput:
        cfg: SwitchConfig = self.cfg  # type: ignore[assignment]
        probs = self.router_probs(x)
        top_prob, top_expert = probs.max(dim=-1)
        pre = dispatch_experts(
            x - self.b_dec, top_expert[:, None], lambda ids: self.W_enc[ids], None, cfg.num_experts, cfg.dispatch
        )[:, 0]  # [B, m]
        values, local = torch.relu(pre).topk(cfg.k, dim=-1, sorted=False)
        values = values * top_prob[:, None]
        indices = top_expert[:, None] * cfg.expert_size + local
        x_hat = sparse_decode(values, indices, self.W_dec, self.b_dec)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        if cfg.balance_coefficient > 0:
            losses["load_balance"] = cfg.balance_coefficient * cfg.d_in * load_balance_loss(probs, top_expert)
        extras = {"router_probs": probs, "selected_experts": top_expert[:, None], "gate_weights": top_prob[:, None]}
        return SAEOutput(x_hat=x_hat, losses=losses, top_values=values, top_indices=indices, extras=extras)
