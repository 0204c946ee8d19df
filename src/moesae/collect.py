"""The ``collect`` stage: every variant's evaluation → the study's tables and DVC's views.

Reads ``results/eval/<family>/<variant>.json`` (written by :mod:`moesae.evaluate`) for the
variants the grid declares (:func:`moesae.grid.study_variants`) and writes:

- ``results/metrics.csv``: one row per variant, every scalar metric (the table figures read);
- ``results/tables/{specialisation,experts}.csv``: per-expert arrays (Fig 2, 6);
- ``results/metrics.json``: the DVC metrics, the study's *headline* numbers only: each claim's
  value (:mod:`moesae.claims`) and a few per-family summaries, so that ``dvc metrics show``,
  ``dvc metrics diff`` and ``dvc exp show`` compare experiments on what matters;
- ``results/plots/*.csv``: DVC plots (``dvc plots show``), one column per Fig 3 family against L0.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from .evaluate import EVAL_SUBDIR, RESULTS_DIR, SPLITS, _json_safe
from .io import atomic_path, atomic_write_json
from .params import load_params

# metrics.csv column order (the contract the figures and the report read); extra scalars follow.
IDENTITY_COLUMNS = [
    "variant", "family", "architecture", "label", "l0_is_set", "active_width", "d_in", "num_latents",
    "num_experts", "active_experts", "feature_scaling", "gate", "k", "seed",
]
COST_COLUMNS = ["params", "flops_per_token", "train_tokens_per_s"]
SPLIT_COLUMNS = [
    "mse", "fvu", "l0", "loss_recovered_zero", "loss_recovered_zero_{}_std", "loss_recovered_mean",
    "loss_recovered_mean_{}_std", "ce_clean", "ce_recon", "ce_zero", "ce_mean",
]
ARRAY_KEYS = ("omega", "expert_usage", "specialisation_cdf", "feature_density_hist", "feature_density_bin_edges")

# DVC views: families summarised in metrics.json and drawn in results/plots (Fig 3's series; a
# profile that lacks one leaves its entries out / its column empty).
HEADLINE_FAMILIES = ["scale_n16_e2", "scale_n32_e4", "scale_n64_e8_mean", "switch_n32", "scale_n64_e1_plain",
                     "topk_m32th", "topk_m8th"]
PLOT_METRICS = {"mse_heldout": "mse_heldout_vs_l0.csv", "loss_recovered_zero_cross": "loss_recovered_cross_vs_l0.csv",
                "redundancy_0.8": "redundancy_vs_l0.csv"}
PLOTS_SUBDIR = "plots"


def _scalar_columns(rows: list[dict[str, Any]]) -> list[str]:
    split_cols = [c.format(s) if "{}" in c else f"{c}_{s}" for s in SPLITS for c in SPLIT_COLUMNS]
    fixed = IDENTITY_COLUMNS + COST_COLUMNS + split_cols + ["dead_fraction"]
    seen = set(fixed)
    extra = []
    for row in rows:
        for key, value in row.items():
            if key not in seen and key not in ARRAY_KEYS and not isinstance(value, (list, dict)):
                seen.add(key)
                extra.append(key)
    redundancy = sorted(c for c in extra if c.startswith("redundancy_")) + [c for c in ("mean_max_cos",) if c in seen]
    expert = [c for c in extra if c.startswith(("in_expert_redundancy_", "inter_expert_redundancy_"))]
    omega = [c for c in ("omega_mean", "activation_overlap") if c in seen]
    ordered = fixed + redundancy + expert + omega
    return ordered + [c for c in extra if c not in ordered]


def collect(results_dir: str | Path = RESULTS_DIR, params_path: str | Path | None = "params.yaml") -> dict[str, Path]:
    """Gather ``eval/*.json`` into metrics.csv, metrics.json and the figure tables.

    With a params file, only the variants its grid declares are collected (stale files of removed variants
    are ignored) and missing ones are reported by name; without one, every JSON found is used.
    """
    import pandas as pd

    results_dir = Path(results_dir)
    eval_dir = results_dir / EVAL_SUBDIR
    wanted: list[str] | None = None
    if params_path is not None and Path(params_path).is_file():
        from .grid import study_variants

        wanted = list(study_variants(load_params(params_path))) or None
    files = sorted(eval_dir.rglob("*.json")) if eval_dir.is_dir() else []
    found = {p.stem: p for p in files}
    names = [n for n in wanted if n in found] if wanted is not None else sorted(found)
    missing = [n for n in wanted if n not in found] if wanted is not None else []
    if missing:
        print(f"[collect] warning: no evaluation for {len(missing)} variant(s): {', '.join(missing)} "
              "(run `moesae evaluate --variant NAME`); collecting the others")
    if not names:
        raise FileNotFoundError(f"no evaluation results in {eval_dir}; run `moesae evaluate --variant NAME` first")
    rows = []
    for name in names:
        try:
            row = json.loads(found[name].read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"corrupt evaluation file {found[name]}: {exc}; re-run `moesae evaluate --variant {name}`") from exc
        row["variant"] = name
        rows.append(row)

    columns = _scalar_columns(rows)
    frame = pd.DataFrame([{c: (math.nan if row.get(c) is None else row.get(c)) for c in columns} for row in rows], columns=columns)
    out = {}
    out["metrics.csv"] = _write_frame(frame, results_dir / "metrics.csv")
    out["metrics.json"] = atomic_write_json(results_dir / "metrics.json", _json_safe(headline_metrics(frame)))
    out.update(write_plots(frame, results_dir / PLOTS_SUBDIR))

    tables = results_dir / "tables"
    spec = [{"variant": r["variant"], "rank": i + 1, "cumulative_share": v}
            for r in rows for i, v in enumerate(r.get("specialisation_cdf") or [])]
    out["specialisation.csv"] = _write_frame(pd.DataFrame(spec, columns=["variant", "rank", "cumulative_share"]), tables / "specialisation.csv")
    experts = []
    for r in rows:
        usage, omega = r.get("expert_usage") or [], r.get("omega") or []
        for i in range(max(len(usage), len(omega))):
            experts.append({"variant": r["variant"], "expert": i,
                            "usage": usage[i] if i < len(usage) else math.nan,
                            "omega": omega[i] if i < len(omega) else math.nan})
    out["experts.csv"] = _write_frame(pd.DataFrame(experts, columns=["variant", "expert", "usage", "omega"]), tables / "experts.csv")
    return out


def _write_frame(frame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def headline_metrics(frame) -> dict[str, Any]:
    """The DVC metrics: each claim's value, keyed by the figure it comes from, and per-family
    summaries (mean over L0 values and seeds) of the Fig 3 families."""
    from .claims import claims_table

    claims = {}
    for row in claims_table(frame):
        key = _slug(row["source"])
        claims[key] = row["our_value"]
    families: dict[str, dict[str, float]] = {}
    for family in HEADLINE_FAMILIES:
        rows = frame[frame["family"] == family]
        if rows.empty:
            continue
        families[family] = {
            metric: float(rows[metric].astype(float).mean())
            for metric in ("mse_heldout", "mse_cross", "loss_recovered_zero_cross", "dead_fraction")
            if metric in rows
        }
    return {"claims": claims, "families": families, "variants": int(len(frame))}


def write_plots(frame, folder: Path) -> dict[str, Path]:
    """One CSV per plotted metric: column ``l0`` plus one column per headline family (mean over seeds)."""
    import pandas as pd

    out = {}
    rows = frame[frame["family"].isin(HEADLINE_FAMILIES)]
    for metric, name in PLOT_METRICS.items():
        if metric in rows and not rows.empty:
            wide = rows.pivot_table(index="k", columns="family", values=metric, aggfunc="mean")
        else:
            wide = pd.DataFrame(index=pd.Index(sorted(frame["k"].unique()), name="k"))
        wide = wide.reindex(columns=HEADLINE_FAMILIES)
        wide.index.name = "l0"
        out[name] = _write_frame(wide.reset_index(), folder / name)
    return out




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae collect", description="Collect results/eval/*.json into results/metrics.csv")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--results", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    from .timing import record

    with record("collect"):
        written = collect(args.results, args.params)
    for name, path in written.items():
        print(f"[collect] wrote {path}")
    return 0
