"""Drawing helpers every figure module shares: panels, series lines, notes, legends, saving.

matplotlib is imported inside the functions, so importing this module is cheap. Figures are
saved atomically (:func:`moesae.io.atomic_path`): a failed notebook never leaves a half-written
PNG behind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_path
from . import style


def figure(nrows: int, ncols: int, width: float = 4.2, height: float = 3.3, **kw):
    """``(fig, axes)`` in the shared theme; ``axes`` is always 2-D."""
    import matplotlib.pyplot as plt

    style.set_theme()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)
    return fig, axes


def styles(ctx) -> dict[str, dict[str, Any]]:
    """The run's configuration styles (label → colour, marker), computed once per context."""
    from ..results import style_groups

    cached = getattr(ctx, "_styles", None)
    if cached is None:
        cached = style.assign_styles(style_groups(ctx.metrics))
        ctx._styles = cached
    return cached


def style_of(ctx, label: str, group: str | None = None) -> dict[str, Any]:
    return styles(ctx).get(label) or style.series_style(label, group)


def line(ax, agg: pd.DataFrame, x: str, label: str, color=None, linestyle="-", marker="o", paper: bool = False,
         offset: float = 1.0, **kw):
    """One series; error bars (± std over seeds) where a point has more than one seed.

    ``offset`` multiplies x (a small dodge on log axes so that error bars do not hide each other).
    """
    if agg.empty:
        return None
    xs = pd.to_numeric(agg[x], errors="coerce") * offset
    if paper:
        return ax.plot(xs, agg["mean"], color=color, label=f"{label} (paper)", **style.PAPER)[0]
    yerr = agg["std"].where(agg["n"] > 1)
    return ax.errorbar(xs, agg["mean"], yerr=None if yerr.isna().all() else yerr.fillna(0), color=color,
                       linestyle=linestyle, marker=marker, markersize=4, linewidth=1.5, capsize=2, label=label, **kw)


def note(ax, text: str, loc: str = "lower left") -> None:
    """A small grey note inside a panel (absent series, L0 used instead of the paper's)."""
    y, va = (0.02, "bottom") if loc.startswith("lower") else (0.98, "top")
    x, ha = (0.98, "right") if loc.endswith("right") else (0.02, "left")
    import textwrap

    text = textwrap.fill(text, 60)
    ax.text(x, y, text, transform=ax.transAxes, fontsize=7, color="0.35", va=va, ha=ha,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1.5})


def placeholder(ax, text: str, width: int = 44) -> None:
    """A panel that says plainly why it is empty, instead of drawing an empty axis."""
    import textwrap

    ax.set_axis_off()
    text = "\n".join(textwrap.fill(part, width) for part in text.split("\n"))
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9,
            bbox={"boxstyle": "round,pad=0.8", "facecolor": "#fff7e6", "edgecolor": "#e0a030"})


def log2_axis(ax, values=()) -> None:
    """Log-2 x axis with a tick at every whole x value drawn (ours and, when overlaid, the paper's).

    A line drawn at measured L0 values (not whole numbers) adds no ticks of its own.
    """
    lines = [np.asarray(ln.get_xdata(), dtype=float) for ln in ax.get_lines()]
    vals = sorted({float(v) for v in list(values) + [x for xs in lines for x in xs] if v == v and v > 0})
    if not vals:
        return
    ax.set_xscale("log", base=2)
    whole = [float(v) for v in values] + [x for xs in lines if len(xs) and np.all(np.mod(xs, 1) == 0) for x in xs]
    ticks = sorted({int(v) for v in whole if v == v and v > 0 and float(v).is_integer()})
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{v}" for v in ticks])
        ax.minorticks_off()


