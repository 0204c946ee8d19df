"""What every backend shares: the explanation it writes (text, and for ``token_pattern`` the
patterns its simulator matches)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Explanation:
    text: str
    patterns: tuple[tuple[int, ...], ...] = ()
    """token_pattern backend: unigrams ``(t,)`` and bigrams ``(previous, t)`` that predict activation."""
