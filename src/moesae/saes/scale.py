"""Scale SAE (Xu et al. 2025): Multiple Expert Activation + Feature Scaling + global TopK (docs/method.md#architectures).

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

Options (see moe.py for ``router`` and ``shared_expert``): with ``router="moex"`` the logits are
the MoE-X sparsity estimates from the *effective* encoders' statistics (row mean
(1 + ω_i) μ_i − ω_i L_i, row variance (1 + ω_i)² σ²_i: no Ŵ is built), and with a shared expert
its candidates enter the TopK with weight 1.
``batch_topk=True``: global TopK across experts *and tokens* — during training keep the k·B largest
of the whole [B, e·m] candidate matrix (BatchTopK-style batch allocation, so a token may keep more
or fewer than k); at inference keep candidates above the global threshold θ (buffer ``threshold``,
EMA of the smallest kept value, as in batchtopk.py). The code then has a variable count per token:
``top_values``/``top_indices`` are padded with zeros to the largest count in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import SAEOutput, _check, reconstruction_mse, sparse_decode
from .batchtopk import select_batch_topk
from .moe import SHARED_EXPERT, MoEConfig, MoESAE, encoder_statistics
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
    batch_topk: bool = False
    """Global TopK with a batch-level budget k·B (training) and a global threshold (inference)."""
    threshold_decay: float = 0.99
    """β: EMA decay of the inference threshold when batch_topk is on."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            isinstance(self.active_experts, int) and 1 <= self.active_experts <= self.routed_experts,
            "active_experts",
            f"active_experts={self.active_experts} must be between 1 and the number of routed experts "
            f"{self.routed_experts} (num_experts={self.num_experts}, shared_expert={self.shared_expert})",
        )
        _check(
            self.feature_scaling in FEATURE_SCALING,
            "feature_scaling",
            f"must be one of {FEATURE_SCALING}, got {self.feature_scaling!r}",
        )
        _check(self.gate in GATES, "gate", f"must be one of {GATES}, got {self.gate!r}")
        width = (self.active_experts + int(self.shared_expert)) * self.expert_size
        _check(
            self.k <= width,
            "k",
            f"k={self.k} exceeds the active width (active_experts + shared_expert)*num_latents/num_experts={width}",
        )
        _check(isinstance(self.batch_topk, bool), "batch_topk", f"must be true or false, got {self.batch_topk!r}")
        _check(0 <= self.threshold_decay < 1, "threshold_decay", f"must be in [0, 1), got {self.threshold_decay!r}")


@register("scale")
class ScaleSAE(MoESAE):
    config_class = ScaleConfig
    display_name = "Scale"

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
        if cfg.batch_topk:
            self.register_buffer("threshold", torch.full((), -1.0))

    @classmethod
    def experts_per_token(cls, cfg: ScaleConfig) -> int:  # type: ignore[override]
        return cfg.active_experts

    @classmethod
    def config_label(cls, cfg: ScaleConfig) -> str:  # type: ignore[override]
        if cfg.active_experts == 1 and cfg.feature_scaling == "none" and cfg.gate == "prob_softmax":
            return f"Switch (authors', e=1, N={cfg.num_experts})"
        scaling = {"mean": "", "none": ", no FS"}.get(cfg.feature_scaling, f", {cfg.feature_scaling} FS")
        extra = ", batch TopK" if cfg.batch_topk else ""
        return f"{cls.display_name} ({cfg.num_experts},{cfg.active_experts}){scaling}{extra}{cls.routing_suffix(cfg)}"

    def router_logits(self, x: Tensor) -> Tensor:
        if self.cfg.router == "moex":  # type: ignore[attr-defined]
            return self.mask_shared_expert(self.moex_router_logits(x))
        return self.mask_shared_expert((x - self.b_router) @ self.W_router.T + self.c_router)

    def low_frequency(self) -> Tensor | None:
        """L_i for every expert ``[N, d]`` (None without Feature Scaling)."""
        mode = self.cfg.feature_scaling  # type: ignore[attr-defined]
        if mode == "none":
            return None
        if mode == "learned":
            return self.low_freq
        # sum / m rather than mean: the backward of sum is a broadcast view, so the gradient of
        # the expert means reaches W_enc without materialising an [N, m, d] tensor.
        low = self.W_enc.sum(1) / self.cfg.expert_size  # type: ignore[attr-defined]
        return low @ self.T.T if mode == "mean" else low

    def encoder_statistics(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Row mean / variance of the effective encoders Ŵ_i, without building Ŵ."""
        row_mean, row_var, bias_mean, bias_var = encoder_statistics(self.W_enc, self.b_enc)
        low = self.low_frequency()
        if low is not None:
            scale = 1 + self.omega[:, None]
            row_mean = scale * row_mean - self.omega[:, None] * low
            row_var = scale.pow(2) * row_var
        return row_mean, row_var, bias_mean, bias_var

    def select_candidates(self, candidates: Tensor) -> tuple[Tensor, Tensor | None]:
        """Positions kept from ``[B, e·m]`` (per-token TopK, or batch TopK) and a keep mask or None.

        With ``batch_topk`` a token keeps a variable count: positions are padded to the largest
        count in the batch and the mask ``[B, width]`` marks the real ones.
        """
        cfg: ScaleConfig = self.cfg  # type: ignore[assignment]
        if not cfg.batch_topk:
            return candidates.topk(cfg.k, dim=-1, sorted=False).indices, None
        return select_batch_topk(candidates.detach(), cfg.k, self.threshold, cfg.threshold_decay, self.training)

    def effective_encoders(self, ids: Tensor) -> Tensor:
        """Ŵ for the experts ``ids``: ``[len(ids), m, d]``. Only these experts are touched."""
        W = self.W_enc[ids]
        low = self.low_frequency()
        if low is None:
            return W
        return W + self.omega[ids][:, None, None] * (W - low[ids][:, None, :])

    def forward(self, x: Tensor) -> SAEOutput:
        cfg: ScaleConfig = self.cfg  # type: ignore[assignment]
        logits = self.router_logits(x)
        probs = torch.softmax(logits, dim=-1)
        top_probs, routed = probs.topk(cfg.active_experts, dim=-1)  # sorted, largest first
        if cfg.gate == "prob_softmax":
            weights = torch.softmax(top_probs, dim=-1)
        else:
            weights = torch.softmax(logits.gather(1, routed), dim=-1)
        experts = routed
        if cfg.shared_expert:  # the always-on expert joins every token, ungated (weight 1)
            experts = torch.cat([routed, routed.new_full((routed.shape[0], 1), SHARED_EXPERT)], 1)
            weights = torch.cat([weights, weights.new_ones(weights.shape[0], 1)], 1)
        # Feature Scaling is applied in output space (Ŵ is never built; see encode_selected).
        values, indices = self.encode_selected(
            x - self.b_dec, experts, weights, self.select_candidates, bias=self.b_enc,
            omega=self.omega if cfg.feature_scaling != "none" else None, low_freq=self.low_frequency(),
        )
        x_hat = sparse_decode(values, indices, self.W_dec, self.b_dec)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        if cfg.balance_coefficient > 0 and cfg.router == "learned":
            losses["load_balance"] = cfg.balance_coefficient * cfg.d_in * self.routed_balance_loss(probs, routed[:, 0])
        extras = {"router_probs": probs, "selected_experts": experts, "gate_weights": weights}
        return SAEOutput(x_hat=x_hat, losses=losses, top_values=values, top_indices=indices, extras=extras)
