"""Fig 3: reconstruction and loss recovered against L0 (a–c) and auto-interp accuracy (d).

The series are the configurations of :func:`moesae.results.main_comparison` (the paper's Scale
(N, e), Switch, TopK, the other baselines and the extensions), one colour and marker each, with
one legend for the whole figure. Panel (d) is split: MoE SAEs and dense SAEs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import results
from . import draw, style

PANELS = [("mse_heldout", "MSE", "(a) MSE · training domain (held-out)"),
          ("mse_cross", "MSE", "(b) MSE · cross-domain"),
          ("loss_recovered_zero_cross", "loss recovered", "(c) loss recovered · cross-domain")]


def plot(ctx: results.Context):
    fig, axes = draw.figure(2, 3, width=4.6, height=3.6)
    df = results.main_comparison(ctx.metrics)
    series = results.series_rows(df)
    order = results.configurations(df)
    absent = results.absent(df)
    paper = results.paper_series(ctx.paper, series)
    for ax, (metric, ylabel, title) in zip(axes[0], PANELS):
        xs = []
        for label, r in series:
            s = draw.style_of(ctx, label)
            agg = results.aggregate(r, "x_l0", metric)
            draw.line(ax, agg, "x_l0", label, color=s["color"], marker=s["marker"])
            xs += list(agg["x_l0"])
        for label, p in paper:
            draw.line(ax, results.aggregate(p, "x_l0", metric), "x_l0", label, color=draw.style_of(ctx, label)["color"],
                      paper=True)
        if not xs:
            draw.placeholder(ax, f"No values for {metric} in results/metrics.csv.")
            continue
        draw.log2_axis(ax, df["k"].dropna())
        ax.set_xlabel("L0")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if absent:
            draw.note(ax, "absent: " + ", ".join(absent), loc="upper right" if metric.startswith("loss") else "lower left")
    scores, why = ctx.autointerp_scores()
    moe = set(df.loc[df["is_moe"], "label"])
    for ax, is_moe in zip(axes[1, :2], (True, False)):
        if scores is None:
            draw.placeholder(ax, f"(d) {why}")
            continue
        _autointerp_panel(ctx, ax, scores, df, lambda lab, is_moe=is_moe: (lab in moe) == is_moe, is_moe)
    draw.legend_outside(fig, axes[:, :], order=order, anchor_ax=axes[1, 2], title="configuration")
    draw.footnote(fig, " · ".join(t for t in (results.seeds_note(df), results.measured_l0_note(df)) if t))
    fig.tight_layout()
    return fig


def _autointerp_panel(ctx: results.Context, ax, scores: pd.DataFrame, df: pd.DataFrame, keep, is_moe: bool) -> None:
    """Fuzzing accuracy per cumulative activation quantile, one line per scored variant."""
    meta = df.drop_duplicates("variant").set_index("variant")
    scored = [v for v in scores["variant"].unique() if v in meta.index and keep(meta.loc[v, "label"])]
    kind = "MoE SAEs" if is_moe else "dense SAEs"
    if not scored:
        draw.placeholder(ax, f"(d) auto-interp · {kind}: no scored variant in results/autointerp/scores.csv.")
        return
    order = {lab: i for i, lab in enumerate(results.configurations(df))}
    scored.sort(key=lambda v: (order.get(meta.loc[v, "label"], len(order)), meta.loc[v, "k"]))
    per_label = pd.Series([meta.loc[v, "label"] for v in scored]).value_counts()
    n = len(scored)
    for i, variant in enumerate(scored):
        r = scores[scores["variant"] == variant].sort_values("pos")
        label = meta.loc[variant, "label"]
        s = draw.style_of(ctx, label)
        name = label if per_label[label] == 1 else f"{label} · L0 {int(meta.loc[variant, 'k'])}"
        err = None
        if {"ci_low", "ci_high"} <= set(r.columns):
            err = np.vstack([r["accuracy"] - r["ci_low"], r["ci_high"] - r["accuracy"]]).clip(min=0)
        dodge = (i - (n - 1) / 2) * min(0.08, 0.5 / max(n, 1))
        ax.errorbar(r["pos"] + dodge, r["accuracy"], yerr=err, marker=s["marker"], markersize=3, capsize=1.5,
                    linewidth=1.2, elinewidth=0.7, color=s["color"], label=name)
    if ctx.paper is not None:
        paper = results.paper_autointerp()
        paper = paper[paper["is_moe"] == is_moe] if not paper.empty else paper
        for label, p in results.paper_series(paper, results.series_rows(df[df["variant"].isin(scored)])):
            for acc in p["accuracy"]:
                ax.plot(range(len(acc)), acc, color=draw.style_of(ctx, label)["color"], label=f"{label} (paper)",
                        **style.PAPER)
    ks = sorted({int(meta.loc[v, "k"]) for v in scored})
    ax.set_xticks(range(len(results.AUTOINTERP_QUANTILES)))
    ax.set_xticklabels(results.AUTOINTERP_QUANTILES, fontsize=7)
    ax.set_xlabel("activation quantile (cumulative)")
    ax.set_ylabel("fuzzing accuracy")
    ax.set_title(f"(d) auto-interp · {kind} · L0 = {', '.join(map(str, ks))}")
