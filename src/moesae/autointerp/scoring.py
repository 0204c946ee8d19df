"""Scoring SAEs: explain and judge every sampled feature, then pool the judgements per quantile."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .codes import feature_order, sample_features, scan_cache
from .config import AutointerpConfig
from .examples import FeatureExamples, TokenStream, collect_examples
from .items import detection_items, fuzzing_items
from .stats import quantile_accuracy


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