def handles(axes, order: list[str] | None = None) -> tuple[list, list[str]]:
    """Every labelled artist of ``axes`` once (first drawn wins), in ``order`` where given."""
    seen: dict[str, Any] = {}
    for ax in np.asarray(axes, dtype=object).flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab and not lab.startswith("_") and lab not in seen:
                seen[lab] = h
    labels = list(seen)
    if order:
        rank = {lab: i for i, lab in enumerate(order)}
        drawn = {lab: i for i, lab in enumerate(labels)}
        labels.sort(key=lambda lab: (rank.get(lab.removesuffix(" (paper)"), len(rank)), lab.endswith(" (paper)"),
                                     drawn[lab]))
    return [seen[lab] for lab in labels], labels


def legend_outside(fig, axes, order: list[str] | None = None, title: str | None = None, extra: list | None = None,
                   anchor_ax=None, ncol: int | None = None):
    """One legend for every series of ``axes``, outside the panels (right of the figure, or inside
    ``anchor_ax``, a panel given over to the legend)."""
    hs, labels = handles(axes, order)
    for h, lab in extra or []:
        hs.append(h)
        labels.append(lab)
    if not hs:
        return None
    if anchor_ax is not None:
        anchor_ax.set_axis_off()
        return anchor_ax.legend(hs, labels, loc="center", frameon=False, fontsize=7, title=title,
                                ncol=ncol or (1 if len(hs) <= 16 else 2), title_fontsize=8)
    return fig.legend(hs, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=7,
                      title=title, ncol=ncol or (1 if len(hs) <= 22 else 2), title_fontsize=8)


def proxy(color="0.2", linestyle="-", marker=None, **kw):
    """A legend entry's line without data (to explain a colour or a line style)."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, linestyle=linestyle, marker=marker, markersize=4, linewidth=1.5, **kw)


def heatmap(ax, pivot: pd.DataFrame, title: str, fmt: str, cmap: str, center=None, label: str = ""):
    import seaborn as sns

    sns.heatmap(pivot, ax=ax, annot=True, fmt=fmt, cmap=cmap, center=center, cbar_kws={"label": label},
                annot_kws={"fontsize": 7}, linewidths=0.5)
    ax.set_xlabel("L0")
    ax.set_ylabel("active experts e")
    ax.set_title(title)
    ax.set_yticklabels([f"{int(float(t.get_text()))}" for t in ax.get_yticklabels()], rotation=0)
    ax.set_xticklabels([f"{int(float(t.get_text()))}" for t in ax.get_xticklabels()], rotation=0)


def pivot(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean over seeds of ``metric``, e (rows) × L0 (columns)."""
    from ..results import aggregate

    agg = aggregate(rows, "k", metric, by=["active_experts"])
    return agg.pivot(index="active_experts", columns="k", values="mean")


def footnote(fig, text: str) -> None:
    fig.text(0.99, 0.005, text, ha="right", fontsize=7, color="0.4")


# ---- saving -----------------------------------------------------------------------------------------------
def save_figure(fig, name: str, figures_dir: str | Path = "reports/figures", formats=("png", "svg")) -> list[Path]:
    """Save ``<figures_dir>/<name>.<fmt>`` for each format, atomically."""
    paths = []
    for fmt in formats:
        path = Path(figures_dir) / f"{name}.{fmt}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt)
        paths.append(path)
    return paths


def finish(fig, name: str, figures_dir: str | Path = "reports/figures"):
    """Save the figure (PNG + SVG), close it, and return the PNG for the notebook to display.

    Displaying the saved file (not the live figure) means the notebook shows exactly the
    artefact the report embeds, whatever matplotlib backend the kernel runs with.
    """
    import matplotlib.pyplot as plt
    from IPython.display import Image

    paths = save_figure(fig, name, figures_dir)
    plt.close(fig)
    return Image(filename=str(paths[0]))


def save_table(table: pd.DataFrame, name: str, figures_dir: str | Path = "reports/figures") -> Path:
    """``<figures_dir>/<name>.csv``, atomically (Table 1 as data, beside its image)."""
    path = Path(figures_dir) / f"{name}.csv"
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path
