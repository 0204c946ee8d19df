"""Backend ``token_pattern``: no model, deterministic. The explanation is the set of tokens / token
bigrams most associated with the feature's activation in the explainer examples (activation mass
× precision); the simulator answers by matching them (detection: any token matches; fuzzing: at
least half the marked tokens match)."""
from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..config import AutointerpConfig
from ..examples import Example, FeatureExamples
from ..items import Item
from .base import Explanation, Judgements


def token_pattern_explanation(
    examples: Sequence[Example], max_patterns: int = 5, min_precision: float = 0.5,
    token_strings: Callable[[list[int]], list[str]] | None = None,
) -> Explanation:
    """The tokens / bigrams most associated with the feature in the explainer examples.

    A pattern's score is its activation mass (summed activation where it occurs and the feature
    is active) times its precision (share of its occurrences where the feature is active). A
    bigram is a candidate only when it is more precise than its last token alone. Patterns below
    ``min_precision`` are dropped, but the best one is always kept.
    """
    total: dict[tuple[int, ...], int] = {}
    active: dict[tuple[int, ...], int] = {}
    mass: dict[tuple[int, ...], float] = {}
    for ex in examples:
        for p, (tok, act) in enumerate(zip(ex.tokens.tolist(), ex.activations.tolist())):
            keys = [(tok,)] + ([(int(ex.tokens[p - 1]), tok)] if p > 0 else [])
            for key in keys:
                total[key] = total.get(key, 0) + 1
                if act > 0:
                    active[key] = active.get(key, 0) + 1
                    mass[key] = mass.get(key, 0.0) + float(act)
    precision = {k: active[k] / total[k] for k in active}
    candidates = [
        k for k in sorted(active)
        if len(k) == 1 or precision[k] > precision.get((k[1],), 0.0)
    ]
    # deterministic order: score, then unigrams first, then token ids
    candidates.sort(key=lambda k: (-mass[k] * precision[k], len(k), k))
    chosen: list[tuple[int, ...]] = []
    for k in candidates:
        if len(chosen) >= max_patterns:
            break
        if precision[k] < min_precision and chosen:
            continue
        if len(k) == 2 and (k[1],) in chosen:
            continue
        chosen.append(k)
    if chosen and precision[chosen[0]] < min_precision:
        chosen = chosen[:1]
    return Explanation(describe_patterns(chosen, token_strings), tuple(chosen))


def describe_patterns(patterns: Sequence[tuple[int, ...]], token_strings: Callable[[list[int]], list[str]] | None = None) -> str:
    if not patterns:
        return "(no activating tokens seen)"
    show = token_strings or (lambda ids: [f"<{i}>" for i in ids])
    parts = []
    for p in patterns:
        parts.append(json.dumps("".join(show(list(p))), ensure_ascii=False))
    return "active on the tokens " + ", ".join(parts)


def pattern_matches(patterns: Iterable[tuple[int, ...]], tokens: Sequence[int]) -> np.ndarray:
    """Boolean per token: does a unigram, or a bigram ending at it, match?"""
    patterns = list(patterns)
    tokens = np.asarray(tokens, dtype=np.int64)
    out = np.isin(tokens, [p[0] for p in patterns if len(p) == 1])
    bigrams = [(p[0] << 32) | p[1] for p in patterns if len(p) == 2]  # token ids < 2^31
    if bigrams and len(tokens) > 1:
        out[1:] |= np.isin((tokens[:-1] << 32) | tokens[1:], bigrams)
    return out


def simulate(explanation: Explanation, item: Item, scorer: str) -> bool:
    """The token_pattern backend's answer: detection = any token matches; fuzzing = at least half
    the marked tokens match."""
    return simulate_many(explanation, [item], scorer)[0]


def simulate_many(explanation: Explanation, items: Sequence[Item], scorer: str) -> list[bool]:
    """:func:`simulate` for many items with one vectorised match (items joined by a separator
    token -1, which no pattern contains, so no bigram spans two items)."""
    if not items:
        return []
    joined = np.concatenate([np.append(np.asarray(it.tokens, dtype=np.int64), -1) for it in items])
    matches = pattern_matches(explanation.patterns, joined)
    ends = np.cumsum([len(it.tokens) + 1 for it in items])
    answers = []
    for it, end in zip(items, ends):
        m = matches[end - 1 - len(it.tokens):end - 1]
        if scorer == "detection":
            answers.append(bool(m.any()))
        else:
            mark = np.asarray(it.highlight, dtype=bool)
            answers.append(bool(mark.any() and m[mark].mean() >= 0.5))
    return answers


class TokenPatternBackend:
    """Backend 1: no model, deterministic."""

    name = "token_pattern"

    def __init__(self, cfg: AutointerpConfig, token_strings: Callable[[list[int]], list[str]] | None = None):
        self.cfg, self.token_strings = cfg, token_strings

    def explain(self, fe: FeatureExamples) -> Explanation:
        return token_pattern_explanation(fe.explain, self.cfg.max_patterns, self.cfg.min_precision, self.token_strings)

    def judge(self, explanation: Explanation, items: Sequence[Item], scorer: str, seed: int = 0) -> Judgements:
        return Judgements(list(simulate_many(explanation, items, scorer)))

    def request_stats(self) -> dict[str, int]:
        """No requests: the counts every backend reports, all zero."""
        return {}

    def endpoint(self) -> dict[str, str | None]:
        return {"endpoint": None, "model": None}

    def progress_postfix(self) -> dict[str, Any]:
        return {}
