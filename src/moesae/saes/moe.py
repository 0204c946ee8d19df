"""What the multi-expert SAEs (Switch, Scale) share: config, router, expert dispatch, balancing.

Expert dispatch computes **only the experts a token selected** (docs/method.md#deliberate-deviations-from-the-authors-code: the public code computes
every expert for every token and masks the result). The (token, expert) pairs are sorted by expert
and each expert's encoder multiplies only its own tokens:

- ``"grouped"``: one batched matmul over the experts that received tokens, each padded to the
  largest expert's token count (fast when routing is balanced, as the load-balancing loss keeps it);
- ``"loop"``: one matmul per selected expert on its contiguous slice, no padding (used when
  routing is so skewed that padding would cost more than the loop);
- ``"all"``: the authors' design, every expert for every token, then masked — kept as the
  reference the fast paths are tested and benchmarked against.

Routing options (config fields, defaults = the published designs):

- ``router: "learned"``: the architecture's own learned softmax router.
- ``router: "moex"`` (MoE-X-style, Yang et al. 2025): no learned router; each token goes to the
  experts whose ReLU codes would be *sparsest*, estimated from each expert's own encoder statistics.
  Treat expert i's m encoder rows as draws from a distribution with per-dimension mean μ_i and
  variance σ²_i (and its biases with mean b̄_i, variance v_i); a pre-activation w·x + b is then
  ≈ N(μ_i·x + b̄_i, σ²_i·x² + v_i), so the expected share of positive units is
  ρ_i(x) = Φ((μ_i·x + b̄_i) / sqrt(σ²_i·x² + v_i)), at 2·N·d multiply-adds per token (the
  statistics themselves cost M·d once per batch). Router logits are −log(1 + m·ρ_i(x)) (the
  probabilities ∝ 1/(1 + expected active units)); experts with the largest logits are selected.
  Routing is a fixed function of the current encoders: no gradient flows through it, and there is
  no load-balancing loss (no router to balance).
- ``shared_expert: true``: expert 0 is always on (one expert every token uses, for the common
  features Switch SAEs otherwise duplicate in every expert). The router chooses among experts
  1…N−1 as before; the shared expert's gate weight is 1 (ungated) and its candidates join the
  routed experts' in the TopK. It is the last column of ``extras["selected_experts"]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .base import SAE, SAEConfig, _check, geometric_median, kept_dot, take

DISPATCH_MODES = ("auto", "grouped", "loop", "all")
ROUTERS = ("learned", "moex")
SHARED_EXPERT = 0


@dataclass
class MoEConfig(SAEConfig):
    num_experts: int = 16
    """Number of experts N; each owns m = M / N features."""
    balance_coefficient: float = 3.0
    """α (Switch) / λ (Scale): the load-balancing loss is α · d · N · Σ f_i P_i."""
    dispatch: str = "auto"
    """How experts are computed: auto | grouped | loop | all (see module docstring)."""
    router: str = "learned"
    """How tokens choose experts: learned (softmax router) | moex (sparsest expected code)."""
    shared_expert: bool = False
    """Expert 0 is used by every token in addition to the routed ones."""

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
        _check(self.router in ROUTERS, "router", f"must be one of {ROUTERS}, got {self.router!r}")
        _check(isinstance(self.shared_expert, bool), "shared_expert", f"must be true or false, got {self.shared_expert!r}")
        _check(
            not self.shared_expert or self.num_experts >= 2,
            "shared_expert",
            "needs num_experts >= 2 (one shared expert plus at least one routed expert)",
        )

    @property
    def routed_experts(self) -> int:
        """Experts the router chooses among (N, or N − 1 with a shared expert)."""
        return self.num_experts - int(self.shared_expert)

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


def sparsity_router_logits(
    x: Tensor, row_mean: Tensor, row_var: Tensor, bias_mean: Tensor, bias_var: Tensor, expert_size: int
) -> Tensor:
    """MoE-X-style router logits −log(1 + m·ρ_i(x)) from encoder statistics (module docstring).

    Args: x ``[B, d]`` centred input; row_mean, row_var ``[N, d]``; bias_mean, bias_var ``[N]``.
    """
    mean = x @ row_mean.T + bias_mean
    std = (x.pow(2) @ row_var.T + bias_var).clamp_min(1e-12).sqrt()
    positive_share = torch.special.ndtr(mean / std)
    return -torch.log1p(expert_size * positive_share)


def encoder_statistics(W: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-expert row mean / variance ``[N, d]`` and bias mean / variance ``[N]`` of ``W [N, m, d]``."""
    row_mean, row_var = W.mean(1), W.var(1, unbiased=False)
    if b is None:
        zeros = W.new_zeros(W.shape[0])
        return row_mean, row_var, zeros, zeros
    return row_mean, row_var, b.mean(1), b.var(1, unbiased=False)


