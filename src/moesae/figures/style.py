"""The one visual style of every figure: theme, and one colour + marker per configuration.

A configuration's style is a function of its label (the architecture's ``config_label``, e.g.
``Scale (16,2)``, see :func:`moesae.saes.describe`), so the same SAE looks the same in every
figure. Each architecture has its own hue family (Scale: reds/oranges, Scale without Feature
Scaling: purples, Switch: blues, TopK: greens, …), configurations of one architecture get distinct
shades, and canonical labels of the study are pinned.

:func:`assign_styles` gives every configuration of a run its style at once, so that no two
configurations of the run share a colour and marker (as long as the palettes last; then the
marker differs): every figure of a run reads the same ``results/metrics.csv`` and so gets the same
assignment. :func:`series_style` is the per-label fallback (the same label always gets the same
style) for a label that is not in the run.

Groupings that are not configurations have their own fixed styles: with / without Feature
Scaling (:data:`FEATURE_SCALING`), the paper's values (:data:`PAPER`), and L0 values
(:func:`l0_styles`, one colour per L0 shared by the figures that draw a line per L0).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p"]

# Pinned styles: the configurations the figures compare, all distinct (colour-blind friendly).
PINNED: dict[str, tuple[str, str]] = {
    "Scale (16,2)": ("#d62728", "o"),
    "Scale (32,4)": ("#ff7f0e", "s"),
    "Scale (64,8)": ("#8c1c13", "^"),
    "Switch": ("#1f77b4", "D"),
    "Switch-32": ("#1f77b4", "D"),
    "Gated": ("#9467bd", "<"),
    "ReLU (L1)": ("#8c564b", ">"),
    "JumpReLU": ("#e377c2", "h"),
    "BatchTopK": ("#7f7f7f", "*"),
}

# Hue families per style group (a preset name or a base architecture; ``scale_none``: Scale
# without Feature Scaling), in the order configurations of the group take them.
FAMILIES: dict[str, list[str]] = {
    "scale": ["#d62728", "#ff7f0e", "#8c1c13", "#fb6a4a", "#e6550d", "#a50f15", "#fdae6b", "#f16913",
              "#67000d", "#fc9272", "#a63603", "#ce1256", "#dd3497", "#feb24c"],
    "scale_none": ["#6a51a3", "#9e9ac8", "#3f007d", "#807dba", "#54278f", "#bcbddc"],
    "authors_switch": ["#17becf", "#0e7c86", "#5ab4ac"],
    "switch": ["#1f77b4", "#6baed6", "#08519c", "#4292c6", "#9ecae1"],
    "topk": ["#2ca02c", "#006d2c", "#74c476", "#a1d99b", "#31a354"],
    "batchtopk": ["#7f7f7f", "#252525", "#bdbdbd"],
    "feature_choice": ["#bcbd22", "#8c8c17", "#dbdb8d"],
    "gated": ["#9467bd", "#c5b0d5", "#6a3d9a"],
    "relu": ["#8c564b", "#c49c94"],
    "jumprelu": ["#e377c2", "#f7b6d2"],
}
FALLBACK = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3", "#8ca252", "#bd9e39", "#ad494a",
            "#a55194", "#6b6ecf", "#b5cf6b", "#e7ba52", "#d6616b", "#ce6dbd"]

FEATURE_SCALING: dict[str, dict[str, Any]] = {
    "with": {"color": "#d62728", "marker": "o", "linestyle": "-"},
    "without": {"color": "#6a51a3", "marker": "s", "linestyle": "--"},
}
"""Lines that group configurations by Feature Scaling (Fig 5, 8): Scale's hue with, purple without."""
PAPER: dict[str, Any] = {"linestyle": (0, (4, 2)), "alpha": 0.55, "linewidth": 1.2, "marker": ".", "markersize": 4}
"""How the paper's values are drawn beside ours (paper profile): dashed, lighter, in the series' colour."""

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


def style_group(label: str, group: str) -> str:
    """The hue family of a configuration: Scale without Feature Scaling has its own."""
    return "scale_none" if group == "scale" and ", no FS" in label else group


def assign_styles(series: list[tuple[str, str | None]]) -> dict[str, dict[str, Any]]:
    """``label → {"color", "marker"}`` for every configuration of a run, all distinct.

    ``series`` is ``[(label, style group)]`` in legend order (see
    :func:`moesae.results.style_groups`). Pinned labels keep their style; the others take the next
    unused shade of their group's family, then of the fallback palette; once every colour is taken,
    colours repeat with a marker not yet used with them.
    """
    out: dict[str, dict[str, Any]] = {}
    used_colors: set[str] = set()
    used_pairs: set[tuple[str, str]] = set()
    group_markers: dict[str, int] = {}
    for label, group in series:  # pinned first, so that a pinned colour is never taken by another label
        base = label.split(" [")[0]
        if base in PINNED and label not in out and PINNED[base][0] not in used_colors:
            color, marker = PINNED[base]
            out[label] = {"color": color, "marker": marker}
            used_colors.add(color)
            used_pairs.add((color, marker))
    every = [c for fam in FAMILIES.values() for c in fam] + FALLBACK
    for label, group in series:
        if label in out:
            continue
        fam = style_group(label, group or "")
        options = FAMILIES.get(fam, []) + FALLBACK
        color = next((c for c in options if c not in used_colors), None)
        if color is None:
            color = next((c for c in every if c not in used_colors), None)
        if color is None:  # more configurations than colours: reuse, with another marker
            color = options[len(out) % len(options)]
        start = group_markers.get(fam, 0)
        marker = MARKERS[start % len(MARKERS)]
        for i in range(len(MARKERS)):
            candidate = MARKERS[(start + i) % len(MARKERS)]
            if (color, candidate) not in used_pairs:
                marker = candidate
                break
        group_markers[fam] = MARKERS.index(marker) + 1
        out[label] = {"color": color, "marker": marker}
        used_colors.add(color)
        used_pairs.add((color, marker))
    return out


def l0_styles(values) -> dict[float, dict[str, Any]]:
    """One colour (dark → light in log L0) and marker per L0 value of a run."""
    import matplotlib as mpl

    vals = sorted({float(v) for v in values if v == v and v > 0})
    if not vals:
        return {}
    cmap = mpl.colormaps["viridis"]
    lo, hi = math.log2(vals[0]), math.log2(vals[-1])
    out = {}
    for i, v in enumerate(vals):
        t = 0.0 if hi == lo else (math.log2(v) - lo) / (hi - lo)
        out[v] = {"color": mpl.colors.to_hex(cmap(0.05 + 0.8 * t)), "marker": MARKERS[i % len(MARKERS)]}
    return out


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
