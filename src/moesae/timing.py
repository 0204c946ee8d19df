"""Wall time per pipeline stage, for the report's "run time per stage" table.

Every stage wraps its work in ``with record("train"): ...``; on success this writes
``results/timings/<stage>.json`` = ``{"stage", "seconds", "finished_at"}``. A stage that fails
writes nothing, so a timing on disk always belongs to a finished run. Written atomically (temp
file then rename), so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

TIMINGS_SUBDIR = "timings"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@-]")


def timing_path(stage_name: str, results_dir: str | Path = "results") -> Path:
    """``<results_dir>/timings/<stage>.json``; characters unsafe in a file name become '_'."""
    if not isinstance(stage_name, str) or not stage_name.strip():
        raise ValueError(f"invalid stage name {stage_name!r}: give the stage a non-empty name, e.g. 'train'")
    return Path(results_dir) / TIMINGS_SUBDIR / f"{_UNSAFE.sub('_', stage_name)}.json"


def write_timing(stage_name: str, seconds: float, results_dir: str | Path = "results") -> Path:
    """Write one stage's timing file atomically and return its path."""
    path = timing_path(stage_name, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record_ = {
        "stage": stage_name,
        "seconds": round(float(seconds), 3),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record_, indent=2) + "\n")
    tmp.replace(path)
    return path


@contextmanager
def record(stage_name: str, results_dir: str | Path = "results") -> Iterator[None]:
    """Time the ``with`` block; on success write ``<results_dir>/timings/<stage_name>.json``."""
    timing_path(stage_name, results_dir)  # validate the name before the work starts
    start = time.perf_counter()
    yield
    write_timing(stage_name, time.perf_counter() - start, results_dir)


def read_timings(results_dir: str | Path = "results") -> list[dict]:
    """All recorded stage timings, sorted by finishing time; unreadable files are skipped."""
    folder = Path(results_dir) / TIMINGS_SUBDIR
    rows = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            row = json.loads(path.read_text())
            rows.append({"stage": str(row["stage"]), "seconds": float(row["seconds"]),
                         "finished_at": str(row.get("finished_at", ""))})
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(rows, key=lambda r: (r["finished_at"], r["stage"]))
