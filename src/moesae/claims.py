"""The paper's headline claims, computed from a metrics table: does each one hold in this run?

Each claim is a pure function of a metrics DataFrame (the columns of ``results/metrics.csv``)
returning a :class:`Finding` (the number, whether the claim holds, and how it was computed).
The *same* function computes the paper's number from the paper's reported values
(:func:`moesae.results.paper_frame`), so the claims table never holds a typed-in number.
:func:`claims_table` returns one row per claim:
``{claim, paper_value, our_value, spread, seed_values, verdict, holds, note}`` (+ ``unit``,
``paper_note``, ``source``).

**Judged against the noise.** Each claim is computed on all seeds together (``our_value``, the
figures' mean over seeds) and on each seed alone (``seed_values``); ``spread`` is the sample
standard deviation of the per-seed values. The verdict (:data:`VERDICT_RULE`):

- *holds*: the claim holds on every seed and the mean clears the claim's threshold by more than
  the spread;
- *does not hold*: it fails on every seed and the mean misses the threshold by more than the spread;
- *inconclusive*: anything in between: seeds disagree, or the effect is within the seed-to-seed
  spread (also with a single seed, where no spread can be measured);
- *not computable*: the run lacks the configurations (the note says what it would take).

``holds`` is True / False for the first two verdicts and None otherwise.

Series are found by configuration (architecture, N, e, Feature Scaling, width), as in the figures;
when an extension family (another router, a shared expert, batch TopK…, run at one L0) matches the
same identity columns, the grid family it extends is used (:func:`moesae.results.main_family`).
Where the paper's L0 is not in our grid, the nearest available L0 is used and the note says so.
What each claim computes: docs/method.md, "Paper headline claims".
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .results import main_family, main_family_per, prepare, select, sweep_experts

SCALE_MAIN = {"architecture": "scale", "num_experts": 32, "active_experts": 4, "feature_scaling": "mean"}
SCALE_SERIES = [
    {"architecture": "scale", "num_experts": 16, "active_experts": 2, "feature_scaling": "mean"},
    SCALE_MAIN,
    {"architecture": "scale", "num_experts": 64, "active_experts": 8, "feature_scaling": "mean"},
]
SWITCH = {"architecture": "switch"}
TOPK_FLOP_MATCHED = {"architecture": "topk", "width_fraction": 1 / 32}


VERDICT_RULE = (
    "holds: the claim holds on every seed and the mean clears its threshold by more than the seed-to-seed "
    "standard deviation; does not hold: it fails on every seed and misses by more than that; inconclusive: "
    "otherwise (seeds disagree, the effect is within the spread, or only one seed was run)."
)


@dataclass
class Finding:
    """One claim evaluated on one metrics table."""

    value: float | None
    """The headline number (None: not computable from this table)."""
    holds: bool | None
    note: str
    threshold: float | None = None
    """The value the headline number must exceed for the claim to hold."""


def _by_k(rows: pd.DataFrame, metric: str) -> pd.Series:
    """Mean over seeds of ``metric`` per k (NaNs dropped)."""
    if rows.empty or metric not in rows:
        return pd.Series(dtype=float)
    vals = pd.to_numeric(rows[metric], errors="coerce")
    return vals.groupby(rows["k"]).mean().dropna().sort_index()


def _low_l0(ks, max_l0: int) -> tuple[list, str]:
    """The L0 values ≤ max_l0, or the smallest one available (and a note saying so)."""
    ks = sorted(ks)
    low = [k for k in ks if k <= max_l0]
    if low:
        return low, ""
    return ks[:1], f" (no L0 ≤ {max_l0} in this run: nearest L0 = {int(ks[0])} used)" if ks else ""


def _fmt_ks(ks) -> str:
    return "{" + ", ".join(str(int(k)) for k in ks) + "}"


def _switch_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    rows = select(df, SWITCH)
    if rows["num_experts"].nunique() > 1:  # several Switch widths: compare with the one matching Scale's N
        same_n = rows[rows["num_experts"] == SCALE_MAIN["num_experts"]]
        rows = same_n if not same_n.empty else rows[rows["num_experts"] == rows["num_experts"].min()]
    return main_family(rows), ""


def _sweep(df: pd.DataFrame) -> tuple[pd.DataFrame, float | None]:
    """The Scale SAEs of the expert sweep, one family per (e, Feature Scaling)."""
    N = sweep_experts(df)
    rows = df[(df["architecture"] == "scale") & (df["num_experts"] == N)]
    return main_family_per(rows, ["active_experts", "feature_scaling"]), N


# ---- the claims ---------------------------------------------------------------------------------------
def mse_reduction_vs_switch(df: pd.DataFrame, split: str = "heldout", scale_config: dict | None = None) -> Finding:
    """Mean over shared L0 values of 1 − MSE_Scale(32,4) / MSE_Switch, in percent (paper: 24% on OWT)."""
    df = prepare(df)
    scale = _by_k(main_family(select(df, scale_config or SCALE_MAIN)), f"mse_{split}")
    switch_rows, _ = _switch_rows(df)
    switch = _by_k(switch_rows, f"mse_{split}")
    if scale.empty or switch.empty:
        missing = "Scale (N=32, e=4, mean scaling)" if scale.empty else "Switch SAE"
        return Finding(None, None, f"not computable: no {missing} rows with mse_{split}")
    ks = scale.index.intersection(switch.index)
    if len(ks) == 0:
        return Finding(None, None, "not computable: Scale and Switch share no L0 value")
    per_k = (1 - scale[ks] / switch[ks]) * 100
    value = float(per_k.mean())
    detail = ", ".join(f"L0 {int(k)}: {v:.1f}%" for k, v in per_k.items())
    return Finding(value, value > 0, f"mean over L0 ∈ {_fmt_ks(ks)} ({detail}); holds when Scale's MSE is lower on average", 0.0)


def redundancy_reduction(df: pd.DataFrame, max_l0: int = 4, e_low: int = 1, e_high: int = 8,
                         threshold: float = 0.8, holds_at: float = 90.0) -> Finding:
    """1 − redundancy(e=8) / redundancy(e=1), no Feature Scaling, low L0, in percent (paper: ~99%)."""
    df = prepare(df)
    metric = f"redundancy_{threshold:g}"
    sweep, N = _sweep(df)
    plain = sweep[sweep["feature_scaling"] == "none"]
    low = _by_k(plain[plain["active_experts"] == e_low], metric)
    high = _by_k(plain[plain["active_experts"] == e_high], metric)
    if low.empty or high.empty:
        return Finding(None, None, f"not computable: need Scale SAEs without Feature Scaling at e = {e_low} and e = {e_high}")
    ks, nearest = _low_l0(low.index.intersection(high.index), max_l0)
    ks = [k for k in ks if low[k] > 0]
    if not ks:
        return Finding(None, None, f"not computable: redundancy at e = {e_low} is 0 at low L0 (nothing to reduce)")
    per_k = (1 - high[ks] / low[ks]) * 100
    value = float(per_k.mean())
    detail = ", ".join(f"L0 {int(k)}: {low[k]:.3g} → {high[k]:.3g}" for k in ks)
    return Finding(value, value >= holds_at,
                   f"N = {int(N)}, τ = {threshold:g}, e = {e_low} → {e_high} ({detail}){nearest}; holds at ≥ {holds_at:g}% less",
                   holds_at)


def _spearman(x: pd.Series, y: pd.Series) -> float:
    rx, ry = x.rank(), y.rank()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def omega_grows_with_e(df: pd.DataFrame, holds_at: float = 0.5) -> Finding:
    """Mean over L0 of the Spearman correlation between e and mean ω (paper: 1.0, monotone)."""
    df = prepare(df)
    sweep, N = _sweep(df)
    rows = sweep[sweep["feature_scaling"] == "mean"]
    if "omega_mean" not in rows:
        return Finding(None, None, "not computable: no omega_mean column")
    rows = rows.assign(omega_mean=pd.to_numeric(rows["omega_mean"], errors="coerce")).dropna(subset=["omega_mean"])
    rhos = {}
    for k, r in rows.groupby("k"):
        per_e = r.groupby("active_experts")["omega_mean"].mean()
        if len(per_e) >= 3:
            rho = _spearman(pd.Series(per_e.index, dtype=float), pd.Series(per_e.values))
            if rho == rho:
                rhos[k] = rho
    if not rhos:
        return Finding(None, None, "not computable: need ω for at least 3 values of e at one L0 (Feature Scaling on)")
    value = float(np.mean(list(rhos.values())))
    detail = ", ".join(f"L0 {int(k)}: {v:.2f}" for k, v in sorted(rhos.items()))
    return Finding(value, value >= holds_at, f"Spearman ρ(e, mean ω), N = {int(N)} ({detail}); holds at mean ρ ≥ {holds_at:g}",
                   holds_at)


def topk_ahead_cross_loss_recovered(df: pd.DataFrame, max_l0: int = 4) -> Finding:
    """TopK (M/32) minus the best Scale series, cross-domain loss recovered, at L0 ≤ 4 (paper: +0.0095)."""
    df = prepare(df)
    metric = "loss_recovered_zero_cross"
    topk = _by_k(main_family(select(df, TOPK_FLOP_MATCHED)), metric)
    scales = [s for s in (_by_k(main_family(select(df, m)), metric) for m in SCALE_SERIES) if not s.empty]
    if topk.empty or not scales:
        missing = "TopK at width M/32" if topk.empty else "Scale (N, e) series"
        return Finding(None, None, f"not computable: no {missing} with {metric}")
    best = pd.concat(scales, axis=1).max(axis=1)
    ks, nearest = _low_l0(topk.index.intersection(best.index), max_l0)
    if not ks:
        return Finding(None, None, "not computable: TopK and Scale share no L0 value")
    margin = topk[ks] - best[ks]
    value = float(margin.mean())
    detail = ", ".join(f"L0 {int(k)}: {topk[k]:.3f} vs {best[k]:.3f}" for k in ks)
    return Finding(value, value > 0, f"TopK minus best Scale ({detail}){nearest}; holds when positive", 0.0)


def feature_scaling_overlap_by_e(df: pd.DataFrame) -> Finding:
    """Less activation overlap with Feature Scaling for e ≥ 2 but not e = 1 (paper's Fig 10).

    Improvement = (overlap_plain − overlap_scaled) / overlap_plain, in percent, averaged over L0;
    the value is the mean over e ≥ 2; holds when that is positive and e = 1's is not.
    """
    df = prepare(df)
    rows, N = _sweep(df)
    per_e = {}
    for e, r in rows.groupby("active_experts"):
        plain = _by_k(r[r["feature_scaling"] == "none"], "activation_overlap")
        scaled = _by_k(r[r["feature_scaling"] == "mean"], "activation_overlap")
        ks = [k for k in plain.index.intersection(scaled.index) if plain[k] > 0]
        if ks:
            per_e[int(e)] = float(((plain[ks] - scaled[ks]) / plain[ks] * 100).mean())
    multi = [v for e, v in per_e.items() if e >= 2]
    if 1 not in per_e or not multi:
        return Finding(None, None, "not computable: need activation overlap with and without Feature Scaling at e = 1 and some e ≥ 2")
    value = float(np.mean(multi))
    detail = ", ".join(f"e={e}: {v:+.1f}%" for e, v in sorted(per_e.items()))
    return Finding(value, value > 0 and per_e[1] <= 0,
                   f"% less overlap with scaling, mean over L0 ({detail}); value = mean over e ≥ 2", 0.0)


def feature_scaling_mse(df: pd.DataFrame) -> Finding:
    """Mean over e and L0 of 1 − MSE_scaled / MSE_plain, in percent (paper's Fig 5: positive)."""
    df = prepare(df)
    rows, N = _sweep(df)
    gains = []
    for e, r in rows.groupby("active_experts"):
        plain = _by_k(r[r["feature_scaling"] == "none"], "mse_heldout")
        scaled = _by_k(r[r["feature_scaling"] == "mean"], "mse_heldout")
        ks = plain.index.intersection(scaled.index)
        gains += list((1 - scaled[ks] / plain[ks]) * 100)
    if not gains:
        return Finding(None, None, "not computable: need Scale SAEs with and without Feature Scaling at the same e and L0")
    value = float(np.mean(gains))
    return Finding(value, value > 0, f"mean over {len(gains)} (e, L0) pairs, N = {int(N)}; holds when positive", 0.0)


@dataclass(frozen=True)
class Claim:
    claim: str
    unit: str
    source: str
    compute: Callable[[pd.DataFrame], Finding]


CLAIMS: list[Claim] = [
    Claim("Scale SAE has ~24% lower MSE than Switch SAE at equal L0 (training domain)", "%", "Fig 3a",
          lambda df: mse_reduction_vs_switch(df, "heldout")),
    Claim("…and lower MSE than Switch SAE on the cross-domain set", "%", "Fig 3b",
          lambda df: mse_reduction_vs_switch(df, "cross")),
    Claim("~99% less feature redundancy at low L0 (e = 8 vs e = 1, no scaling); the revised abstract "
          "(OpenReview, Feb 2026) no longer states this figure", "%", "Fig 7", redundancy_reduction),
    Claim("Feature Scaling ω grows with the number of active experts e", "ρ", "Fig 2", omega_grows_with_e),
    Claim("TopK is ahead of Scale SAE on cross-domain loss recovered at L0 ≤ 4", "Δ", "Fig 3c",
          topk_ahead_cross_loss_recovered),
    Claim("Feature Scaling helps for e ≥ 2 but not for e = 1 (activation overlap)", "%", "Fig 10",
          feature_scaling_overlap_by_e),
    Claim("Feature Scaling lowers MSE (N = 64)", "%", "Fig 5", feature_scaling_mse),
]


def verdict(finding: Finding, per_seed: list[Finding]) -> tuple[str, float | None]:
    """The verdict of one claim and the seed-to-seed spread (see :data:`VERDICT_RULE`)."""
    if finding.value is None or finding.holds is None:
        return "not computable", None
    values = [f.value for f in per_seed if f.value is not None and f.holds is not None]
    spread = float(np.std(values, ddof=1)) if len(values) >= 2 else None
    if spread is None:
        return "inconclusive", None
    margin = finding.value - finding.threshold if finding.threshold is not None else None
    every = [f.holds for f in per_seed if f.value is not None and f.holds is not None]
    if all(every) and finding.holds and (margin is None or margin > spread):
        return "holds", spread
    if not any(every) and not finding.holds and (margin is None or -margin > spread):
        return "does not hold", spread
    return "inconclusive", spread


def _per_seed(metrics: pd.DataFrame, compute: Callable[[pd.DataFrame], Finding]) -> list[tuple[int, Finding]]:
    if "seed" not in metrics or metrics.empty:
        return []
    seeds = sorted(pd.to_numeric(metrics["seed"], errors="coerce").dropna().astype(int).unique())
    return [(int(s), compute(metrics[pd.to_numeric(metrics["seed"], errors="coerce") == s])) for s in seeds]


def claims_table(metrics: pd.DataFrame, paper: pd.DataFrame | None = None) -> list[dict]:
    """One row per claim: the paper's number (from ``paper``), ours (mean ± spread over seeds) and the verdict."""
    rows = []
    for c in CLAIMS:
        ours = c.compute(metrics)
        per_seed = _per_seed(metrics, c.compute)
        judged, spread = verdict(ours, [f for _, f in per_seed])
        theirs = c.compute(paper) if paper is not None else Finding(None, None, "")
        rows.append({"claim": c.claim, "paper_value": theirs.value, "our_value": ours.value, "spread": spread,
                     "seed_values": {s: f.value for s, f in per_seed if f.value is not None},
                     "verdict": judged, "holds": {"holds": True, "does not hold": False}.get(judged),
                     "note": ours.note, "paper_note": theirs.note, "unit": c.unit, "source": c.source})
    return rows


def format_value(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "–"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "Δ":
        return f"{value:+.4f}"
    return f"{value:.2f}"
