"""Any moesae SAE as plain safetensors + a self-describing ``cfg.json`` (docs/interop.md).

For the mixture-of-experts SAEs (Switch, Scale), which no SAELens class expresses, and for any
other architecture when a tool wants moesae's own tensors. Readable with ``safetensors`` alone:

- ``sae_weights.safetensors``: the inference tensors under their checkpoint names and shapes
  (docs/checkpoints.md), training-only state left out (dead-latent counters, the sparsity
  coefficient's calibration, Feature Choice's firing densities), plus, derived:
  ``expert_of_feature [M]`` (int64, MoE) and, for a Scale SAE with Feature Scaling,
  ``W_enc_effective [N, m, d]`` = Ŵ_i = W_i + ω_i (W_i − 1 L_iᵀ), the encoders the forward
  effectively applies (Feature Scaling folded in);
- ``cfg.json``: ``format: "moesae-safetensors"``, the moesae config, the expert layout (expert i
  owns features i·m … (i+1)·m − 1), the forward pass in words, every tensor's shape and meaning,
  and the hook metadata (as in an SAELens export).

``moesae.load_sae`` reads such a folder back (the derived tensors are checked, not loaded).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
PLAIN_FORMAT = "moesae-safetensors"
FORMAT_VERSION = 1

TRAINING_ONLY = {"tokens_since_fired", "input_scale", "log_sparsity_coefficient", "calibration_step", "firing_density"}
"""State the inference map never reads (left out of the export)."""
DERIVED = {"expert_of_feature", "W_enc_effective"}

MEANING = {
    "W_dec": "[M, d] decoder rows (one per feature); x̂ = z W_dec + b_dec",
    "b_dec": "[d] pre-bias: subtracted before encoding, added after decoding",
    "W_enc": "encoder rows: [M, d] for dense SAEs, [N, m, d] expert-stacked for MoE SAEs (expert i = features i·m … (i+1)·m − 1)",
    "b_enc": "encoder bias: [M] dense, [N, m] per expert (Scale)",
    "W_router": "[N, d] router weights",
    "b_router": "[d] router pre-bias: the router reads x − b_router",
    "c_router": "[N] router bias c_g (Scale)",
    "omega": "[N] Feature Scaling ω per expert (the high-frequency multiplier is 1 + ω)",
    "T": "[d, d] shared low-frequency transform (Scale, feature_scaling mean): L_i = T μ_i, μ_i the mean of W_i's rows",
    "low_freq": "[N, d] learned low-frequency vector L_i per expert (Scale, feature_scaling learned)",
    "threshold": "[] global inference threshold θ (BatchTopK; Scale with batch_topk): keep ReLU(h) > max(θ, 0)",
    "thresholds": "[M] per-feature inference thresholds θ_j (Feature Choice): keep ReLU(h_j) > θ_j",
    "log_threshold": "[M] log of the JumpReLU threshold θ_j",
    "r_mag": "[M] Gated magnitude path log-rescale: π_mag = exp(r_mag) ⊙ W_enc (x − b_dec) + b_mag",
    "b_gate": "[M] Gated gate bias: open where W_enc (x − b_dec) + b_gate > 0",
    "b_mag": "[M] Gated magnitude bias",
    "expert_of_feature": "[M] int64, derived: the expert owning each feature (feature // m)",
    "W_enc_effective": "[N, m, d] derived: Ŵ_i = W_i + ω_i (W_i − 1 L_iᵀ), the encoders with Feature Scaling folded in",
}

FORWARD = {
    "topk": "z = TopK_k(ReLU(W_enc (x − b_dec) + b_enc)); x̂ = z W_dec + b_dec",
    "batchtopk": "z = h · 1[h > max(θ, 0)], h = ReLU(W_enc (x − b_dec) + b_enc) (eval mode); x̂ = z W_dec + b_dec",
    "feature_choice": "z_j = h_j · 1[h_j > θ_j], h = ReLU(W_enc (x − b_dec) + b_enc) (eval mode); x̂ = z W_dec + b_dec",
    "relu": "z = ReLU(W_enc (x − b_dec) + b_enc); x̂ = z W_dec + b_dec",
    "jumprelu": "π = W_enc (x − b_dec) + b_enc; z = π · 1[π > exp(log_threshold)]; x̂ = z W_dec + b_dec",
    "gated": "p = W_enc (x − b_dec); z = 1[p + b_gate > 0] · ReLU(exp(r_mag) ⊙ p + b_mag); x̂ = z W_dec + b_dec",
    "switch": (
        "p = softmax(W_router (x − b_router)); i = argmax p; a = TopK_k(ReLU(W_enc[i] (x − b_dec))); "
        "z[i·m:(i+1)·m] = g · a with g = p_i (router 'learned') or 1 (router 'moex'), 0 elsewhere; x̂ = z W_dec + b_dec. "
        "router 'moex': logits from the encoders' statistics instead of W_router; shared_expert: expert 0 always "
        "joins (weight 1) and TopK_k runs over both experts' candidates"
    ),
    "scale": (
        "p = softmax(W_router (x − b_router) + c_router); S = the active_experts largest p; w = softmax over S of p "
        "(gate prob_softmax) or of the logits (logit_softmax); candidates w_i · ReLU(Ŵ_i (x − b_dec) + b_enc[i]) for "
        "i in S (Ŵ = W_enc_effective, or W_enc without Feature Scaling); z = TopK_k over the candidates (batch_topk: "
        "those above max(θ, 0)), placed at features i·m + j; x̂ = z W_dec + b_dec"
    ),
}


def is_plain_config(cfg: dict[str, Any]) -> bool:
    return isinstance(cfg, dict) and cfg.get("format") == PLAIN_FORMAT


def to_plain(sae, metadata: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg.json dict, tensors) of the plain export of ``sae``."""
    cls = type(sae)
    arch = cls.architecture
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items() if name not in TRAINING_ONLY}
    config = sae.config_dict()
    cfg: dict[str, Any] = {
        "format": PLAIN_FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.num_latents),
        "k": int(sae.cfg.k),
        "dtype": "float32",
        "config": config,
        "forward": FORWARD.get(arch, ""),
    }
    if cls.is_moe:
        N, m = int(sae.cfg.num_experts), int(sae.cfg.expert_size)
        tensors["expert_of_feature"] = sae.expert_of_feature().detach().cpu().long()
        cfg["experts"] = {
            "num_experts": N, "expert_size": m, "experts_per_token": int(cls.experts_per_token(sae.cfg)),
            "shared_expert": bool(sae.cfg.shared_expert), "router": sae.cfg.router,
            "gate": getattr(sae.cfg, "gate", "router probability"),
            "feature_scaling": getattr(sae.cfg, "feature_scaling", "none"),
            "layout": f"expert i owns features i·{m} … (i+1)·{m} − 1 (rows of W_dec, columns of the code); "
                      "W_enc[i] and b_enc[i] are its encoder",
        }
        if arch == "scale" and sae.cfg.feature_scaling != "none":
            with torch.no_grad():
                tensors["W_enc_effective"] = sae.effective_encoders(
                    torch.arange(N, device=sae.W_enc.device)).detach().cpu().contiguous()
    cfg["tensors"] = {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "meaning": MEANING.get(name, "")}
        for name, t in sorted(tensors.items())
    }
    cfg["left_out"] = sorted(name for name in sae.state_dict() if name in TRAINING_ONLY)
    cfg["metadata"] = dict(metadata or {})
    return cfg, tensors


