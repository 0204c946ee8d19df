"""Fig 5: with vs without Feature Scaling, against e at two L0 and against L0 at two values of e."""
from __future__ import annotations

import pandas as pd

from .. import results
from . import draw, style

METRICS = [("mse_heldout", "MSE"), ("loss_recovered_zero_heldout", "loss recovered")]


def _pair(ax, plain, scaled, x, metric, paper_rows=None):
    """The with / without lines of one panel (and the paper's, in the paper profile)."""
    for rows, key in [(scaled, "with"), (plain, "without")]:
        s = style.FEATURE_SCALING[key]
        draw.line(ax, results.aggregate(rows, x, metric), x, key, color=s["color"], linestyle=s["linestyle"],
                  marker=s["marker"])
    for key, p in (paper_rows or {}).items():
        draw.line(ax, results.aggregate(p, x, metric), x, key, color=style.FEATURE_SCALING[key]["color"], paper=True)


def plot(ctx: results.Context, l0_targets=(2, 32), e_targets=(8, 16)):
    fig, axes = draw.figure(2, 4, width=3.5, height=3.0)
    plain, N = results.sweep_rows(ctx.metrics, "none")
    scaled, _ = results.sweep_rows(ctx.metrics, "mean")
    if plain.empty and scaled.empty:
        for ax in axes.flat:
            draw.placeholder(ax, "No Scale SAE with / without Feature Scaling in results/metrics.csv.")
        return fig
    both = pd.concat([plain, scaled])
    l0s = results.pick_l0(both["k"], l0_targets)
    es = results.pick_l0(both["active_experts"], e_targets)
    paper = ctx.paper

    def paper_at(col, value):
        if paper is None:
            return None
        sel = (paper["num_experts"] == 64) & (paper[col] == value)
        return {"with": paper[sel & (paper["feature_scaling"] == "mean")],
                "without": paper[sel & (paper["feature_scaling"] == "none")]}

    for row, (metric, ylabel) in enumerate(METRICS):
        for col in range(4):
            ax = axes[row, col]
            if col < 2:
                if col >= len(l0s):
                    draw.placeholder(ax, "Only one L0 value in this run.")
                    continue
                target, used = l0s[col]
                _pair(ax, plain[plain["k"] == used], scaled[scaled["k"] == used], "active_experts", metric,
                      paper_at("k", target))
                draw.log2_axis(ax, both["active_experts"])
                ax.set_xlabel("active experts e")
                ax.set_title(results.l0_label(target, used))
            else:
                if col - 2 >= len(es):
                    draw.placeholder(ax, "Only one value of e in this run.")
                    continue
                target, used = es[col - 2]
                _pair(ax, plain[plain["active_experts"] == used], scaled[scaled["active_experts"] == used], "k", metric,
                      paper_at("active_experts", target))
                draw.log2_axis(ax, both["k"])
                ax.set_xlabel("L0")
                ax.set_title(f"e = {used}" if used == target else f"e = {used} (paper: {target})")
            if col == 0:
                ax.set_ylabel(ylabel)
    absent = [what for what, rows in [("with Feature Scaling", scaled), ("without Feature Scaling", plain)] if rows.empty]
    if absent:
        draw.note(axes[0, 0], "absent: runs " + ", ".join(absent), loc="upper left")
    draw.legend_outside(fig, axes, title=f"Feature Scaling\nN = {int(N)}")
    draw.footnote(fig, results.seeds_note(both))
    fig.tight_layout()
    return fig
