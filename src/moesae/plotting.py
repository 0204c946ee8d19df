"""Figures 1–11 and Table 1 from ``results/``: one function per figure, one shared style.

The notebooks in ``notebooks/`` are thin: they call :func:`load_context` and one ``figNN_*``
function here, then :func:`save_figure`. Everything a figure needs is read from the results
tables (``results/metrics.csv``, ``results/tables/*.csv``, ``results/autointerp/scores.csv``) and,
for Fig 1, from a trained model's ``cfg.json``; nothing is typed in except the paper's reported
values, which come from ``moesae/data/paper_reported.yaml`` and are drawn (dashed, labelled
"paper") only in the paper profile, where the scales match.

Series are chosen by configuration (architecture, N, e, Feature Scaling, width), not by family
name, so the same code draws the default profile, the paper profile and the paper's own numbers
(:func:`paper_frame` turns them into rows with the same columns). A series with no rows is
skipped and named in the panel; a figure never fails on a missing series.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# name → (title, caption). The report and the notebooks read captions from here only.
FIGURES: dict[str, tuple[str, str]] = {
    "fig01_architecture": (
        "Fig 1 · Scale SAE architecture",
        "The Scale SAE as configured in this run: a router picks the e experts with the largest "
        "probability out of N, Feature Scaling (ω, T) sharpens each selected expert's encoder, a global "
        "TopK keeps k of the e·m candidate features, and one shared decoder reconstructs x.",
    ),
    "fig02_omega": (
        "Fig 2 · Feature Scaling ω vs active experts",
        "Mean learned ω (raw; the encoder's high-frequency multiplier is 1 + ω) against the number of "
        "active experts e, one line per L0. The paper reports ω growing with e.",
    ),
    "fig03_main_comparison": (
        "Fig 3 · Reconstruction and loss recovered vs L0",
        "(a) MSE on held-out text of the training domain, (b) MSE and (c) loss recovered (zero "
        "ablation) on the cross-domain set, against L0, for Scale SAE (N, e), Switch SAE and TopK "
        "baselines; (d) automated-interpretability accuracy per activation quantile.",
    ),
    "fig04_active_experts": (
        "Fig 4 · Number of active experts (no Feature Scaling)",
        "MSE and loss recovered against L0 for e active experts out of N, without Feature Scaling, on "
        "both domains (e = 1 is the authors' Switch preset).",
    ),
    "fig05_feature_scaling": (
        "Fig 5 · With vs without Feature Scaling",
        "Solid: with Feature Scaling, dashed: without. Left: against e at a low and a high L0; right: "
        "against L0 at two values of e. Held-out text of the training domain.",
    ),
    "fig06_specialisation": (
        "Fig 6 · Expert specialisation",
        "Cumulative share of a probe category's top features owned by the experts, experts sorted by "
        "usage (x: fraction of experts). A curve far above the diagonal means a few experts own the category.",
    ),
    "fig07_redundancy": (
        "Fig 7 · Feature redundancy without Feature Scaling",
        "Fraction of decoder rows whose maximum cosine similarity to another row exceeds 0.8, for e "
        "active experts × L0, without Feature Scaling.",
    ),
    "fig08_redundancy_scaling": (
        "Fig 8 · Redundancy with vs without Feature Scaling",
        "Redundancy (max cosine > 0.8) against e, without (dashed) and with (solid) Feature Scaling.",
    ),
    "fig09_expert_redundancy": (
        "Fig 9 · In-expert vs inter-expert redundancy",
        "Redundancy (max cosine > 0.8) within each expert, averaged over experts (solid), against the "
        "same statistic on random equal-size subsets of the whole dictionary (dashed).",
    ),
    "fig10_activation_overlap": (
        "Fig 10 · Activation overlap",
        "Left: mean share of top-k features two probe tokens have in common, without Feature Scaling. "
        "Right: change with Feature Scaling, in percent (positive: less overlap with scaling).",
    ),
    "fig11_decomposition": (
        "Fig 11 · Feature Scaling decompositions",
        "MSE against L0 for the mean-based (the paper's), identity-based and learned-based "
        "low-frequency decompositions, and without Feature Scaling.",
    ),
    "table1_configurations": (
        "Table 1 · Configurations",
        "Every trained configuration with its parameter count, forward FLOPs per token, measured "
        "training throughput and headline metrics (mean over seeds).",
    ),
}

# Architectures whose L0 is not fixed by k: plotted at their measured L0.
VARIABLE_L0 = {"gated", "relu", "jumprelu"}
# How each architecture is named in legends when it has no dedicated series.
ARCH_NAMES = {"gated": "Gated", "relu": "ReLU (L1)", "jumprelu": "JumpReLU", "batchtopk": "BatchTopK",
              "feature_choice": "Feature Choice", "topk": "TopK", "switch": "Switch", "scale": "Scale"}


@dataclass(frozen=True)
class Series:
    """One line in a figure: a label and the identity columns its rows must match."""

    label: str
    match: dict[str, Any]
    expected: bool = True
    """Name it in the panel when it has no rows (optional baselines are only drawn when present)."""


FIG3_SERIES = [
    Series("Scale (16,2)", {"architecture": "scale", "num_experts": 16, "active_experts": 2, "feature_scaling": "mean"}),
    Series("Scale (32,4)", {"architecture": "scale", "num_experts": 32, "active_experts": 4, "feature_scaling": "mean"}),
    Series("Scale (64,8)", {"architecture": "scale", "num_experts": 64, "active_experts": 8, "feature_scaling": "mean"}),
    Series("Switch", {"architecture": "switch"}),
    Series("Switch (authors', e=1)", {"architecture": "scale", "active_experts": 1, "feature_scaling": "none"}, expected=False),
    Series("TopK M/32", {"architecture": "topk", "width_fraction": 1 / 32}),
    Series("TopK M/8", {"architecture": "topk", "width_fraction": 1 / 8}, expected=False),
]


# ---- loading -----------------------------------------------------------------------------------
@dataclass
class Context:
    """Everything a figure notebook reads, loaded once."""

    root: Path
    results_dir: Path
    profile: str
    metrics: pd.DataFrame
    paper: pd.DataFrame | None
    """The paper's values as rows (only in the paper profile, where scales are comparable)."""
    notes: list[str] = field(default_factory=list)

    def table(self, name: str) -> pd.DataFrame | None:
        """``results/tables/<name>.csv`` or None when that table was not produced."""
        path = self.results_dir / "tables" / f"{name}.csv"
        return pd.read_csv(path) if path.is_file() else None


