"""Scale SAE (Xu et al. 2025): Multiple Expert Activation + Feature Scaling + global TopK (SPEC §2).

Parameters (checkpoint names and shapes; N experts of m = M/N features):
  W_router [N, d]   router weights W_g;  c_router [N] router bias c_g (zero init);
  b_router [d]      router pre-bias b_g (geometric-median init);
  W_enc [N, m, d]   expert encoders W_i;  b_enc [N, m] expert encoder biases (zero init);
  omega [N]         Feature Scaling ω_i, one per expert (zero init; the multiplier is 1 + ω);
  T [d, d]          shared low-frequency transform (identity init; ``mean`` decomposition only);
  low_freq [N, d]   per-expert low-frequency vector (``learned`` decomposition only);
  W_dec [M, d]      unit-norm decoder rows, expert i owns rows i·m … (i+1)·m − 1;
  b_dec [d]         pre-bias;  tokens_since_fired [M] (buffer).
With ``feature_scaling="none"`` omega and T are buffers frozen at 0 and I.

Forward: p = softmax(W_g (x − b_g) + c_g); S = the e experts with the largest p;
w_i = softmax over S of p_i (``gate="prob_softmax"``, the authors') or of the logits
(``gate="logit_softmax"``); Ŵ_i = W_i + ω_i (W_i − 1 L_iᵀ) with the low-frequency part
L_i = T μ_i (``mean``), μ_i (``identity``) or a learned vector (``learned``), μ_i the mean of W_i's
rows; a_i = ReLU(Ŵ_i (x − b_dec) + b_i); f = concat_i(w_i a_i); z = TopK_k(f) over the e·m
candidates; x̂ = W_decᵀ z + b_dec. Loss = MSE + λ · d · N Σ f_i P_i (f_i by argmax expert).

Ŵ_i = W_i + ω_i H_i is the paper's 1·L_iᵀ + (1 + ω_i) H_i rearranged, so that ω = 0 gives W_i
bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import SAEOutput, _check, reconstruction_mse, sparse_decode
from .moe import MoEConfig, MoESAE, dispatch_experts, load_balance_loss
from .registry import register

FEATURE_SCALING = ("mean", "identity", "learned", "none")
GATES = ("prob_softmax", "logit_softmax")


@dataclass
class ScaleConfig(MoEConfig):
    active_experts: int = 2
    """e: experts activated per token."""
    feature_scaling: str = "mean"
    """Decomposition for Feature Scaling: mean | identity | learned | none."""
    gate: str = "prob_softmax"
    """Gate over the selected experts: softmax of their probabilities (authors) or of their logits."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            isinstance(self.active_experts, int) and 1 <= self.active_experts <= self.num_experts,
            "active_experts",
            f"active_experts={self.active_experts} must be between 1 and num_experts={self.num_experts}",
        )
        _check(
            self.feature_scaling in FEATURE_SCALING,
            "feature_scaling",
            f"must be one of {FEATURE_SCALING}, got {self.feature_scaling!r}",
        )
        _check(self.gate in GATES, "gate", f"must be one of {GATES}, got {self.gate!r}")
        _check(
            self.k <= self.active_experts * self.expert_size,
            "k",
            f"k={self.k} exceeds the active width active_experts*num_latents/num_experts="
            f"{self.active_experts * self.expert_size}",
        )


@register("scale")
class ScaleSAE(MoESAE):
    config_class = ScaleConfig

    def __init__(self, cfg: ScaleConfig) -> None:
        super().__init__(cfg)
        N, m, d = cfg.num_experts, cfg.expert_size, cfg.d_in
        self.c_router = nn.Parameter(torch.zeros(N))
        self.b_enc = nn.Parameter(torch.zeros(N, m))
        if cfg.feature_scaling == "none":
            self.register_buffer("omega", torch.zeros(N))
            self.register_buffer("T", torch.eye(d))
        else:
            self.omega = nn.Parameter(torch.zeros(N))
            if cfg.feature_scaling == "mean":
                self.T = nn.Parameter(torch.eye(d))
            if cfg.feature_scaling == "learned":
                self.low_freq = nn.Parameter(self.W_enc.detach().mean(1).clone())

    def active_experts_per_token(self) -> int:
        return self.cfg.active_experts  # type: ignore[attr-defined]

    def router_logits(self, x: Tensor) -> Tensor:
        return (x - self.b_router) @ self.W_router.T + self.c_router

    def effective_encoders(self, ids: Tensor) -> Tensor:
        """Ŵ for the experts ``ids``: ``[len(ids), m, d]``. Only these experts are touched."""
        W = self.W_enc[ids]
        mode = self.cfg.feature_scaling  # type: ignore[attr-defined]
        if mode == "none":
            return W
        if mode == "learned":
            low = self.low_freq[ids]
        else:
            low = W.mean(1)
            if mode == "mean":
                low = low @ self.T.T
        return W + self.omega[ids][:, None, None] * (W - low[:, None, :])

    def forward(self, x: Tensor) -> SAEOutput:
        cfg: ScaleConfig = self.cfg  # type: ignore[assignment]
        logits = self.router_logits(x)
        probs = torch.softmax(logits, dim=-1)
        top_probs, experts = probs.topk(cfg.active_experts, dim=-1)  # sorted, largest first
        if cfg.gate == "prob_softmax":
            weights = torch.softmax(top_probs, dim=-1)
        else:
            weights = torch.softmax(logits.gather(1, experts), dim=-1)
        pre = dispatch_experts(
            x - self.b_dec, experts, self.effective_encoders, self.b_enc, cfg.num_experts, cfg.dispatch
        )  # [B, e, m]
        candidates = (torch.relu(pre) * weights[:, :, None]).flatten(1)  # [B, e·m]
        values, candidate_idx = candidates.topk(cfg.k, dim=-1, sorted=False)
        indices = self._global_ids(candidate_idx, experts)
        x_hat = sparse_decode(values, indices, self.W_dec, self.b_dec)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        if cfg.balance_coefficient > 0:
            losses["load_balance"] = cfg.balance_coefficient * cfg.d_in * load_balance_loss(probs, experts[:, 0])
        extras = {"router_probs": probs, "selected_experts": experts, "gate_weights": weights}
        return SAEOutput(x_hat=x_hat, losses=losses, top_values=values, top_indices=indices, extras=extras)