def feature_scaling_terms(x: Tensor, experts: Tensor, omega: Tensor, low_freq: Tensor) -> tuple[Tensor, Tensor]:
    """ω_i and L_i · x for each token's selected experts, both ``[B, e]``.

    L · x for all N experts is one thin matmul; gathering L per token first would make the
    backward a slow scatter-add of ``[B, e, d]`` rows into ``[N, d]``.
    """
    return take(omega, experts), (x @ low_freq.T).gather(1, experts)


def scale_outputs(raw: Tensor, omega_sel: Tensor, low_dot_x: Tensor) -> Tensor:
    """Feature Scaling in output space: Ŵ_i x = (1 + ω_i) W_i x − ω_i (L_i · x), from ``raw`` = W_i x."""
    return torch.addcmul((-omega_sel * low_dot_x).to(raw.dtype), raw, (1 + omega_sel).to(raw.dtype))


def dispatch_experts(
    x: Tensor,
    experts: Tensor,
    expert_weights: Tensor | Callable[[Tensor], Tensor],
    expert_bias: Tensor | None,
    num_experts: int,
    mode: str = "auto",
    *,
    omega: Tensor | None = None,
    low_freq: Tensor | None = None,
) -> Tensor:
    """Pre-activations of each token's selected experts, computing only those experts.

    Args:
        x: ``[B, d]`` (already centred by the pre-bias).
        experts: ``[B, e]`` selected expert ids per token.
        expert_weights: the stacked encoders ``[N, m, d]`` (preferred: used in place, so no
            per-step copy of the weights and one gradient buffer), or a callable mapping a 1-D
            tensor of expert ids to their encoders ``[A, m, d]`` (called only with experts that
            at least one token selected; ``"all"`` calls it with every id).
        expert_bias: ``[N, m]`` or None.
        omega, low_freq: optional Feature Scaling ``[N]`` and ``[N, d]``: the effective encoder
            is Ŵ_i = W_i + ω_i (W_i − 1 L_iᵀ). The fast modes apply it to the output,
            Ŵ_i x = (1 + ω_i) W_i x − ω_i (L_i · x), so Ŵ (all M·d weights, several passes per
            step forward and backward) is never materialised; ``"all"`` builds Ŵ as the authors do.
    Returns:
        ``[B, e, m]``: ``Ŵ_i x + b_i`` for each selected expert i, in the dtype of the expert
        matmul (bf16 under autocast).
    """
    if mode not in DISPATCH_MODES:
        raise ValueError(f"invalid SAE config field 'dispatch': must be one of {DISPATCH_MODES}, got {mode!r}")
    if (omega is None) != (low_freq is None):
        raise ValueError("dispatch_experts: Feature Scaling needs both omega and low_freq (or neither)")
    B, e = experts.shape
    device = x.device
    stacked = expert_weights if isinstance(expert_weights, Tensor) else None

    def weights_of(ids: Tensor | None) -> Tensor:
        if stacked is not None:
            return stacked if ids is None else stacked.index_select(0, ids)
        return expert_weights(torch.arange(num_experts, device=device) if ids is None else ids)  # type: ignore[operator]

    if mode == "all":  # the authors' design: every expert for every token, then keep the selected
        W = weights_of(None)  # [N, m, d]
        if omega is not None:
            W = W + omega[:, None, None] * (W - low_freq[:, None, :])  # type: ignore[index]
        pre = torch.einsum("bd,nmd->bnm", x, W)
        if expert_bias is not None:
            pre = pre + expert_bias
        return pre.gather(1, experts[:, :, None].expand(B, e, pre.shape[-1]))

    flat = experts.reshape(-1)  # pair p = (token p // e, rank p % e)
    num_pairs = flat.numel()
    counts_host = torch.bincount(flat, minlength=num_experts).tolist()  # the one host sync
    active = [i for i, c in enumerate(counts_host) if c > 0]
    all_active = len(active) == num_experts
    active_ids = None if all_active else torch.tensor(active, device=device)
    capacity = max(counts_host)
    if mode == "auto":
        mode = "grouped" if len(active) * capacity <= 2 * num_pairs else "loop"
    fuse_bias = expert_bias is not None and omega is None
    order = torch.argsort(flat, stable=True)  # pairs sorted by expert: contiguous per-expert runs

    if mode == "grouped":
        # One batched matmul: expert a's tokens fill rows a·C … a·C + count_a − 1 of a zero-padded
        # [A·C, d] buffer (C = the largest expert's token count).
        W = weights_of(active_ids)
        A, m, d = W.shape
        counts = torch.tensor(counts_host, device=device)
        sorted_experts = flat[order]
        position = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts).index_select(0, sorted_experts)
        if all_active:
            slot = sorted_experts
        else:
            slot_of_expert = torch.full((num_experts,), -1, dtype=torch.long, device=device)
            slot_of_expert[active_ids] = torch.arange(A, device=device)
            slot = slot_of_expert.index_select(0, sorted_experts)
        row = slot * capacity + position  # padded row of each pair, in sorted order
        dest = torch.empty_like(order)
        dest.index_copy_(0, order, row)  # the same, in (token, rank) order
        # Under autocast the buffer is built in the matmul dtype (half the memory of fp32).
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.dtype
        # One gather builds the buffer: padded row r is token source[r] of x, or the zero row B
        # (no zero-filled [A·C, d] buffer, no [B·e, d] copy of x to scatter from).
        source = torch.full((A * capacity,), B, dtype=torch.long, device=device)
        source.index_copy_(0, row, torch.div(order, e, rounding_mode="floor"))
        x_rows = torch.cat([x.to(dtype), x.new_zeros(1, d, dtype=dtype)])  # backward: a sum per token
        padded = x_rows.index_select(0, source).view(A, capacity, d)
        if fuse_bias:
            bias = expert_bias if all_active else expert_bias.index_select(0, active_ids)  # type: ignore[union-attr]
            out = torch.baddbmm(bias[:, None, :], padded, W.transpose(1, 2))
        else:
            out = torch.bmm(padded, W.transpose(1, 2))  # [A, C, m]
        pre = out.view(A * capacity, m).index_select(0, dest).view(B, e, m)
    elif mode == "loop":
        # One matmul per selected expert on its contiguous slice (no padding). The stacked weights
        # are unbound once, so the backward fills one gradient buffer instead of one per expert.
        weights = weights_of(active_ids).unbind(0)
        biases = expert_bias.unbind(0) if fuse_bias else None  # type: ignore[union-attr]
        x_sorted = x.index_select(0, order // e)
        chunks = x_sorted.split([counts_host[i] for i in active])
        outs = [
            torch.addmm(biases[i], chunk, w.T) if biases is not None else chunk @ w.T
            for i, chunk, w in zip(active, chunks, weights)
        ]
        pre_sorted = torch.cat(outs, 0)
        m = pre_sorted.shape[1]
        inverse = torch.empty_like(order)
        inverse.index_copy_(0, order, torch.arange(num_pairs, device=device))
        pre = pre_sorted.index_select(0, inverse).view(B, e, m)
    else:
        raise ValueError(f"invalid SAE config field 'dispatch': unknown mode {mode!r}")

    if omega is not None:
        omega_sel, low_dot_x = feature_scaling_terms(x, experts, omega, low_freq)  # type: ignore[arg-type]
        pre = scale_outputs(pre, omega_sel[:, :, None], low_dot_x[:, :, None])
    if expert_bias is not None and not fuse_bias:
        pre = pre + take(expert_bias, experts).to(pre.dtype)
    return pre


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

    def encode_selected(
        self,
        x_c: Tensor,
        experts: Tensor,
        gates: Tensor,
        select: Callable[[Tensor], tuple[Tensor, Tensor | None]],
        *,
        bias: Tensor | None = None,
        omega: Tensor | None = None,
        low_freq: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The kept code ``(values, global feature ids)``, each ``[B, k]``, of the selected experts.

        Candidates ``gates_s · ReLU(Ŵ_i x_c + b_i)`` of each token's experts ``[B, e, m]`` are
        computed *without autograd* by the fast dispatch; ``select`` (flattened ``[B, e·m]`` →
        candidate positions and an optional keep mask) picks the code; only the kept entries are
        then recomputed with autograd (:func:`kept_dot` for ``W_i x``, then Feature Scaling, bias
        and gate on ``[B, k]``), so the backward costs k·d per token instead of e·m·d.
        ``dispatch="all"`` is the authors' dense design end to end and the reference this path is
        tested against.
        """
        cfg: MoEConfig = self.cfg  # type: ignore[assignment]
        N, m, d = cfg.num_experts, cfg.expert_size, cfg.d_in
        if cfg.dispatch == "all":
            pre = dispatch_experts(x_c, experts, self.W_enc, bias, N, "all", omega=omega, low_freq=low_freq)
            candidates = (torch.relu(pre) * gates[:, :, None].to(pre.dtype)).flatten(1)
            candidate_idx, keep = select(candidates)
            values = candidates.gather(1, candidate_idx)
            return (values if keep is None else values * keep), self._global_ids(candidate_idx, experts)

        if omega is not None:  # [B, e], with autograd: the kept entries' scaling is gathered from these
            omega_sel, low_dot_x = feature_scaling_terms(x_c, experts, omega, low_freq)  # type: ignore[arg-type]
        with torch.no_grad():
            raw = dispatch_experts(x_c, experts, self.W_enc, None, N, cfg.dispatch)  # [B, e, m]
            pre = raw
            if omega is not None:
                pre = scale_outputs(raw, omega_sel[:, :, None], low_dot_x[:, :, None])
            if bias is not None:
                pre = pre + take(bias, experts).to(pre.dtype)
            candidate_idx, keep = select((torch.relu(pre) * gates[:, :, None].to(pre.dtype)).flatten(1))
            raw_kept = raw.flatten(1).gather(1, candidate_idx)
        ids = self._global_ids(candidate_idx, experts)
        slot = candidate_idx // m
        pre_kept = kept_dot(x_c, self.W_enc.view(N * m, d), ids, raw_kept)
        if omega is not None:
            pre_kept = scale_outputs(pre_kept, omega_sel.gather(1, slot), low_dot_x.gather(1, slot))
        if bias is not None:
            pre_kept = pre_kept + take(bias.view(N * m), ids)
        values = torch.relu(pre_kept) * gates.gather(1, slot).to(pre_kept.dtype)
        return (values if keep is None else values * keep), ids

    def encoder_statistics(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Statistics of each expert's (effective) encoder for the ``moex`` router."""
        return encoder_statistics(self.W_enc, getattr(self, "b_enc", None))

    @torch.no_grad()
    def moex_router_logits(self, x: Tensor) -> Tensor:
        """``[B, N]`` MoE-X-style logits (no gradient: routing is a fixed function of the encoders)."""
        cfg: MoEConfig = self.cfg  # type: ignore[assignment]
        return sparsity_router_logits(x - self.b_dec, *self.encoder_statistics(), cfg.expert_size)

    def mask_shared_expert(self, logits: Tensor) -> Tensor:
        """With a shared expert the router chooses among the others: its logit becomes −inf."""
        if not self.cfg.shared_expert:  # type: ignore[attr-defined]
            return logits
        logits = logits.clone()
        logits[:, SHARED_EXPERT] = -torch.inf
        return logits

    def routed_balance_loss(self, probs: Tensor, top_expert: Tensor) -> Tensor:
        """N · Σ f_i P_i over the routed experts only (the shared expert is not balanced)."""
        if self.cfg.shared_expert:  # type: ignore[attr-defined]
            return load_balance_loss(probs[:, SHARED_EXPERT + 1 :], top_expert - 1)
        return load_balance_loss(probs, top_expert)

    # ---- architecture facts ---------------------------------------------------------------
    is_moe = True

    @classmethod
    def experts_per_token(cls, cfg: MoEConfig) -> int:
        """Routed experts each token uses (e; 1 for Switch), not counting a shared expert."""
        raise NotImplementedError  # pragma: no cover - abstract

    def active_experts_per_token(self) -> int:
        return self.experts_per_token(self.cfg)  # type: ignore[arg-type]

    @classmethod
    def max_k(cls, cfg: MoEConfig) -> int:  # type: ignore[override]
        return cls.active_width(cfg)

    @classmethod
    def active_width(cls, cfg: MoEConfig) -> int:  # type: ignore[override]
        """(e + shared expert) · m encoder rows per token."""
        return (cls.experts_per_token(cfg) + int(cfg.shared_expert)) * cfg.expert_size

    @classmethod
    def forward_flops(cls, cfg: MoEConfig) -> int:  # type: ignore[override]
        """Router (N·d learned, 2·N·d moex) + active experts' encoders + k decoder rows."""
        router = cfg.num_experts * cfg.d_in * (2 if cfg.router == "moex" else 1)
        return router + cls.active_width(cfg) * cfg.d_in + cfg.k * cfg.d_in

    @classmethod
    def routing_suffix(cls, cfg: MoEConfig) -> str:
        return ("" if cfg.router == "learned" else f", {cfg.router}") + (", shared" if cfg.shared_expert else "")
