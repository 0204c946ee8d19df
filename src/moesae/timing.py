"""Wall time per pipeline stage, for the report's run-time table.

``with record("train@scale_n16_e2_k8"): ...`` writes ``results/timings/<stage>.json`` =
``{"stage", "seconds", "finished_at"}`` atomically when the block finishes without error.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator


def _filename(stage: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in stage) + ".json"


@contextmanager
def record(stage: str, results_dir: str | Path = "results") -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    out_dir = Path(results_dir) / "timings"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / _filename(stage)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"stage": stage, "seconds": round(seconds, 3), "finished_at": datetime.now(timezone.utc).isoformat()})
        + "\n"
    )
    tmp.replace(path)


def read_timings(results_dir: str | Path = "results") -> list[dict]:
    """Every recorded stage timing, sorted by finishing time."""
    rows = []
    for path in sorted((Path(results_dir) / "timings").glob("*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue
    return sorted(rows, key=lambda r: r.get("finished_at", ""))
