"""The ground-truth figure: how well each SAE family recovers the known features of the synthetic
benchmark (``moesae synthetic``; metric definitions in docs/method.md, "Ground-truth recovery").

Panels: each recovery metric against L0 (mean ± std over seeds; dashed: a random decoder of the
same width), and the ranking metric against the encoder rows computed per token (matched active
compute). Every family is one configuration, drawn with its configuration label and
:func:`moesae.figures.style.series_style`, so it has the same colour and marker in every panel and
one legend entry.

Reads only ``results/synthetic/metrics.csv`` and ``summary.json`` (written by
:mod:`moesae.synthetic.runner`), so the figure's stage does not depend on the benchmark's code.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..io import atomic_path
from .style import MARKERS, series_style, set_theme

NAME = "synthetic_recovery"
RESULTS_SUBDIR = "synthetic"
METRICS_FILE = "metrics.csv"  # the names moesae.synthetic.runner writes (a test checks they agree)
SUMMARY_FILE = "summary.json"
PLOT_METRICS = [
    ("matched_cosine", "matched cosine (Hungarian)"),
    ("fraction_recovered", "true features recovered (cos ≥ 0.9)"),
    ("mmcs_true_to_learned", "mean max cos, true → learned"),
    ("f1", "detection F1 of matched latents"),
    ("fvu", "FVU (reconstruction, for contrast)"),
]
COMPUTE_METRIC = "matched_cosine"
CHANCE_STYLE = {"color": "0.5", "linestyle": "--", "linewidth": 0.8}
LEGEND_COLUMNS = 4


def load(results_dir: str | Path = "results") -> tuple[pd.DataFrame, dict[str, Any]]:
    """``(metrics.csv, summary.json)`` of the benchmark in ``<results_dir>/synthetic``."""
    folder = Path(results_dir) / RESULTS_SUBDIR
    missing = [f for f in (METRICS_FILE, SUMMARY_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder / missing[0]} not found: run `dvc repro synthetic` first")
    return pd.read_csv(folder / METRICS_FILE), json.loads((folder / SUMMARY_FILE).read_text())


def series(df: pd.DataFrame, summary: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Family → ``{"label", "color", "marker"}``, one distinct style per configuration, by label.

    The label is the configuration's (``summary["families"]``, from the architecture registry);
    two families with the same label are told apart by their family name. Should two series still
    share colour and marker, the later one takes the next marker not yet drawn in that colour.
    """
    facts = (summary or {}).get("families") or {}
    families = sorted(df["family"].unique())
    archs = df.groupby("family")["architecture"].first().to_dict() if "architecture" in df.columns else {}
    labels = {f: str(facts.get(f, {}).get("label") or f) for f in families}
    counts = pd.Series(labels).value_counts()
    out: dict[str, dict[str, Any]] = {}
    used: set[tuple[str, str]] = set()
    for fam in families:
        label = labels[fam] if counts[labels[fam]] == 1 else f"{labels[fam]} [{fam}]"
        key = labels[fam] if counts[labels[fam]] == 1 else f"{labels[fam]} {fam}"
        style = series_style(key, facts.get(fam, {}).get("architecture") or archs.get(fam))
        color, marker = style["color"], style["marker"]
        if (color, marker) in used:
            start = MARKERS.index(marker) if marker in MARKERS else 0
            free = [MARKERS[(start + i) % len(MARKERS)] for i in range(len(MARKERS))]
            marker = next((m for m in free if (color, m) not in used), marker)
        used.add((color, marker))
        out[fam] = {"label": label, "color": color, "marker": marker}
    return dict(sorted(out.items(), key=lambda item: (item[1]["label"], item[0])))  # legend order: by label


def _chance_lines(chance: dict[str, dict[str, float]], metric: str) -> list[tuple[float, list[str]]]:
    """(value, widths) of a metric's random-decoder levels; levels closer than 0.02 share a line."""
    lines: list[tuple[float, list[str]]] = []
    for width, levels in sorted(chance.items(), key=lambda item: int(item[0])):
        value = levels.get(metric)
        if value is None or not math.isfinite(value):
            continue
        near = [entry for entry in lines if abs(entry[0] - value) < 0.02]
        if near:
            near[0][1].append(width)
        else:
            lines.append((value, [width]))
    return lines


def _log2_axis(ax, values: Sequence[float], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(values), [str(int(v)) for v in values])
    ax.minorticks_off()
    ax.set_xlabel(label)


