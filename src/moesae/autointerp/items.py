"""Scoring items: the excerpts a scorer judges (detection: is the feature active anywhere here?
fuzzing: are the marked tokens the active ones?) with the right answer of each."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .examples import FeatureExamples


@dataclass
class Item:
    """One judgement to make: an excerpt (with marked tokens for fuzzing) and the right answer."""

    tokens: np.ndarray
    truth: bool
    decile: int
    highlight: np.ndarray | None = None
    """Fuzzing: which tokens are marked."""


def detection_items(fe: FeatureExamples) -> list[Item]:
    """Activating excerpts (answer yes) and as many non-activating ones (answer no)."""
    items = [Item(e.tokens, True, e.decile) for e in fe.test]
    items += [Item(e.tokens, False, 0) for e in fe.negatives]
    return items


def fuzzing_items(fe: FeatureExamples, rng: np.random.Generator) -> list[Item]:
    """Each activating excerpt with its true active tokens marked (yes) and with as many other
    tokens marked (no, when it has enough inactive tokens); non-activating excerpts with random
    tokens marked (no), as many marks as a typical activating excerpt."""
    items: list[Item] = []
    counts = []
    for e in fe.test:
        tokens = e.tokens
        active = e.activations > 0
        h = int(active.sum())
        counts.append(h)
        items.append(Item(tokens, True, e.decile, active))
        inactive = np.flatnonzero(~active)
        if len(inactive) >= h:
            wrong = np.zeros(len(tokens), dtype=bool)
            wrong[rng.choice(inactive, size=h, replace=False)] = True
            items.append(Item(tokens, False, e.decile, wrong))
    h_typical = max(1, int(round(float(np.median(counts))))) if counts else 1
    for e in fe.negatives:
        mark = np.zeros(len(e.tokens), dtype=bool)
        mark[rng.choice(len(e.tokens), size=min(h_typical, len(e.tokens)), replace=False)] = True
        items.append(Item(e.tokens, False, 0, mark))
    return items
