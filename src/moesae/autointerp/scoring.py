"""Scoring SAEs: explain and judge every sampled feature, count what the backend did, pool the
judgements per quantile, and stop (loudly) when too few judgements are usable."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .accounting import FAIL_FAST_FEATURES, SAECounts, check_parse_rate, describe_counts, tally
from .backends.base import Judgements
from .codes import feature_order, sample_features, scan_cache
from .config import AutointerpConfig
from .examples import FeatureExamples, TokenStream, collect_examples
from .items import detection_items, fuzzing_items
from .stats import quantile_accuracy, quantile_groups


@dataclass
class FeatureResult:
    feature: int
    explanation: str
    num_activations: int
    judgements: dict[str, tuple[np.ndarray, np.ndarray]]
    """scorer → (decile per judgement, correct per judgement), unanswered judgements dropped."""
    planned: dict[str, np.ndarray] = field(default_factory=dict)
    """scorer → decile of every planned judgement (answered or not)."""
    requested: dict[str, int] = field(default_factory=dict)
    """scorer → judgements sent to the backend (0 when the explanation is degenerate)."""
    reply_counts: dict[str, Judgements] = field(default_factory=dict)
    """scorer → the backend's counts of prompts, unreadable replies and retries (answers dropped)."""
    explanation_raw: str = ""
    explanation_problem: str | None = None
    explanation_retried: bool = False


def score_feature(fe: FeatureExamples, backend: Any, scorers: Sequence[str], seed: int) -> FeatureResult:
    """Explain one feature and judge its items with every scorer; a degenerate explanation is not
    judged (its planned judgements count as lost)."""
    explanation = backend.explain(fe)
    rng = np.random.default_rng([seed, fe.feature, 1])
    out, planned, requested, counts = {}, {}, {}, {}
    for scorer in scorers:
        items = detection_items(fe) if scorer == "detection" else fuzzing_items(fe, rng)
        planned[scorer] = np.array([it.decile for it in items], dtype=np.int64)
        if explanation.problem:
            judged = Judgements([None] * len(items))
        else:
            judged = backend.judge(explanation, items, scorer, seed=seed * 1_000_003 + fe.feature)
        requested[scorer] = 0 if explanation.problem else len(items)
        answered = [(it, a) for it, a in zip(items, judged.answers) if a is not None]
        deciles = np.array([it.decile for it, _ in answered], dtype=np.int64)
        correct = np.array([a == it.truth for it, a in answered], dtype=bool)
        out[scorer] = (deciles, correct)
        counts[scorer] = Judgements([], judged.prompts, judged.malformed, judged.recovered, list(judged.bad_replies))
    return FeatureResult(fe.feature, explanation.text, fe.num_activations, out, planned, requested, counts,
                         explanation.raw, explanation.problem, explanation.retried)


