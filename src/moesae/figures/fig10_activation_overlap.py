"""Fig 10: activation overlap (e × L0) without Feature Scaling, and its % change with scaling."""
from __future__ import annotations

from .. import results
from . import draw


def plot(ctx: results.Context):
    plain, N = results.sweep_rows(ctx.metrics, "none")
    scaled, _ = results.sweep_rows(ctx.metrics, "mean")
    fig, axes = draw.figure(1, 2, width=5.2, height=3.8)
    if plain.empty or "activation_overlap" not in plain or plain["activation_overlap"].notna().sum() == 0:
        for ax in axes.flat:
            draw.placeholder(ax, "No activation-overlap values for Scale SAEs without Feature Scaling.")
        return fig
    p = draw.pivot(plain, "activation_overlap")
    draw.heatmap(axes[0, 0], p, f"activation overlap, no scaling (N = {int(N)})", ".2f", "mako_r", label="overlap")
    if scaled.empty:
        draw.placeholder(axes[0, 1], "No Scale SAEs with Feature Scaling: the change cannot be computed.")
    else:
        change = results.overlap_improvement_pct(p, draw.pivot(scaled, "activation_overlap"))
        draw.heatmap(axes[0, 1], change, "change with Feature Scaling (%)", ".1f", "vlag_r", center=0, label="% less overlap")
    fig.tight_layout()
    return fig
