"""What the multi-expert SAEs (Switch, Scale) share: config, router, expert dispatch, balancing.

Expert dispatch computes **only the experts a token selected** (SPEC §7: the public code computes
every expert for every token and masks the result). The (token, expert) pairs are sorted by expert
and each expert's encoder multiplies only its own tokens:

- ``"grouped"``: one batched matmul over the experts that received tokens, each padded to the
  largest expert's token count (fast when routing is balanced, as the load-balancing loss keeps it);
- ``"loop"``: one matmul per selected expert on its contiguous slice, no padding (used when
  routing is so skewed that padding would cost more than the loop);
- ``"all"``: the authors' design, every expert for every token, then masked — kept as the
  reference the fast paths are tested and benchmarked against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .base import SAE, SAEConfig, _check, geometric_median

DISPATCH_MODES = ("auto", "grouped", "loop", "all")


@dataclass
class MoEConfig(SAEConfig):
    num_experts: int = 16
    """Number of experts N; each owns m = M / N features."""
    balance_coefficient: float = 3.0
    """α (Switch) / λ (Scale): the load-balancing loss is α · d · N · Σ f_i P_i."""
    dispatch: str = "auto"
    """How experts are computed: auto | grouped | loop | all (see module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            isinstance(self.num_experts, int) and self.num_experts > 0,
            "num_experts",
            f"must be a positive integer, got {self.num_experts!r}",
        )
        _check(
            self.num_latents % self.num_experts == 0,
            "num_latents",
            f"num_latents={self.num_latents} is not divisible by num_experts={self.num_experts}",
        )
        _check(self.balance_coefficient >= 0, "balance_coefficient", "must be non-negative")
        _check(self.dispatch in DISPATCH_MODES, "dispatch", f"must be one of {DISPATCH_MODES}, got {self.dispatch!r}")

    @property
    def expert_size(self) -> int:
        return self.num_latents // self.num_experts


def load_balance_loss(router_probs: Tensor, top_expert: Tensor) -> Tensor:
    """N · Σ_i f_i P_i: f_i = share of tokens whose argmax expert is i, P_i = mean probability.

    Equals 1 when routing is perfectly balanced.
    """
    num_experts = router_probs.shape[1]
    f = torch.bincount(top_expert, minlength=num_experts).to(router_probs.dtype) / top_expert.numel()
    P = router_probs.mean(0)
    return num_experts * (f * P).sum()


def dispatch_experts(
    x: Tensor,
    experts: Tensor,
    expert_weights: Callable[[Tensor], Tensor],
    expert_bias: Tensor | None,
    num_experts: int,
    mode: str = "auto",
) -> Tensor:
    """Pre-activations of each token's selected experts.

    Args:
        x: ``[B, d]`` (already centred by the pre-bias).
        experts: ``[B, e]`` selected expert ids per token.
        expert_weights: maps a 1-D tensor of expert ids to their encoders ``[A, m, d]``;
            called only with experts that at least one token selected.
        expert_bias: ``[N, m]`` or None.
    Returns:
        ``[B, e, m]``: ``W_i x + b_i`` for each selected expert i.
    """
    B, e = experts.shape
    if mode == "all":
        W = expert_weights(torch.arange(num_experts, device=x.device))  # [N, m, d]
        pre = torch.einsum("bd,nmd->bnm", x, W)
        if expert_bias is not None:
            pre = pre + expert_bias
        return pre.gather(1, experts[:, :, None].expand(B, e, pre.shape[-1]))

    flat = experts.reshape(-1)
    num_pairs = flat.numel()
    token_of_pair = torch.arange(B, device=x.device).repeat_interleave(e)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    counts = torch.bincount(flat, minlength=num_experts)
    active = counts.nonzero().squeeze(1)
    active_counts = counts[active]
    W = expert_weights(active)  # [A, m, d]
    m = W.shape[1]
    capacity = int(active_counts.max())
    if mode == "auto":
        mode = "grouped" if active.numel() * capacity <= 2 * num_pairs else "loop"

    x_sorted = x[token_of_pair[order]]
    if mode == "grouped":
        slot_of_expert = torch.full((num_experts,), -1, dtype=torch.long, device=x.device)
        slot_of_expert[active] = torch.arange(active.numel(), device=x.device)
        offsets = torch.cumsum(counts, 0) - counts
        position = torch.arange(num_pairs, device=x.device) - offsets[sorted_experts]
        slot = slot_of_expert[sorted_experts]
        padded = x.new_zeros(active.numel(), capacity, x.shape[1])
        padded = padded.index_put((slot, position), x_sorted)
        out = torch.bmm(padded, W.transpose(1, 2))  # [A, C, m]
        if expert_bias is not None:
            out = out + expert_bias[active][:, None, :]
        pre_sorted = out[slot, position]
    elif mode == "loop":
        chunks = torch.split(x_sorted, active_counts.tolist())
        outs = [chunk @ W[i].T for i, chunk in enumerate(chunks)]
        if expert_bias is not None:
            outs = [o + expert_bias[active[i]] for i, o in enumerate(outs)]
        pre_sorted = torch.cat(outs, 0)
    else:
        raise ValueError(f"invalid SAE config field 'dispatch': unknown mode {mode!r}")
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(num_pairs, device=x.device)
    return pre_sorted[inverse].view(B, e, m)


class MoESAE(SAE):
    """Shared parts: expert-stacked encoder, router pre-bias, balancing loss, FLOP count."""

    router_prebias_name = "b_router"

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        N, m, d = cfg.num_experts, cfg.expert_size, cfg.d_in
        self.W_enc = nn.Parameter(self._initial_encoder.clone().view(N, m, d))
        del self._initial_encoder
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        bound = 1.0 / d**0.5
        self.W_router = nn.Parameter((torch.rand(N, d, generator=generator) * 2 - 1) * bound)
        self.b_router = nn.Parameter(torch.zeros(d))

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        median = geometric_median(x).to(self.b_dec.dtype)
        self.b_dec.copy_(median)
        self.b_router.copy_(median)

    def expert_of_feature(self) -> Tensor:
        """``[M]``: the expert that owns each feature."""
        cfg: MoEConfig = self.cfg  # type: ignore[assignment]
        return torch.arange(cfg.num_latents, device=self.W_dec.device) // cfg.expert_size

    def _global_ids(self, candidate_idx: Tensor, experts: Tensor) -> Tensor:
        """Map top-k indices into the ``[B, e·m]`` candidate block to global feature ids."""
        m = self.cfg.expert_size  # type: ignore[attr-defined]
        slot = candidate_idx // m
        return experts.gather(1, slot) * m + candidate_idx % m

    def active_experts_per_token(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def flops_per_token(self) -> int:
        cfg: MoEConfig = self.cfg  # type: ignore[assignment]
        e = self.active_experts_per_token()
        return cfg.num_experts * cfg.d_in + e * cfg.expert_size * cfg.d_in + cfg.k * cfg.d_in
