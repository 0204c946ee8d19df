"""The SAE model zoo: one file per architecture, all behind ``build_sae`` / ``load_sae``."""
from . import batchtopk, feature_choice, gated, jumprelu, relu, scale, switch, topk  # noqa: F401  (registers the architectures)
from .base import SAE, SAEConfig, SAEOutput
from .registry import (
    PRESETS, REGISTRY, ArchitectureFacts, architecture_class, available_architectures, build_sae, describe, load_sae,
    register,
)

__all__ = [
    "SAE", "SAEConfig", "SAEOutput", "PRESETS", "REGISTRY",
    "ArchitectureFacts", "architecture_class", "available_architectures", "build_sae", "describe", "load_sae",
    "register",
]
