"""moesae SAE ⇄ SAELens 6.x checkpoint folder (docs/interop.md).

The SAELens contract, read from its source (sae_lens 6.x: ``saes/sae.py``, ``saes/standard_sae.py``,
``saes/topk_sae.py``, ``saes/jumprelu_sae.py``, ``saes/gated_sae.py``, ``constants.py``,
``loading/pretrained_sae_loaders.py``):

- a folder with ``cfg.json`` and ``sae_weights.safetensors``; ``SAE.load_from_disk`` reads the
  config, casts every tensor to ``cfg["dtype"]``, builds the class registered for
  ``cfg["architecture"]`` (``standard`` | ``topk`` | ``jumprelu`` | ``gated``) from the fields of
  its config dataclass (unknown keys are dropped) and loads the state dict **strictly**;
- a config with ``metadata.sae_lens_version`` ≥ 6 is taken as is; an older (or absent) version is
  converted from the flat 5.x layout (``hook_point``, ``activation_fn_str``,
  ``activation_fn_kwargs.k``...);
- fields: ``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``,
  ``normalize_activations`` (none | expected_average_only_in | constant_norm_rescale | layer_norm),
  ``reshape_activations`` (none | hook_z), ``metadata`` (model_name, hook_name, hook_head_index,
  context_size, prepend_bos, exclude_special_tokens, dataset_path, model_from_pretrained_kwargs,
  ...); TopK adds ``k`` and ``rescale_acts_by_decoder_norm``;
- tensors: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``;
  JumpReLU adds ``threshold [d_sae]`` (the threshold itself); Gated has ``b_gate``, ``b_mag``,
  ``r_mag`` and no ``b_enc``;
- forward: ``x_c = x − b_dec`` (when ``apply_b_dec_to_input``), ``h = x_c W_enc + b_enc``;
  standard ``z = ReLU(h)``; topk ``z = ReLU(TopK_k(h))``; jumprelu ``z = ReLU(h) · 1[h > θ]``;
  gated ``z = 1[x_c W_enc + b_gate > 0] · ReLU(x_c (W_enc ⊙ exp(r_mag)) + b_mag)``;
  ``x̂ = z W_dec + b_dec``.

Every exported architecture is the same function as the moesae SAE at inference (eval mode):

| moesae | SAELens | why it is exact |
|---|---|---|
| topk | topk | TopK of ReLU(h) and ReLU of TopK(h) keep the same non-zero values |
| relu | standard | same formula |
| jumprelu | jumprelu | θ = exp(log_threshold) > 0, so ReLU(h) · 1[h > θ] = h · 1[h > θ] |
| batchtopk | jumprelu | inference keeps ReLU(h) > θ with one global θ ≥ 0: threshold = θ for every latent |
| feature_choice | jumprelu | inference keeps ReLU(h) > θ_j: threshold = max(θ_j, 0) |
| gated | gated | same formula |

``input_scale``, ``log_sparsity_coefficient`` and ``calibration_step`` (ReLU, Gated, JumpReLU) only
weight the training loss: the inference map does not read them, so nothing is folded. Dead-latent
counters and Feature Choice's firing densities are training state and are not exported. The
moesae configuration travels in ``metadata.moesae`` so that a round trip rebuilds the same
architecture. Switch and Scale SAEs route each token to experts: no SAELens class computes that,
so they are refused (use the plain safetensors export, :mod:`.plain`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: the config layout (≥ 6.0 is read without conversion)."""

SAELENS_ARCHITECTURE = {
    "topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "gated": "gated",
    "batchtopk": "jumprelu", "feature_choice": "jumprelu",
}
"""moesae architecture → the SAELens architecture it is exported as."""

IMPORTED_ARCHITECTURE = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
"""SAELens architecture → the moesae architecture it is imported as (without moesae metadata)."""

STATE_KEYS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"),
}
"""The exact tensor names SAELens's strict ``load_state_dict`` expects per architecture."""

DEFAULT_IMPORT_K = 32
"""``k`` given to an imported standard / JumpReLU / Gated SAE (their target L0, used only for the
FLOP count) when the folder carries none."""

