"""The interface every SAE implements, and what all of them share (docs/method.md#architectures).

Every architecture is one file in this package: a config dataclass (validated in
``__post_init__``, errors name the field) and an ``SAE`` subclass registered with
:func:`moesae.saes.registry.register`. The shared contract:

- ``encode(x) -> z``: dense ``[batch, M]`` codes, zeros off the support, with any gate weight
  folded in, so that ``decode(z) == z @ W_dec + b_dec`` exactly reconstructs ``forward(x).x_hat``.
- ``decode(z)``: ``z @ W_dec + b_dec``.
- ``forward(x) -> SAEOutput``: the reconstruction, the code in sparse form when the architecture
  has one (values and feature indices, ``[batch, k]``), and the weighted loss terms.
- ``flops_per_token()``: forward multiply-accumulates per token (docs/method.md#cost).
- ``save(path)`` / :func:`moesae.saes.registry.load_sae`: ``cfg.json`` + ``sae_weights.safetensors``.

Parameters shared by all: ``W_dec [M, d]`` (one unit-norm row per feature) and ``b_dec [d]``
(the pre-bias, subtracted before encoding and added after decoding).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid SAE config field '{field_name}': {message}")


@dataclass
class SAEConfig:
    """Fields every architecture has."""

    d_in: int
    """Width d of the activations the SAE reads (768 for GPT-2 small)."""
    num_latents: int
    """Dictionary size M (total number of features)."""
    k: int = 32
    """Number of latents kept per token (the target L0) for TopK-style codes."""
    dead_tokens_threshold: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead."""
    seed: int = 0
    """Seed for the parameter initialisation."""

    def __post_init__(self) -> None:
        _check(isinstance(self.d_in, int) and self.d_in > 0, "d_in", f"must be a positive integer, got {self.d_in!r}")
        _check(
            isinstance(self.num_latents, int) and self.num_latents > 0,
            "num_latents",
            f"must be a positive integer, got {self.num_latents!r}",
        )
        _check(isinstance(self.k, int) and self.k > 0, "k", f"must be a positive integer, got {self.k!r}")
        _check(
            self.k <= self.num_latents,
            "k",
            f"k={self.k} exceeds num_latents={self.num_latents}; choose k <= num_latents",
        )
        _check(self.dead_tokens_threshold > 0, "dead_tokens_threshold", "must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SAEOutput:
    """What ``forward`` returns."""

    x_hat: Tensor
    """Reconstruction, ``[batch, d]``."""
    losses: dict[str, Tensor]
    """Weighted loss terms; the training loss is their sum. Always has ``mse``."""
    top_values: Tensor | None = None
    """Sparse code: kept values ``[batch, k]`` (gates folded in), or None for dense-code SAEs."""
    top_indices: Tensor | None = None
    """Sparse code: feature ids ``[batch, k]`` matching ``top_values``."""
    latents: Tensor | None = None
    """Dense code ``[batch, M]`` for architectures without a fixed-k sparse form."""
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Architecture-specific tensors for metrics (router probabilities, selected experts...);
    ``fired`` (bool ``[M]``, optional): the latents non-zero for some token of the batch."""

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]

    def dense_code(self, num_latents: int) -> Tensor:
        if self.latents is not None:
            return self.latents
        assert self.top_values is not None and self.top_indices is not None
        z = self.top_values.new_zeros(self.top_values.shape[0], num_latents)
        return z.scatter(1, self.top_indices, self.top_values)

    def l0(self) -> Tensor:
        """Mean number of non-zero latents per token (from the sparse code when there is one)."""
        if self.top_values is not None:
            return (self.top_values != 0).sum(1).float().mean()
        assert self.latents is not None
        return (self.latents != 0).sum(1).float().mean()

    def active_mask(self, num_latents: int) -> Tensor:
        """Boolean ``[batch, M]``: which latents are non-zero for each token."""
        return self.dense_code(num_latents) != 0


def reconstruction_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Σ over dims of the squared error, averaged over the batch (the paper's MSE)."""
    return (x - x_hat).pow(2).sum(-1).mean()


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """``Σ_j values[:, j] · W_dec[indices[:, j]] + b_dec`` without materialising ``[batch, M]``.

    ``embedding_bag`` gathers only the k decoder rows per token and its backward touches only
    those rows, so decoding costs k·d per token instead of M·d. With ``offsets`` ``[B]`` the code
    is flat instead (``values``, ``indices`` 1-D, token t's entries from ``offsets[t]`` on): a
    variable count per token without padding.
    """
    out = F.embedding_bag(indices, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return out + b_dec


@torch.no_grad()
def flat_support(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The True entries of a ``[B, M]`` mask as a flat code: their row-major flat positions,
    their columns, and each row's first entry (``offsets [B]``), the form :func:`kept_dot` and
    :func:`sparse_decode` take for a variable count per token."""
    B, M = mask.shape
    positions = mask.reshape(-1).nonzero().squeeze(1)
    rows = torch.div(positions, M, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=B)
    return positions, positions - rows * M, torch.cumsum(counts, 0) - counts


def fired_latents(columns: Tensor, num_latents: int) -> Tensor:
    """Bool ``[M]``: the latents among ``columns`` (the ``fired`` extra of :class:`SAEOutput`)."""
    return torch.zeros(num_latents, dtype=torch.bool, device=columns.device).index_fill_(0, columns, True)


def scatter_code(positions: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A flat code as the dense ``[B, M]`` matrix (no gradient: for logs and metrics)."""
    z = values.new_zeros(shape[0] * shape[1])
    return z.index_put_((positions,), values.detach()).view(shape)


def take(t: Tensor, index: Tensor) -> Tensor:
    """``t[index]`` (rows of ``t`` along dim 0, shape ``index.shape + t.shape[1:]``), reproducibly.

    The backward of advanced indexing (``index_put_`` with accumulation) is not deterministic on a
    multi-threaded CPU: summing gradients into a repeated row happens in a thread-dependent order,
    so two identical trainings drift apart in the last bits. ``index_select``'s backward is.
    """
    return t.index_select(0, index.reshape(-1)).view(*index.shape, *t.shape[1:])


class _KeptDot(torch.autograd.Function):
    """``out[t, j] = W[indices[t, j]] · x[t]`` with a backward that touches only the kept rows."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, indices: Tensor, values: Tensor | None,  # type: ignore[override]
                offsets: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(x, W, indices, offsets)
        if values is not None:  # already computed by the forward's no-grad encoder pass
            return values.detach().clone()
        if offsets is not None:
            rows = torch.repeat_interleave(torch.diff(offsets, append=offsets.new_tensor([indices.numel()])))
            return (W.index_select(0, indices) * x.to(W.dtype).index_select(0, rows)).sum(-1)
        return torch.einsum("bkd,bd->bk", W[indices], x.to(W.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, W, indices, offsets = ctx.saved_tensors
        need_x, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.to(W.dtype).contiguous()
        grad_x = grad_W = None
        # grad_x[t] = Σ_j grad[t, j] · W[indices[t, j]] is exactly embedding_bag's forward, and
        # grad_W[r] = Σ_{(t, j): indices[t, j] = r} grad[t, j] · x[t] is embedding_bag's weight
        # gradient for the upstream gradient x: k·d work per token instead of M·d (or e·m·d).
        with torch.enable_grad():
            weight = W.detach().requires_grad_(need_W)
            gx = F.embedding_bag(indices, weight, offsets, per_sample_weights=grad, mode="sum")
        if need_W:
            (grad_W,) = torch.autograd.grad(gx, weight, x.to(gx.dtype))
        if need_x:
            grad_x = gx.detach().to(x.dtype)
        return grad_x, grad_W, None, None, None


def kept_dot(x: Tensor, W: Tensor, indices: Tensor, values: Tensor | None = None, offsets: Tensor | None = None) -> Tensor:
    """``[B, k]`` encoder dot products ``W[indices[t, j]] · x[t]`` of the kept latents only.

    The sparse backward of TopK-style encoders (issue #7): the forward selects latents from
    pre-activations computed without autograd, then calls this for the k kept ones, so the
    backward costs k·d per token (``embedding_bag``-style gathers and scatters) instead of the
    dense matmul's M·d. Pass ``values`` (the same dot products from the no-grad pass) to skip
    recomputing them. Gradients flow to ``x`` ``[B, d]`` and ``W`` ``[M, d]`` (a view of a
    parameter is fine); ``indices`` ``[B, k]`` index rows of ``W``. With ``offsets`` ``[B]`` the
    kept latents are flat instead (``indices`` 1-D, token t's from ``offsets[t]`` on; a variable
    count per token without padding) and so is the result.
    """
    return _KeptDot.apply(x, W, indices, values, offsets)


def geometric_median(points: Tensor, iterations: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld iterations for the point minimising the summed Euclidean distance."""
    points = points.detach().float()
    median = points.mean(0)
    for _ in range(iterations):
        dist = torch.linalg.vector_norm(points - median, dim=1).clamp_min(eps)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if torch.linalg.vector_norm(new - median) < eps * (1 + torch.linalg.vector_norm(median)):
            median = new
            break
        median = new
    return median


class SAE(nn.Module):
    """Base class: pre-bias, unit-norm decoder rows, tied init, dead-latent tracking, save."""

    architecture: ClassVar[str] = "base"
    config_class: ClassVar[type[SAEConfig]] = SAEConfig

    # ---- architecture facts (read by the grid, evaluation, figures, auto-interp, synthetic) ----
    # Everything the rest of the package needs to know about an architecture lives here, so a new
    # architecture is one file: see :func:`moesae.saes.registry.describe`.
    display_name: ClassVar[str] = "SAE"
    """How legends and tables name the architecture."""
    l0_is_set: ClassVar[bool] = True
    """True: ``k`` fixes L0 (TopK family). False: L0 is measured (a sparsity coefficient sets it)."""
    is_moe: ClassVar[bool] = False
    """Mixture of experts: features are split into experts chosen per token by a router."""

    @classmethod
    def max_k(cls, cfg: SAEConfig) -> int:
        """The largest k this configuration can keep per token (the candidates its TopK sees)."""
        return cfg.num_latents

    @classmethod
    def active_width(cls, cfg: SAEConfig) -> int:
        """Encoder rows computed per token (M for a dense SAE, e·M/N for a MoE SAE)."""
        return cfg.num_latents

    @classmethod
    def forward_flops(cls, cfg: SAEConfig) -> int:
        """Forward multiply-accumulates per token: active encoder rows + router + k decoder rows."""
        return cls.active_width(cfg) * cfg.d_in + cfg.k * cfg.d_in

    @classmethod
    def config_label(cls, cfg: SAEConfig) -> str:
        """A short name of this configuration for legends, e.g. ``Scale (16,2)``."""
        return cls.display_name

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, M = cfg.d_in, cfg.num_latents
        generator = torch.Generator().manual_seed(cfg.seed)
        # Tied init: random unit-norm decoder rows, encoder = decoder (subclasses reshape W_enc).
        W = torch.randn(M, d, generator=generator)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W.clone())
        self.b_dec = nn.Parameter(torch.zeros(d))
        self._initial_encoder = W.clone()
        self.register_buffer("tokens_since_fired", torch.zeros(M, dtype=torch.long))

    # ---- the interface -------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        return self.forward(x).dense_code(self.cfg.num_latents)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> SAEOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def flops_per_token(self) -> int:
        """Forward multiply-accumulates per token (docs/method.md#metrics)."""
        return self.forward_flops(self.cfg)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def sparse_step(self, x: Tensor) -> bool:
        """Whether this forward is a CPU training step, where SAEs with a dense code (ReLU,
        Gated, JumpReLU, Feature Choice) train on the code's support only: the support is found
        from pre-activations computed without autograd, and only its entries are recomputed with
        autograd (:func:`kept_dot`) and decoded (:func:`sparse_decode`). Every loss term and
        pseudo-gradient is zero off the support, so the gradients are the dense formulation's
        (tested against it) for one dense matmul per step instead of six. Evaluation, and GPUs
        (where dense matmuls are cheap), use the dense formulation."""
        return self.training and torch.is_grad_enabled() and x.device.type == "cpu"

    # ---- what the trainer calls ----------------------------------------------------------
    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        """Data-dependent initialisation from the first batch: b_dec = geometric median."""
        self.b_dec.copy_(geometric_median(x).to(self.b_dec.dtype))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Renormalise every decoder row (one per feature) to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each decoder row (keeps norms at 1)."""
        if self.W_dec.grad is None:
            return
        # In place, no [M, d] temporaries: one batched dot per row, then grad −= parallel · W.
        parallel = torch.einsum("md,md->m", self.W_dec.grad, self.W_dec)
        self.W_dec.grad.addcmul_(self.W_dec, parallel[:, None], value=-1)

    @torch.no_grad()
    def update_dead_statistics(self, out: SAEOutput, batch_size: int) -> None:
        self.tokens_since_fired += batch_size
        if out.top_indices is not None and out.top_values is not None:
            # sparse codes: touch only the k fired ids per token, no [batch, M] mask
            self.tokens_since_fired[out.top_indices[out.top_values != 0]] = 0
        elif "fired" in out.extras:  # the forward already knew which latents fired (bool [M])
            self.tokens_since_fired.masked_fill_(out.extras["fired"], 0)
        elif out.latents is not None:
            # a latent fired iff max |z| over the batch > 0 (abs + amax: faster than != 0 then any)
            self.tokens_since_fired.masked_fill_(out.latents.detach().abs().amax(0) > 0, 0)
        else:
            self.tokens_since_fired[out.active_mask(self.cfg.num_latents).any(0)] = 0

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens_threshold

    def frozen_parameter_names(self) -> set[str]:
        """Parameters the optimiser must leave alone (e.g. ω and T with Feature Scaling off)."""
        return set()

    # ---- checkpoint format ---------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, **self.cfg.to_dict()}

    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` into the folder ``path``.

        Written to temporary names and renamed, so an interrupted save never leaves a
        half-written checkpoint behind.
        """
        from ..io import atomic_path, atomic_write_text

        path = Path(path)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        with atomic_path(path / WEIGHTS_FILE) as tmp_weights:  # world-readable (0644), never half-written
            save_file(tensors, str(tmp_weights))
        atomic_write_text(path / CONFIG_FILE, json.dumps(self.config_dict(), indent=2, sort_keys=True) + "\n")
        return path

    def load_weights(self, path: str | Path) -> None:
        state = load_file(str(Path(path) / WEIGHTS_FILE))
        self.load_state_dict(state)


def lr_for_width(num_latents: int) -> float:
    """The recipe's learning rate: 2e-4 / sqrt(M / 2^14) (docs/method.md#training-recipe)."""
    return 2e-4 / math.sqrt(num_latents / 2**14)
