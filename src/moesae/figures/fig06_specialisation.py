"""Fig 6: expert specialisation, the cumulative share of a probe category's top features owned by
the experts (sorted by usage), for the MoE SAEs of Fig 3, at two L0 values."""
from __future__ import annotations

from .. import results
from . import draw

META = ["variant", "label", "k", "num_experts"]


def plot(ctx: results.Context, l0_targets=(16, 32)):
    table = ctx.table("specialisation")
    if table is None or table.empty:
        fig, axes = draw.figure(1, 1, width=6, height=3)
        draw.placeholder(axes[0, 0], "No expert-specialisation table: results/tables/specialisation.csv is missing "
                                     "(written by `moesae collect`).")
        return fig
    moe = results.main_comparison(ctx.metrics)
    moe = moe[moe["is_moe"]]
    expected = results.expected_moe()
    df = table.merge(moe[META], on="variant", how="inner")
    l0s = results.pick_l0(df["k"], l0_targets)
    fig, axes = draw.figure(1, max(len(l0s), 1), width=4.6, height=4.0)
    if not l0s:
        draw.placeholder(axes[0, 0], "results/tables/specialisation.csv has no rows for the MoE SAEs of Fig 3.")
        return fig
    order = results.configurations(moe)
    for ax, (target, used) in zip(axes.flat, l0s):
        sub = df[df["k"] == used].copy()
        sub["expert_fraction"] = sub["rank"] / sub["num_experts"]
        for label in [lab for lab in order if lab in set(sub["label"])]:
            s = draw.style_of(ctx, label)
            agg = results.aggregate(sub[sub["label"] == label], "expert_fraction", "cumulative_share")
            draw.line(ax, agg, "expert_fraction", label, color=s["color"], marker=s["marker"], markevery=_every(len(agg)))
        absent = results.absent(moe[moe["k"] == used], expected)
        if absent:
            draw.note(ax, "absent at this L0: " + ", ".join(absent), loc="lower right")
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="uniform (no specialisation)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("experts, sorted by usage (fraction of N)")
        ax.set_ylabel("cumulative share of top features")
        ax.set_title(results.l0_label(target, used))
    draw.legend_outside(fig, axes, order=order + ["uniform (no specialisation)"], title="configuration")
    fig.tight_layout()
    return fig


def _every(n: int) -> int:
    """Markers on about eight points of a curve (a marker per expert would hide the line)."""
    return max(1, n // 8)
