"""moesae: multi-expert sparse autoencoders (Scale SAE) and their baselines, reproducibly.

``build_sae``, ``load_sae`` and ``available_architectures`` are imported lazily, so that
modules which do not need torch (plotting, the report) start fast.
"""
__version__ = "0.1.0"
__all__ = ["build_sae", "load_sae", "available_architectures", "__version__"]


def __getattr__(name: str):
    if name in {"build_sae", "load_sae", "available_architectures"}:
        from . import saes

        return getattr(saes, name)
    raise AttributeError(f"module 'moesae' has no attribute {name!r}")
