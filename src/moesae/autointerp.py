"""Automated interpretability (Fig 3d): explain each sampled feature, then score the explanation.

The protocol follows EleutherAI's explain-then-score pipeline used by the paper:

1. **Examples.** The held-out token stream is cut into non-overlapping chunks of ``chunk_length``
   tokens inside each document. A chunk is an *activating context* of a feature when the feature
   fires on one of its tokens; its value is the peak activation, and its example is the token
   window around that peak (``window_before`` tokens before, ``window_after`` after). The top
   ``explainer_examples`` contexts go to the explainer; the remaining ones are ranked by peak and
   cut into activation deciles (1 = weakest, 10 = strongest), ``examples_per_decile`` sampled from
   each for scoring. As many *non-activating* windows (the feature is zero on every token) are drawn
   at random, so positives and negatives are balanced.
2. **Explain.** Backend ``token_pattern`` (default, no model, deterministic): the explanation is the
   set of tokens / token bigrams most associated with the feature's activation in the explainer
   examples (activation mass × precision). Backend ``openai``: any OpenAI-compatible
   chat-completions endpoint (vLLM serving Llama-3.1, or a hosted API) with the prompts in
   ``moesae/prompts``.
3. **Score.** *Detection*: is the feature active anywhere in this excerpt? *Fuzzing*: are the
   marked tokens the ones it is active on? For fuzzing every activating example is shown twice,
   once with its true active tokens marked and once with as many other tokens marked; the
   non-activating windows are shown with random tokens marked. The ``token_pattern`` backend's
   simulator answers by matching its patterns (detection: any token matches; fuzzing: at least
   half the marked tokens match).
4. **Statistics**, in the paper's cumulative form: quantile ``q_j`` pools the judgements on the
   activating examples from deciles ``j..10`` (so ``q10`` is the top decile alone and ``q1`` every
   activating example; accuracy should rise from q1 to q10), ``not`` the judgements on
   non-activating windows. For detection ``q_j`` holds only activating excerpts (the right answer
   is always yes: read it next to ``not``); for fuzzing it holds both versions of each excerpt.
   Judgements are pooled over the sampled features; the confidence interval is a bootstrap over
   features (judgements on one feature are not independent) or Wilson's.

The stage ``moesae autointerp`` scores the Fig 3d series (the grid variant of each listed family at
the L0 nearest ``target_l0``) and writes ``results/autointerp/scores.csv`` (variant, family,
scorer, quantile, accuracy, ci_low, ci_high, n) and ``results/autointerp/explanations.jsonl``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import string
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .params import ParamsError, load_params, section_to

QUANTILES = ["not"] + [f"q{j}" for j in range(1, 11)]
SCORERS = ("detection", "fuzzing")
BACKENDS = ("token_pattern", "openai")
SCORE_COLUMNS = ["variant", "family", "scorer", "quantile", "accuracy", "ci_low", "ci_high", "n"]
FIG3D_FAMILIES = [
    "scale_n16_e2", "scale_n32_e4", "scale_n64_e8_mean", "switch_n32", "scale_n64_e1_plain",
    "topk_m32th", "topk_m8th",
]
EXTRA_ARCHITECTURES = ["gated", "relu", "jumprelu", "batchtopk", "matryoshka", "feature_choice", "moe_x"]
RESULTS_DIR = Path("results/autointerp")
MODELS_DIR = Path("models")  # SAEs live in models/<family>/<variant>/ (grid.model_dir)


# ---- configuration ----------------------------------------------------------------------------
@dataclass
class LLMConfig:
    """The ``openai`` backend: any OpenAI-compatible ``/chat/completions`` endpoint."""

    base_url: str | None = None
    """Endpoint root including ``/v1``; null: $MOESAE_LLM_BASE_URL, then $OPENAI_BASE_URL."""
    model: str | None = None
    """Model name as the server knows it; null: $MOESAE_LLM_MODEL."""
    api_key_env: str = "MOESAE_LLM_API_KEY"
    """Environment variable holding the API key (never put keys in params); falls back to $OPENAI_API_KEY."""
    cache_dir: str = "data/llm_cache"
    """Responses are cached here (one JSON file per request), so reruns cost nothing."""
    concurrency: int = 8
    """Features explained and scored in parallel (requests in flight)."""
    max_retries: int = 6
    """Retries on HTTP 429 / 5xx / connection errors, with exponential backoff."""
    backoff_seconds: float = 1.0
    """First backoff; doubled each retry (capped at 60 s); a Retry-After header wins."""
    timeout_seconds: float = 120.0
    temperature: float = 0.0
    examples_per_prompt: int = 10
    """Excerpts judged per scoring request."""
    explanation_max_tokens: int = 200
    judgement_max_tokens: int = 120
    price_per_million_input: float = 0.0
    """USD per million prompt tokens, for the cost shown on the progress bar (0: tokens only)."""
    price_per_million_output: float = 0.0

    def __post_init__(self) -> None:
        for name in ("concurrency", "examples_per_prompt", "explanation_max_tokens", "judgement_max_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"'llm.{name}' must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"'llm.max_retries' must be a non-negative integer, got {self.max_retries!r}")
        for name in ("backoff_seconds", "timeout_seconds", "temperature", "price_per_million_input", "price_per_million_output"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"'llm.{name}' must be >= 0, got {getattr(self, name)!r}")

    def resolved(self) -> tuple[str, str, str | None]:
        """(base_url, model, api_key) from params, else the environment; errors say what to set."""
        base_url = self.base_url or os.environ.get("MOESAE_LLM_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        model = self.model or os.environ.get("MOESAE_LLM_MODEL")
        if not base_url:
            raise ValueError(
                "autointerp backend 'openai' needs an endpoint: set 'autointerp.llm.base_url' in params.yaml "
                "or MOESAE_LLM_BASE_URL (e.g. http://localhost:8000/v1 for vLLM)"
            )
        if not model:
            raise ValueError(
                "autointerp backend 'openai' needs a model: set 'autointerp.llm.model' in params.yaml "
                "or MOESAE_LLM_MODEL (e.g. meta-llama/Llama-3.1-8B-Instruct)"
            )
        key = os.environ.get(self.api_key_env) or os.environ.get("OPENAI_API_KEY")
        return base_url, model, key


@dataclass
class AutointerpConfig:
    """The ``autointerp`` section of params.yaml."""

    backend: str = "token_pattern"
    """token_pattern (offline, deterministic) | openai (an OpenAI-compatible chat endpoint, see ``llm``)."""
    split: str = "heldout"
    """Activation-cache split the examples come from (paper profile: ``autointerp`` = OpenWebText2)."""
    families: list[str] = field(default_factory=lambda: list(FIG3D_FAMILIES))
    """Grid families scored (Fig 3d series); families absent from the grid are skipped."""
    extra_architectures: list[str] = field(default_factory=lambda: list(EXTRA_ARCHITECTURES))
    """Families of these architectures (gated, relu, ... baselines) are scored too when present."""
    target_l0: int = 32
    """Each family's variant with the k nearest this is scored (the paper: all at L0 = 32)."""
    num_features: int = 100
    """Random live features per SAE (paper: 1000)."""
    min_activations: int = 20
    """A feature is eligible when it fires on at least this many cached tokens (enough to explain and test)."""
    max_tokens: int | None = None
    """Cached tokens read (null: the whole split)."""
    batch_size: int = 4096
    chunk_length: int = 32
    """Contexts are non-overlapping chunks of this many tokens; one example per chunk."""
    window_before: int = 16
    """Tokens shown before the activating (peak) token."""
    window_after: int = 4
    """Tokens shown after it."""
    explainer_examples: int = 20
    """Top activating contexts shown to the explainer (at most half a feature's contexts)."""
    examples_per_decile: int = 5
    """Activating contexts scored per activation decile (and as many non-activating ones in total)."""
    max_patterns: int = 5
    """token_pattern: at most this many tokens / bigrams in an explanation."""
    min_precision: float = 0.5
    """token_pattern: a pattern must be active on at least this share of its occurrences."""
    scorers: list[str] = field(default_factory=lambda: list(SCORERS))
    ci: str = "bootstrap"
    """Confidence interval: bootstrap (over features) | wilson (over judgements)."""
    ci_level: float = 0.95
    bootstrap_samples: int = 1000
    seed: int = 0
    device: str = "cpu"
    """Where the SAEs encode the cache: cpu | cuda | auto."""
    llm: LLMConfig | dict = field(default_factory=LLMConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"'backend' must be one of {BACKENDS}, got {self.backend!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"'device' must be cpu, cuda or auto, got {self.device!r}")
        if self.ci not in ("bootstrap", "wilson"):
            raise ValueError(f"'ci' must be 'bootstrap' or 'wilson', got {self.ci!r}")
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad or not self.scorers:
            raise ValueError(f"'scorers' must be a non-empty subset of {SCORERS}, got {self.scorers!r}")
        positive = ["target_l0", "num_features", "min_activations", "batch_size", "chunk_length",
                    "explainer_examples", "examples_per_decile", "max_patterns", "bootstrap_samples"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"'{name}' must be a positive integer, got {value!r}")
        for name in ("window_before", "window_after"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"'{name}' must be a non-negative integer, got {getattr(self, name)!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"'max_tokens' must be a positive integer or null, got {self.max_tokens!r}")
        if not 0 < self.min_precision <= 1:
            raise ValueError(f"'min_precision' must be in (0, 1], got {self.min_precision!r}")
        if not 0 < self.ci_level < 1:
            raise ValueError(f"'ci_level' must be in (0, 1), got {self.ci_level!r}")
        if isinstance(self.llm, dict):
            self.llm = section_to(LLMConfig, self.llm, "autointerp.llm")
        elif not isinstance(self.llm, LLMConfig):
            raise ValueError(f"'llm' must be a mapping, got {type(self.llm).__name__}")


# ---- the token stream: documents, chunks, windows --------------------------------------------
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


# ---- scoring items ----------------------------------------------------------------------------
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


# ---- backend 1: token patterns ----------------------------------------------------------------
@dataclass
class Explanation:
    text: str
    patterns: tuple[tuple[int, ...], ...] = ()
    """token_pattern backend: unigrams ``(t,)`` and bigrams ``(previous, t)`` that predict activation."""


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

    def judge(self, explanation: Explanation, items: Sequence[Item], scorer: str, seed: int = 0) -> list[bool | None]:
        return list(simulate_many(explanation, items, scorer))

    def progress_postfix(self) -> dict[str, Any]:
        return {}


# ---- backend 2: an OpenAI-compatible chat endpoint -------------------------------------------
class ChatClient:
    """Minimal OpenAI-compatible chat-completions client (standard library only).

    Retries HTTP 429 / 5xx / connection errors with exponential backoff (a ``Retry-After`` header
    wins), caches every response on disk keyed by the full request, and counts requests, cache
    hits and tokens for the progress bar. Thread-safe.
    """

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, cache_dir: str | Path | None = None,
        max_retries: int = 6, backoff_seconds: float = 1.0, timeout_seconds: float = 120.0,
        temperature: float = 0.0, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_retries, self.backoff_seconds, self.timeout_seconds = max_retries, backoff_seconds, timeout_seconds
        self.temperature, self.sleep = temperature, sleep
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._lock = threading.Lock()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.stats[k] += v

    def cache_key(self, payload: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def complete(self, messages: list[dict[str, str]], max_tokens: int = 200) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": max_tokens}
        key = self.cache_key(payload)
        path = self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                content = json.loads(path.read_text())["content"]
                self._count(cache_hits=1)
                return content
            except (json.JSONDecodeError, KeyError):
                pass  # a corrupt entry is simply re-requested
        data = self._post(payload)
        try:
            content = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"{self.url} answered without choices[0].message.content: {str(data)[:300]}") from exc
        usage = data.get("usage") or {}
        self._count(prompt_tokens=int(usage.get("prompt_tokens", 0) or 0),
                    completion_tokens=int(usage.get("completion_tokens", 0) or 0))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"request": payload, "content": content, "usage": usage}, ensure_ascii=False))
            tmp.replace(path)
        return content

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
            self._count(requests=1)
            retry_after: float | None = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                    return json.loads(response.read().decode())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:300]
                if exc.code != 429 and exc.code < 500:
                    raise RuntimeError(
                        f"{self.url} refused the request (HTTP {exc.code}): {detail}; check the model name "
                        "and the API key variable (autointerp.llm.model / api_key_env)"
                    ) from exc
                last_error = f"HTTP {exc.code}: {detail}"
                header = exc.headers.get("Retry-After") if exc.headers else None
                try:
                    retry_after = float(header) if header is not None else None
                except ValueError:
                    retry_after = None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except json.JSONDecodeError as exc:
                last_error = f"the answer is not JSON ({exc})"
            if attempt < self.max_retries:
                delay = retry_after if retry_after is not None else min(60.0, self.backoff_seconds * 2**attempt)
                self.sleep(delay)
        raise RuntimeError(
            f"{self.url} failed after {self.max_retries + 1} attempts ({last_error}); is the server up? "
            "(autointerp.llm.base_url / MOESAE_LLM_BASE_URL)"
        )