def write_plain(sae, out_dir: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    from ..io import atomic_path, atomic_write_json

    cfg, tensors = to_plain(sae, metadata)
    out = Path(out_dir)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(out / CONFIG_FILE, cfg, indent=2)
    return out


def load_plain(path: str | Path, cfg: dict[str, Any] | None = None):
    """The SAE of a plain export (eval mode); training-only state starts at its initial value."""
    from safetensors.torch import load_file

    from ..saes.registry import build_sae

    path = Path(path)
    if cfg is None:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    if int(cfg.get("format_version", 0)) != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE}: plain export format_version {cfg.get('format_version')!r}, "
                         f"this moesae reads {FORMAT_VERSION}")
    config = dict(cfg["config"])
    sae = build_sae(config.pop("architecture"), **config)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:
        raise ValueError(f"corrupt weights {path / WEIGHTS_FILE}: {exc}") from exc
    derived = {name: tensors.pop(name) for name in list(tensors) if name in DERIVED}
    result = sae.load_state_dict(tensors, strict=False)
    missing = [n for n in result.missing_keys if n not in TRAINING_ONLY]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path / WEIGHTS_FILE} does not fit architecture '{sae.architecture}': "
                         f"missing {missing}, unexpected {list(result.unexpected_keys)}")
    sae.eval()
    if "W_enc_effective" in derived:
        with torch.no_grad():
            rebuilt = sae.effective_encoders(torch.arange(sae.cfg.num_experts))
        if not torch.allclose(rebuilt, derived["W_enc_effective"], rtol=1e-5, atol=1e-6):
            raise ValueError(f"{path / WEIGHTS_FILE}: W_enc_effective does not match W_enc, omega and the "
                             "low-frequency tensors; the file was edited inconsistently")
    sae.imported_from = {"format": PLAIN_FORMAT, "metadata": cfg.get("metadata", {})}
    return sae
