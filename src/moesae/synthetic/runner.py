"""The ``moesae synthetic`` stage: train every family of ``synthetic.families`` on ground-truth data
and score how well it recovers the true features (see docs/method.md, "Ground-truth recovery").

**Training** every architecture family in ``synthetic.families`` (a grid like ``grid.families``,
any registry name) at each L0 = k in ``synthetic.l0``, one pass per seed through
:func:`moesae.training.train_saes` (all SAEs of a seed see the same batches). The seed changes the
true dictionary, the data stream and the SAE initialisation, so the spread over seeds covers all
three.

**Matched L0** compares families at the same k. **Matched active compute** compares families
computing the same number of encoder rows per token (``active_width``, an architecture fact: M for
a dense SAE, m = M/N for Switch, e·M/N for Scale). So TopK at width e·M/N is the compute-matched
baseline of Scale (N, e) (router N·d aside), and TopK at M/N that of Switch N. Both columns
(``active_width``, ``flops_per_token``) are in the table; ``summary.json`` lists every multi-expert
family beside the dense families of the same active width.

**Metrics**: :mod:`moesae.synthetic.recovery`, on a held-out batch of ``eval_tokens`` tokens with
their true codes, plus ``l0`` and ``fvu`` for context. ``chance`` in ``summary.json`` holds the
same metrics for random unit-norm decoders of each width against the same truth.

Outputs: ``results/synthetic/metrics.csv`` (one row per family × k × seed) and
``results/synthetic/summary.json`` (config, per-family facts, means and seed spread, chance levels,
the ranking), both written atomically. Finished cells are kept in ``results/synthetic/cells/``
keyed by a hash of everything that determines them (parameters, device, and the source of this
module's import closure), so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..devices import check_device, resolve_device
from ..grid import GridSpec, build_variant, expand_grid, sae_fields
from ..io import atomic_path, atomic_write_json
from ..params import ParamsError, load_params, section_to
from ..saes import describe
from ..training import TrainConfig, TrainingRun, train_saes
from ..training.fingerprint import package_imports, source_digest
from .generator import SyntheticData, SyntheticDataConfig
from .recovery import MATCHING_METHODS, chance_levels, recovery_metrics

SECTION = "synthetic"
OUTPUT_DIR = Path("results/synthetic")
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
CELLS_DIR = "cells"
RANKING_METRIC = "matched_cosine"
TABLE_METRICS = ["matched_cosine", "fraction_recovered", "mmcs_true_to_learned", "mmcs_learned_to_true",
                 "f1", "precision", "recall", "redundancy_0.9", "dead_fraction", "l0", "fvu"]
DATA_FIELDS = [f.name for f in dataclasses.fields(SyntheticDataConfig) if f.name != "seed"]


@dataclass
class SyntheticConfig:
    """The ``synthetic`` section of params.yaml. Every field the profile sets is required (the
    values live in ``profiles/default.yaml``; other profiles overlay it)."""

    families: dict[str, dict[str, Any]]
    """Family name → SAE config (``architecture`` plus fields; ``width_fraction`` scales M), as in ``grid``."""
    data: dict[str, Any]
    """Generator fields, every field of :class:`SyntheticDataConfig` but ``seed`` (from ``seeds``)."""
    num_latents: int
    """SAE width M before ``width_fraction``."""
    l0: list[int]
    """The k values every family is trained at (matched L0)."""
    seeds: list[int]
    """Seeds: each changes the true dictionary, the data stream and the SAE initialisation."""
    steps: int
    batch_size: int
    lr: float | None
    """null: the recipe's 2e-4 / sqrt(M / 2^14)."""
    dead_tokens_threshold: int
    """Training tokens without firing before AuxK treats a latent as dead."""
    eval_tokens: int
    recovery_threshold: float
    redundancy_thresholds: list[float]
    matching: str
    """auto | hungarian | greedy (see :func:`moesae.synthetic.recovery.match_features`)."""
    device: str
    """auto | cpu | cuda | cuda:<index> | mps (see :mod:`moesae.devices`)."""
    workers: int
    """CPU training processes per seed (the SAEs are split among them; results do not depend on it)."""
    threads: int
    """torch threads per training process (enters each cell's key: it can change the last bits)."""
    output_dir: str = str(OUTPUT_DIR)

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise ValueError(f"invalid field '{SECTION}.{name}': {msg}")

        if not isinstance(self.families, dict) or not self.families:
            bad("families", "list at least one family, e.g. {topk: {architecture: topk}}")
        for name, fam in self.families.items():
            if not isinstance(fam, dict) or "architecture" not in fam:
                bad(f"families.{name}", "must be a mapping with an 'architecture' key")
        if not self.l0 or any(not isinstance(k, int) or k <= 0 for k in self.l0):
            bad("l0", f"must be a non-empty list of positive integers, got {self.l0!r}")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            bad("seeds", f"must be a non-empty list of non-negative integers, got {self.seeds!r}")
        for name in ("steps", "batch_size", "eval_tokens", "dead_tokens_threshold", "num_latents", "workers", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                bad(name, f"must be a positive integer, got {value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            bad("lr", f"must be positive or null, got {self.lr!r}")
        if not 0 < self.recovery_threshold <= 1:
            bad("recovery_threshold", f"must be in (0, 1], got {self.recovery_threshold!r}")
        if any(not 0 < t <= 1 for t in self.redundancy_thresholds):
            bad("redundancy_thresholds", f"must be values in (0, 1], got {self.redundancy_thresholds!r}")
        if self.matching not in MATCHING_METHODS:
            bad("matching", f"must be auto, hungarian or greedy, got {self.matching!r}")
        try:
            check_device(self.device, f"{SECTION}.device")
        except ValueError as exc:
            bad("device", str(exc))
        if not isinstance(self.data, dict):
            bad("data", f"must be a mapping of generator fields, got {self.data!r}")
        if "seed" in self.data:
            bad("data.seed", f"set the seeds with '{SECTION}.seeds' instead")
        unknown = sorted(set(self.data) - set(DATA_FIELDS))
        if unknown:
            bad(f"data.{unknown[0]}", f"not a generator field (fields: {', '.join(DATA_FIELDS)})")
        missing = [f for f in DATA_FIELDS if f not in self.data]
        if missing:
            bad(f"data.{missing[0]}", "missing; the profile must state every generator field")
        try:
            self.data_config(0)
        except (ValueError, TypeError) as exc:
            bad("data", str(exc))

    def torch_device(self) -> torch.device:
        return resolve_device(self.device, f"{SECTION}.device")

    def data_config(self, seed: int) -> SyntheticDataConfig:
        return SyntheticDataConfig(**{**self.data, "seed": seed})


def load_config(params: dict[str, Any]) -> SyntheticConfig:
    """The ``synthetic`` section of ``params`` (every key stated, see :class:`SyntheticConfig`)."""
    section = dict(params.get(SECTION) or {})
    if not section:
        raise ParamsError(f"params.yaml has no '{SECTION}' section; see profiles/default.yaml for one")
    if "preset" in section:
        raise ParamsError(f"params.yaml: '{SECTION}.preset' is gone; a profile states the values themselves "
                          "(see profiles/paper.yaml)")
    required = [f.name for f in dataclasses.fields(SyntheticConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in section]
    if missing:
        raise ParamsError(f"params.yaml: '{SECTION}.{missing[0]}' is missing (see profiles/default.yaml)")
    return section_to(SyntheticConfig, section, SECTION)


# =============================================================================================
# Cells
# =============================================================================================
def cells(cfg: SyntheticConfig, seed: int) -> dict[str, dict[str, Any]]:
    """The variants trained at ``seed``: name → variant (as :func:`moesae.grid.expand_grid`)."""
    return expand_grid(GridSpec(num_latents=cfg.num_latents, l0=list(cfg.l0), families=cfg.families, seeds=[seed]))


def cell_file(cells_dir: Path, name: str, seed: int) -> Path:
    return cells_dir / f"{name}_s{seed}.json"


def code_files() -> list[Path]:
    """The source a cell's result depends on: this module and its import closure in the package."""
    return package_imports([Path(__file__).resolve()])


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of :func:`code_files` (computed once per process)."""
    return source_digest(code_files())


def cell_key(cfg: SyntheticConfig, variant: dict[str, Any], seed: int, device: torch.device | str) -> str:
    """Hash of everything that determines a cell's result, code included (stale cells are never reused)."""
    spec = {"code": code_fingerprint(), "variant": variant, "data": dataclasses.asdict(cfg.data_config(seed)),
            "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "dead": cfg.dead_tokens_threshold,
            "eval_tokens": cfg.eval_tokens, "recovery": cfg.recovery_threshold,
            "redundancy": list(cfg.redundancy_thresholds), "matching": cfg.matching,
            "device": torch.device(device).type, "threads": cfg.threads}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_row(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return cached["row"] if isinstance(cached, dict) and cached.get("key") == key else None


def family_facts(variants: dict[str, dict[str, Any]], d_in: int) -> dict[str, dict[str, Any]]:
    """Per family, from the registry: label, architecture, whether it is a mixture of experts."""
    facts: dict[str, dict[str, Any]] = {}
    for variant in variants.values():
        if variant["family"] in facts:
            continue
        f = describe(variant["architecture"], **{**sae_fields(variant), "d_in": d_in})
        facts[variant["family"]] = {"architecture": variant["architecture"], "base_architecture": f.base_architecture,
                                    "label": f.label, "is_moe": f.is_moe, "active_width": f.active_width}
    return facts


# =============================================================================================
# Running
# =============================================================================================
@torch.no_grad()
def evaluate_sae(sae: Any, x: Tensor, codes: Tensor, dictionary: Tensor, recovery_threshold: float,
                 redundancy_thresholds: list[float] | tuple[float, ...], matching: str) -> dict[str, float]:
    """Recovery metrics plus L0 and FVU of one trained SAE on the held-out tokens."""
    sae.eval()
    M = sae.cfg.num_latents
    active, sq_err = [], 0.0
    for xb in torch.split(x, 4096):
        out = sae(xb)
        active.append(out.active_mask(M))
        sq_err += float((xb - out.x_hat).pow(2).sum())
    latent_active = torch.cat(active)
    metrics = recovery_metrics(sae.W_dec.detach(), dictionary, latent_active, codes > 0, recovery_threshold,
                               redundancy_thresholds, matching)
    metrics["l0"] = float(latent_active.sum(1).double().mean())
    metrics["fvu"] = sq_err / float((x - x.mean(0)).pow(2).sum())
    return metrics


def cell_row(variant: dict[str, Any], seed: int, sae: Any, metrics: dict[str, float], seconds: float) -> dict[str, Any]:
    """One metrics.csv row: the configuration, its architecture facts, the metrics."""
    cls = type(sae)
    return {
        "family": variant["family"], "architecture": variant["architecture"], "k": variant["k"], "seed": seed,
        "num_latents": sae.cfg.num_latents,
        "num_experts": getattr(sae.cfg, "num_experts", math.nan),
        "active_experts": sae.active_experts_per_token() if cls.is_moe else math.nan,
        "feature_scaling": getattr(sae.cfg, "feature_scaling", ""),
        "active_width": int(cls.active_width(sae.cfg)), "flops_per_token": int(sae.flops_per_token()),
        **metrics,
        "train_seconds": seconds,
    }


def run_benchmark(cfg: SyntheticConfig, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Train and score every family × k × seed; write metrics.csv and summary.json. Resumable."""
    import pandas as pd

    out_dir = Path(cfg.output_dir)
    cells_dir = out_dir / CELLS_DIR
    rows: list[dict[str, Any]] = []
    chance: dict[str, dict[str, list[float]]] = {}
    facts: dict[str, dict[str, Any]] = {}
    start = time.time()
    device = cfg.torch_device()
    for seed in cfg.seeds:
        data_cfg = cfg.data_config(seed)
        data = SyntheticData(data_cfg, device)
        variants = cells(cfg, seed)
        for family, fact in family_facts(variants, data_cfg.d_in).items():
            facts.setdefault(family, fact)
        todo, runs = [], []
        for name, variant in variants.items():
            path = cell_file(cells_dir, name, seed)
            key = cell_key(cfg, variant, seed, device)
            cached = _cached_row(path, key)
            if cached is not None:
                rows.append(cached)
                continue
            sae = build_variant(variant, data_cfg.d_in, cfg.dead_tokens_threshold).to(device)
            train_cfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, log_every=max(1, cfg.steps // 10), checkpoint_every=0)
            runs.append(TrainingRun(name=name, sae=sae, config=train_cfg))
            todo.append((variant, path, key))
        x_eval, codes_eval = data.eval_set(cfg.eval_tokens)
        if runs:
            print(f"[synthetic] seed {seed}: training {len(runs)} SAEs for {cfg.steps} steps "
                  f"(d={data_cfg.d_in}, n={data_cfg.num_features} true features, mean L0 {data_cfg.mean_l0})")
            train_saes(runs, data.batch_fn(cfg.batch_size), progress=progress, workers=cfg.workers, threads=cfg.threads)
        for run, (variant, path, key) in zip(runs, todo):
            metrics = evaluate_sae(run.sae, x_eval, codes_eval, data.dictionary, cfg.recovery_threshold,
                                   cfg.redundancy_thresholds, cfg.matching)
            row = cell_row(variant, seed, run.sae, metrics, run.seconds)
            atomic_write_json(path, {"key": key, "row": row}, indent=1)
            rows.append(row)
        for width in sorted({r["num_latents"] for r in rows if r["seed"] == seed}):
            levels = chance_levels(data, width, codes_eval > 0, cfg.recovery_threshold, seed=seed)
            for name, value in levels.items():
                chance.setdefault(str(width), {}).setdefault(name, []).append(value)
    df = pd.DataFrame(rows).sort_values(["family", "k", "seed"]).reset_index(drop=True)
    chance_mean = {w: {k: float(np.mean(v)) for k, v in levels.items()} for w, levels in chance.items()}
    summary = summarize(df, cfg, chance_mean, facts, time.time() - start)
    with atomic_path(out_dir / METRICS_FILE) as tmp:
        df.to_csv(tmp, index=False)
    atomic_write_json(out_dir / SUMMARY_FILE, summary, indent=2, default=_json_default)
    return df, summary


# =============================================================================================
# The summary
# =============================================================================================
def summary_table(df: Any) -> Any:
    """Per family × k: mean and standard deviation over seeds of the headline metrics."""
    metrics = [m for m in TABLE_METRICS if m in df.columns]
    grouped = df.groupby(["family", "k"])
    table = grouped[metrics].agg(["mean", "std"])
    table.columns = [f"{m}_{stat}" for m, stat in table.columns]
    table["seeds"] = grouped.size()
    table["active_width"] = grouped["active_width"].first()
    return table.reset_index()


def compute_matched_pairs(df: Any, facts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every multi-expert family beside each dense family computing as many encoder rows per token."""
    widths = df.groupby("family")["active_width"].first()
    is_moe = {f: bool(facts[f]["is_moe"]) for f in widths.index}
    return [
        {"family": a, "baseline": b, "active_width": int(widths[a])}
        for a in widths.index for b in widths.index
        if a != b and widths[a] == widths[b] and is_moe[a] and not is_moe[b]
    ]


def summarize(df: Any, cfg: SyntheticConfig, chance: dict[str, dict[str, float]],
              facts: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The summary: config, the table, chance levels, and the ranking by matched cosine (at matched L0)."""
    table = summary_table(df)
    # Rank by the metric averaged over the L0 grid, over the k values every family was trained at.
    common_k = sorted(set.intersection(*[set(g["k"]) for _, g in df.groupby("family")]))
    at_common = df[df["k"].isin(common_k)]
    per_seed = at_common.groupby(["family", "seed"])[RANKING_METRIC].mean()
    ranking = per_seed.groupby("family").agg(["mean", "std"]).sort_values("mean", ascending=False)
    return {
        "ranking_metric": RANKING_METRIC,
        "ranking_k": common_k,
        "ranking": [{"family": f, "mean": float(r["mean"]), "std": float(r["std"]) if not math.isnan(r["std"]) else None}
                    for f, r in ranking.iterrows()],
        "best_family": str(ranking.index[0]),
        "compute_matched_pairs": compute_matched_pairs(df, facts),
        "families": {f: facts[f] for f in sorted(set(df["family"]))},
        "chance": chance,
        "table": table.to_dict(orient="records"),
        "config": dataclasses.asdict(cfg),
        "data": {str(s): dataclasses.asdict(cfg.data_config(s)) for s in cfg.seeds},
        "seconds": seconds,
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# =============================================================================================
# The stage
# =============================================================================================
def main(argv: list[str] | None = None) -> int:
    from ..timing import record

    parser = argparse.ArgumentParser(prog="moesae synthetic", description="Ground-truth feature-recovery benchmark")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(load_params(args.params))
    with record(SECTION):
        df, summary = run_benchmark(cfg, progress=not args.no_progress)
    print(f"[synthetic] wrote {Path(cfg.output_dir) / METRICS_FILE} ({len(df)} rows); best by "
          f"{summary['ranking_metric']}: {summary['best_family']} ({summary['ranking'][0]['mean']:.3f})")
    return 0


__all__ = [
    "CELLS_DIR", "METRICS_FILE", "OUTPUT_DIR", "RANKING_METRIC", "SUMMARY_FILE", "SyntheticConfig",
    "cell_key", "cells", "code_files", "code_fingerprint", "compute_matched_pairs", "evaluate_sae",
    "family_facts", "load_config", "main", "run_benchmark", "summarize", "summary_table",
]
