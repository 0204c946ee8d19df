"""Examples of one feature from the activation cache: the token stream cut into documents, runs
and chunks; the activating contexts (top ones for the explainer, per-decile samples for scoring)
and as many non-activating windows. See docs/method.md (Automated interpretability)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import AutointerpConfig


@dataclass
class TokenStream:
    """The cached token ids with, per row, the bounds of its contiguous run and its chunk id.

    A run is a maximal stretch of rows from one document at consecutive positions, so a window
    never crosses a document boundary or a gap left by subsampling.
    """

    token_ids: np.ndarray
    run_start: np.ndarray
    run_end: np.ndarray
    """Exclusive end row of each row's run."""
    chunk: np.ndarray
    """Global id of each row's chunk (``chunk_length`` rows of one run)."""

    def __len__(self) -> int:
        return len(self.token_ids)


def token_stream(token_ids: Sequence[int], doc_index: Sequence[int], position: Sequence[int], chunk_length: int) -> TokenStream:
    """Runs and chunks from the cache's aligned ``token_ids``, ``doc_index`` and ``position`` arrays."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    doc_index = np.asarray(doc_index, dtype=np.int64)
    position = np.asarray(position, dtype=np.int64)
    n = len(token_ids)
    if not len(doc_index) == len(position) == n:
        raise ValueError(
            f"token_ids, doc_index and position must be aligned, got lengths {n}, {len(doc_index)}, {len(position)}"
        )
    if n == 0:
        raise ValueError("the activation cache has no tokens; rebuild it with `moesae activations`")
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (doc_index[1:] != doc_index[:-1]) | (position[1:] != position[:-1] + 1)
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], n)
    run_id = np.cumsum(new_run) - 1
    run_start, run_end = starts[run_id], ends[run_id]
    offset = np.arange(n) - run_start
    chunks_per_run = -(-(ends - starts) // chunk_length)
    first_chunk = np.concatenate([[0], np.cumsum(chunks_per_run)[:-1]])
    chunk = first_chunk[run_id] + offset // chunk_length
    return TokenStream(token_ids, run_start, run_end, chunk)


@dataclass
class Example:
    """One excerpt: its tokens and the feature's activation on each."""

    tokens: np.ndarray
    activations: np.ndarray
    decile: int
    """1..10: activation decile of an activating context (10 = strongest); 0: non-activating."""
    max_activation: float = 0.0


@dataclass
class FeatureExamples:
    feature: int
    num_activations: int
    """Cached tokens on which the feature fires."""
    explain: list[Example]
    test: list[Example]
    negatives: list[Example]


def _window(stream: TokenStream, rows: np.ndarray, vals: np.ndarray, centre: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray]:
    a = max(int(stream.run_start[centre]), centre - before)
    b = min(int(stream.run_end[centre]), centre + after + 1)
    acts = np.zeros(b - a, dtype=np.float32)
    lo, hi = np.searchsorted(rows, a), np.searchsorted(rows, b)
    acts[rows[lo:hi] - a] = vals[lo:hi]
    return stream.token_ids[a:b], acts


def collect_examples(
    feature: int, rows: np.ndarray, vals: np.ndarray, stream: TokenStream, cfg: AutointerpConfig, rng: np.random.Generator
) -> FeatureExamples:
    """Explainer, per-decile test and non-activating examples of one feature.

    ``rows`` (ascending) / ``vals``: the stream rows where the feature fires and its activations.
    """
    rows = np.asarray(rows, dtype=np.int64)
    vals = np.asarray(vals, dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    rows, vals = rows[order], vals[order]
    if len(rows) == 0:
        return FeatureExamples(feature, 0, [], [], [])
    chunks = stream.chunk[rows]
    by_chunk = np.lexsort((-vals, chunks))  # within each chunk, the peak first
    first = np.ones(len(by_chunk), dtype=bool)
    first[1:] = chunks[by_chunk][1:] != chunks[by_chunk][:-1]
    peak_rows, peak_vals = rows[by_chunk][first], vals[by_chunk][first]
    ranked = np.lexsort((peak_rows, -peak_vals))  # strongest first, ties by position
    n_contexts = len(ranked)
    n_explain = min(cfg.explainer_examples, max(1, n_contexts // 2))

    def example(i: int, decile: int) -> Example:
        tokens, acts = _window(stream, rows, vals, int(peak_rows[i]), cfg.window_before, cfg.window_after)
        return Example(tokens, acts, decile, float(peak_vals[i]))

    explain = [example(i, 10) for i in ranked[:n_explain]]
    rest = ranked[n_explain:][::-1]  # weakest first
    test: list[Example] = []
    if len(rest):
        deciles = 1 + (np.arange(len(rest)) * 10) // len(rest)
        for d in range(1, 11):
            members = rest[deciles == d]
            take = min(cfg.examples_per_decile, len(members))
            for i in np.sort(rng.choice(members, size=take, replace=False)) if take else []:
                test.append(example(int(i), d))

    negatives = [
        Example(stream.token_ids[a:b], np.zeros(b - a, dtype=np.float32), 0, 0.0)
        for a, b in silent_windows(rows, stream, len(test), cfg.window_before, cfg.window_after, rng)
    ]
    return FeatureExamples(feature, int(len(rows)), explain, test, negatives)


def silent_windows(
    rows: np.ndarray, stream: TokenStream, count: int, before: int, after: int, rng: np.random.Generator, rounds: int = 8
) -> list[tuple[int, int]]:
    """Up to ``count`` random windows ``[a, b)`` (distinct centres) with no row of ``rows`` inside:
    rejection sampling, vectorised; a feature active almost everywhere may yield fewer."""
    found: list[tuple[int, int]] = []
    seen: set[int] = set()
    n = len(stream)
    for _ in range(rounds):
        if len(found) >= count:
            break
        centres = rng.integers(n, size=max(16, 4 * count))
        a = np.maximum(stream.run_start[centres], centres - before)
        b = np.minimum(stream.run_end[centres], centres + after + 1)
        silent = np.searchsorted(rows, a) == np.searchsorted(rows, b)
        for c, lo, hi in zip(centres[silent].tolist(), a[silent].tolist(), b[silent].tolist()):
            if c not in seen and len(found) < count:
                seen.add(c)
                found.append((lo, hi))
    return found