def load_prompt(name: str) -> string.Template:
    """A prompt template from ``moesae/prompts/<name>.txt`` (``$placeholders``)."""
    try:
        text = resources.files("moesae").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"prompt template moesae/prompts/{name}.txt is missing; reinstall the package") from exc
    return string.Template(text.strip())


def render_tokens(strings: Sequence[str], mark: Sequence[bool] | None = None) -> str:
    """Concatenate token strings, wrapping each run of marked tokens in ``<<...>>``."""
    out, inside = [], False
    for s, m in zip(strings, mark if mark is not None else [False] * len(strings)):
        if m and not inside:
            out.append("<<")
        elif not m and inside:
            out.append(">>")
        inside = bool(m)
        out.append(s)
    if inside:
        out.append(">>")
    return "".join(out)


def parse_explanation(text: str) -> str:
    match = list(re.finditer(r"explanation\s*:\s*(.+)", text, flags=re.IGNORECASE))
    line = match[-1].group(1) if match else text.strip()
    return line.strip().splitlines()[0].strip() if line.strip() else ""


def parse_judgements(text: str, count: int) -> list[bool] | None:
    """The first JSON-style list of 0/1 in ``text`` with ``count`` entries, else None."""
    for match in re.finditer(r"\[([^\[\]]*)\]", text):
        parts = [p.strip() for p in match.group(1).split(",") if p.strip()]
        if len(parts) == count and all(p in {"0", "1"} for p in parts):
            return [p == "1" for p in parts]
    return None


