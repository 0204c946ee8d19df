"""Stage ``corpus``: the text every later stage reads, as HuggingFace ``datasets`` on disk.

Four splits under ``<paths.corpus>/<split>/`` (``datasets.Dataset.save_to_disk``), each with a
``text`` column: ``train`` (the training domain), ``heldout`` (held-out text of the same domain),
``cross`` (another domain, for zero-shot evaluation only) and ``autointerp`` (text for
explain-and-score), plus ``manifest.json`` saying what was read.

Two sources, same shape ("train on one domain, evaluate zero-shot on another"):

* ``stdlib`` (default profile, no download): the Python standard library that ships with the
  interpreter. Training domain = its ``.py`` source files (code); cross-domain set = its English
  documentation (the ``pydoc_data.topics`` help pages plus docstrings of modules *not* used for
  training, so no cross text was seen in training). Split by whole files, so held-out code never
  shares a file with training code. The manifest records the file list hash and byte counts.
* ``hf`` (paper profile): OpenWebText (streamed) for train / held-out, Humanity's Last Exam
  Biology/Medicine (question + newline + rationale; a *gated* dataset) for ``cross``,
  OpenWebText2 for ``autointerp``. The held-out split is chosen by a hash of each document, so it
  does not depend on the streaming order.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .io import atomic_write_json
from .params import load_params, section_to

SPLITS = ("train", "heldout", "cross", "autointerp")
MANIFEST = "manifest.json"

# Folders of the standard library that are not "the library's code": tests, generated codec
# tables, third-party packages installed next to it, and the help text used for the cross set.
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings",
                         "pydoc_data", "__pycache__", "turtledemo"}
_MIN_DOCSTRING_CHARS = 40


@dataclass
class CorpusConfig:
    """The ``corpus`` section of params.yaml."""

    source: str = "stdlib"
    """``stdlib`` (offline, the Python standard library) or ``hf`` (HuggingFace datasets)."""
    max_train_bytes: int = 6_000_000
    """Training-domain text to keep (train split), in UTF-8 bytes."""
    max_cross_bytes: int = 1_500_000
    """Cross-domain text to keep, in UTF-8 bytes."""
    heldout_fraction: float = 0.1
    """Held-out share of the training domain (stdlib: of max_train_bytes; hf: of documents)."""
    seed: int = 0
    """Seed of the file shuffle (stdlib) / held-out hash (hf)."""
    max_doc_chars: int | None = None
    """Cut every document to this many characters (null: keep whole). Saves disk when the
    activation stage only reads each document's first context anyway."""
    # ---- hf source only ----
    train_dataset: str = "Skylion007/openwebtext"
    """HF dataset of the training domain (streamed)."""
    train_config: str | None = None
    train_split: str = "train"
    train_text_field: str = "text"
    max_train_docs: int | None = None
    """hf: stop after this many training documents (null: use max_train_bytes only)."""
    cross_dataset: str = "cais/hle"
    """Humanity's Last Exam (gated: accept its terms on huggingface.co and `huggingface-cli login`)."""
    cross_config: str | None = None
    cross_split: str = "test"
    cross_category: str | None = "Biology/Medicine"
    """Keep only rows whose ``category`` equals this (null: all rows)."""
    cross_fields: list[str] = field(default_factory=lambda: ["question", "rationale"])
    """Columns joined with a newline to form each cross-domain document."""
    autointerp_dataset: str | None = "Geralt-Targaryen/openwebtext2"
    """HF dataset for the auto-interp text (null: reuse the held-out split)."""
    autointerp_config: str | None = None
    autointerp_split: str = "train"
    autointerp_text_field: str = "text"
    max_autointerp_bytes: int = 50_000_000

    def __post_init__(self) -> None:
        if self.source not in {"stdlib", "hf"}:
            raise ValueError(f"'source' must be 'stdlib' or 'hf', got {self.source!r}")
        for name in ("max_train_bytes", "max_cross_bytes", "max_autointerp_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"'{name}' must be a positive integer, got {value!r}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"'heldout_fraction' must be in (0, 1), got {self.heldout_fraction!r}")
        if self.max_doc_chars is not None and self.max_doc_chars <= 0:
            raise ValueError(f"'max_doc_chars' must be positive or null, got {self.max_doc_chars!r}")
        if self.max_train_docs is not None and self.max_train_docs <= 0:
            raise ValueError(f"'max_train_docs' must be positive or null, got {self.max_train_docs!r}")
        if not self.cross_fields:
            raise ValueError("'cross_fields' must name at least one column")


# ---- writing and reading splits ----------------------------------------------------------------
def _fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()