def plot(df: pd.DataFrame, summary: dict[str, Any] | None = None,
         metrics: Sequence[tuple[str, str]] = PLOT_METRICS, compute_metric: str | None = COMPUTE_METRIC):
    """Recovery vs L0 per family (mean ± std over seeds), plus one panel vs active encoder width.

    ``summary`` (``summary.json``) gives the configuration labels (``families``) and the random
    decoders' levels (``chance``: width → metric → value), drawn dashed and labelled with the width.
    Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    set_theme()
    summary = summary or {}
    styles = series(df, summary)
    chance = summary.get("chance") or {}
    panels = list(metrics) + ([(compute_metric, "")] if compute_metric else [])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    ks = sorted(df["k"].unique())
    drew_chance = False
    for ax, (metric, title) in zip(axes.flat, metrics):
        for fam, st in styles.items():
            g = df[df["family"] == fam].groupby("k")[metric].agg(["mean", "std"]).reset_index()
            ax.errorbar(g["k"], g["mean"], yerr=g["std"].fillna(0), marker=st["marker"], ms=4, capsize=2,
                        color=st["color"], label=st["label"])
        for value, widths in _chance_lines(chance, metric):
            ax.axhline(value, **CHANCE_STYLE)
            ax.annotate(f"random, M={'/'.join(widths)}", (1, value), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7, color="0.4")
            drew_chance = True
        _log2_axis(ax, ks, "L0 (k)")
        ax.set_title(title)
    if compute_metric:
        ax = axes.flat[len(metrics)]
        for fam, st in styles.items():
            g = df[df["family"] == fam].groupby("active_width")[compute_metric].agg(["mean", "std"]).reset_index()
            ax.errorbar(g["active_width"], g["mean"], yerr=g["std"].fillna(0), marker=st["marker"], ms=5, ls="none",
                        capsize=2, color=st["color"], label=st["label"])
        _log2_axis(ax, sorted(df["active_width"].unique()), "encoder rows computed per token")
        ax.set_title(f"{compute_metric} vs active compute (mean over k)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [Line2D([], [], color=st["color"], marker=st["marker"], ms=5, label=st["label"]) for st in styles.values()]
    if drew_chance:
        handles.append(Line2D([], [], **CHANCE_STYLE, label="random decoder of width M"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), LEGEND_COLUMNS), frameon=False)
    seeds = int(df.groupby(["family", "k"])["seed"].nunique().max())
    fig.suptitle(f"Ground-truth feature recovery on synthetic data (mean ± std over {seeds} seed(s))")
    legend_rows = math.ceil(len(handles) / LEGEND_COLUMNS)
    fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.02, 1, 0.97))
    return fig


def summary_table(summary: dict[str, Any]) -> pd.DataFrame:
    """Every family × L0: mean and std over seeds of the headline metrics (``summary["table"]``)."""
    return pd.DataFrame(summary["table"])


def ranking_table(summary: dict[str, Any]) -> pd.DataFrame:
    """Families ranked by the ranking metric at matched L0 (mean and std over seeds)."""
    return pd.DataFrame(summary["ranking"]).rename(
        columns={"mean": f"{summary['ranking_metric']} (mean)", "std": "std over seeds"})


def compute_matched_table(df: pd.DataFrame, summary: dict[str, Any],
                          metrics: Sequence[str] = ("matched_cosine", "mmcs_learned_to_true", "f1", "fvu")) -> pd.DataFrame:
    """Each multi-expert family beside the dense families of the same active width (means over k and seeds)."""
    means = df.groupby("family")[list(metrics)].mean()
    rows = []
    for pair in summary.get("compute_matched_pairs", []):
        for role in ("family", "baseline"):
            rows.append({"pair": f"{pair['family']} vs {pair['baseline']}", "active_width": pair["active_width"],
                         "family": pair[role], **means.loc[pair[role]].to_dict()})
    return pd.DataFrame(rows, columns=["pair", "active_width", "family", *metrics])


def chance_table(summary: dict[str, Any]) -> pd.DataFrame:
    """The random-decoder levels per SAE width."""
    return pd.DataFrame(summary.get("chance") or {}).T.rename_axis("num_latents")


def save(fig, table: pd.DataFrame | None = None, name: str = NAME, figures_dir: str | Path = "reports/figures"):
    """Write ``<name>.png`` / ``.svg`` (and the table as ``<name>.csv``) atomically, close the figure,
    and return the PNG for the notebook to display (the artefact the report embeds)."""
    import matplotlib.pyplot as plt
    from IPython.display import Image

    figures_dir = Path(figures_dir)
    for fmt in ("png", "svg"):
        with atomic_path(figures_dir / f"{name}.{fmt}") as tmp:
            fig.savefig(tmp, format=fmt)
    plt.close(fig)
    if table is not None:
        with atomic_path(figures_dir / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False)
    return Image(filename=str(figures_dir / f"{name}.png"))


__all__ = ["NAME", "PLOT_METRICS", "chance_table", "compute_matched_table", "load", "plot", "ranking_table", "save",
           "series", "summary_table"]