class OpenAIBackend:
    """Backend 2: explain and score with a chat model; prompts from ``moesae/prompts``."""

    name = "openai"

    def __init__(self, cfg: AutointerpConfig, token_strings: Callable[[list[int]], list[str]], client: ChatClient | None = None):
        llm: LLMConfig = cfg.llm  # type: ignore[assignment]
        if client is None:
            base_url, model, key = llm.resolved()
            client = ChatClient(base_url, model, key, llm.cache_dir, llm.max_retries, llm.backoff_seconds,
                                llm.timeout_seconds, llm.temperature)
        self.cfg, self.llm, self.client, self.token_strings = cfg, llm, client, token_strings
        self.prompts = {name: load_prompt(name) for name in (
            "explain_system", "explain_user", "detection_system", "detection_user", "fuzzing_system", "fuzzing_user")}
        self.unparsed = 0
        self._lock = threading.Lock()

    def explain(self, fe: FeatureExamples) -> Explanation:
        if not fe.explain:
            return Explanation("(no activating examples)")
        top = max(e.max_activation for e in fe.explain) or 1.0
        blocks = []
        for i, e in enumerate(fe.explain, 1):
            strings = self.token_strings([int(t) for t in e.tokens])
            active = e.activations > 0
            listed = ", ".join(
                f"{json.dumps(s, ensure_ascii=False)} ({round(10 * float(a) / top)})"
                for s, a, m in zip(strings, e.activations, active) if m
            )
            blocks.append(f"Example {i}: {render_tokens(strings, active)}\nActive tokens: {listed}")
        messages = [
            {"role": "system", "content": self.prompts["explain_system"].substitute()},
            {"role": "user", "content": self.prompts["explain_user"].substitute(examples="\n\n".join(blocks))},
        ]
        text = parse_explanation(self.client.complete(messages, self.llm.explanation_max_tokens))
        return Explanation(text or "(the explainer gave no explanation)")

    def judge(self, explanation: Explanation, items: Sequence[Item], scorer: str, seed: int = 0) -> list[bool | None]:
        # Shuffle so one prompt mixes positives and negatives; answers are mapped back.
        order = np.random.default_rng(seed).permutation(len(items))
        answers: list[bool | None] = [None] * len(items)
        per = self.llm.examples_per_prompt
        for start in range(0, len(order), per):
            batch = [int(i) for i in order[start:start + per]]
            blocks = []
            for n, i in enumerate(batch, 1):
                strings = self.token_strings([int(t) for t in items[i].tokens])
                blocks.append(f"Example {n}: {render_tokens(strings, items[i].highlight)}")
            messages = [
                {"role": "system", "content": self.prompts[f"{scorer}_system"].substitute()},
                {"role": "user", "content": self.prompts[f"{scorer}_user"].substitute(
                    explanation=explanation.text, examples="\n".join(blocks), count=len(batch))},
            ]
            parsed = parse_judgements(self.client.complete(messages, self.llm.judgement_max_tokens), len(batch))
            if parsed is None:
                with self._lock:
                    self.unparsed += len(batch)
                continue
            for i, answer in zip(batch, parsed):
                answers[i] = answer
        return answers

    def progress_postfix(self) -> dict[str, Any]:
        s = self.client.stats
        cost = (s["prompt_tokens"] * self.llm.price_per_million_input
                + s["completion_tokens"] * self.llm.price_per_million_output) / 1e6
        out = {"req": s["requests"], "cached": s["cache_hits"], "tok_in": s["prompt_tokens"], "tok_out": s["completion_tokens"]}
        if cost:
            out["usd"] = f"{cost:.2f}"
        if self.unparsed:
            out["unparsed"] = self.unparsed
        return out