def load_context(results_dir: str | Path = "results", profile: str = "default") -> Context:
    """Read ``results/metrics.csv`` (and the paper's values in the paper profile)."""
    results_dir = Path(results_dir)
    metrics = prepare(load_metrics(results_dir))
    paper = prepare(paper_frame()) if profile == "paper" else None
    root = results_dir.resolve().parent
    return Context(root=root, results_dir=results_dir, profile=profile, metrics=metrics, paper=paper)


def load_metrics(results_dir: str | Path = "results") -> pd.DataFrame:
    path = Path(results_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run the pipeline first (`dvc repro collect`, or `moesae collect` after "
            "the evaluate stages), or point results_dir at a finished run"
        )
    df = pd.read_csv(path)
    missing = {"variant", "architecture", "k"} - set(df.columns)
    if missing:
        raise ValueError(f"{path} lacks the column(s) {sorted(missing)}; regenerate it with `moesae collect`")
    return df


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Normalise identity columns and add ``width_fraction`` (M / the MoE width) and ``x_l0``."""
    df = df.copy()
    for col in ("family", "feature_scaling", "gate"):
        if col not in df:
            df[col] = ""
        df[col] = df[col].fillna("").astype(str)
    for col in ("num_experts", "active_experts", "num_latents", "seed"):
        if col not in df:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["seed"] = df["seed"].fillna(0)
    df["family"] = df["family"].where(df["family"] != "", df["variant"].astype(str))
    moe_width = df.loc[df["num_experts"].notna(), "num_latents"]
    reference = moe_width.max() if len(moe_width) else df["num_latents"].max()
    df["width_fraction"] = df["num_latents"] / reference if reference and reference == reference else np.nan
    l0 = pd.to_numeric(df["l0_heldout"], errors="coerce") if "l0_heldout" in df else pd.Series(np.nan, index=df.index)
    df["x_l0"] = np.where(df["architecture"].isin(VARIABLE_L0) & l0.notna(), l0, df["k"])
    return df


@lru_cache(maxsize=1)
def paper_reported() -> dict[str, Any]:
    """The paper's reported values (``moesae/data/paper_reported.yaml``)."""
    import yaml

    text = resources.files("moesae").joinpath("data/paper_reported.yaml").read_text()
    return yaml.safe_load(text)


def paper_frame(paper: dict[str, Any] | None = None) -> pd.DataFrame:
    """The paper's series as rows with our metrics.csv columns, one row per configuration and L0.

    When two tables give the same configuration and metric, the first listed wins (see the notes in
    the YAML for where the paper's own tables disagree). Fig 10's scaled overlap is derived from the
    plain overlap and the reported percent change.
    """
    paper = paper or paper_reported()
    M = paper["setting"]["num_latents"]
    rows: dict[tuple, dict[str, Any]] = {}

    def row_for(identity: dict[str, Any], label: str, k: int) -> dict[str, Any]:
        key = tuple(sorted(identity.items())) + (("k", k),)
        if key not in rows:
            rows[key] = {"variant": f"paper: {label} k{k}", "family": label, **identity, "k": k, "seed": 0,
                         "num_latents": identity.get("num_latents", M)}
        return rows[key]

    for s in paper["series"]:
        for i, (k, v) in enumerate(zip(s["k"], s["values"])):
            row = row_for(s["identity"], s["label"], k)
            row.setdefault(s["metric"], float(v))
            if "l0_measured" in s:
                row.setdefault("l0_heldout", float(s["l0_measured"][i]))
    for imp in paper.get("fig10_improvement_pct", []):
        e = imp["active_experts"]
        plain_id = {"architecture": "scale", "num_experts": 64, "active_experts": e, "feature_scaling": "none"}
        for k, pct in zip(imp["k"], imp["values"]):
            plain = rows.get(tuple(sorted(plain_id.items())) + (("k", k),), {}).get("activation_overlap")
            if plain is None:
                continue
            scaled = row_for({**plain_id, "feature_scaling": "mean"}, f"N=64 e={e} scaled", k)
            scaled.setdefault("activation_overlap", plain * (1 - pct / 100))
    df = pd.DataFrame(list(rows.values()))
    df["d_in"] = paper["setting"]["d_in"]
    return df


# ---- selection -----------------------------------------------------------------------------------
def select(df: pd.DataFrame, match: dict[str, Any]) -> pd.DataFrame:
    """Rows whose identity columns equal ``match`` (numbers compared with a tolerance)."""
    mask = pd.Series(True, index=df.index)
    for col, want in match.items():
        if col not in df:
            return df.iloc[0:0]
        if isinstance(want, (int, float)) and not isinstance(want, bool):
            mask &= np.isclose(pd.to_numeric(df[col], errors="coerce"), want, rtol=1e-3)
        else:
            mask &= df[col].astype(str) == str(want)
    return df[mask]


def aggregate(df: pd.DataFrame, x: str, y: str, by: list[str] | None = None) -> pd.DataFrame:
    """Mean, standard deviation and count of ``y`` over seeds, per ``x`` (and ``by``)."""
    keys = list(by or []) + [x]
    if y not in df or df.empty:
        return pd.DataFrame(columns=keys + ["mean", "std", "n"])
    data = df[keys + [y]].copy()
    data[y] = pd.to_numeric(data[y], errors="coerce")
    data = data.dropna(subset=[y])
    out = data.groupby(keys, dropna=False)[y].agg(["mean", "std", "count"]).reset_index()
    return out.rename(columns={"count": "n"}).sort_values(keys)


def pick_l0(available, targets) -> list[tuple[int, int]]:
    """For each target L0, the nearest available one (in log scale), each used at most once.

    Returns ``[(target, used)]``; ties go to the smaller L0. Targets beyond what is available
    are dropped rather than shown twice.
    """
    avail = sorted({int(a) for a in available if a == a})
    picked: list[tuple[int, int]] = []
    for t in targets:
        free = [a for a in avail if a not in {u for _, u in picked}]
        if not free:
            break
        best = min(free, key=lambda a: (abs(math.log2(a) - math.log2(t)), a))
        picked.append((int(t), best))
    return picked


def l0_label(target: int, used: int) -> str:
    return f"L0 = {used}" if used == target else f"L0 = {used} (paper: {target})"


def sweep_experts(df: pd.DataFrame) -> float | None:
    """The N of the active-expert sweep: the Scale N with the most distinct e values."""
    scale = df[df["architecture"] == "scale"].dropna(subset=["num_experts", "active_experts"])
    if scale.empty:
        return None
    counts = scale.groupby("num_experts")["active_experts"].nunique()
    return float(counts.sort_values(kind="stable").index[-1])


def series_rows(df: pd.DataFrame, series: list[Series], extra_archs: bool = True) -> list[tuple[str, pd.DataFrame]]:
    """``[(label, rows)]`` for each series with rows; other architectures appended per family."""
    out, used = [], set()
    for s in series:
        rows = select(df, s.match)
        used |= set(rows.index)
        for fam, fam_rows in rows.groupby("family", sort=True):
            label = s.label if rows["family"].nunique() == 1 else f"{s.label} [{fam}]"
            out.append((label, fam_rows))
    if extra_archs:
        rest = df[~df.index.isin(used) & ~df["architecture"].isin(["scale", "switch", "topk"])]
        for fam, fam_rows in rest.groupby("family", sort=True):
            arch = fam_rows["architecture"].iloc[0]
            out.append((f"{ARCH_NAMES.get(arch, arch)} [{fam}]", fam_rows))
    return out


def absent_series(df: pd.DataFrame, series: list[Series]) -> list[str]:
    return [s.label for s in series if s.expected and select(df, s.match).empty]


# ---- style and drawing helpers -----------------------------------------------------------------
_STYLE_SET = False


def set_style() -> None:
    """The one shared style (seaborn whitegrid, colour-blind palette)."""
    global _STYLE_SET
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind", font_scale=0.9)
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight",
                         "axes.titlesize": 10, "legend.fontsize": 8, "svg.fonttype": "none"})
    _STYLE_SET = True