def save_split(root: str | Path, split: str, texts: list[str], sources: list[str]) -> dict[str, Any]:
    """Write one split as a ``datasets`` folder (atomically) and return its manifest entry."""
    import datasets
    import pyarrow as pa

    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; splits are {SPLITS}")
    fingerprint = _fingerprint(texts)
    # A content-derived fingerprint (instead of a random one) keeps the files byte-identical
    # across reruns, so a second `dvc repro` sees the same outputs.
    table = pa.table({"text": pa.array(texts, pa.large_string()), "source": pa.array(sources, pa.string())})
    ds = datasets.Dataset(table, fingerprint=fingerprint[:16])
    datasets.disable_progress_bars()  # a bar per tiny split is noise in the stage log
    out = Path(root) / split
    tmp = Path(root) / f".{split}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    ds.save_to_disk(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {
        "documents": len(texts),
        "bytes": sum(len(t.encode("utf-8")) for t in texts),
        "sha256": fingerprint,
    }


def load_split(root: str | Path, split: str):
    """One corpus split as a ``datasets.Dataset`` with a ``text`` column (memory-mapped)."""
    import datasets

    path = Path(root) / split
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; splits are {', '.join(SPLITS)}")
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"corpus split {path} not found: run `moesae corpus` (dvc repro corpus) first")
    return datasets.load_from_disk(str(path))


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `moesae corpus` first")
    return json.loads(path.read_text())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)


def _cut(text: str, max_chars: int | None) -> str:
    return text if max_chars is None else text[:max_chars]


# ---- source: the Python standard library -------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_code_files(root: Path | None = None) -> list[tuple[str, int]]:
    """(path relative to the stdlib folder, size in bytes) of every eligible ``.py`` file, sorted."""
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                files.append((path.relative_to(root).as_posix(), path.stat().st_size))
    files.sort()
    if not files:
        raise RuntimeError(f"no Python source files found in the standard library folder; is this a full Python install?")
    return files