# ---- statistics -------------------------------------------------------------------------------
def wilson_interval(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (NaN for n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(correct: np.ndarray, total: np.ndarray, level: float = 0.95, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the pooled accuracy Σcorrect/Σtotal, resampling features."""
    correct, total = np.asarray(correct, dtype=float), np.asarray(total, dtype=float)
    keep = total > 0
    correct, total = correct[keep], total[keep]
    if len(total) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(total), np.full(len(total), 1 / len(total)), size=samples)
    acc = (weights @ correct) / np.maximum(weights @ total, 1e-12)
    lo, hi = np.quantile(acc, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def quantile_groups(deciles: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of the judgements in each reported quantile: ``not`` (decile 0) and the cumulative
    ``q_j`` = deciles j..10 (q10: top decile alone; q1: every activating example)."""
    deciles = np.asarray(deciles)
    groups = {"not": deciles == 0}
    for j in range(1, 11):
        groups[f"q{j}"] = deciles >= j
    return groups


def quantile_accuracy(
    feature: np.ndarray, decile: np.ndarray, correct: np.ndarray, ci: str = "bootstrap",
    level: float = 0.95, samples: int = 1000, seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per quantile: pooled accuracy, confidence interval and number of judgements."""
    feature, correct = np.asarray(feature), np.asarray(correct, dtype=bool)
    rows = []
    for quantile, mask in quantile_groups(decile).items():
        n, k = int(mask.sum()), int(correct[mask].sum())
        if n == 0:
            lo = hi = acc = math.nan
        else:
            acc = k / n
            if ci == "wilson":
                lo, hi = wilson_interval(k, n, level)
            else:
                feats, inverse = np.unique(feature[mask], return_inverse=True)
                c = np.bincount(inverse, weights=correct[mask].astype(float), minlength=len(feats))
                t = np.bincount(inverse, minlength=len(feats)).astype(float)
                lo, hi = bootstrap_interval(c, t, level, samples, seed)
        rows.append({"quantile": quantile, "accuracy": acc, "ci_low": lo, "ci_high": hi, "n": n})
    return rows


# ---- SAE codes over the cache -----------------------------------------------------------------
def sparse_codes(sae: Any, x: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, feature, value) of every positive latent of ``sae`` on the batch ``x``."""
    import torch

    with torch.no_grad():
        out = sae(x.to(sae.W_dec.device))
        if out.top_indices is not None:
            values, indices = out.top_values, out.top_indices
            rows = torch.arange(values.shape[0], device=indices.device).unsqueeze(1).expand_as(indices)
            keep = values > 0
            r, f, v = rows[keep], indices[keep], values[keep]
        else:
            z = out.dense_code(sae.cfg.num_latents)
            r, f = (z > 0).nonzero(as_tuple=True)
            v = z[r, f]
    return r.cpu().numpy().astype(np.int64), f.cpu().numpy().astype(np.int64), v.float().cpu().numpy()


def scan_cache(
    saes: Sequence[Any], features: Sequence[np.ndarray], batches: Callable[[], Iterator[Any]]
) -> tuple[list[np.ndarray], list[dict[int, tuple[np.ndarray, np.ndarray]]]]:
    """One pass over the cache: for each SAE, how many tokens every feature fires on, and
    ``feature → (rows, values)`` for the listed ``features`` only (memory stays small)."""
    counts = [np.zeros(sae.cfg.num_latents, dtype=np.int64) for sae in saes]
    parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in saes]
    offset = 0
    for x in batches():
        for i, (sae, chosen) in enumerate(zip(saes, features)):
            r, f, v = sparse_codes(sae, x)
            counts[i] += np.bincount(f, minlength=len(counts[i]))
            keep = np.isin(f, chosen)
            parts[i].append((r[keep] + offset, f[keep], v[keep]))
        offset += int(x.shape[0])
    result = []
    for i, chosen in enumerate(features):
        chosen = np.asarray(chosen, dtype=np.int64)
        if parts[i]:
            rows, feats, vals = (np.concatenate([p[j] for p in parts[i]]) for j in range(3))
        else:
            rows, feats, vals = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        order = np.lexsort((rows, feats))
        rows, feats, vals = rows[order], feats[order], vals[order]
        starts, ends = np.searchsorted(feats, chosen), np.searchsorted(feats, chosen, side="right")
        result.append({int(f): (rows[a:b], vals[a:b]) for f, a, b in zip(chosen, starts, ends)})
    return counts, result


def feature_order(num_latents: int, seed: int) -> np.ndarray:
    """The seeded random order in which features are considered for sampling."""
    return np.random.default_rng(seed).permutation(num_latents)


def sample_features(counts: np.ndarray, num: int, min_activations: int, seed: int) -> np.ndarray:
    """``num`` random features among those firing on at least ``min_activations`` tokens (sorted):
    the first eligible ones in :func:`feature_order`, i.e. a uniform sample without replacement."""
    counts = np.asarray(counts)
    order = feature_order(len(counts), seed)
    return np.sort(order[counts[order] >= min_activations][:num])


# ---- scoring one SAE --------------------------------------------------------------------------
@dataclass
class FeatureResult:
    feature: int
    explanation: str
    num_activations: int
    judgements: dict[str, tuple[np.ndarray, np.ndarray]]
    """scorer → (decile per judgement, correct per judgement), unanswered judgements dropped."""


def score_feature(fe: FeatureExamples, backend: Any, scorers: Sequence[str], seed: int) -> FeatureResult:
    explanation = backend.explain(fe)
    rng = np.random.default_rng([seed, fe.feature, 1])
    out = {}
    for scorer in scorers:
        items = detection_items(fe) if scorer == "detection" else fuzzing_items(fe, rng)
        answers = backend.judge(explanation, items, scorer, seed=seed * 1_000_003 + fe.feature)
        answered = [(it, a) for it, a in zip(items, answers) if a is not None]
        deciles = np.array([it.decile for it, _ in answered], dtype=np.int64)
        correct = np.array([a == it.truth for it, a in answered], dtype=bool)
        out[scorer] = (deciles, correct)
    return FeatureResult(fe.feature, explanation.text, fe.num_activations, out)


def score_features(
    examples: Sequence[FeatureExamples], backend: Any, cfg: AutointerpConfig, desc: str = "autointerp", progress: bool = True
) -> list[FeatureResult]:
    """Explain and score every feature; in parallel for the LLM backend, with a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False)
    workers = cfg.llm.concurrency if backend.name == "openai" else 1  # type: ignore[union-attr]
    results: list[FeatureResult] = []
    try:
        if workers == 1:
            for fe in examples:
                results.append(score_feature(fe, backend, cfg.scorers, cfg.seed))
                bar.update(1)
                bar.set_postfix(backend.progress_postfix(), refresh=False)
        else:
            with ThreadPoolExecutor(workers) as pool:
                futures = [pool.submit(score_feature, fe, backend, cfg.scorers, cfg.seed) for fe in examples]
                for fut in futures:
                    results.append(fut.result())
                    bar.update(1)
                    bar.set_postfix(backend.progress_postfix(), refresh=False)
    finally:
        bar.close()
    return results


def summarize(results: Sequence[FeatureResult], cfg: AutointerpConfig) -> list[dict[str, Any]]:
    """Rows (scorer, quantile, accuracy, ci_low, ci_high, n) pooled over features."""
    rows = []
    for scorer in cfg.scorers:
        feature = np.concatenate([np.full(len(r.judgements[scorer][0]), r.feature) for r in results] or [np.zeros(0)])
        decile = np.concatenate([r.judgements[scorer][0] for r in results] or [np.zeros(0, dtype=np.int64)])
        correct = np.concatenate([r.judgements[scorer][1] for r in results] or [np.zeros(0, dtype=bool)])
        for row in quantile_accuracy(feature, decile, correct, cfg.ci, cfg.ci_level, cfg.bootstrap_samples, cfg.seed):
            rows.append({"scorer": scorer, **row})
    return rows


def autointerp_saes(
    saes: dict[str, Any], stream: TokenStream, batches: Callable[[], Iterator[Any]], cfg: AutointerpConfig,
    backend: Any, progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score several SAEs over one activation stream (one pass for all SAEs; two when sampled
    features are rare).

    ``saes``: name → SAE; ``batches()`` yields the cached activations in stream order.
    Returns (score rows with a ``variant`` key, one explanation record per scored feature).
    """
    names = list(saes)
    models = [saes[n] for n in names]
    for sae in models:
        sae.eval()
    # One pass keeps the codes of the first candidates in the sampling order (enough unless many
    # features are dead or rare); a second pass fetches any sampled feature beyond them.
    candidates = [feature_order(m.cfg.num_latents, cfg.seed)[: 2 * cfg.num_features + 32] for m in models]
    counts, acts = scan_cache(models, candidates, batches)
    chosen = [sample_features(c, cfg.num_features, cfg.min_activations, cfg.seed) for c in counts]
    missing = [np.setdiff1d(ch, cand) for ch, cand in zip(chosen, candidates)]
    if any(len(m) for m in missing):
        _, extra = scan_cache(models, missing, batches)
        for a, e in zip(acts, extra):
            a.update(e)
    rows, records = [], []
    for name, feats, fa, count in zip(names, chosen, acts, counts):
        if len(feats) == 0:
            print(f"[autointerp] {name}: no feature fires on >= {cfg.min_activations} tokens; nothing to score")
        examples = [
            collect_examples(int(f), *fa[int(f)], stream, cfg, np.random.default_rng([cfg.seed, int(f)]))
            for f in feats
        ]
        results = score_features(examples, backend, cfg, desc=f"autointerp {name}", progress=progress)
        for row in summarize(results, cfg):
            rows.append({"variant": name, **row})
        for r in results:
            rec = {"variant": name, "feature": r.feature, "num_activations": r.num_activations, "explanation": r.explanation}
            for scorer, (_, correct) in r.judgements.items():
                rec[f"{scorer}_accuracy"] = float(correct.mean()) if len(correct) else None
                rec[f"{scorer}_n"] = int(len(correct))
            records.append(rec)
        live = int((count > 0).sum())
        print(f"[autointerp] {name}: {len(feats)} features scored ({live} live of {len(count)})")
    return rows, records


# ---- the stage --------------------------------------------------------------------------------
def select_variants(variants: dict[str, dict[str, Any]], cfg: AutointerpConfig) -> dict[str, str]:
    """Variant name → family for the Fig 3d series: per family, the lowest seed and the k nearest
    ``target_l0`` (ties: the smaller k). Listed families absent from the grid are skipped."""
    families = list(cfg.families)
    for v in variants.values():
        fam = v.get("family")
        if v.get("architecture") in cfg.extra_architectures and fam and fam not in families:
            families.append(fam)
    chosen: dict[str, str] = {}
    for fam in families:
        cands = [(n, v) for n, v in variants.items() if v.get("family") == fam]
        if not cands:
            continue
        seed = min(int(v.get("seed", 0)) for _, v in cands)
        cands = [(n, v) for n, v in cands if int(v.get("seed", 0)) == seed]
        name, _ = min(cands, key=lambda nv: (abs(int(nv[1]["k"]) - cfg.target_l0), int(nv[1]["k"])))
        chosen[name] = fam
    return chosen


def write_csv_atomic(rows: list[dict[str, Any]], path: Path, columns: list[str]) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
    tmp.replace(path)


def write_jsonl_atomic(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)


def make_backend(cfg: AutointerpConfig, token_strings: Callable[[list[int]], list[str]] | None):
    if cfg.backend == "openai":
        if token_strings is None:
            raise ValueError("the openai backend needs the subject model's tokenizer to show text")
        return OpenAIBackend(cfg, token_strings)
    return TokenPatternBackend(cfg, token_strings)


def run_stage(params_path: str | Path = "params.yaml", backend_name: str | None = None,
              variants: list[str] | None = None, out_dir: str | Path = RESULTS_DIR, progress: bool = True) -> Path:
    """Load the cache, tokenizer and SAEs named by params.yaml, score them, write the outputs."""
    import torch

    from .activations import ActivationReader
    from .grid import model_dir
    from .saes import load_sae
    from .subject_model import load_subject_model

    params = load_params(params_path)
    section = dict(params.get("autointerp") or {})
    if backend_name:
        section["backend"] = backend_name
    cfg = section_to(AutointerpConfig, section, "autointerp")
    if cfg.backend == "openai":
        cfg.llm.resolved()  # a missing endpoint or model is reported before any work starts
    grid = params.get("variants") or {}
    if variants:
        missing = [v for v in variants if v not in grid]
        if missing:
            raise ParamsError(f"params.yaml: no variant named '{missing[0]}' under 'variants'")
        selected = {v: grid[v].get("family", "") for v in variants}
    else:
        selected = select_variants(grid, cfg)
    if not selected:
        raise ValueError(
            f"no grid variant belongs to the autointerp families {cfg.families}; "
            "list existing families under 'autointerp.families'"
        )
    paths = params.get("paths") or {}
    split_dir = Path(paths.get("activations", "data/activations")) / cfg.split
    if not split_dir.exists():
        raise FileNotFoundError(f"no activation cache at {split_dir}; run `moesae activations` (split '{cfg.split}')")
    reader = ActivationReader(split_dir)
    n = reader.num_tokens if cfg.max_tokens is None else min(cfg.max_tokens, reader.num_tokens)
    stream = token_stream(np.asarray(reader.token_ids[:n]), np.asarray(reader.doc_index[:n]), np.asarray(reader.position[:n]), cfg.chunk_length)
    subject = load_subject_model(paths.get("subject_model", "models/subject"))
    saes = {}
    for name in selected:
        saes[name] = load_sae(model_dir(name, grid[name], MODELS_DIR))
        if saes[name].cfg.d_in != reader.d_model:
            raise ValueError(f"SAE {name} reads width {saes[name].cfg.d_in} but the cache has {reader.d_model}; retrain it")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("autointerp.device is 'cuda' but no CUDA device is visible; use cpu or auto")
    for sae in saes.values():
        sae.to(device)
    backend = make_backend(cfg, subject.token_strings)

    def batches() -> Iterator[Any]:
        return reader.iter_batches(cfg.batch_size, max_tokens=n)

    rows, records = autointerp_saes(saes, stream, batches, cfg, backend, progress=progress)
    for row in rows:
        row["family"] = selected[row["variant"]]
    out_dir = Path(out_dir)
    write_jsonl_atomic(records, out_dir / "explanations.jsonl")
    write_csv_atomic(rows, out_dir / "scores.csv", SCORE_COLUMNS)
    return out_dir / "scores.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae autointerp", description="Explain-and-score features (Fig 3d)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--backend", choices=BACKENDS, help="override autointerp.backend")
    parser.add_argument("--variant", action="append", help="score this variant instead of the Fig 3d series (repeatable)")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from .timing import record

    with record("autointerp"):
        path = run_stage(args.params, args.backend, args.variant, args.out, progress=not args.no_progress)
    print(f"[autointerp] wrote {path}")
    return 0


# ---- Fig 3d helpers ---------------------------------------------------------------------------
def fig3d_table(scores: Any, scorer: str = "fuzzing") -> Any:
    """Wide table variant × quantile (not, q1..q10) of one scorer's accuracy, for Fig 3d."""
    df = scores[scores["scorer"] == scorer]
    table = df.pivot(index="variant", columns="quantile", values="accuracy")
    return table.reindex(columns=[q for q in QUANTILES if q in table.columns])


if __name__ == "__main__":
    raise SystemExit(main())