def _figure(nrows: int, ncols: int, width: float = 4.2, height: float = 3.3, **kw):
    import matplotlib.pyplot as plt

    if not _STYLE_SET:
        set_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)
    return fig, axes


def _colors(labels: list[str]) -> dict[str, Any]:
    import seaborn as sns

    palette = sns.color_palette("colorblind", 10) + sns.color_palette("dark", 10)
    fixed = [s.label for s in FIG3_SERIES]
    ordered = fixed + [lab for lab in labels if lab not in fixed]
    return {lab: palette[i % len(palette)] for i, lab in enumerate(ordered)}


def note(ax, text: str, loc: str = "lower left") -> None:
    """A small grey note inside a panel (absent series, L0 used instead of the paper's)."""
    y, va = (0.02, "bottom") if loc.startswith("lower") else (0.98, "top")
    x, ha = (0.98, "right") if loc.endswith("right") else (0.02, "left")
    ax.text(x, y, text, transform=ax.transAxes, fontsize=7, color="0.35", va=va, ha=ha, wrap=True)


def placeholder(ax, text: str) -> None:
    """A panel that says plainly why it is empty, instead of drawing an empty axis."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, wrap=True,
            bbox={"boxstyle": "round,pad=0.8", "facecolor": "#fff7e6", "edgecolor": "#e0a030"})


def line(ax, agg: pd.DataFrame, x: str, label: str, color=None, linestyle="-", marker="o", paper: bool = False):
    """One series; error bars (± std over seeds) where a point has more than one seed."""
    if agg.empty:
        return
    if paper:
        ax.plot(agg[x], agg["mean"], linestyle=(0, (4, 2)), color=color, alpha=0.55, linewidth=1.2,
                marker=".", markersize=4, label=f"{label} (paper)")
        return
    yerr = agg["std"].where(agg["n"] > 1)
    ax.errorbar(agg[x], agg["mean"], yerr=None if yerr.isna().all() else yerr.fillna(0), color=color,
                linestyle=linestyle, marker=marker, markersize=4, linewidth=1.5, capsize=2, label=label)


def _log2_axis(ax, values) -> None:
    """Log-2 x axis with a tick at every x value drawn (ours and, when overlaid, the paper's)."""
    drawn = [x for ln in ax.get_lines() for x in np.asarray(ln.get_xdata(), dtype=float)]
    vals = sorted({float(v) for v in list(values) + drawn if v == v and v > 0})
    if not vals:
        return
    ax.set_xscale("log", base=2)
    if all(float(v).is_integer() for v in vals):
        ax.set_xticks(vals)
        ax.set_xticklabels([f"{int(v)}" for v in vals])
        ax.minorticks_off()


def _seeds_note(df: pd.DataFrame) -> str:
    n = df.groupby(["family", "k"])["seed"].nunique().max() if not df.empty else 1
    return f"mean ± std over {n} seeds" if n and n > 1 else "one seed"


def save_figure(fig, name: str, figures_dir: str | Path = "reports/figures", formats=("png", "svg")) -> list[Path]:
    """Save ``<figures_dir>/<name>.<fmt>`` for each format, atomically."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = figures_dir / f"{name}.{fmt}"
        tmp = figures_dir / f".{name}.{os.getpid()}.tmp.{fmt}"
        fig.savefig(tmp, format=fmt)
        tmp.replace(path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


# ---- Fig 1 -------------------------------------------------------------------------------------------
def architecture_config(root: str | Path = ".", variant: str | None = None) -> tuple[dict[str, Any], str]:
    """A Scale SAE configuration to draw: ``(cfg, where it came from)``.

    Prefers a trained checkpoint's ``models/<variant>/cfg.json`` (with Feature Scaling, the largest
    e, then the largest k), else the matching entry of ``params.yaml`` ``variants``.
    """
    import yaml

    root = Path(root)
    variants: dict[str, dict[str, Any]] = {}
    params_path = root / "params.yaml"
    if params_path.is_file():
        variants = (yaml.safe_load(params_path.read_text()) or {}).get("variants") or {}
    candidates = []
    for name, v in variants.items():
        if v.get("architecture") == "scale" and v.get("feature_scaling", "mean") != "none":
            candidates.append((int(v.get("num_experts", 0)), int(v.get("active_experts", 0)), int(v.get("k", 0)), name))
    # The smallest N draws every expert; among those, the largest e and k show the most structure.
    names = [variant] if variant else [c[-1] for c in sorted(candidates, key=lambda c: (c[0], -c[1], -c[2], c[3]))]
    if not names:
        names = sorted(p.parent.name for p in (root / "models").glob("*/*/cfg.json"))
    for name in names:
        family = str(variants.get(name, {}).get("family", ""))
        found = sorted((root / "models").glob(f"{family or '*'}/{name}/cfg.json"))
        if found:
            cfg = json.loads(found[0].read_text())
            if cfg.get("architecture") == "scale" and (variant or cfg.get("feature_scaling") != "none"):
                return cfg, found[0].relative_to(root).as_posix()
    for name in names:
        if name in variants:
            cfg = dict(variants[name])
            return cfg, f"params.yaml, variant {name} (no trained checkpoint found)"
    raise FileNotFoundError(
        f"no Scale SAE configuration under {root}: neither models/<family>/<variant>/cfg.json nor params.yaml "
        "variants with architecture 'scale'; run `moesae profile default` and the train stage"
    )


def fig01_architecture(cfg: dict[str, Any], source: str = "", d_in: int | None = None):
    """The Scale SAE diagram drawn from a real configuration (N, e, m, k, Feature Scaling, d)."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    N = int(cfg["num_experts"])
    e = int(cfg.get("active_experts", 1))
    M = int(cfg["num_latents"])
    k = int(cfg["k"])
    m = M // N
    d = cfg.get("d_in") or d_in
    fs = cfg.get("feature_scaling", "mean")
    gate = cfg.get("gate", "prob_softmax")
    fig, axes = _figure(1, 1, width=12.5, height=4.8)
    ax = axes[0, 0]
    ax.set_xlim(0, 25)
    ax.set_ylim(0, 9.4)
    ax.set_axis_off()

    def box(x, y, w, h, text, color="#dbe9f6", edge="#3b6ea5", fs_=8.5, weight="normal"):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.08", facecolor=color, edgecolor=edge, linewidth=1.2))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs_, weight=weight)

    def arrow(x0, y0, x1, y1, color="0.3"):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=11, color=color, linewidth=1.1))

    d_txt = f"d = {d}" if d else "d"
    box(0.2, 4.1, 1.8, 1.2, f"x\n({d_txt})", color="#eeeeee", edge="0.4")
    box(2.3, 6.3, 4.9, 1.7, f"Router\np = softmax(W_g(x − b_g) + c_g)\nover N = {N} experts", color="#fde8c8", edge="#c9822b")
    arrow(1.1, 5.3, 3.2, 6.8)
    # Experts: up to 16 slots drawn; the highlighted ones are an illustrative selection of e.
    shown = min(N, 16)
    selected = set(np.linspace(0, shown - 1, num=min(e, shown)).round().astype(int).tolist()) if e < N else set(range(shown))
    x0, width_all = 7.6, 8.4
    slot = width_all / shown
    for i in range(shown):
        is_sel = i in selected
        ax.add_patch(FancyBboxPatch((x0 + i * slot + 0.04, 4.2), slot - 0.12, 1.0, boxstyle="round,pad=0.02",
                                    facecolor="#4c9f70" if is_sel else "#f2f2f2", edgecolor="#2f6b48" if is_sel else "0.6"))
    more = f"; first {shown} of {N} drawn" if N > shown else ""
    ax.text(x0 + width_all / 2, 3.75, f"N = {N} experts × m = {m} features each{more}", ha="center", fontsize=8.5)
    ax.text(x0 + width_all / 2, 3.25, f"green: the e = {e} selected for a token (illustrative), the only ones computed",
            ha="center", fontsize=7.5, color="0.35")
    arrow(7.2, 7.3, x0 + 0.6, 5.3)
    arrow(2.0, 4.7, x0, 4.7)
    gate_txt = "w_i = softmax over S of p_i" if gate == "prob_softmax" else "w_i = softmax over S of the logits"
    ax.text(x0 + 1.4, 6.3, f"S = the top-{e} experts by p\n{gate_txt}", ha="left", fontsize=8, color="#8a5a1c")
    if fs == "none":
        fs_text = "Feature Scaling: off\n(ω = 0, T = I, frozen)"
    elif fs == "mean":
        fs_text = "Feature Scaling (mean)\nL_i = T μ_i,  H_i = W_i − 1 L_iᵀ\nŴ_i = 1 L_iᵀ + (1 + ω_i) H_i\nω ∈ R^N (one per expert), T ∈ R^(d×d)"
    elif fs == "identity":
        fs_text = "Feature Scaling (identity)\nL_i = μ_i,  H_i = W_i − 1 L_iᵀ\nŴ_i = 1 L_iᵀ + (1 + ω_i) H_i"
    else:
        fs_text = f"Feature Scaling ({fs})\nL_i learned per expert\nŴ_i = 1 L_iᵀ + (1 + ω_i) H_i"
    box(6.0, 0.4, 6.4, 2.3, fs_text, color="#efe3f7", edge="#7d4e9e", fs_=8)
    arrow(9.0, 2.7, 9.0, 3.2)
    ax.text(12.9, 1.6, f"a_i = ReLU(Ŵ_i (x − b_dec) + b_i)\nf = concat over S of w_i · a_i\n{e} × {m} = {e * m} candidate features",
            fontsize=8, va="center")
    box(16.9, 4.0, 2.6, 1.4, f"Global TopK\nkeep k = {k}\nof {e * m}", color="#fbe0e0", edge="#b04040", weight="bold")
    arrow(x0 + width_all, 4.7, 16.9, 4.7)
    box(20.2, 4.0, 2.9, 1.4, f"Decoder\nW_dec: {M} × {d or 'd'}\n(+ b_dec)", color="#dbe9f6")
    arrow(19.5, 4.7, 20.2, 4.7)
    box(23.7, 4.1, 1.1, 1.2, "x̂", color="#eeeeee", edge="0.4", fs_=11)
    arrow(23.1, 4.7, 23.7, 4.7)
    ax.text(0.2, 9.3, f"Scale SAE · M = {M}, N = {N}, e = {e}, m = M/N = {m}, k = {k}, Feature Scaling = {fs}",
            fontsize=10, weight="bold", va="top")
    if d:
        flops = N * d + e * m * d + k * d
        ax.text(0.2, 8.6, f"forward MACs per token: N·d + e·m·d + k·d = {flops:,} (a dense TopK of width M: {M * d + k * d:,})",
                fontsize=7.5, color="0.3", va="top")
    if source:
        ax.text(24.8, 0.1, f"drawn from {source}", fontsize=7, color="0.45", ha="right")
    return fig


