"""The one visual style of every figure: theme, and one colour + marker per configuration.

A configuration's style is a function of its label (the architecture's ``config_label``, e.g.
``Scale (16,2)``, see :func:`moesae.saes.describe`), so the same SAE looks the same in every
figure. Each architecture has its own hue family (Scale: reds/oranges, Switch: blues, TopK:
greens, …), configurations of one architecture get distinct shades, and canonical labels of the
study are pinned so that they never share a colour.
"""
from __future__ import annotations

import hashlib
from typing import Any

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p"]

# Pinned styles: the configurations the figures compare, all distinct (colour-blind friendly).
PINNED: dict[str, tuple[str, str]] = {
    "Scale (16,2)": ("#d62728", "o"),
    "Scale (32,4)": ("#ff7f0e", "s"),
    "Scale (64,8)": ("#8c1c13", "^"),
    "Switch": ("#1f77b4", "D"),
    "Switch-32": ("#1f77b4", "D"),
    "Switch (authors', e=1)": ("#17becf", "v"),
    "TopK M/32": ("#2ca02c", "P"),
    "TopK M/8": ("#98df8a", "X"),
    "TopK": ("#2ca02c", "P"),
    "Gated": ("#9467bd", "<"),
    "ReLU (L1)": ("#8c564b", ">"),
    "JumpReLU": ("#e377c2", "h"),
    "BatchTopK": ("#7f7f7f", "*"),
    "Feature Choice": ("#bcbd22", "p"),
}

# Hue families per architecture for labels that are not pinned (shade chosen from the label).
FAMILIES: dict[str, list[str]] = {
    "scale": ["#fcae91", "#fb6a4a", "#de2d26", "#a50f15", "#fdae6b", "#e6550d", "#a63603"],
    "authors_switch": ["#9ecae1", "#17becf", "#0e7c86"],
    "switch": ["#6baed6", "#3182bd", "#08519c", "#4292c6", "#2171b5"],
    "topk": ["#74c476", "#31a354", "#006d2c", "#a1d99b"],
    "batchtopk": ["#969696", "#636363", "#252525"],
    "feature_choice": ["#dbdb8d", "#bcbd22", "#8c8c17"],
    "gated": ["#c5b0d5", "#9467bd", "#6a3d9a"],
    "relu": ["#c49c94", "#8c564b"],
    "jumprelu": ["#f7b6d2", "#e377c2"],
}
FALLBACK = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]

_THEME_SET = False


def _pick(options: list[str], label: str) -> str:
    digest = int(hashlib.sha256(label.encode()).hexdigest(), 16)
    return options[digest % len(options)]


def series_style(label: str, architecture: str | None = None) -> dict[str, Any]:
    """``{"color", "marker"}`` for one series; the same label always gets the same style."""
    base = label.split(" [")[0]
    if base in PINNED:
        color, marker = PINNED[base]
    else:
        color = _pick(FAMILIES.get(architecture or "", FALLBACK), base)
        marker = _pick(MARKERS, base + "marker")
    return {"color": color, "marker": marker}


def set_theme() -> None:
    """The shared theme (seaborn whitegrid), applied once per process."""
    global _THEME_SET
    if _THEME_SET:
        return
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind", font_scale=0.9)
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight",
                         "axes.titlesize": 10, "legend.fontsize": 8, "svg.fonttype": "none"})
    _THEME_SET = True
