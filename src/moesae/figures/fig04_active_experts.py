"""Fig 4: MSE and loss recovered against L0 for e active experts out of N, without Feature Scaling."""
from __future__ import annotations

from .. import results
from . import draw

PANELS = [("mse_heldout", "MSE · training domain"), ("loss_recovered_zero_heldout", "loss recovered · training domain"),
          ("mse_cross", "MSE · cross-domain"), ("loss_recovered_zero_cross", "loss recovered · cross-domain")]


def plot(ctx: results.Context):
    fig, axes = draw.figure(2, 2, width=4.6, height=3.4)
    rows, N = results.sweep_rows(ctx.metrics, "none")
    if rows.empty:
        for ax in axes.flat:
            draw.placeholder(ax, "No Scale SAE without Feature Scaling in results/metrics.csv.")
        return fig
    series = sorted(results.series_rows(rows), key=lambda s: s[1]["active_experts"].iloc[0])
    for ax, (metric, title) in zip(axes.flat, PANELS):
        for label, r in series:
            s = draw.style_of(ctx, label)
            e = int(r["active_experts"].iloc[0])
            name = f"e = {e}: {label}"
            draw.line(ax, results.aggregate(r, "k", metric), "k", name, color=s["color"], marker=s["marker"])
            if ctx.paper is not None:
                p = ctx.paper[(ctx.paper["num_experts"] == 64) & (ctx.paper["feature_scaling"] == "none")
                              & (ctx.paper["active_experts"] == e)]
                draw.line(ax, results.aggregate(p, "k", metric), "k", name, color=s["color"], paper=True)
        draw.log2_axis(ax, rows["k"])
        ax.set_xlabel("L0")
        ax.set_title(title)
    draw.legend_outside(fig, axes, title=f"active experts, N = {int(N)}")
    draw.footnote(fig, results.seeds_note(rows))
    fig.tight_layout()
    return fig