# ---- Fig 2 -------------------------------------------------------------------------------------------
def fig02_omega(ctx: Context):
    """Mean ω vs e, one line per L0, N of the expert sweep, with Feature Scaling."""
    fig, axes = _figure(1, 1, width=5.5, height=3.8)
    ax = axes[0, 0]
    df = ctx.metrics
    N = sweep_experts(df)
    rows = df[(df["architecture"] == "scale") & (df["num_experts"] == N) & (df["feature_scaling"] == "mean")] if N else df.iloc[0:0]
    if "omega_mean" not in rows or rows["omega_mean"].notna().sum() == 0:
        placeholder(ax, "No ω values: no Scale SAE with Feature Scaling in results/metrics.csv (column omega_mean).")
        return fig
    agg = aggregate(rows, "active_experts", "omega_mean", by=["k"])
    ks = sorted(agg["k"].unique())
    import seaborn as sns

    pal = sns.color_palette("viridis", len(ks))
    for color, k in zip(pal, ks):
        line(ax, agg[agg["k"] == k], "active_experts", f"L0 = {int(k)}", color=color)
        if ctx.paper is not None:
            p = ctx.paper[(ctx.paper["num_experts"] == 64) & (ctx.paper["feature_scaling"] == "mean") & (ctx.paper["k"] == k)]
            line(ax, aggregate(p, "active_experts", "omega_mean"), "active_experts", f"L0 = {int(k)}", color=color, paper=True)
    _log2_axis(ax, agg["active_experts"])
    ax.set_xlabel("active experts e")
    ax.set_ylabel("mean ω (raw)")
    ax.set_title(f"N = {int(N)}, Feature Scaling (mean) · {_seeds_note(rows)}")
    ax.legend(frameon=False)
    return fig


