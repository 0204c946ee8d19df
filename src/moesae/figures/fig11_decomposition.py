"""Fig 11: MSE against L0 for the Feature Scaling decompositions (mean, identity, learned, none)."""
from __future__ import annotations

from .. import results
from . import draw

DECOMPOSITIONS = [("mean", "mean-based (paper)"), ("identity", "identity-based"), ("learned", "learned-based"),
                  ("none", "no Feature Scaling")]


def plot(ctx: results.Context, e_target: int = 8):
    df = ctx.metrics
    scale = df[(df["architecture"] == "scale") & df["feature_scaling"].isin(["identity", "learned"])]
    fig, axes = draw.figure(1, 1, width=5.5, height=3.8)
    ax = axes[0, 0]
    if scale.empty:
        draw.placeholder(ax, "No identity- or learned-decomposition runs in results/metrics.csv.")
        return fig
    N = scale["num_experts"].mode().iloc[0]
    e = scale["active_experts"].mode().iloc[0]
    same = df[(df["architecture"] == "scale") & (df["num_experts"] == N) & (df["active_experts"] == e)]
    absent, xs = [], []
    for fs, description in DECOMPOSITIONS:
        rows = results.main_family(same[same["feature_scaling"] == fs])
        if rows.empty:
            absent.append(description)
            continue
        label = rows["label"].iloc[0]
        s = draw.style_of(ctx, label)
        agg = results.aggregate(rows, "k", "mse_heldout")
        draw.line(ax, agg, "k", f"{description}: {label}", color=s["color"], marker=s["marker"],
                  linestyle="--" if fs == "none" else "-")
        xs += list(agg["k"])
        if ctx.paper is not None:
            p = ctx.paper[(ctx.paper["num_experts"] == 64) & (ctx.paper["active_experts"] == e_target)
                          & (ctx.paper["feature_scaling"] == fs)]
            draw.line(ax, results.aggregate(p, "k", "mse_heldout"), "k", f"{description}: {label}", color=s["color"],
                      paper=True)
    draw.log2_axis(ax, xs)
    ax.set_xlabel("L0")
    ax.set_ylabel("MSE · training domain")
    ax.set_title(f"N = {int(N)}, e = {int(e)} · {results.seeds_note(same)}")
    if absent:
        draw.note(ax, "absent: " + ", ".join(absent))
    draw.legend_outside(fig, axes, title="low-frequency decomposition")
    fig.tight_layout()
    return fig
