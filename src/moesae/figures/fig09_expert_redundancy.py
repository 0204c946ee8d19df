"""Fig 9: redundancy within each expert against random equal-size subsets of the dictionary, vs e."""
from __future__ import annotations

from .. import results
from . import draw, style


def plot(ctx: results.Context, threshold: float = 0.8):
    inner, inter = f"in_expert_redundancy_{threshold:g}", f"inter_expert_redundancy_{threshold:g}"
    fig, axes = draw.figure(1, 2, width=4.6, height=3.5, sharey=True)
    l0s = style.l0_styles(ctx.metrics["k"])
    drawn_ks: set[float] = set()
    for ax, (scaling, title) in zip(axes.flat, [("none", "without Feature Scaling"), ("mean", "with Feature Scaling")]):
        rows, N = results.sweep_rows(ctx.metrics, scaling)
        if rows.empty or inner not in rows or rows[inner].notna().sum() == 0:
            draw.placeholder(ax, f"No in-expert redundancy for Scale SAEs {title}.")
            continue
        for k in sorted(rows["k"].unique()):
            s = l0s[float(k)]
            r = rows[rows["k"] == k]
            draw.line(ax, results.aggregate(r, "active_experts", inner), "active_experts", f"_L0 = {int(k)} in-expert",
                      color=s["color"], marker=s["marker"])
            draw.line(ax, results.aggregate(r, "active_experts", inter), "active_experts", f"_L0 = {int(k)} random",
                      color=s["color"], linestyle="--", marker=s["marker"], markerfacecolor="white")
            drawn_ks.add(float(k))
        draw.log2_axis(ax, rows["active_experts"])
        ax.set_xlabel("active experts e")
        ax.set_title(f"{title}, N = {int(N)}")
    axes[0, 0].set_ylabel(f"redundancy (max cos > {threshold:g})")
    if drawn_ks:
        extra = [(draw.proxy(l0s[k]["color"], marker=l0s[k]["marker"]), f"L0 = {int(k)}") for k in sorted(drawn_ks)]
        extra += [(draw.proxy("0.2", "-", "o"), "in-expert (solid)"),
                  (draw.proxy("0.2", "--", "o", markerfacecolor="white"), "random subsets (dashed)")]
        draw.legend_outside(fig, axes, extra=extra)
    fig.tight_layout()
    return fig
