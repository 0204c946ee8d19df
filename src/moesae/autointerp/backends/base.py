"""What every backend returns: the explanation it writes, and its judgements on a list of items
with the count of replies that could not be read."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Explanation:
    text: str
    patterns: tuple[tuple[int, ...], ...] = ()
    """token_pattern backend: unigrams ``(t,)`` and bigrams ``(previous, t)`` that predict activation."""
    raw: str = ""
    """The explainer's reply as received (LLM backends), for the record and for error messages."""
    problem: str | None = None
    """Why the explanation is degenerate (``replies.EXPLANATION_PROBLEMS``), or None: a degenerate
    explanation is not scored."""
    retried: bool = False
    """The first reply was degenerate and the explainer was asked again."""


@dataclass
class Judgements:
    """A backend's answers to the items of one scorer (None: no readable answer)."""

    answers: list[bool | None]
    prompts: int = 0
    """Scoring requests (one per batch of excerpts; retries not counted)."""
    malformed: int = 0
    """Prompts whose first reply could not be parsed (each asked again, when retries are on)."""
    recovered: int = 0
    """Of those, prompts whose retry was parsed."""
    bad_replies: list[str] = field(default_factory=list)
    """The first unparseable raw replies (at most a few), for error messages."""

    @property
    def lost(self) -> int:
        """Prompts with no readable answer even after the retry."""
        return self.malformed - self.recovered
