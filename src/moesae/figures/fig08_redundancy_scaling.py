"""Fig 8: redundancy (max cosine > τ) against e, with vs without Feature Scaling, at two L0."""
from __future__ import annotations

import pandas as pd

from .. import results
from . import draw, style


def plot(ctx: results.Context, l0_targets=(16, 32), threshold: float = 0.8):
    metric = f"redundancy_{threshold:g}"
    plain, N = results.sweep_rows(ctx.metrics, "none")
    scaled, _ = results.sweep_rows(ctx.metrics, "mean")
    both = pd.concat([plain, scaled])
    l0s = results.pick_l0(both["k"], l0_targets) if not both.empty else []
    fig, axes = draw.figure(1, max(len(l0s), 1), width=4.6, height=3.5)
    if not l0s:
        draw.placeholder(axes[0, 0], "No Scale SAEs of the expert sweep in results/metrics.csv.")
        return fig
    for ax, (target, used) in zip(axes.flat, l0s):
        for rows, key in [(scaled, "with"), (plain, "without")]:
            s = style.FEATURE_SCALING[key]
            draw.line(ax, results.aggregate(rows[rows["k"] == used], "active_experts", metric), "active_experts", key,
                      color=s["color"], linestyle=s["linestyle"], marker=s["marker"])
        if ctx.paper is not None:
            for fsn, key in [("mean", "with"), ("none", "without")]:
                p = ctx.paper[(ctx.paper["num_experts"] == 64) & (ctx.paper["feature_scaling"] == fsn) & (ctx.paper["k"] == target)]
                draw.line(ax, results.aggregate(p, "active_experts", metric), "active_experts", key,
                          color=style.FEATURE_SCALING[key]["color"], paper=True)
        draw.log2_axis(ax, both["active_experts"])
        ax.set_xlabel("active experts e")
        ax.set_ylabel(f"redundancy (max cos > {threshold:g})")
        ax.set_title(results.l0_label(target, used))
        if scaled.empty:
            draw.note(ax, "absent: runs with Feature Scaling", loc="upper left")
    draw.legend_outside(fig, axes, title=f"Feature Scaling\nN = {int(N)}")
    fig.tight_layout()
    return fig