# ---- Fig 3 -------------------------------------------------------------------------------------------
AUTOINTERP_QUANTILES = ["not"] + [f"q{i}" for i in range(1, 11)]


def fig03_main_comparison(ctx: Context):
    fig, axes = _figure(2, 2, width=5.2, height=3.8)
    df = ctx.metrics
    rows = series_rows(df, FIG3_SERIES)
    colors = _colors([lab for lab, _ in rows])
    panels = [("mse_heldout", "MSE", "(a) MSE · training domain (held-out)"),
              ("mse_cross", "MSE", "(b) MSE · cross-domain"),
              ("loss_recovered_zero_cross", "loss recovered", "(c) loss recovered · cross-domain")]
    absent = absent_series(df, FIG3_SERIES)
    for ax, (metric, ylabel, title) in zip(axes.flat[:3], panels):
        xs = []
        for label, r in rows:
            agg = aggregate(r, "x_l0", metric)
            line(ax, agg, "x_l0", label, color=colors[label])
            xs += list(agg["x_l0"])
        if ctx.paper is not None:
            for label, r in series_rows(ctx.paper, FIG3_SERIES):
                line(ax, aggregate(r, "x_l0", metric), "x_l0", label, color=colors.get(label), paper=True)
        if not xs:
            placeholder(ax, f"No values for {metric} in results/metrics.csv.")
            continue
        _log2_axis(ax, xs)
        ax.set_xlabel("L0")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if absent:
            note(ax, "absent: " + ", ".join(absent), loc="upper left" if metric.startswith("loss") else "lower left")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    _autointerp_panel(ctx, axes[1, 1], colors)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), frameon=False,
               bbox_to_anchor=(0.5, 1.0 + 0.025 * math.ceil(len(labels) / 4)))
    fig.text(0.99, 0.005, _seeds_note(df), ha="right", fontsize=7, color="0.4")
    fig.tight_layout()
    return fig


def _autointerp_panel(ctx: Context, ax, colors: dict[str, Any]) -> None:
    path = ctx.results_dir / "autointerp" / "scores.csv"
    if not path.is_file():
        placeholder(ax, "(d) Auto-interp accuracy: not computed yet.\n"
                        "results/autointerp/scores.csv does not exist;\nrun the autointerp stage "
                        "(`moesae autointerp`)\nto fill this panel.")
        return
    scores = pd.read_csv(path)
    if scores.empty:
        placeholder(ax, "(d) Auto-interp accuracy: results/autointerp/scores.csv has no rows yet.")
        return
    label_of = {}
    for label, r in series_rows(ctx.metrics, FIG3_SERIES):
        for v in r["variant"]:
            label_of[v] = label
    scores = scores[scores["quantile"].isin(AUTOINTERP_QUANTILES)].copy()
    scores["pos"] = scores["quantile"].map({q: i for i, q in enumerate(AUTOINTERP_QUANTILES)})
    for variant, r in scores.groupby("variant", sort=True):
        r = r.sort_values("pos")
        label = label_of.get(variant, variant)
        k = ctx.metrics.loc[ctx.metrics["variant"] == variant, "k"]
        name = f"{label} (L0 {int(k.iloc[0])})" if len(k) else label
        err = None
        if {"ci_low", "ci_high"} <= set(r.columns):
            err = np.vstack([r["accuracy"] - r["ci_low"], r["ci_high"] - r["accuracy"]]).clip(min=0)
        ax.errorbar(r["pos"], r["accuracy"], yerr=err, marker="o", markersize=3, capsize=2, color=colors.get(label), label=name)
    if ctx.paper is not None:
        for s in paper_reported()["autointerp"]["series"]:
            ax.plot(range(len(AUTOINTERP_QUANTILES)), s["accuracy"], linestyle=(0, (4, 2)), alpha=0.5, label=f"{s['label']} (paper)")
    ax.set_xticks(range(len(AUTOINTERP_QUANTILES)))
    ax.set_xticklabels(AUTOINTERP_QUANTILES, fontsize=7)
    ax.set_xlabel("activation quantile (cumulative)")
    ax.set_ylabel("fuzzing accuracy")
    ax.set_title("(d) auto-interp accuracy")
    ax.legend(frameon=False, fontsize=6)


# ---- Fig 4 -------------------------------------------------------------------------------------------
def _sweep_rows(df: pd.DataFrame, scaling: str) -> tuple[pd.DataFrame, float | None]:
    N = sweep_experts(df)
    if N is None:
        return df.iloc[0:0], None
    rows = df[(df["architecture"] == "scale") & (df["num_experts"] == N) & (df["feature_scaling"] == scaling)]
    return rows, N


def _e_palette(values) -> dict[float, Any]:
    import seaborn as sns

    vals = sorted({float(v) for v in values})
    return dict(zip(vals, sns.color_palette("crest", len(vals)))) if vals else {}


