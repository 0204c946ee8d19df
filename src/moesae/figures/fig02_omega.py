"""Fig 2: mean ω against the number of active experts e, one line per L0 (Feature Scaling on)."""
from __future__ import annotations

from .. import results
from . import draw, style


def plot(ctx: results.Context):
    """Mean ω vs e at the N of the expert sweep, with (mean) Feature Scaling; one line per L0."""
    fig, axes = draw.figure(1, 1, width=5.5, height=3.8)
    ax = axes[0, 0]
    rows, N = results.sweep_rows(ctx.metrics, "mean")
    if "omega_mean" not in rows or rows["omega_mean"].notna().sum() == 0:
        draw.placeholder(ax, "No ω values: no Scale SAE with Feature Scaling in results/metrics.csv (column omega_mean).")
        return fig
    agg = results.aggregate(rows, "active_experts", "omega_mean", by=["k"])
    l0s = style.l0_styles(ctx.metrics["k"])
    for k in sorted(agg["k"].unique()):
        s = l0s[float(k)]
        draw.line(ax, agg[agg["k"] == k], "active_experts", f"L0 = {int(k)}", color=s["color"], marker=s["marker"])
        if ctx.paper is not None:
            p = ctx.paper[(ctx.paper["num_experts"] == 64) & (ctx.paper["feature_scaling"] == "mean") & (ctx.paper["k"] == k)]
            draw.line(ax, results.aggregate(p, "active_experts", "omega_mean"), "active_experts", f"L0 = {int(k)}",
                      color=s["color"], paper=True)
    draw.log2_axis(ax, agg["active_experts"])
    ax.set_xlabel("active experts e")
    ax.set_ylabel("mean ω (raw)")
    ax.set_title(f"N = {int(N)}, Feature Scaling (mean) · {results.seeds_note(rows)}")
    draw.legend_outside(fig, axes, title="L0")
    fig.tight_layout()
    return fig
