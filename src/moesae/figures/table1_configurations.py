"""Table 1 as an image (main columns only); the data is :func:`moesae.results.table1`, which the
notebook also saves as CSV and shows in full, and the report shows as HTML."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import results
from . import draw

IMAGE_COLUMNS = ["family", "configuration", "k", "parameters", "FLOPs/token", "train tokens/s", "MSE", "loss rec.",
                 "loss rec. (cross)", "redundancy 0.8", "seeds"]


def plot(metrics: pd.DataFrame, max_rows: int = 80):
    tab = results.format_table1(results.table1(metrics))
    tab = tab[[c for c in IMAGE_COLUMNS if c in tab.columns]].head(max_rows)
    # Plain text in a grid: matplotlib's table() measures every cell repeatedly and is ~10x slower.
    n_rows = len(tab) + 1
    widths = [max(len(str(c)), *(len(str(v)) for v in tab[c])) + 2 for c in tab.columns]
    total = float(sum(widths))
    fig, axes = draw.figure(1, 1, width=max(8.0, 0.075 * total), height=0.35 + 0.19 * n_rows)
    ax = axes[0, 0]
    ax.set_axis_off()
    ax.set_xlim(0, total)
    ax.set_ylim(n_rows, 0)
    lefts = np.concatenate([[0.0], np.cumsum(widths)[:-1]])
    for j, col in enumerate(tab.columns):
        align_left = col in results.TABLE1_TEXT
        x = lefts[j] + (0.5 if align_left else widths[j] - 0.5)
        ha = "left" if align_left else "right"
        ax.text(x, 0.5, col, ha=ha, va="center", fontsize=7, weight="bold")
        for i, v in enumerate(tab[col], start=1):
            ax.text(x, i + 0.5, str(v), ha=ha, va="center", fontsize=7)
    for i in range(1, n_rows, 2):
        ax.axhspan(i, i + 1, color="0.95", zorder=0)
    ax.axhline(1, color="0.3", linewidth=0.8)
    return fig