def fig04_active_experts(ctx: Context):
    fig, axes = _figure(2, 2, width=4.6, height=3.4)
    rows, N = _sweep_rows(ctx.metrics, "none")
    if rows.empty:
        for ax in axes.flat:
            placeholder(ax, "No Scale SAE without Feature Scaling in results/metrics.csv.")
        return fig
    panels = [("mse_heldout", "MSE · training domain"), ("loss_recovered_zero_heldout", "loss recovered · training domain"),
              ("mse_cross", "MSE · cross-domain"), ("loss_recovered_zero_cross", "loss recovered · cross-domain")]
    pal = _e_palette(rows["active_experts"])
    for ax, (metric, title) in zip(axes.flat, panels):
        agg = aggregate(rows, "k", metric, by=["active_experts"])
        for e, color in pal.items():
            line(ax, agg[agg["active_experts"] == e], "k", f"e = {int(e)}", color=color)
            if ctx.paper is not None:
                p = ctx.paper[(ctx.paper["num_experts"] == 64) & (ctx.paper["feature_scaling"] == "none") & (ctx.paper["active_experts"] == e)]
                line(ax, aggregate(p, "k", metric), "k", f"e = {int(e)}", color=color, paper=True)
        _log2_axis(ax, agg["k"])
        ax.set_xlabel("L0")
        ax.set_title(title)
    axes[0, 0].legend(frameon=False, title=f"N = {int(N)}")
    fig.text(0.99, 0.005, _seeds_note(rows), ha="right", fontsize=7, color="0.4")
    fig.tight_layout()
    return fig


# ---- Fig 5 -------------------------------------------------------------------------------------------
def fig05_feature_scaling(ctx: Context, l0_targets=(2, 32), e_targets=(8, 16)):
    fig, axes = _figure(2, 4, width=3.5, height=3.0)
    plain, N = _sweep_rows(ctx.metrics, "none")
    scaled, _ = _sweep_rows(ctx.metrics, "mean")
    if plain.empty and scaled.empty:
        for ax in axes.flat:
            placeholder(ax, "No Scale SAE with / without Feature Scaling in results/metrics.csv.")
        return fig
    both = pd.concat([plain, scaled])
    l0s = pick_l0(both["k"], l0_targets)
    es = pick_l0(both["active_experts"], e_targets)
    for row, (metric, ylabel) in enumerate([("mse_heldout", "MSE"), ("loss_recovered_zero_heldout", "loss recovered")]):
        for col in range(4):
            ax = axes[row, col]
            if col < 2:
                if col >= len(l0s):
                    placeholder(ax, "Only one L0 value in this run.")
                    continue
                target, used = l0s[col]
                for rows, style, lab in [(scaled, "-", "with"), (plain, "--", "without")]:
                    line(ax, aggregate(rows[rows["k"] == used], "active_experts", metric), "active_experts", lab,
                         linestyle=style, color="#2b7bba" if lab == "with" else "#888888")
                if ctx.paper is not None:
                    for fsn, lab in [("mean", "with"), ("none", "without")]:
                        p = ctx.paper[(ctx.paper["num_experts"] == 64) & (ctx.paper["feature_scaling"] == fsn) & (ctx.paper["k"] == target)]
                        line(ax, aggregate(p, "active_experts", metric), "active_experts", lab, color="#c0504d", paper=True)
                _log2_axis(ax, both["active_experts"])
                ax.set_xlabel("active experts e")
                ax.set_title(l0_label(target, used))
            else:
                if col - 2 >= len(es):
                    placeholder(ax, "Only one value of e in this run.")
                    continue
                target, used = es[col - 2]
                for rows, style, lab in [(scaled, "-", "with"), (plain, "--", "without")]:
                    line(ax, aggregate(rows[rows["active_experts"] == used], "k", metric), "k", lab,
                         linestyle=style, color="#2b7bba" if lab == "with" else "#888888")
                if ctx.paper is not None:
                    for fsn, lab in [("mean", "with"), ("none", "without")]:
                        p = ctx.paper[(ctx.paper["num_experts"] == 64) & (ctx.paper["feature_scaling"] == fsn) & (ctx.paper["active_experts"] == target)]
                        line(ax, aggregate(p, "k", metric), "k", lab, color="#c0504d", paper=True)
                _log2_axis(ax, both["k"])
                ax.set_xlabel("L0")
                ax.set_title(f"e = {used}" if used == target else f"e = {used} (paper: {target})")
            if col == 0:
                ax.set_ylabel(ylabel)
    axes[0, 0].legend(frameon=False, title=f"Feature Scaling, N = {int(N)}" if N else None)
    fig.text(0.99, 0.005, _seeds_note(both), ha="right", fontsize=7, color="0.4")
    fig.tight_layout()
    return fig


