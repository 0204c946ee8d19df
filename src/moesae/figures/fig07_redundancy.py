"""Fig 7: feature redundancy (max cosine > τ) without Feature Scaling, e × L0 heatmap."""
from __future__ import annotations

from .. import results
from . import draw


def plot(ctx: results.Context, threshold: float = 0.8):
    metric = f"redundancy_{threshold:g}"
    rows, N = results.sweep_rows(ctx.metrics, "none")
    fig, axes = draw.figure(1, 1, width=5.5, height=3.8)
    if rows.empty or metric not in rows or rows[metric].notna().sum() == 0:
        draw.placeholder(axes[0, 0], f"No {metric} values for Scale SAEs without Feature Scaling.")
        return fig
    draw.heatmap(axes[0, 0], draw.pivot(rows, metric), f"redundancy (max cos > {threshold:g}), N = {int(N)}, no scaling",
                 ".2g", "rocket_r", label="fraction of features")
    return fig
