"""The explainer / scorer backends: ``token_pattern`` (offline) and ``openai`` (a chat model)."""
from __future__ import annotations

from typing import Callable

from ..config import AutointerpConfig
from .base import Explanation
from .openai import OpenAIBackend
from .token_pattern import TokenPatternBackend


def make_backend(cfg: AutointerpConfig, token_strings: Callable[[list[int]], list[str]] | None):
    if cfg.backend == "openai":
        if token_strings is None:
            raise ValueError("the openai backend needs the subject model's tokenizer to show text")
        return OpenAIBackend(cfg, token_strings)
    return TokenPatternBackend(cfg, token_strings)


__all__ = ["Explanation", "OpenAIBackend", "TokenPatternBackend", "make_backend"]
