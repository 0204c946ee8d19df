"""Atomic writes: every artifact is written to a temporary name in its folder and renamed, so an
interrupted stage never leaves a half-written file behind. Files are world-readable (0644) so
other users of a shared server can read the results and models."""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FILE_MODE = 0o644


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path`` (mode 0644).

    Use it for writers that take a file name (``safetensors.save_file``, ``fig.savefig``, numpy).
    The suffix is kept, so libraries that choose a format by suffix see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path).with_suffix(".tmp" + path.suffix)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, sort_keys: bool = False,
                      default: Callable[[Any], Any] | None = None) -> Path:
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)
    return atomic_write_text(path, text + "\n")
