"""Architecture registry: names → SAE classes, plus named presets.

Adding an architecture: write ``saes/<name>.py`` with a config dataclass and an ``SAE``
subclass decorated with ``@register("<name>")``, and import it in ``saes/__init__.py``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

from .base import CONFIG_FILE, WEIGHTS_FILE, SAE

REGISTRY: dict[str, type[SAE]] = {}

# Named presets: a name that builds a registered architecture with some fields fixed.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # The Scale SAE authors' "Switch" baseline: one expert per token, gate weight exactly 1
    # (softmax over the single selected probability), no Feature Scaling. Unlike the original
    # Switch SAE, the output is not scaled by the router probability.
    "authors_switch": ("scale", {"active_experts": 1, "feature_scaling": "none", "gate": "prob_softmax"}),
}


def register(name: str, *aliases: str):
    def wrap(cls: type[SAE]) -> type[SAE]:
        cls.architecture = name
        for key in (name, *aliases):
            if key in REGISTRY and REGISTRY[key] is not cls:
                raise ValueError(f"architecture name '{key}' registered twice")
            REGISTRY[key] = cls
        return cls

    return wrap


def available_architectures() -> list[str]:
    return sorted(set(REGISTRY) | set(PRESETS))


@dataclasses.dataclass(frozen=True)
class ArchitectureFacts:
    """What the grid, evaluation, figures, auto-interp and the synthetic benchmark know about one
    configuration. Read from the architecture's class (see ``SAE`` in ``base.py``); nothing else
    in the package keeps a list of architectures."""

    architecture: str
    """The name used in the config (may be a preset)."""
    base_architecture: str
    """The registered class's name (a preset resolves to it)."""
    display_name: str
    label: str
    """This configuration's short name, e.g. ``Scale (16,2)``."""
    l0_is_set: bool
    is_moe: bool
    max_k: int
    active_width: int
    flops_per_token: int


def resolve(architecture: str, config: dict[str, Any] | None = None) -> tuple[type[SAE], dict[str, Any]]:
    """The registered class and the config fields a (possibly preset) architecture name builds."""
    config = dict(config or {})
    if architecture in PRESETS:
        base, fixed = PRESETS[architecture]
        clash = {k for k in fixed if k in config and config[k] != fixed[k]}
        if clash:
            raise ValueError(
                f"invalid SAE config field '{sorted(clash)[0]}': preset '{architecture}' fixes it to "
                f"{fixed[sorted(clash)[0]]!r}"
            )
        return resolve(base, {**config, **fixed})
    if architecture not in REGISTRY:
        raise ValueError(
            f"invalid SAE config field 'architecture': unknown architecture '{architecture}'; "
            f"choose one of {available_architectures()}"
        )
    cls = REGISTRY[architecture]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(
            f"invalid SAE config field '{unknown[0]}': not a field of architecture '{architecture}' "
            f"(its fields: {sorted(fields)})"
        )
    return cls, config


def architecture_class(architecture: str) -> type[SAE]:
    """The class an architecture (or preset) name builds."""
    return resolve(architecture)[0]


def describe(architecture: str, **config: Any) -> ArchitectureFacts:
    """The facts of one configuration, validated, without allocating any tensor.

    ``d_in`` defaults to 1 and ``k`` to 1 when absent (``max_k`` and ``active_width`` do not depend
    on them; ``flops_per_token`` does).
    """
    config.setdefault("d_in", 1)
    config.setdefault("k", 1)
    cls, fields = resolve(architecture, config)
    cfg = cls.config_class(**fields)
    return ArchitectureFacts(
        architecture=architecture, base_architecture=cls.architecture, display_name=cls.display_name,
        label=cls.config_label(cfg), l0_is_set=cls.l0_is_set, is_moe=cls.is_moe, max_k=cls.max_k(cfg),
        active_width=cls.active_width(cfg), flops_per_token=cls.forward_flops(cfg),
    )


def build_sae(architecture: str, **config: Any) -> SAE:
    """Build an SAE by architecture (or preset) name; ``config`` are its config fields.

    Raises ``ValueError`` naming the field for unknown architectures, unknown fields and bad values,
    before any tensor is allocated.
    """
    cls, fields = resolve(architecture, config)
    return cls(cls.config_class(**fields))


def load_sae(path: str | Path) -> SAE:
    """Load an SAE saved with ``save(path)`` (``cfg.json`` + ``sae_weights.safetensors``).

    An SAELens folder (its ``cfg.json`` has ``d_sae``) or a plain export (``moesae export
    --format safetensors``) is converted to the equivalent SAE (:mod:`moesae.interop`).
    """
    path = Path(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"no SAE checkpoint at {path}: {p.name} is missing (train it first)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt SAE config {cfg_path}: {exc}; delete the folder and retrain") from exc
    # SAELens and plain-export folders. Imported by name on purpose: the converters are not part of
    # any architecture's training code, so they stay out of the training fingerprints and the
    # stages' import closures (moesae.training.fingerprint.package_imports reads import statements).
    foreign = importlib.import_module("moesae.interop").load_foreign(path, cfg)
    if foreign is not None:
        return foreign
    architecture = cfg.pop("architecture")
    sae = build_sae(architecture, **cfg)
    try:
        sae.load_weights(path)
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise ValueError(f"corrupt SAE weights {weights_path}: {exc}; delete the folder and retrain") from exc
    return sae
