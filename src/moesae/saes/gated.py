"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

Parameters (checkpoint names and shapes):
  W_enc [M, d]  shared encoder directions;  r_mag [M] per-feature log-rescale of the magnitude path;
  b_gate [M], b_mag [M];  W_dec [M, d], b_dec [d];
  buffers input_scale, log_sparsity_coefficient, calibration_step, tokens_since_fired (relu.py).

π_gate = W_enc (x − b_dec) + b_gate;   π_mag = exp(r_mag) ⊙ W_enc (x − b_dec) + b_mag;
z = 1[π_gate > 0] ⊙ ReLU(π_mag);   x̂ = W_decᵀ z + b_dec.
loss = ‖x − x̂‖² + λ · s · Σ_j ReLU(π_gate,j) ‖W_dec,j‖ + ‖x − (W_decᵀ ReLU(π_gate) + b_dec)_frozen‖²
(batch means). The last, auxiliary term decodes the gate path with a stop-gradient copy of the
decoder, so the gate learns to reconstruct without the L1 shrinking the magnitudes. λ is
calibrated towards L0 = k unless set (relu.py); L0 is the number of open gates.
Gate biases start so that about k gates per token open on the first batch; b_mag, r_mag start at 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import SAEOutput, fired_latents, kept_dot, reconstruction_mse, scatter_code, sparse_decode, take
from .registry import register
from .relu import CoefficientSparsityConfig, CoefficientSparsitySAE, float_mask, weighted_code_sum


@dataclass
class GatedConfig(CoefficientSparsityConfig):
    pass


@register("gated")
class GatedSAE(CoefficientSparsitySAE):
    config_class = GatedConfig
    display_name = "Gated"

    def __init__(self, cfg: GatedConfig) -> None:
        super().__init__(cfg)
        M = cfg.num_latents
        self.r_mag = nn.Parameter(torch.zeros(M))
        self.b_gate = nn.Parameter(torch.zeros(M))
        self.b_mag = nn.Parameter(torch.zeros(M))

    def init_biases(self, quantile: Tensor) -> None:
        self.b_gate.fill_(-float(quantile))

    def forward(self, x: Tensor) -> SAEOutput:
        if self.sparse_step(x):
            return self.sparse_forward(x)
        # Few [B, M] passes (training speed at the default size): biases inside the matmuls,
        # the gate as a float mask written by the comparison itself, the penalty from column sums.
        projection = self.encoder_projection(x)
        pi_gate = projection + self.b_gate
        pi_mag = torch.addcmul(self.b_mag, self.r_mag.exp(), projection)
        gate_open = float_mask(torch.gt, pi_gate, 0.0)  # 1.0 where the gate is open
        z = torch.relu(pi_mag) * gate_open
        x_hat = torch.addmm(self.b_dec, z, self.W_dec)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        gate_acts = torch.relu(pi_gate)
        losses["l1"] = self.sparsity_coefficient() * self.input_scale * weighted_code_sum(gate_acts, self.decoder_norms())
        if self.training:
            x_gate = torch.addmm(self.b_dec.detach(), gate_acts, self.W_dec.detach())
            losses["aux_gate"] = reconstruction_mse(x, x_gate)
        if self.training and self.calibrating():
            self.calibrate(gate_open.sum() / x.shape[0])
        # z ≥ 0: a latent fired on the batch iff its column maximum is > 0 (one pass, no abs)
        return SAEOutput(x_hat=x_hat, losses=losses, latents=z, extras={"fired": z.detach().amax(0) > 0})

    def sparse_forward(self, x: Tensor) -> SAEOutput:
        """The training step on the open gates only (:meth:`sparse_step`): z, the gate
        activations of the penalty and of the auxiliary reconstruction are all zero elsewhere."""
        B, M = x.shape[0], self.cfg.num_latents
        x_c = x - self.b_dec
        raw, positions, columns, offsets = self.support(x_c, self.b_gate)
        projection = kept_dot(x_c, self.W_enc, columns, raw, offsets)
        gate_acts = torch.relu(projection + take(self.b_gate, columns))
        z = torch.relu(torch.addcmul(take(self.b_mag, columns), take(self.r_mag.exp(), columns), projection))
        x_hat = sparse_decode(z, columns, self.W_dec, self.b_dec, offsets)
        losses = {"mse": reconstruction_mse(x, x_hat)}
        penalty = (gate_acts * take(self.decoder_norms(), columns)).sum() / B
        losses["l1"] = self.sparsity_coefficient() * self.input_scale * penalty
        x_gate = sparse_decode(gate_acts, columns, self.W_dec.detach(), self.b_dec.detach(), offsets)
        losses["aux_gate"] = reconstruction_mse(x, x_gate)
        if self.calibrating():
            self.calibrate(torch.tensor(positions.numel() / B))
        return SAEOutput(x_hat=x_hat, losses=losses, latents=scatter_code(positions, z, (B, M)),
                         extras={"fired": fired_latents(columns[z.detach() > 0], M)})