_LEGACY_METADATA_KEYS = {
    "model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
    "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
    "sae_lens_version", "sae_lens_training_version",
}
_NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


# ---- export -----------------------------------------------------------------------------------
def _f32(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def to_saelens(sae, metadata: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg.json dict, tensors) of the SAELens checkpoint computing the same function as ``sae``.

    Raises ``ValueError`` naming why for an architecture SAELens cannot express.
    """
    cls = type(sae)
    arch = cls.architecture
    if cls.is_moe:
        raise ValueError(
            f"architecture '{arch}' cannot be exported to SAELens: it is a mixture of experts (a router picks "
            "each token's experts and gates their codes), which no SAELens SAE class computes; export it with "
            "`moesae export --format safetensors` (plain safetensors + cfg.json with the expert layout)"
        )
    if arch not in SAELENS_ARCHITECTURE:
        raise ValueError(
            f"architecture '{arch}' has no SAELens equivalent (exportable: {sorted(SAELENS_ARCHITECTURE)}); "
            "use `moesae export --format safetensors`"
        )
    target = SAELENS_ARCHITECTURE[arch]
    M = sae.cfg.num_latents
    tensors: dict[str, Tensor] = {
        "W_enc": _f32(sae.W_enc).T.contiguous(),  # moesae [M, d] rows → SAELens [d_in, d_sae] columns
        "W_dec": _f32(sae.W_dec),
        "b_dec": _f32(sae.b_dec),
    }
    if target == "gated":
        tensors.update(b_gate=_f32(sae.b_gate), b_mag=_f32(sae.b_mag), r_mag=_f32(sae.r_mag))
    else:
        tensors["b_enc"] = _f32(sae.b_enc)
    if arch == "jumprelu":
        tensors["threshold"] = _f32(sae.threshold())  # exp(log_threshold), the value the forward compares with
    elif arch == "batchtopk":
        # eval mode keeps ReLU(h) > max(θ, 0) (θ = −1 means never set: every positive latent)
        tensors["threshold"] = torch.full((M,), max(float(sae.threshold), 0.0), dtype=torch.float32)
    elif arch == "feature_choice":
        tensors["threshold"] = _f32(sae.thresholds).clamp_min(0.0)
    cfg: dict[str, Any] = {
        "architecture": target,
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(M),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,  # moesae's pre-bias: x − b_dec before encoding
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if target == "topk":
        cfg.update(k=int(sae.cfg.k), rescale_acts_by_decoder_norm=False)
    from .. import __version__

    meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None, **(metadata or {})}
    meta["moesae"] = {"version": __version__, "architecture": arch, "config": sae.config_dict()}
    cfg["metadata"] = meta
    return cfg, tensors


def write_saelens(sae, out_dir: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/cfg.json`` + ``out_dir/sae_weights.safetensors`` (atomically, 0644)."""
    from safetensors.torch import save_file

    from ..io import atomic_path, atomic_write_json

    cfg, tensors = to_saelens(sae, metadata)
    out = Path(out_dir)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(out / CONFIG_FILE, cfg, indent=2)
    return out


# ---- import -----------------------------------------------------------------------------------
def is_saelens_config(cfg: dict[str, Any]) -> bool:
    """True for an SAELens ``cfg.json`` (it has ``d_sae``; moesae's own has ``num_latents``)."""
    return isinstance(cfg, dict) and "d_sae" in cfg and "num_latents" not in cfg and "format" not in cfg


def _major(version: Any) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def normalize_saelens_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The 6.x layout of an SAELens config (a 5.x flat config converted as SAELens itself does)."""
    cfg = dict(cfg)
    meta = dict(cfg.get("metadata") or {})
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    major = _major(version) if version else None
    if major is not None and major >= 6:
        cfg["metadata"] = meta
        cfg.setdefault("apply_b_dec_to_input", True)
        cfg.setdefault("normalize_activations", "none")
        cfg.setdefault("reshape_activations", "none")
        return cfg
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
    flat = {renames.get(k, k): v for k, v in cfg.items()}
    flat.setdefault("architecture", "standard")
    flat.setdefault("apply_b_dec_to_input", True)
    flat.setdefault("prepend_bos", True)
    activation = flat.get("activation_fn", "relu")
    kwargs = flat.get("activation_fn_kwargs") or {}
    if activation == "topk" and kwargs.get("k") is not None:
        flat["architecture"], flat["k"] = "topk", kwargs["k"]
    elif flat["architecture"] == "standard" and activation not in ("relu", None):
        raise ValueError(
            f"SAELens config has activation_fn '{activation}': only ReLU standard SAEs have a moesae equivalent"
        )
    normalize = flat.get("normalize_activations")
    if isinstance(normalize, bool):
        normalize = "expected_average_only_in" if normalize else "none"
    flat["normalize_activations"] = normalize or "none"
    flat.setdefault("reshape_activations", "hook_z" if "hook_z" in str(flat.get("hook_name", "")) else "none")
    out = {k: v for k, v in flat.items() if k not in _LEGACY_METADATA_KEYS}
    out["metadata"] = {**{k: v for k, v in flat.items() if k in _LEGACY_METADATA_KEYS}, **meta}
    return out


def _shape_check(tensors: dict[str, Tensor], arch: str, d: int, M: int) -> None:
    want = {"W_enc": (d, M), "W_dec": (M, d), "b_dec": (d,)}
    for name in STATE_KEYS[arch]:
        expected = want.get(name, (M,))
        got = tuple(tensors[name].shape)
        if got != expected:
            raise ValueError(
                f"SAELens tensor '{name}' has shape {list(got)}, expected {list(expected)} for d_in={d}, d_sae={M}"
            )


def _positive_log(threshold: Tensor) -> tuple[Tensor, int]:
    """log θ for moesae's JumpReLU (θ > 0); θ ≤ 0 becomes the smallest normal float (count returned).

    With θ ≤ 0 SAELens keeps ReLU(h) · 1[h > θ] = ReLU(h); the replacement differs only for
    0 < h ≤ 1.2e-38.
    """
    tiny = torch.finfo(torch.float32).tiny
    bad = int((threshold <= 0).sum())
    return threshold.double().clamp_min(tiny).log().float(), bad


def from_saelens(cfg: dict[str, Any], tensors: dict[str, Tensor], k: int | None = None):
    """The moesae SAE (eval mode) computing the same function as an SAELens checkpoint.

    ``cfg`` is the parsed ``cfg.json`` (5.x or 6.x layout), ``tensors`` its state dict. ``k``:
    the target L0 given to a standard / JumpReLU / Gated import (default: the moesae config the
    folder carries, else ``min(32, d_sae)``). Refuses, naming why, what has no exact equivalent.
    """
    from ..saes.registry import build_sae

    cfg = normalize_saelens_config(cfg)
    arch = cfg.get("architecture")
    if arch not in IMPORTED_ARCHITECTURE:
        raise ValueError(
            f"SAELens architecture '{arch}' has no moesae equivalent (importable: {sorted(IMPORTED_ARCHITECTURE)})"
        )
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in _NORMALIZATIONS:
        raise ValueError(f"SAELens config has unknown normalize_activations '{normalize}'")
    if normalize == "expected_average_only_in":
        raise ValueError(
            "SAELens config has normalize_activations 'expected_average_only_in': the SAE expects inputs scaled "
            "by a dataset constant that is not in the folder; fold it in SAELens "
            "(sae.fold_activation_norm_scaling_factor(factor)) and save again"
        )
    if normalize in ("constant_norm_rescale", "layer_norm"):
        raise ValueError(
            f"SAELens config has normalize_activations '{normalize}': a per-token input normalisation that no "
            "moesae SAE computes, so it cannot be imported exactly"
        )
    d, M = int(cfg["d_in"]), int(cfg["d_sae"])
    tensors = {name: t.detach().to(torch.float32) for name, t in tensors.items()}
    scaling = None
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in tensors:
            scaling = tensors.pop(name)
    missing = [n for n in STATE_KEYS[arch] if n not in tensors]
    extra = sorted(set(tensors) - set(STATE_KEYS[arch]))
    if missing or extra:
        raise ValueError(
            f"SAELens '{arch}' weights must hold exactly {list(STATE_KEYS[arch])}: "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra}" if extra else "")
        )
    _shape_check(tensors, arch, d, M)
    W_enc = tensors["W_enc"].T.contiguous()  # [M, d] rows
    W_dec = tensors["W_dec"].clone()
    b_dec = tensors["b_dec"].clone()
    b_enc = tensors.get("b_enc")
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # h_j ‖W_dec,j‖ chooses the code and z_j / ‖W_dec,j‖ is decoded: fold the norms in
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        W_dec = W_dec * scaling.reshape(-1)[:, None]  # 5.x fine-tuning scale: decode(z ⊙ s) = z (s ⊙ W_dec)
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens encodes x, moesae x − b_dec: W (x − b_dec) + (b + W b_dec) = W x + b
        shift = W_enc @ b_dec
        if arch == "gated":
            tensors["b_gate"] = tensors["b_gate"] + shift
            tensors["b_mag"] = tensors["b_mag"] + tensors["r_mag"].exp() * shift
        else:
            b_enc = b_enc + shift

    meta = cfg.get("metadata") or {}
    source = meta.get("moesae") if isinstance(meta.get("moesae"), dict) else {}
    config = dict(source.get("config") or {})
    architecture = config.pop("architecture", None)
    threshold = tensors.get("threshold")
    usable = (
        architecture in SAELENS_ARCHITECTURE
        and SAELENS_ARCHITECTURE[architecture] == arch
        and config.get("d_in") == d and config.get("num_latents") == M
        and not (architecture == "batchtopk" and not bool((threshold == threshold[0]).all()))
    )
    sae = None
    if usable:  # a moesae export: rebuild the architecture and config it came from
        if k is not None:
            config["k"] = int(k)
        try:
            sae = build_sae(architecture, **config)
        except ValueError:  # written by a moesae whose config fields differ: the generic mapping below
            sae = None
    if sae is None:
        architecture = IMPORTED_ARCHITECTURE[arch]
        config = {"d_in": d, "num_latents": M, "k": min(DEFAULT_IMPORT_K, M)}
        if arch == "topk":
            config["k"] = int(cfg.get("k", 100))  # TopKSAEConfig's default
        if k is not None:
            config["k"] = int(k)
        sae = build_sae(architecture, **config)
    state = sae.state_dict()
    state.update(W_enc=W_enc, W_dec=W_dec, b_dec=b_dec)
    if arch == "gated":
        state.update(b_gate=tensors["b_gate"], b_mag=tensors["b_mag"], r_mag=tensors["r_mag"])
    else:
        state["b_enc"] = b_enc
    replaced = 0
    if architecture == "jumprelu":
        state["log_threshold"], replaced = _positive_log(threshold)
    elif architecture == "batchtopk":
        state["threshold"] = threshold[0].clone().reshape(())
    elif architecture == "feature_choice":
        state["thresholds"] = threshold.clone()
    sae.load_state_dict(state)
    sae.eval()
    sae.imported_from = {
        "format": "saelens", "architecture": arch, "metadata": meta,
        "nonpositive_thresholds_replaced": replaced,
    }
    return sae


def load_saelens(path: str | Path, cfg: dict[str, Any] | None = None, k: int | None = None):
    """:func:`from_saelens` on an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    if cfg is None:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no SAELens weights at {weights}")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise ValueError(f"corrupt SAELens weights {weights}: {exc}") from exc
    return from_saelens(cfg, tensors, k=k)


__all__ = [
    "SAELENS_ARCHITECTURE", "IMPORTED_ARCHITECTURE", "STATE_KEYS", "to_saelens", "write_saelens",
    "is_saelens_config", "normalize_saelens_config", "from_saelens", "load_saelens",
]
