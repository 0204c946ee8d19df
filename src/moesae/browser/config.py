"""The ``browser`` section of params.yaml."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class BrowserConfig:
    variants: Any = "auto"
    """auto: the auto-interp selection (its families, each at the L0 nearest its target_l0), so the
    explanations exist for the same SAEs; or a list of grid variant names."""
    num_features: int = 40
    """Live features per SAE: those auto-interp explained first (its seeded order), then a uniform sample."""
    min_activations: int = 20
    """A feature is live when it fires on at least this many of the cached tokens read."""
    top_examples: int = 12
    """Top-activating contexts per feature page."""
    quantile_examples: int = 3
    """Contexts per activation decile (10 deciles)."""
    max_tokens: int | None = 32768
    """Cached tokens read, from the start of the split (null: the whole split)."""
    split: str = "heldout"
    window_before: int = 16
    window_after: int = 4
    chunk_length: int = 32
    batch_size: int = 4096
    logit_tokens: int = 10
    """Tokens listed as most promoted / suppressed by each decoder direction."""
    neighbours: int = 8
    """Nearest other features by decoder cosine shown per feature."""
    histogram_bins: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.variants == "auto" or (isinstance(self.variants, list) and all(isinstance(v, str) for v in self.variants))):
            raise ValueError(f"browser.variants must be 'auto' or a list of variant names, got {self.variants!r}")
        for name in ("num_features", "min_activations", "top_examples", "chunk_length", "batch_size",
                     "logit_tokens", "histogram_bins"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"browser.{name} must be a positive integer, got {v!r}")
        for name in ("quantile_examples", "window_before", "window_after", "neighbours", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"browser.{name} must be a non-negative integer, got {v!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"browser.max_tokens must be a positive integer or null, got {self.max_tokens!r}")


def load_config(section: dict | None) -> BrowserConfig:
    section = dict(section or {})
    known = {f.name for f in fields(BrowserConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"params.yaml: unknown key 'browser.{unknown[0]}' (known: {', '.join(sorted(known))})")
    return BrowserConfig(**section)