def _read_source(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def module_docstrings(source: str) -> str:
    """The module, class and function docstrings of ``source``, blank-line separated (no import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def help_topics() -> list[tuple[str, str]]:
    """(topic name, text) of the help pages Python ships for ``help('topic')``."""
    from pydoc_data.topics import topics

    return [(name, topics[name].strip()) for name in sorted(topics)]


def build_stdlib_corpus(cfg: CorpusConfig) -> tuple[dict[str, tuple[list[str], list[str]]], dict[str, Any]]:
    """Splits (texts, source names) and the reproducibility record for the stdlib source."""
    root = stdlib_root()
    files = stdlib_code_files(root)
    order = list(range(len(files)))
    random.Random(cfg.seed).shuffle(order)
    heldout_budget = max(1, int(cfg.max_train_bytes * cfg.heldout_fraction))
    buckets: dict[str, list[tuple[str, str]]] = {"heldout": [], "train": []}
    used = {"heldout": 0, "train": 0}
    unused: list[str] = []
    for i in order:
        rel, _ = files[i]
        if used["train"] >= cfg.max_train_bytes:
            unused.append(rel)  # read later, only as far as the cross-domain budget needs
            continue
        text = _read_source(root, rel)
        if text is None or not text.strip():
            continue
        bucket = "heldout" if used["heldout"] < heldout_budget else "train"
        used[bucket] += len(text.encode("utf-8"))
        buckets[bucket].append((rel, text))
    if not buckets["train"] or not buckets["heldout"]:
        raise RuntimeError("the standard library has too little source for a train and a held-out split")
    # Cross-domain: the help topics, then docstrings of modules never shown in training (in the
    # same seeded order), until the byte budget is met.
    kept: list[tuple[str, str]] = []
    total = 0

    def keep(name: str, text: str) -> bool:
        nonlocal total
        if total >= cfg.max_cross_bytes:
            return False
        kept.append((name, text))
        total += len(text.encode("utf-8"))
        return True

    for name, text in help_topics():
        if text and not keep(f"pydoc_data.topics:{name}", text):
            break
    for rel in unused:
        if total >= cfg.max_cross_bytes:
            break
        source = _read_source(root, rel)
        doc = module_docstrings(source) if source else ""
        if doc:
            keep(f"docstrings:{rel}", doc)
    splits = {}
    for split, items in (("train", buckets["train"]), ("heldout", buckets["heldout"]), ("cross", kept)):
        splits[split] = ([_cut(t, cfg.max_doc_chars) for _, t in items], [n for n, _ in items])
    splits["autointerp"] = splits["heldout"]
    listing = "\n".join(f"{rel}\t{size}" for rel, size in files)
    record = {
        "python_version": sys.version.split()[0],
        "stdlib_files": len(files),
        "stdlib_bytes": sum(size for _, size in files),
        "stdlib_file_list_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "excluded_dirs": sorted(_STDLIB_EXCLUDED_DIRS),
        "help_topics": len(help_topics()),
    }
    return splits, record


# ---- source: HuggingFace datasets (paper profile) ----------------------------------------------
_OFFLINE_HINT = (
    "This needs network access to the HuggingFace Hub (unset HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) "
    "or the dataset already in the local HF cache; offline, use the default profile "
    "(`moesae profile default`)."
)


def _open_hf(name: str, config: str | None, split: str, streaming: bool, gated: bool = False):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as exc:  # the HF stack raises many types; all mean "could not get it"
        gated_hint = (
            f" '{name}' is a gated dataset: accept its terms on https://huggingface.co/datasets/{name} "
            "and log in (`huggingface-cli login` or HF_TOKEN) first." if gated else ""
        )
        raise RuntimeError(
            f"could not load the HuggingFace dataset '{name}' (split '{split}'): {type(exc).__name__}: {exc}."
            f"{gated_hint} {_OFFLINE_HINT}"
        ) from exc


def _is_heldout(text: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _take_text(rows: Iterable[dict], field_: str, max_bytes: int, max_docs: int | None, max_chars: int | None) -> list[str]:
    out, total = [], 0
    for row in rows:
        text = row.get(field_)
        if not isinstance(text, str) or not text.strip():
            continue
        text = _cut(text, max_chars)
        out.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes or (max_docs is not None and len(out) >= max_docs):
            break
    return out


def build_hf_corpus(cfg: CorpusConfig) -> tuple[dict[str, tuple[list[str], list[str]]], dict[str, Any]]:
    from tqdm.auto import tqdm

    stream = _open_hf(cfg.train_dataset, cfg.train_config, cfg.train_split, streaming=True)
    train, heldout = [], []
    train_bytes = 0
    bar = tqdm(desc="corpus: training domain", unit="B", unit_scale=True, total=cfg.max_train_bytes)
    for row in stream:
        text = row.get(cfg.train_text_field)
        if not isinstance(text, str) or not text.strip():
            continue
        text = _cut(text, cfg.max_doc_chars)
        if _is_heldout(text, cfg.seed, cfg.heldout_fraction):
            heldout.append(text)
            continue
        train.append(text)
        size = len(text.encode("utf-8"))
        train_bytes += size
        bar.update(size)
        if train_bytes >= cfg.max_train_bytes or (cfg.max_train_docs is not None and len(train) >= cfg.max_train_docs):
            break
    bar.close()
    if not train or not heldout:
        raise RuntimeError(f"'{cfg.train_dataset}' gave no usable documents in column '{cfg.train_text_field}'")
    rows = _open_hf(cfg.cross_dataset, cfg.cross_config, cfg.cross_split, streaming=False, gated=True)
    cross = []
    for row in rows:
        if cfg.cross_category is not None and row.get("category") != cfg.cross_category:
            continue
        parts = [str(row.get(f) or "").strip() for f in cfg.cross_fields]
        text = "\n".join(p for p in parts if p)
        if text:
            cross.append(_cut(text, cfg.max_doc_chars))
    if not cross:
        raise RuntimeError(
            f"no rows of '{cfg.cross_dataset}' have category {cfg.cross_category!r}; check 'corpus.cross_category'"
        )
    kept, total = [], 0
    for text in cross:
        if total >= cfg.max_cross_bytes:
            break
        kept.append(text)
        total += len(text.encode("utf-8"))
    if cfg.autointerp_dataset:
        auto_rows = _open_hf(cfg.autointerp_dataset, cfg.autointerp_config, cfg.autointerp_split, streaming=True)
        autointerp = _take_text(auto_rows, cfg.autointerp_text_field, cfg.max_autointerp_bytes, None, cfg.max_doc_chars)
        auto_name = cfg.autointerp_dataset
    else:
        autointerp, auto_name = heldout, cfg.train_dataset
    splits = {
        "train": (train, [cfg.train_dataset] * len(train)),
        "heldout": (heldout, [cfg.train_dataset] * len(heldout)),
        "cross": (kept, [cfg.cross_dataset] * len(kept)),
        "autointerp": (autointerp, [auto_name] * len(autointerp)),
    }
    record = {"datasets": {"train": cfg.train_dataset, "cross": cfg.cross_dataset, "autointerp": auto_name}}
    return splits, record


# ---- the stage -----------------------------------------------------------------------------------
def build_corpus(cfg: CorpusConfig, out_dir: str | Path) -> dict[str, Any]:
    """Build every split into ``out_dir`` and write ``manifest.json``; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits, record = build_stdlib_corpus(cfg) if cfg.source == "stdlib" else build_hf_corpus(cfg)
    manifest: dict[str, Any] = {"source": cfg.source, "config": asdict(cfg), **record, "splits": {}}
    for split in SPLITS:
        texts, sources = splits[split]
        if not texts:
            raise RuntimeError(f"corpus split '{split}' came out empty; raise the byte limits in the 'corpus' section")
        manifest["splits"][split] = save_split(out, split, texts, sources)
    _write_json(out / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    from .timing import record

    parser = argparse.ArgumentParser(prog="moesae corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = section_to(CorpusConfig, params.get("corpus"), "corpus")
    out = Path((params.get("paths") or {}).get("corpus", "data/corpus"))
    with record("corpus"):
        manifest = build_corpus(cfg, out)
    for split, entry in manifest["splits"].items():
        print(f"[corpus] {split:<10} {entry['documents']:>7} documents  {entry['bytes'] / 1e6:8.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
