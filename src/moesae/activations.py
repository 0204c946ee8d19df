"""Stage ``activations``: the subject model's residual stream at the hook, cached on disk.

Layout of ``<paths.activations>/<split>/`` (the splits named in ``max_tokens``: train / heldout /
cross, and autointerp in the paper profile):

* ``shard_00000.npy`` … — activation rows ``[rows, d_model]`` in NumPy ``.npy`` format, readable
  with ``np.load(mmap_mode="r")``. ``bfloat16`` (which NumPy lacks) is stored as its raw 16-bit
  pattern (``<i2``) and converted on read.
* ``token_ids.npy``, ``doc_index.npy``, ``position.npy``, ``sequence_index.npy`` — one int32 per
  row, aligned with the shards, so every row's context can be rebuilt (``position`` is the index
  in the model's context, 0 = BOS).
* ``manifest.json`` — model, hook, dtype, shape, token count, and per shard its rows, bytes and
  sha256. Written last: a folder without it is unfinished.

Which rows are cached: every document is tokenized and cut into contexts of ``context_length``
tokens (BOS first when the subject model prepends it); long documents are split into consecutive
contexts (``long_documents: split``) or truncated to their first context (``truncate``, what the
Switch SAE code does). Padding is never cached, and the BOS position (the same vector in every
context) is dropped by default. ``paper_faithful: true`` reproduces the Scale SAE authors' cache
instead: every document truncated to its first 20 tokens, padding positions *kept*. A split may
have its own context length (``context_length_by_split``, e.g. 256 for ``autointerp`` as in the
paper).

Bounded disk: ``max_disk_gb`` caps the whole cache. The other splits are planned first and the
train split gets the rows that still fit (recorded under ``disk_budget`` in its manifest); the
trainer's batch stream (:meth:`ActivationReader.batch_fn`) then cycles over it epoch after epoch,
still a deterministic function of the step, so an interrupted run resumes bit for bit.

Resumable: the split's work is planned up front (deterministically), each finished shard is
written atomically and recorded in ``progress.json``; a rerun keeps those shards and continues.
:class:`ActivationReader` streams shuffled batches across shards through memory maps and detects a
truncated or corrupted shard, naming it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .devices import check_device
from .io import atomic_path, atomic_write_json
from .params import load_params, section_to

FORMAT = "moesae-activations/1"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
META_ARRAYS = ("token_ids", "doc_index", "position", "sequence_index")
DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16),
          "bfloat16": (torch.bfloat16, np.int16)}
PAPER_FAITHFUL_CONTEXT = 20
DEFAULT_SPLITS = ("train", "heldout", "cross")


class ShardError(RuntimeError):
    """A cached shard is missing, truncated or corrupted; the message names it and the fix."""


@dataclass
class ActivationsConfig:
    """The ``activations`` section of params.yaml."""

    context_length: int = 128
    """Tokens per context (BOS included)."""
    paper_faithful: bool = False
    """Reproduce the authors' cache: documents truncated to their first 20 tokens, padding kept."""
    dtype: str = "float32"
    """On-disk dtype: float32, float16 or bfloat16."""
    shard_tokens: int = 262_144
    """Rows per shard (a shard closes at the first context boundary past this)."""
    max_tokens: dict[str, int | None] = field(
        default_factory=lambda: {"train": 1_500_000, "heldout": 131_072, "cross": 131_072})
    """Rows to cache per split (null: the whole split). Its keys are the splits cached."""
    batch_size: int = 64
    """Contexts per forward pass."""
    long_documents: str = "split"
    """``split``: cut long documents into consecutive contexts; ``truncate``: first context only."""
    exclude_bos: bool = True
    """Drop the BOS position (identical in every context, and an outlier in norm)."""
    device: str = "auto"
    threads: int | None = None
    """torch CPU threads (null: torch's default)."""
    context_length_by_split: dict[str, int] = field(default_factory=dict)
    """Per-split context length overriding ``context_length`` (e.g. ``{autointerp: 256}``: the paper's
    auto-interp contexts); BOS included. Ignored with ``paper_faithful``."""
    max_disk_gb: float | None = None
    """Disk budget of the whole cache (GB = 1e9 bytes; shards + row metadata). The train split is
    capped so that every split fits; training then cycles over it (epochs). Null: no cap."""

    def __post_init__(self) -> None:
        from .corpus import SPLITS

        if not isinstance(self.context_length, int) or self.context_length < 2:
            raise ValueError(f"'context_length' must be an integer >= 2, got {self.context_length!r}")
        if not isinstance(self.context_length_by_split, dict):
            raise ValueError(f"'context_length_by_split' must map split names to context lengths, "
                             f"got {self.context_length_by_split!r}")
        for split, value in self.context_length_by_split.items():
            if split not in SPLITS:
                raise ValueError(f"'context_length_by_split.{split}': unknown split (splits are {', '.join(SPLITS)})")
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ValueError(f"'context_length_by_split.{split}' must be an integer >= 2, got {value!r}")
        if self.max_disk_gb is not None and (isinstance(self.max_disk_gb, bool)
                                             or not isinstance(self.max_disk_gb, (int, float)) or self.max_disk_gb <= 0):
            raise ValueError(f"'max_disk_gb' must be a positive number of GB or null, got {self.max_disk_gb!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"'dtype' must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("shard_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"'{name}' must be a positive integer, got {value!r}")
        if not isinstance(self.max_tokens, dict) or not self.max_tokens:
            raise ValueError(f"'max_tokens' must map split names to token counts, got {self.max_tokens!r}")
        for split, value in self.max_tokens.items():
            if split not in SPLITS:
                raise ValueError(f"'max_tokens.{split}': unknown split (splits are {', '.join(SPLITS)})")
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"'max_tokens.{split}' must be a positive integer or null, got {value!r}")
        if self.long_documents not in {"split", "truncate"}:
            raise ValueError(f"'long_documents' must be 'split' or 'truncate', got {self.long_documents!r}")
        check_device(self.device)

    # The settings actually used, after paper_faithful overrides.
    @property
    def effective_context_length(self) -> int:
        return PAPER_FAITHFUL_CONTEXT if self.paper_faithful else self.context_length

    def context_for(self, split: str | None) -> int:
        """The context length of ``split`` (BOS included), after paper_faithful overrides."""
        if self.paper_faithful:
            return PAPER_FAITHFUL_CONTEXT
        return int(self.context_length_by_split.get(split, self.context_length)) if split else self.context_length

    @property
    def effective_long_documents(self) -> str:
        return "truncate" if self.paper_faithful else self.long_documents

    @property
    def keep_padding(self) -> bool:
        return self.paper_faithful

    @property
    def effective_exclude_bos(self) -> bool:
        return False if self.paper_faithful else self.exclude_bos


# ---- planning: which contexts and rows go into which shard ------------------------------------
@dataclass
class SplitPlan:
    """Every context of a split and the rows it contributes, fixed before any model call."""

    tokens: np.ndarray  # int32 [S, T], padded with the pad id
    lengths: np.ndarray  # int32 [S], valid tokens per context
    doc_index: np.ndarray  # int32 [S]
    row_start: np.ndarray  # int32 [S], first cached position
    row_end: np.ndarray  # int32 [S], one past the last cached position
    shard_bounds: list[tuple[int, int]]  # contexts [a, b) of each shard

    @property
    def rows(self) -> np.ndarray:
        return (self.row_end - self.row_start).astype(np.int64)

    def shard_rows(self, i: int) -> int:
        a, b = self.shard_bounds[i]
        return int(self.rows[a:b].sum())

    def fingerprint(self, extra: dict[str, Any]) -> str:
        h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
        for arr in (self.tokens, self.lengths, self.doc_index, self.row_start, self.row_end):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(json.dumps(self.shard_bounds).encode())
        return h.hexdigest()

    def meta_arrays(self) -> dict[str, np.ndarray]:
        """token_ids / doc_index / position / sequence_index, one entry per cached row."""
        seq = np.repeat(np.arange(len(self.lengths), dtype=np.int64), self.rows)
        first = np.repeat(np.cumsum(self.rows) - self.rows, self.rows)
        position = (np.arange(len(seq), dtype=np.int64) - first + self.row_start[seq]).astype(np.int32)
        return {
            "token_ids": self.tokens[seq, position].astype(np.int32),
            "doc_index": self.doc_index[seq].astype(np.int32),
            "position": position,
            "sequence_index": seq.astype(np.int32),
        }


def plan_split(sm, texts: Sequence[str], cfg: ActivationsConfig, max_tokens: int | None,
               chunk_docs: int = 512, split: str | None = None) -> SplitPlan:
    """Tokenize documents (in order, stopping once ``max_tokens`` rows are planned) into contexts
    of ``split``'s context length."""
    T = cfg.context_for(split)
    split_long = cfg.effective_long_documents == "split"
    skip_bos = int(cfg.effective_exclude_bos and sm.prepend_bos)
    seqs, docs, starts, ends = [], [], [], []
    total = 0
    for lo in range(0, len(texts), chunk_docs):
        token_lists = sm.tokenize(texts[lo:lo + chunk_docs])
        for doc, _, ids in sm.windows(token_lists, T, split_long=split_long):
            end = T if cfg.keep_padding else len(ids)
            if end - skip_bos <= 0:
                continue
            if max_tokens is not None and total + end - skip_bos > max_tokens:
                end = skip_bos + (max_tokens - total)  # the last context is cut to hit the budget
            seqs.append(ids)
            docs.append(lo + doc)
            starts.append(skip_bos)
            ends.append(end)
            total += end - skip_bos
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    if not seqs:
        raise RuntimeError("no tokens to cache: the corpus split is empty")
    tokens = np.full((len(seqs), T), sm.pad_token_id, dtype=np.int32)
    lengths = np.zeros(len(seqs), dtype=np.int32)
    for i, ids in enumerate(seqs):
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
    row_start, row_end = np.array(starts, np.int32), np.array(ends, np.int32)
    rows = row_end - row_start
    bounds, a, acc = [], 0, 0
    for i, r in enumerate(rows):
        acc += int(r)
        if acc >= cfg.shard_tokens:
            bounds.append((a, i + 1))
            a, acc = i + 1, 0
    if a < len(rows):
        bounds.append((a, len(rows)))
    return SplitPlan(tokens, lengths, np.array(docs, np.int32), row_start, row_end, bounds)


# ---- writing ------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


@torch.no_grad()
def _shard_activations(sm, plan: SplitPlan, i: int, cfg: ActivationsConfig, bar) -> np.ndarray:
    torch_dtype, _ = DTYPES[cfg.dtype]
    a, b = plan.shard_bounds[i]
    parts = []
    for lo in range(a, b, cfg.batch_size):
        hi = min(lo + cfg.batch_size, b)
        width = plan.tokens.shape[1] if cfg.keep_padding else int(plan.lengths[lo:hi].max())
        tokens = torch.from_numpy(plan.tokens[lo:hi, :width].astype(np.int64))
        mask = torch.arange(width)[None, :] < torch.from_numpy(plan.lengths[lo:hi].astype(np.int64))[:, None]
        acts = sm.hook_activations(tokens, mask).float().cpu()
        for j in range(hi - lo):
            s, e = int(plan.row_start[lo + j]), int(plan.row_end[lo + j])
            parts.append(acts[j, s:e])
        bar.update(int(plan.rows[lo:hi].sum()))
    out = torch.cat(parts).to(torch_dtype)
    if cfg.dtype == "bfloat16":
        return out.view(torch.int16).numpy()
    return out.numpy()


def _model_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("subject.json", "config.json", "tokenizer.json", "model.safetensors"):
        path = model_dir / name
        if path.is_file():
            h.update(name.encode())
            h.update(_sha256(path).encode())
    return h.hexdigest()


def cache_split(sm, texts: Sequence[str], out_dir: str | Path, cfg: ActivationsConfig, split: str,
                model_fingerprint: str = "", progress: bool = True,
                stop_after_shards: int | None = None, plan: SplitPlan | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cache one split into ``out_dir`` (resuming finished shards); returns its manifest.

    ``plan``: the split's plan when already made (default: plan ``max_tokens[split]`` rows);
    ``extra``: entries added to the manifest (not to its fingerprint; e.g. the disk budget).
    ``stop_after_shards`` stops after writing that many shards in this call (to test resuming)."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plan is None:
        plan = plan_split(sm, texts, cfg, cfg.max_tokens.get(split), split=split)
    extra = dict(extra or {})
    settings = {
        "format": FORMAT, "split": split, "model": sm.name, "model_fingerprint": model_fingerprint,
        "hook": sm.hook_name, "hook_layer": sm.hook_layer, "d_model": sm.d_model, "dtype": cfg.dtype,
        "context_length": cfg.context_for(split), "long_documents": cfg.effective_long_documents,
        "paper_faithful": cfg.paper_faithful, "prepend_bos": sm.prepend_bos,
        "exclude_bos": cfg.effective_exclude_bos, "keep_padding": cfg.keep_padding,
        "shard_tokens": cfg.shard_tokens,
    }
    fingerprint = plan.fingerprint(settings)
    manifest_path, progress_path = out / MANIFEST, out / PROGRESS
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == fingerprint and _shards_intact(out, old["shards"]):
            if any(old.get(k) != v for k, v in extra.items()):  # same rows, new bookkeeping (e.g. budget)
                old.update(extra)
                _write_json(manifest_path, old)
            return old  # already complete and unchanged
    done: dict[str, dict[str, Any]] = {}
    if progress_path.is_file():
        state = json.loads(progress_path.read_text())
        if state.get("fingerprint") == fingerprint:
            done = {name: entry for name, entry in state["shards"].items()
                    if (out / name).is_file() and (out / name).stat().st_size == entry["bytes"]}
    if not done:  # a fresh start: clear whatever an older configuration left behind
        for path in list(out.glob("shard_*.npy")) + list(out.glob(".*.tmp*")) + [manifest_path]:
            path.unlink(missing_ok=True)
    manifest_path.unlink(missing_ok=True)
    total_rows = int(plan.rows.sum())
    _check_disk(out, total_rows * sm.d_model * np.dtype(DTYPES[cfg.dtype][1]).itemsize, split)
    for name, array in plan.meta_arrays().items():
        _save_npy(out / f"{name}.npy", array)
    initial = sum(plan.shard_rows(i) for i in range(len(plan.shard_bounds)) if shard_name(i) in done)
    bar = tqdm(total=total_rows, initial=initial, desc=f"activations [{split}]", unit="tok", unit_scale=True,
               disable=not progress)
    written = 0
    for i in range(len(plan.shard_bounds)):
        name = shard_name(i)
        if name in done:
            continue
        array = _shard_activations(sm, plan, i, cfg, bar)
        _save_npy(out / name, array)
        done[name] = {"rows": int(array.shape[0]), "bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}
        _write_json(progress_path, {"fingerprint": fingerprint, "shards": done})
        written += 1
        if stop_after_shards is not None and written >= stop_after_shards and i + 1 < len(plan.shard_bounds):
            bar.close()
            return {"interrupted": True, "shards_done": len(done)}
    bar.close()
    shards, first = [], 0
    for i in range(len(plan.shard_bounds)):
        entry = done[shard_name(i)]
        shards.append({"file": shard_name(i), "first_row": first, **entry})
        first += entry["rows"]
    manifest = {
        **settings, "fingerprint": fingerprint, "shape": [total_rows, sm.d_model], "num_tokens": total_rows,
        "num_sequences": int(len(plan.lengths)), "num_documents": int(len(np.unique(plan.doc_index))),
        "metadata": {name: f"{name}.npy" for name in META_ARRAYS}, "shards": shards, **extra,
    }
    _write_json(manifest_path, manifest)
    progress_path.unlink(missing_ok=True)
    return manifest


def _shards_intact(out: Path, shards: list[dict[str, Any]]) -> bool:
    return all((out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s["bytes"] for s in shards)


def _check_disk(out: Path, need_bytes: int, split: str) -> None:
    free = shutil.disk_usage(out).free
    if need_bytes > free:
        raise RuntimeError(
            f"the '{split}' activation cache needs {need_bytes / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free "
            f"under {out}; lower 'activations.max_tokens.{split}', use dtype bfloat16, or free disk space"
        )


def disk_bytes(num_tokens: int, d_model: int, dtype: str) -> int:
    """On-disk size of a cache (shards + 4 int32 metadata arrays), for planning."""
    return num_tokens * (d_model * np.dtype(DTYPES[dtype][1]).itemsize + 4 * len(META_ARRAYS))


GB = 1e9


def train_budget(cfg: ActivationsConfig, d_model: int, other_tokens: dict[str, int]) -> dict[str, Any] | None:
    """How the disk budget (``max_disk_gb``) caps the train split, given the rows of the other
    splits; None when there is no budget (or no train split).

    Returns ``max_disk_gb``, ``other_splits_bytes``, ``requested_tokens`` (``max_tokens.train``),
    ``cap_tokens`` (what fits beside the other splits) and ``train_max_tokens`` (the rows to plan)."""
    if cfg.max_disk_gb is None or "train" not in cfg.max_tokens:
        return None
    other = sum(disk_bytes(int(n), d_model, cfg.dtype) for split, n in other_tokens.items() if split != "train")
    budget = int(cfg.max_disk_gb * GB)
    cap = (budget - other) // disk_bytes(1, d_model, cfg.dtype)
    if cap <= 0:
        raise ValueError(
            f"'activations.max_disk_gb' ({cfg.max_disk_gb} GB) leaves no room for the train split: the other splits "
            f"({', '.join(s for s in other_tokens if s != 'train')}) alone need {other / GB:.1f} GB; raise "
            "'activations.max_disk_gb' or lower their 'activations.max_tokens'"
        )
    requested = cfg.max_tokens["train"]
    return {"max_disk_gb": cfg.max_disk_gb, "other_splits_bytes": int(other), "requested_tokens": requested,
            "cap_tokens": int(cap), "train_max_tokens": int(cap if requested is None else min(requested, cap)),
            "capped": bool(requested is None or cap < requested)}


def planned_epochs(tokens_trained: int, cache_tokens: int) -> float:
    """Passes over a cache of ``cache_tokens`` rows that training on ``tokens_trained`` tokens makes."""
    return tokens_trained / cache_tokens if cache_tokens else math.inf


# ---- reading ------------------------------------------------------------------------------------
class ActivationReader:
    """One cached split: memory-mapped shards, shuffled or in-order batches, row metadata.

    A shard whose size differs from the manifest (truncated) is reported when the reader opens;
    one whose bytes changed (corrupted) is reported the first time it is read (``verify=True``
    checks each shard's sha256 once, on first use)."""

    CHUNK_ROWS = 1024  # contiguous rows kept together by the shuffle (read locality)
    GROUP_CHUNKS = 1024  # chunks shuffled together: rows are fully mixed within ~1M-row windows

    def __init__(self, split_dir: str | Path, verify: bool = True) -> None:
        self.dir = Path(split_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            hint = " (an interrupted run: rerun it to resume)" if (self.dir / PROGRESS).is_file() else ""
            raise FileNotFoundError(f"no activation cache at {self.dir}: {MANIFEST} missing{hint}; run `moesae activations`")
        self.manifest: dict[str, Any] = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ShardError(f"{path} has format {self.manifest.get('format')!r}, expected {FORMAT!r}; rerun `moesae activations`")
        self.d_model: int = int(self.manifest["d_model"])
        self.num_tokens: int = int(self.manifest["num_tokens"])
        self.dtype: str = self.manifest["dtype"]
        self.verify = verify
        self._shards = self.manifest["shards"]
        self._offsets = np.array([s["first_row"] for s in self._shards] + [self.num_tokens], dtype=np.int64)
        for s in self._shards:
            file = self.dir / s["file"]
            if not file.is_file():
                raise ShardError(f"activation shard {file} is missing; delete {self.dir} and rerun `moesae activations`")
            size = file.stat().st_size
            if size != s["bytes"]:
                raise ShardError(
                    f"activation shard {file} is truncated or altered ({size} bytes, manifest says {s['bytes']}); "
                    f"delete {self.dir} and rerun `moesae activations`"
                )
        self._maps: dict[int, np.ndarray] = {}
        self._meta: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_tokens

    def epochs(self, tokens_trained: int) -> float:
        """Passes over this cache that training on ``tokens_trained`` tokens makes (a capped cache
        is cycled: :meth:`batch_fn` continues epoch after epoch)."""
        return planned_epochs(tokens_trained, self.num_tokens)

    def __repr__(self) -> str:
        return f"ActivationReader({self.dir}, tokens={self.num_tokens}, d_model={self.d_model}, dtype={self.dtype})"

    # ---- shards ----
    def _shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            s = self._shards[i]
            file = self.dir / s["file"]
            if self.verify and _sha256(file) != s["sha256"]:
                raise ShardError(f"activation shard {file} is corrupted (sha256 mismatch); "
                                 f"delete {self.dir} and rerun `moesae activations`")
            try:
                arr = np.load(file, mmap_mode="r")
            except (ValueError, OSError) as exc:
                raise ShardError(f"activation shard {file} is unreadable ({exc}); delete {self.dir} and rerun") from exc
            if arr.shape != (s["rows"], self.d_model):
                raise ShardError(f"activation shard {file} has shape {arr.shape}, expected {(s['rows'], self.d_model)}")
            self._maps[i] = arr
        return self._maps[i]

    def _to_tensor(self, array: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.float()

    def rows(self, indices: np.ndarray | Sequence[int]) -> Tensor:
        """Activation rows at global ``indices`` (any order) as float32 [len, d]."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_tokens):
            raise IndexError(f"row index out of range [0, {self.num_tokens})")
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        shard_of = np.searchsorted(self._offsets, sorted_idx, side="right") - 1
        out = np.empty((idx.size, self.d_model), dtype=DTYPES[self.dtype][1])
        for shard in np.unique(shard_of):
            sel = shard_of == shard
            out[order[sel]] = self._shard(int(shard))[sorted_idx[sel] - self._offsets[shard]]
        return self._to_tensor(out)

    def slice(self, start: int, stop: int) -> Tensor:
        """Contiguous rows [start, stop) as float32."""
        stop = min(stop, self.num_tokens)
        parts = []
        i = int(np.searchsorted(self._offsets, start, side="right") - 1)
        while start < stop:
            a, b = self._offsets[i], self._offsets[i + 1]
            take = min(stop, b)
            parts.append(self._shard(i)[start - a: take - a])
            start, i = take, i + 1
        if not parts:
            return torch.empty(0, self.d_model)
        return self._to_tensor(np.concatenate(parts))

    # ---- batches ----
    def iter_batches(self, batch_size: int, max_tokens: int | None = None) -> Iterator[Tensor]:
        """Batches in cache order (the last one may be smaller)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        end = self.num_tokens if max_tokens is None else min(max_tokens, self.num_tokens)
        for start in range(0, end, batch_size):
            yield self.slice(start, min(start + batch_size, end))

    def batch_index_fn(self, batch_size: int, seed: int = 0) -> Callable[[int], np.ndarray]:
        """``step -> row indices`` of a shuffled stream: epoch after epoch, each a permutation of
        every cached row, cut into consecutive batches (a batch may straddle two epochs).

        The permutation keeps CHUNK_ROWS-row blocks together across the cache and shuffles rows
        fully within windows of GROUP_CHUNKS blocks, so a batch reads a bounded region of disk."""
        N = self.num_tokens
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"invalid train config field 'batch_size': must be a positive integer, got {batch_size!r}")
        chunk, group = self.CHUNK_ROWS, self.GROUP_CHUNKS
        n_chunks = math.ceil(N / chunk)
        layouts: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        groups: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

        def layout(epoch: int) -> tuple[np.ndarray, np.ndarray]:
            if epoch not in layouts:
                order = np.random.default_rng([seed, epoch]).permutation(n_chunks)
                sizes = np.minimum(chunk, N - order * chunk)
                group_sizes = np.add.reduceat(sizes, np.arange(0, n_chunks, group))
                layouts[epoch] = (order, np.concatenate([[0], np.cumsum(group_sizes)]))
                while len(layouts) > 2:
                    layouts.popitem(last=False)
            return layouts[epoch]

        def group_rows(epoch: int, g: int) -> np.ndarray:
            key = (epoch, g)
            if key not in groups:
                order, _ = layout(epoch)
                chunks = order[g * group:(g + 1) * group]
                rows = np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, N)) for c in chunks])
                groups[key] = np.random.default_rng([seed, epoch, g + 1]).permutation(rows)
                while len(groups) > 3:
                    groups.popitem(last=False)
            return groups[key]

        def indices(step: int) -> np.ndarray:
            if step < 0:
                raise ValueError(f"step must be >= 0, got {step}")
            pos, out, need = step * batch_size, [], batch_size
            while need:
                epoch, within = divmod(pos, N)
                _, starts = layout(epoch)
                g = int(np.searchsorted(starts, within, side="right") - 1)
                rows = group_rows(epoch, g)
                a = within - int(starts[g])
                take = min(need, len(rows) - a)
                out.append(rows[a:a + take])
                pos, need = pos + take, need - take
            return np.concatenate(out)

        return indices

    def batch_fn(self, batch_size: int, seed: int = 0) -> Callable[[int], Tensor]:
        """``batch_at(step) -> FloatTensor[batch_size, d]``, deterministic per step (resumable
        training), every cached row exactly once per epoch, read through memory maps."""
        indices = self.batch_index_fn(batch_size, seed)
        return lambda step: self.rows(indices(step))

    # ---- row metadata ----
    def _meta_array(self, name: str) -> np.ndarray:
        if name not in self._meta:
            path = self.dir / f"{name}.npy"
            if not path.is_file():
                raise ShardError(f"{path} is missing; delete {self.dir} and rerun `moesae activations`")
            arr = np.load(path, mmap_mode="r")
            if arr.shape != (self.num_tokens,):
                raise ShardError(f"{path} has {arr.shape[0]} rows, the cache has {self.num_tokens}; rerun `moesae activations`")
            self._meta[name] = arr
        return self._meta[name]

    @property
    def token_ids(self) -> np.ndarray:
        return self._meta_array("token_ids")

    @property
    def doc_index(self) -> np.ndarray:
        return self._meta_array("doc_index")

    @property
    def position(self) -> np.ndarray:
        return self._meta_array("position")

    @property
    def sequence_index(self) -> np.ndarray:
        return self._meta_array("sequence_index")


class _Texts:
    """The ``text`` column of a Dataset, sliced on demand (a paper-size split stays on disk)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: slice) -> list[str]:
        return self.dataset[item]["text"]


# ---- the stage ------------------------------------------------------------------------------------
def build_activations(cfg: ActivationsConfig, corpus_root: str | Path, model_dir: str | Path, out_root: str | Path,
                      progress: bool = True) -> dict[str, dict[str, Any]]:
    from .corpus import load_split
    from .devices import resolve_device
    from .subject_model import load_subject_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = Path(model_dir)
    sm = load_subject_model(model_dir, device=str(resolve_device(cfg.device, "activations.device")))
    for split in cfg.max_tokens:
        if sm.max_positions is not None and cfg.context_for(split) > sm.max_positions:
            key = f"context_length_by_split.{split}" if split in cfg.context_length_by_split else "context_length"
            raise ValueError(f"'activations.{key}' {cfg.context_for(split)} exceeds the subject model's "
                             f"{sm.max_positions} positions")
    fingerprint = _model_fingerprint(model_dir)
    texts = {split: _Texts(load_split(corpus_root, split)) for split in cfg.max_tokens}
    plans: dict[str, SplitPlan] = {}
    extras: dict[str, dict[str, Any]] = {}
    if cfg.max_disk_gb is not None and "train" in cfg.max_tokens:
        # The other splits first: the train split gets what the budget leaves.
        for split in cfg.max_tokens:
            if split != "train":
                plans[split] = plan_split(sm, texts[split], cfg, cfg.max_tokens[split], split=split)
        budget = train_budget(cfg, sm.d_model, {s: int(plan.rows.sum()) for s, plan in plans.items()})
        assert budget is not None
        plans["train"] = plan_split(sm, texts["train"], cfg, budget["train_max_tokens"], split="train")
        budget["train_tokens"] = int(plans["train"].rows.sum())
        budget["planned_bytes"] = budget["other_splits_bytes"] + disk_bytes(budget["train_tokens"], sm.d_model, cfg.dtype)
        extras["train"] = {"disk_budget": budget}
        if budget["capped"] and budget["train_tokens"] == budget["train_max_tokens"]:
            want = "the whole split" if budget["requested_tokens"] is None else f"{budget['requested_tokens']:,} tokens"
            print(f"[activations] disk budget {cfg.max_disk_gb:g} GB: train split capped at {budget['train_tokens']:,} "
                  f"tokens (of {want}); training cycles over it", flush=True)
    manifests = {}
    for split in cfg.max_tokens:
        manifests[split] = cache_split(sm, texts[split], Path(out_root) / split, cfg, split, fingerprint,
                                       progress=progress, plan=plans.get(split), extra=extras.get(split))
    return manifests


def main(argv: list[str] | None = None) -> int:
    from .timing import record

    parser = argparse.ArgumentParser(prog="moesae activations", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = section_to(ActivationsConfig, params.get("activations"), "activations")
    paths = params.get("paths") or {}
    with record("activations"):
        manifests = build_activations(cfg, paths.get("corpus", "data/corpus"), paths.get("subject_model", "models/subject"),
                                      paths.get("activations", "data/activations"), progress=not args.no_progress)
    for split, m in manifests.items():
        print(f"[activations] {split:<10} {m['num_tokens']:>10} tokens × {m['d_model']} ({m['dtype']}), "
              f"context {m['context_length']}, {len(m['shards'])} shards, hook {m['hook']}")
    budget = manifests.get("train", {}).get("disk_budget")
    if budget:
        print(f"[activations] disk budget {budget['max_disk_gb']:g} GB: the cache takes "
              f"{budget['planned_bytes'] / GB:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
