"""The stage's files in ``results/autointerp/``, written atomically: ``scores.csv`` (one row per
variant × scorer × quantile), ``explanations.jsonl`` (one record per sampled feature) and
``summary.json`` (per SAE: requests, degenerate explanations, unreadable replies, judgements used;
see docs/autointerp.md); and the wide Fig 3d table read back from scores.csv.

Every string in them is raw (explanations and replies as the model wrote them, token strings as
the tokenizer decodes them): escape them before putting them into HTML."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import atomic_path, atomic_write_json, atomic_write_text
from .stats import QUANTILES

RESULTS_DIR = Path("results/autointerp")
SCORE_COLUMNS = ["variant", "family", "scorer", "quantile", "accuracy", "ci_low", "ci_high", "n", "n_planned"]
"""``n``: judgements used in the quantile; ``n_planned``: judgements the protocol asked for there
(they differ when replies could not be parsed or explanations were degenerate)."""
SUMMARY_VERSION = 1


def write_scores(rows: list[dict[str, Any]], path: str | Path, columns: list[str] = SCORE_COLUMNS) -> Path:
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
    return Path(path)


def write_explanations(records: list[dict[str, Any]], path: str | Path) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def summary(counts: list[Any], backend: str, endpoint: dict[str, str | None], min_parse_rate: float,
            scorers: list[str]) -> dict[str, Any]:
    """The content of summary.json: the run's backend, endpoint and model, and per SAE its counts
    (:class:`~.accounting.SAECounts` fields) and their totals."""
    from .accounting import totals

    return {
        "version": SUMMARY_VERSION,
        "backend": backend,
        "endpoint": endpoint.get("endpoint"),
        "model": endpoint.get("model"),
        "min_parse_rate": min_parse_rate,
        "scorers": list(scorers),
        "variants": {c.variant: c.to_dict() for c in counts},
        "totals": totals(counts),
    }


def write_summary(content: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_json(path, content, indent=2)


def read_summary(path: str | Path = RESULTS_DIR / "summary.json") -> dict[str, Any] | None:
    """summary.json, or None when the stage has not run (or wrote an unreadable file)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def fig3d_table(scores: Any, scorer: str = "fuzzing") -> Any:
    """Wide table variant × quantile (not, q1..q10) of one scorer's accuracy, for Fig 3d."""
    df = scores[scores["scorer"] == scorer]
    table = df.pivot(index="variant", columns="quantile", values="accuracy")
    return table.reindex(columns=[q for q in QUANTILES if q in table.columns])