def score_features(
    examples: Sequence[FeatureExamples], backend: Any, cfg: AutointerpConfig, desc: str = "autointerp",
    progress: bool = True, on_result: Callable[[list[FeatureResult]], None] | None = None,
) -> list[FeatureResult]:
    """Explain and score every feature; in parallel for the LLM backend, with a progress bar.

    ``on_result(results so far)`` runs after each feature, in order; an exception it raises stops
    the work (requests not yet sent are cancelled) and propagates.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False)
    workers = cfg.llm.concurrency if backend.name == "openai" else 1  # type: ignore[union-attr]
    results: list[FeatureResult] = []

    def done(result: FeatureResult) -> None:
        results.append(result)
        bar.update(1)
        bar.set_postfix(backend.progress_postfix(), refresh=False)
        if on_result is not None:
            on_result(results)

    try:
        if workers == 1:
            for fe in examples:
                done(score_feature(fe, backend, cfg.scorers, cfg.seed))
        else:
            pool = ThreadPoolExecutor(workers)
            try:
                futures = [pool.submit(score_feature, fe, backend, cfg.scorers, cfg.seed) for fe in examples]
                for fut in futures:
                    done(fut.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
    finally:
        bar.close()
    return results


def summarize(results: Sequence[FeatureResult], cfg: AutointerpConfig) -> list[dict[str, Any]]:
    """Rows (scorer, quantile, accuracy, ci_low, ci_high, n, n_planned) pooled over features:
    ``n`` judgements used, of ``n_planned`` the protocol asked for."""
    rows = []
    for scorer in cfg.scorers:
        feature = np.concatenate([np.full(len(r.judgements[scorer][0]), r.feature) for r in results] or [np.zeros(0)])
        decile = np.concatenate([r.judgements[scorer][0] for r in results] or [np.zeros(0, dtype=np.int64)])
        correct = np.concatenate([r.judgements[scorer][1] for r in results] or [np.zeros(0, dtype=bool)])
        planned = np.concatenate([r.planned.get(scorer, r.judgements[scorer][0]) for r in results]
                                 or [np.zeros(0, dtype=np.int64)])
        n_planned = {q: int(mask.sum()) for q, mask in quantile_groups(planned).items()}
        for row in quantile_accuracy(feature, decile, correct, cfg.ci, cfg.ci_level, cfg.bootstrap_samples, cfg.seed):
            rows.append({"scorer": scorer, **row, "n_planned": n_planned[row["quantile"]]})
    return rows


def explanation_record(name: str, r: FeatureResult) -> dict[str, Any]:
    """One line of explanations.jsonl (raw strings: escape them before showing them as HTML)."""
    rec: dict[str, Any] = {"variant": name, "feature": r.feature, "num_activations": r.num_activations,
                           "explanation": r.explanation}
    for scorer, (_, correct) in r.judgements.items():
        rec[f"{scorer}_accuracy"] = float(correct.mean()) if len(correct) else None
        rec[f"{scorer}_n"] = int(len(correct))
    if r.explanation_raw or r.explanation_problem:
        rec["explanation_raw"] = r.explanation_raw
        rec["explanation_problem"] = r.explanation_problem
    return rec


def autointerp_saes(
    saes: dict[str, Any], stream: TokenStream, batches: Callable[[], Iterator[Any]], cfg: AutointerpConfig,
    backend: Any, progress: bool = True, families: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[SAECounts]]:
    """Score several SAEs over one activation stream (one pass for all SAEs; two when sampled
    features are rare).

    ``saes``: name → SAE; ``batches()`` yields the cached activations in stream order.
    Returns (score rows with a ``variant`` key, one explanation record per sampled feature, the
    counts of each SAE). Raises :class:`~.accounting.AutointerpFailure` as soon as an SAE's parse
    rate is below ``cfg.min_parse_rate`` (then the SAEs after it are not scored), or early within
    an SAE when, after ``FAIL_FAST_FEATURES`` features, it is below half of it.
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
    endpoint = backend.endpoint()
    cache_dir = cfg.llm.cache_dir if backend.name == "openai" else None  # type: ignore[union-attr]
    rows, records, tallies = [], [], []
    for name, feats, fa, count in zip(names, chosen, acts, counts):
        if len(feats) == 0:
            print(f"[autointerp] {name}: no feature fires on >= {cfg.min_activations} tokens; nothing to score")
        examples = [
            collect_examples(int(f), *fa[int(f)], stream, cfg, np.random.default_rng([cfg.seed, int(f)]))
            for f in feats
        ]
        before = backend.request_stats()
        meta = dict(family=(families or {}).get(name, ""), num_latents=len(count), live_features=int((count > 0).sum()))

        def fail_fast(done: list[FeatureResult]) -> None:
            if len(done) >= FAIL_FAST_FEATURES and len(done) < len(examples):
                so_far = tally(name, done, before, backend.request_stats(), **meta)
                check_parse_rate([so_far], cfg.min_parse_rate, endpoint, cache_dir, stopped_early=True)

        results = score_features(examples, backend, cfg, desc=f"autointerp {name}", progress=progress,
                                 on_result=fail_fast)
        sae_counts = tally(name, results, before, backend.request_stats(), **meta)
        tallies.append(sae_counts)
        print(f"[autointerp] {describe_counts(sae_counts)}")
        check_parse_rate([sae_counts], cfg.min_parse_rate, endpoint, cache_dir)
        for row in summarize(results, cfg):
            rows.append({"variant": name, **row})
        records.extend(explanation_record(name, r) for r in results)
    return rows, records, tallies
