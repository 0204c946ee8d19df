"""The stage's files in ``results/autointerp/``: ``scores.csv`` (one row per variant × scorer ×
quantile) and ``explanations.jsonl`` (one record per scored feature), written atomically, and the
wide Fig 3d table read back from scores.csv."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import atomic_path, atomic_write_text
from .stats import QUANTILES

RESULTS_DIR = Path("results/autointerp")
SCORE_COLUMNS = ["variant", "family", "scorer", "quantile", "accuracy", "ci_low", "ci_high", "n"]


def write_scores(rows: list[dict[str, Any]], path: str | Path, columns: list[str] = SCORE_COLUMNS) -> Path:
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
    return Path(path)


def write_explanations(records: list[dict[str, Any]], path: str | Path) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def fig3d_table(scores: Any, scorer: str = "fuzzing") -> Any:
    """Wide table variant × quantile (not, q1..q10) of one scorer's accuracy, for Fig 3d."""
    df = scores[scores["scorer"] == scorer]
    table = df.pivot(index="variant", columns="quantile", values="accuracy")
    return table.reindex(columns=[q for q in QUANTILES if q in table.columns])