# ---- Fig 6 -------------------------------------------------------------------------------------------
def fig06_specialisation(ctx: Context, l0_targets=(16, 32)):
    table = ctx.table("specialisation")
    meta_cols = ["variant", "family", "k", "num_experts", "active_experts", "feature_scaling", "seed"]
    if table is None or table.empty:
        fig, axes = _figure(1, 1, width=6, height=3)
        placeholder(axes[0, 0], "No expert-specialisation table: results/tables/specialisation.csv is missing "
                                "(written by `moesae collect`).")
        return fig
    moe = [s for s in FIG3_SERIES if s.match["architecture"] != "topk"]
    labelled = [r.assign(series=label) for label, r in series_rows(ctx.metrics, moe, extra_archs=False)]
    meta = pd.concat(labelled) if labelled else ctx.metrics.iloc[0:0].assign(series="")
    df = table.merge(meta[meta_cols + ["series"]], on="variant", how="inner")
    l0s = pick_l0(df["k"], l0_targets)
    fig, axes = _figure(1, max(len(l0s), 1), width=5.0, height=4.0)
    if not l0s:
        placeholder(axes[0, 0], "results/tables/specialisation.csv has no rows for the Scale / Switch series of Fig 3.")
        return fig
    colors = _colors(sorted(df["series"].unique()))
    for ax, (target, used) in zip(axes.flat, l0s):
        sub = df[df["k"] == used].copy()
        sub["expert_fraction"] = sub["rank"] / sub["num_experts"]
        for label, r in sub.groupby("series", sort=False):
            agg = aggregate(r, "expert_fraction", "cumulative_share")
            line(ax, agg, "expert_fraction", label, color=colors[label], marker="")
        absent = [s.label for s in moe if s.expected and s.label not in set(sub["series"])]
        if absent:
            note(ax, "absent: " + ", ".join(absent), loc="upper left")
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="uniform")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("experts, sorted by usage (fraction of N)")
        ax.set_ylabel("cumulative share of top features")
        ax.set_title(l0_label(target, used))
    axes.flat[-1].legend(frameon=False, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


# ---- Fig 7 / 10 heatmaps -------------------------------------------------------------------------------
def _heatmap(ax, pivot: pd.DataFrame, title: str, fmt: str, cmap: str, center=None, label: str = ""):
    import seaborn as sns

    sns.heatmap(pivot, ax=ax, annot=True, fmt=fmt, cmap=cmap, center=center, cbar_kws={"label": label},
                annot_kws={"fontsize": 7}, linewidths=0.5)
    ax.set_xlabel("L0")
    ax.set_ylabel("active experts e")
    ax.set_title(title)
    ax.set_yticklabels([f"{int(float(t.get_text()))}" for t in ax.get_yticklabels()], rotation=0)
    ax.set_xticklabels([f"{int(float(t.get_text()))}" for t in ax.get_xticklabels()], rotation=0)


def _pivot(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    agg = aggregate(rows, "k", metric, by=["active_experts"])
    return agg.pivot(index="active_experts", columns="k", values="mean")


def fig07_redundancy(ctx: Context, threshold: float = 0.8):
    metric = f"redundancy_{threshold:g}"
    rows, N = _sweep_rows(ctx.metrics, "none")
    fig, axes = _figure(1, 1, width=5.5, height=3.8)
    if rows.empty or metric not in rows or rows[metric].notna().sum() == 0:
        placeholder(axes[0, 0], f"No {metric} values for Scale SAEs without Feature Scaling.")
        return fig
    _heatmap(axes[0, 0], _pivot(rows, metric), f"redundancy (max cos > {threshold:g}), N = {int(N)}, no scaling",
             ".2g", "rocket_r", label="fraction of features")
    return fig


def fig10_activation_overlap(ctx: Context):
    plain, N = _sweep_rows(ctx.metrics, "none")
    scaled, _ = _sweep_rows(ctx.metrics, "mean")
    fig, axes = _figure(1, 2, width=5.2, height=3.8)
    if plain.empty or plain["activation_overlap"].notna().sum() == 0:
        for ax in axes.flat:
            placeholder(ax, "No activation-overlap values for Scale SAEs without Feature Scaling.")
        return fig
    p = _pivot(plain, "activation_overlap")
    _heatmap(axes[0, 0], p, f"activation overlap, no scaling (N = {int(N)})", ".2f", "mako_r", label="overlap")
    if scaled.empty:
        placeholder(axes[0, 1], "No Scale SAEs with Feature Scaling: the change cannot be computed.")
    else:
        s = _pivot(scaled, "activation_overlap")
        change = overlap_improvement_pct(p, s)
        _heatmap(axes[0, 1], change, "change with Feature Scaling (%)", ".1f", "vlag_r", center=0, label="% less overlap")
    fig.tight_layout()
    return fig


def overlap_improvement_pct(plain: pd.DataFrame, scaled: pd.DataFrame) -> pd.DataFrame:
    """(plain − scaled) / plain · 100 on the cells both have: positive = less overlap with scaling."""
    plain, scaled = plain.align(scaled, join="inner")
    return (plain - scaled) / plain * 100


# ---- Fig 8 / 9 -----------------------------------------------------------------------------------------
def fig08_redundancy_scaling(ctx: Context, l0_targets=(16, 32), threshold: float = 0.8):
    metric = f"redundancy_{threshold:g}"
    plain, N = _sweep_rows(ctx.metrics, "none")
    scaled, _ = _sweep_rows(ctx.metrics, "mean")
    both = pd.concat([plain, scaled])
    l0s = pick_l0(both["k"], l0_targets) if not both.empty else []
    fig, axes = _figure(1, max(len(l0s), 1), width=4.6, height=3.5)
    if not l0s:
        placeholder(axes[0, 0], "No Scale SAEs of the expert sweep in results/metrics.csv.")
        return fig
    for ax, (target, used) in zip(axes.flat, l0s):
        for rows, style, lab, color in [(plain, "--", "without", "#888888"), (scaled, "-", "with", "#2b7bba")]:
            line(ax, aggregate(rows[rows["k"] == used], "active_experts", metric), "active_experts", lab, color=color, linestyle=style)
        if ctx.paper is not None:
            for fsn, lab in [("none", "without"), ("mean", "with")]:
                p = ctx.paper[(ctx.paper["num_experts"] == 64) & (ctx.paper["feature_scaling"] == fsn) & (ctx.paper["k"] == target)]
                line(ax, aggregate(p, "active_experts", metric), "active_experts", lab, color="#c0504d", paper=True)
        _log2_axis(ax, both["active_experts"])
        ax.set_xlabel("active experts e")
        ax.set_ylabel(f"redundancy (max cos > {threshold:g})")
        ax.set_title(l0_label(target, used))
        if scaled.empty:
            note(ax, "absent: runs with Feature Scaling", loc="upper left")
    axes[0, 0].legend(frameon=False, title="Feature Scaling")
    fig.tight_layout()
    return fig


def fig09_expert_redundancy(ctx: Context, threshold: float = 0.8):
    inner, inter = f"in_expert_redundancy_{threshold:g}", f"inter_expert_redundancy_{threshold:g}"
    fig, axes = _figure(1, 2, width=4.6, height=3.5, sharey=True)
    any_drawn = False
    for ax, (scaling, title) in zip(axes.flat, [("none", "without Feature Scaling"), ("mean", "with Feature Scaling")]):
        rows, N = _sweep_rows(ctx.metrics, scaling)
        if rows.empty or inner not in rows or rows[inner].notna().sum() == 0:
            placeholder(ax, f"No in-expert redundancy for Scale SAEs {title}.")
            continue
        import seaborn as sns

        ks = sorted(rows["k"].unique())
        for color, k in zip(sns.color_palette("viridis", len(ks)), ks):
            r = rows[rows["k"] == k]
            line(ax, aggregate(r, "active_experts", inner), "active_experts", f"L0 = {int(k)} in-expert", color=color)
            line(ax, aggregate(r, "active_experts", inter), "active_experts", f"L0 = {int(k)} random subsets",
                 color=color, linestyle="--", marker="x")
        _log2_axis(ax, rows["active_experts"])
        ax.set_xlabel("active experts e")
        ax.set_title(f"{title}, N = {int(N)}")
        any_drawn = True
    axes[0, 0].set_ylabel(f"redundancy (max cos > {threshold:g})")
    if any_drawn:
        for ax in axes.flat:
            if ax.has_data():
                ax.legend(frameon=False, fontsize=6)
                break
    fig.tight_layout()
    return fig


# ---- Fig 11 --------------------------------------------------------------------------------------------
DECOMPOSITIONS = [("mean", "mean-based (paper)"), ("identity", "identity-based"), ("learned", "learned-based"), ("none", "no Feature Scaling")]


def fig11_decomposition(ctx: Context, e_target: int = 8):
    df = ctx.metrics
    scale = df[(df["architecture"] == "scale") & df["feature_scaling"].isin(["identity", "learned"])]
    fig, axes = _figure(1, 1, width=5.5, height=3.8)
    ax = axes[0, 0]
    if scale.empty:
        placeholder(ax, "No identity- or learned-decomposition runs in results/metrics.csv.")
        return fig
    N = scale["num_experts"].mode().iloc[0]
    e = scale["active_experts"].mode().iloc[0]
    absent = []
    xs = []
    for fs, label in DECOMPOSITIONS:
        rows = df[(df["architecture"] == "scale") & (df["num_experts"] == N) & (df["active_experts"] == e) & (df["feature_scaling"] == fs)]
        if rows.empty:
            absent.append(label)
            continue
        agg = aggregate(rows, "k", "mse_heldout")
        line(ax, agg, "k", label, linestyle="--" if fs == "none" else "-")
        xs += list(agg["k"])
        if ctx.paper is not None:
            p = ctx.paper[(ctx.paper["num_experts"] == 64) & (ctx.paper["active_experts"] == e_target) & (ctx.paper["feature_scaling"] == fs)]
            line(ax, aggregate(p, "k", "mse_heldout"), "k", label, color="0.5", paper=True)
    _log2_axis(ax, xs)
    ax.set_xlabel("L0")
    ax.set_ylabel("MSE · training domain")
    ax.set_title(f"N = {int(N)}, e = {int(e)} · {_seeds_note(scale)}")
    ax.legend(frameon=False)
    if absent:
        note(ax, "absent: " + ", ".join(absent))
    return fig


# ---- Table 1 -------------------------------------------------------------------------------------------
TABLE1_COLUMNS = [
    ("family", "family"), ("architecture", "architecture"), ("num_experts", "N"), ("active_experts", "e"),
    ("feature_scaling", "scaling"), ("num_latents", "M"), ("k", "k"), ("params", "parameters"),
    ("flops_per_token", "FLOPs/token"), ("train_tokens_per_s", "train tokens/s"), ("l0_heldout", "L0"),
    ("mse_heldout", "MSE"), ("fvu_heldout", "FVU"), ("loss_recovered_zero_heldout", "loss rec."),
    ("mse_cross", "MSE (cross)"), ("loss_recovered_zero_cross", "loss rec. (cross)"),
    ("dead_fraction", "dead"), ("redundancy_0.8", "redundancy 0.8"),
]


def table1(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (seeds averaged; ``seeds`` counts them), readable column names."""
    df = prepare(metrics)
    cols = [c for c, _ in TABLE1_COLUMNS if c in df]
    ident = [c for c in ("family", "architecture", "num_experts", "active_experts", "feature_scaling", "num_latents", "k") if c in cols]
    numeric = [c for c in cols if c not in ident]
    for c in numeric:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    grouped = df.groupby(ident, dropna=False, sort=False)
    out = grouped[numeric].mean().reset_index()
    out["seeds"] = grouped["seed"].nunique().values
    out = out.sort_values(["family", "k"], kind="stable")
    out = out[cols + ["seeds"]].rename(columns=dict(TABLE1_COLUMNS))
    return out.reset_index(drop=True)


def format_table1(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for display: integers with thousands separators, metrics with 3–4 significant digits."""
    out = table.copy().astype(object)
    for col in out.columns:
        vals = pd.to_numeric(table[col], errors="coerce")
        if vals.notna().sum() == 0:
            out[col] = table[col].fillna("").astype(str).replace({"nan": ""})
            continue
        if col in {"N", "e", "M", "k", "parameters", "FLOPs/token", "train tokens/s", "seeds"}:
            out[col] = [f"{int(round(v)):,}" if v == v else "–" for v in vals]
        else:
            out[col] = [f"{v:.4g}" if v == v else "–" for v in vals]
    return out


TABLE1_IMAGE_COLUMNS = ["family", "k", "parameters", "FLOPs/token", "train tokens/s", "MSE", "loss rec.",
                        "loss rec. (cross)", "redundancy 0.8", "seeds"]


def fig_table1(metrics: pd.DataFrame, max_rows: int = 60):
    """Table 1 as an image, main columns only (the report and the notebook show the full HTML table)."""
    tab = format_table1(table1(metrics))
    tab = tab[[c for c in TABLE1_IMAGE_COLUMNS if c in tab.columns]].head(max_rows)
    # Plain text in a grid: matplotlib's table() measures every cell repeatedly and is ~10x slower.
    n_rows, n_cols = len(tab) + 1, len(tab.columns)
    widths = [max(len(str(c)), *(len(str(v)) for v in tab[c])) + 2 for c in tab.columns]
    total = float(sum(widths))
    fig, axes = _figure(1, 1, width=max(8.0, 0.075 * total), height=0.35 + 0.19 * n_rows)
    ax = axes[0, 0]
    ax.set_axis_off()
    ax.set_xlim(0, total)
    ax.set_ylim(n_rows, 0)
    lefts = np.concatenate([[0.0], np.cumsum(widths)[:-1]])
    for j, col in enumerate(tab.columns):
        align_left = j == 0
        x = lefts[j] + (0.5 if align_left else widths[j] - 0.5)
        ha = "left" if align_left else "right"
        ax.text(x, 0.5, col, ha=ha, va="center", fontsize=7, weight="bold")
        for i, v in enumerate(tab[col], start=1):
            ax.text(x, i + 0.5, str(v), ha=ha, va="center", fontsize=7)
    for i in range(1, n_rows, 2):
        ax.axhspan(i, i + 1, color="0.95", zorder=0)
    ax.axhline(1, color="0.3", linewidth=0.8)
    return fig
