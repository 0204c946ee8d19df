"""Automated interpretability (Fig 3d): explain each sampled feature, then score the explanation.

The protocol follows EleutherAI's explain-then-score pipeline used by the paper (docs/method.md,
section "Automated interpretability"; running it against an LLM server: docs/autointerp.md):

1. **Examples** (:mod:`.examples`). The held-out token stream is cut into non-overlapping chunks
   of ``chunk_length`` tokens inside each document. A chunk is an *activating context* of a feature
   when the feature fires on one of its tokens; its value is the peak activation, and its example
   is the token window around that peak (``window_before`` tokens before, ``window_after`` after).
   The top ``explainer_examples`` contexts go to the explainer; the remaining ones are ranked by
   peak and cut into activation deciles (1 = weakest, 10 = strongest), ``examples_per_decile``
   sampled from each for scoring. As many *non-activating* windows (the feature is zero on every
   token) are drawn at random, so positives and negatives are balanced.
2. **Explain** (:mod:`.backends`). Backend ``token_pattern`` (default, no model, deterministic):
   the explanation is the set of tokens / token bigrams most associated with the feature's
   activation in the explainer examples (activation mass × precision). Backend ``openai``: any
   OpenAI-compatible chat-completions endpoint (vLLM serving Llama-3.1, or a hosted API) with the
   prompts in ``moesae/prompts``.
3. **Score** (:mod:`.items`). *Detection*: is the feature active anywhere in this excerpt?
   *Fuzzing*: are the marked tokens the ones it is active on? For fuzzing every activating example
   is shown twice, once with its true active tokens marked and once with as many other tokens
   marked; the non-activating windows are shown with random tokens marked. The ``token_pattern``
   backend's simulator answers by matching its patterns (detection: any token matches; fuzzing: at
   least half the marked tokens match).
4. **Statistics** (:mod:`.stats`), in the paper's cumulative form: quantile ``q_j`` pools the
   judgements on the activating examples from deciles ``j..10`` (so ``q10`` is the top decile
   alone and ``q1`` every activating example; accuracy should rise from q1 to q10), ``not`` the
   judgements on non-activating windows. For detection ``q_j`` holds only activating excerpts (the
   right answer is always yes: read it next to ``not``); for fuzzing it holds both versions of each
   excerpt. Judgements are pooled over the sampled features; the confidence interval is a bootstrap
   over features (judgements on one feature are not independent) or Wilson's.

The stage ``moesae autointerp`` (:mod:`.stage`) scores the Fig 3d series (:mod:`.selection`: the
grid variant of each listed family at the L0 nearest ``target_l0``) and writes
``results/autointerp/scores.csv`` (variant, family, scorer, quantile, accuracy, ci_low, ci_high, n)
``results/autointerp/explanations.jsonl`` and ``results/autointerp/summary.json`` (:mod:`.outputs`).
Every reply is counted (:mod:`.accounting`): requests, degenerate explanations, judgement replies
that could not be parsed, judgements used; a run whose parse rate is below
``autointerp.min_parse_rate`` fails with the counts and a raw reply instead of reporting scores.
"""
from __future__ import annotations

from .accounting import AutointerpFailure, SAECounts, check_parse_rate, format_table, tally, totals
from .backends import Explanation, OpenAIBackend, TokenPatternBackend, make_backend
from .backends.base import Judgements
from .backends.token_pattern import (
    describe_patterns, pattern_matches, simulate, simulate_many, token_pattern_explanation,
)
from .client import ChatClient, Reply, cut_at_stop, redact_url
from .codes import feature_order, sample_features, scan_cache, sparse_codes
from .config import BACKENDS, FIG3D_FAMILIES, SCORERS, AutointerpConfig, LLMConfig, load_config
from .examples import Example, FeatureExamples, TokenStream, collect_examples, silent_windows, token_stream
from .items import Item, detection_items, fuzzing_items
from .outputs import (
    RESULTS_DIR, SCORE_COLUMNS, fig3d_table, read_summary, summary, write_explanations, write_scores, write_summary,
)
from .prompting import judgement_schema, load_prompt, render_tokens
from .replies import (
    EXPLANATION_PROBLEMS, explanation_problem, is_repetitive, judgement_problem, parse_explanation, parse_judgements,
)
from .scoring import FeatureResult, autointerp_saes, explanation_record, score_feature, score_features, summarize
from .selection import scored_families, select_variants
from .stage import main, run_stage
from .stats import QUANTILES, bootstrap_interval, quantile_accuracy, quantile_groups, wilson_interval

__all__ = [
    "AutointerpFailure", "EXPLANATION_PROBLEMS", "Judgements", "Reply", "SAECounts", "check_parse_rate",
    "cut_at_stop", "explanation_problem", "explanation_record", "format_table", "is_repetitive",
    "judgement_problem", "judgement_schema", "read_summary", "redact_url", "summary", "tally", "totals",
    "write_summary",
    "AutointerpConfig", "BACKENDS", "ChatClient", "Example", "Explanation", "FIG3D_FAMILIES", "FeatureExamples",
    "FeatureResult", "Item", "LLMConfig", "OpenAIBackend", "QUANTILES", "RESULTS_DIR", "SCORERS", "SCORE_COLUMNS",
    "TokenPatternBackend", "TokenStream", "autointerp_saes", "bootstrap_interval", "collect_examples",
    "describe_patterns", "detection_items", "feature_order", "fig3d_table", "fuzzing_items", "load_config",
    "load_prompt", "main", "make_backend", "parse_explanation", "parse_judgements", "pattern_matches",
    "quantile_accuracy", "quantile_groups", "render_tokens", "run_stage", "sample_features", "scan_cache",
    "score_feature", "score_features", "scored_families", "select_variants", "silent_windows", "simulate",
    "simulate_many", "sparse_codes", "summarize", "token_pattern_explanation", "token_stream", "wilson_interval",
    "write_explanations", "write_scores",
]
