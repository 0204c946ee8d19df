"""The results tables as the figures, the claims and the report read them (pure data, no drawing).

Everything here reads ``results/metrics.csv``, ``results/tables/*.csv`` and
``results/autointerp/scores.csv``, or the paper's reported values
(``moesae/data/paper_reported.yaml``, turned into rows with the same columns by
:func:`paper_frame`). Nothing about an architecture is typed in: :func:`prepare` asks the SAE
registry (:func:`moesae.saes.describe`) for each configuration's facts (its label for legends,
whether k sets L0 or L0 is measured, whether it is a mixture of experts) from the row's
architecture and config columns.

Series are chosen by configuration (architecture, N, e, Feature Scaling, width), not by family
name, so the same code reads the default profile, the paper profile and the paper's own numbers
(docs/method.md, "Figures"). A series with no rows is named as absent; nothing here fails on a
missing series.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# The paper's Fig 3 configurations (docs/method.md, "Figures"): named in a panel when absent.
MAIN_SCALE = [
    {"architecture": "scale", "num_experts": 16, "active_experts": 2, "feature_scaling": "mean"},
    {"architecture": "scale", "num_experts": 32, "active_experts": 4, "feature_scaling": "mean"},
    {"architecture": "scale", "num_experts": 64, "active_experts": 8, "feature_scaling": "mean"},
]
EXPECTED_MAIN: list[tuple[str, dict[str, Any]]] = [
    ("Scale (16,2)", MAIN_SCALE[0]), ("Scale (32,4)", MAIN_SCALE[1]), ("Scale (64,8)", MAIN_SCALE[2]),
    ("Switch", {"architecture": "switch"}), ("TopK", {"architecture": "topk"}),
]
AUTOINTERP_QUANTILES = ["not"] + [f"q{i}" for i in range(1, 11)]
AUTOINTERP_SCORER = "fuzzing"
"""The paper's Fig 3d scorer (the scores table also holds detection)."""


# ---- loading -----------------------------------------------------------------------------------------
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

    def autointerp_scores(self) -> tuple[pd.DataFrame | None, str]:
        """``results/autointerp/scores.csv`` (the Fig 3d scorer only), or None and why not."""
        path = self.results_dir / "autointerp" / "scores.csv"
        if not path.is_file():
            return None, ("Auto-interp accuracy: not computed yet. results/autointerp/scores.csv does not exist; "
                          "run the autointerp stage (`moesae autointerp`) to fill this panel.")
        scores = pd.read_csv(path)
        if "scorer" in scores and (scores["scorer"] == AUTOINTERP_SCORER).any():
            scores = scores[scores["scorer"] == AUTOINTERP_SCORER]
        scores = scores[scores["quantile"].isin(AUTOINTERP_QUANTILES)] if "quantile" in scores else scores.iloc[0:0]
        if scores.empty:
            return None, "Auto-interp accuracy: results/autointerp/scores.csv has no rows yet."
        scores = scores.assign(pos=scores["quantile"].map({q: i for i, q in enumerate(AUTOINTERP_QUANTILES)}))
        return scores, ""


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


# ---- architecture facts of a row -------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and value == "")


def _convert(value: Any, kind: str) -> Any:
    """A CSV cell as the type of the SAE config field (``kind``: its annotation, as text)."""
    kind = kind.replace("typing.", "").strip()
    if kind.startswith("bool"):
        return value if isinstance(value, bool) else str(value).strip().lower() in {"true", "1", "1.0", "yes"}
    if kind.startswith("int"):
        return int(round(float(value)))
    if kind.startswith("float"):
        return float(value)
    if kind.startswith("str"):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def row_config(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(architecture, config fields)`` of a metrics row: the columns that are fields of its SAE config.

    ``width_fraction`` is not an SAE field (the width is ``num_latents``); empty cells are left to
    the config's defaults. Raises ``ValueError`` for an architecture the registry does not know.
    """
    from .saes.registry import resolve

    architecture = str(row["architecture"])
    cls, _ = resolve(architecture)
    config = {}
    for f in dataclasses.fields(cls.config_class):
        if f.name in row and not _missing(row[f.name]):
            try:
                config[f.name] = _convert(row[f.name], str(f.type))
            except (TypeError, ValueError):
                continue
    return architecture, config


_CORE_FIELDS = ("d_in", "num_latents", "k", "num_experts", "active_experts", "feature_scaling", "gate")


@lru_cache(maxsize=4096)
def _facts(architecture: str, items: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    from .saes import describe, registry
    from .saes.registry import resolve

    config = dict(items)
    try:
        facts = describe(architecture, **config)
    except (TypeError, ValueError):
        try:  # a column that is not this configuration's (or an odd value): the core identity only
            facts = describe(architecture, **{k: v for k, v in config.items() if k in _CORE_FIELDS})
        except (TypeError, ValueError):
            facts = None
    if facts is None:
        return {"label": architecture, "display_name": architecture, "base_architecture": architecture,
                "preset": "", "is_moe": bool(config.get("num_experts")), "l0_is_set": True}
    cls, fields = resolve(architecture, {k: v for k, v in config.items() if k in _CORE_FIELDS})
    defaults = {f.name: f.default for f in dataclasses.fields(cls.config_class)}
    presets = getattr(registry, "PRESETS", {})
    preset = architecture if architecture in presets else ""
    for name, (base, fixed) in presets.items():
        if not preset and base == facts.base_architecture and all(
                config.get(k, defaults.get(k)) == v for k, v in fixed.items()):
            preset = name
    return {"label": facts.label, "display_name": facts.display_name, "base_architecture": facts.base_architecture,
            "preset": preset, "is_moe": facts.is_moe, "l0_is_set": facts.l0_is_set}


def row_facts(row: dict[str, Any]) -> dict[str, Any]:
    """Registry facts of one metrics row: label, display_name, base_architecture, preset, is_moe, l0_is_set."""
    try:
        architecture, config = row_config(row)
    except ValueError:
        architecture = str(row.get("architecture"))
        return {"label": architecture, "display_name": architecture, "base_architecture": architecture,
                "preset": "", "is_moe": not _missing(row.get("num_experts")), "l0_is_set": True}
    # The facts read here do not depend on k or the seed (k only bounds the width, which is validated
    # where the variant is built); leaving them out keeps an odd k from hiding a configuration's label.
    config.pop("seed", None)
    config.pop("k", None)
    return _facts(architecture, tuple(sorted(config.items())))


# ---- the prepared table -----------------------------------------------------------------------------------
FACT_COLUMNS = ["label", "display_name", "base_architecture", "preset", "is_moe", "l0_is_set"]


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Normalise identity columns; add the registry facts, ``width_fraction`` and ``x_l0``.

    - ``label`` (the configuration's name in legends, from the registry; when two families share a
      label because metrics.csv lacks the column that tells them apart, `` [family]`` is appended),
      ``display_name``, ``base_architecture``, ``preset`` (e.g. ``authors_switch``), ``is_moe``,
      ``l0_is_set`` and ``style_group`` (preset or base architecture);
    - ``width_fraction``: M / the MoE width of the run;
    - ``x_l0``: k where k sets L0, the measured held-out L0 where a coefficient sets it.
    """
    df = df.copy()
    for col in ("family", "feature_scaling", "gate"):
        if col not in df:
            df[col] = ""
        df[col] = df[col].fillna("").astype(str)
    for col in ("num_experts", "active_experts", "num_latents", "seed", "k"):
        if col not in df:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["seed"] = df["seed"].fillna(0)
    df["family"] = df["family"].where(df["family"] != "", df["variant"].astype(str))
    given = df["label"].fillna("").astype(str) if "label" in df else pd.Series("", index=df.index)
    facts = pd.DataFrame([row_facts(r) for r in df.to_dict("records")], index=df.index, columns=FACT_COLUMNS)
    for col in FACT_COLUMNS:
        df[col] = facts[col]
    df["label"] = given.where(given != "", df["label"])
    df["is_moe"] = df["is_moe"].astype(bool)
    df["l0_is_set"] = df["l0_is_set"].astype(bool)
    # Two families with one label (metrics.csv lacks the column that tells them apart): name the family.
    shared = df.groupby("label")["family"].nunique()
    ambiguous = df["label"].isin(shared[shared > 1].index)
    df.loc[ambiguous, "label"] = df.loc[ambiguous, "label"] + " [" + df.loc[ambiguous, "family"] + "]"
    df["style_group"] = df["preset"].where(df["preset"] != "", df["base_architecture"])
    moe_width = df.loc[df["is_moe"], "num_latents"]
    reference = moe_width.max() if len(moe_width) else df["num_latents"].max()
    df["width_fraction"] = df["num_latents"] / reference if reference and reference == reference else np.nan
    l0 = pd.to_numeric(df["l0_heldout"], errors="coerce") if "l0_heldout" in df else pd.Series(np.nan, index=df.index)
    df["x_l0"] = np.where(~df["l0_is_set"] & l0.notna(), l0, df["k"])
    return df


def _order_key(row: dict[str, Any]) -> tuple:
    def num(v):
        return float(v) if not _missing(v) else math.inf

    return (not row["is_moe"], bool(row["preset"]), row["display_name"], num(row.get("num_experts")),
            num(row.get("active_experts")), num(row.get("num_latents")), row["label"])


def configurations(df: pd.DataFrame) -> list[str]:
    """The labels of a prepared table, in the one order every legend uses (MoE first, presets after
    the architectures they preset, then by name, N, e, M)."""
    if df.empty:
        return []
    first = df.drop_duplicates("label")
    return [r["label"] for r in sorted(first.to_dict("records"), key=_order_key)]


def series_rows(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``[(label, rows)]``: one series per configuration, in legend order."""
    return [(label, df[df["label"] == label]) for label in configurations(df)]


def style_groups(df: pd.DataFrame) -> list[tuple[str, str]]:
    """``[(label, style group)]`` of every configuration in legend order (what the style assigns colours to)."""
    groups = df.drop_duplicates("label").set_index("label")["style_group"]
    return [(label, str(groups[label])) for label in configurations(df)]


# ---- selection -----------------------------------------------------------------------------------------------
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


def main_family(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of one family when several share an identity: the one run at the most L0 values.

    An extension family (e.g. a different router, run at one L0) matches the same identity columns
    as the grid family it extends; comparisons use the grid family. Ties: the shorter label.
    """
    if rows.empty or "family" not in rows or rows["family"].nunique() <= 1:
        return rows
    label = rows["label"] if "label" in rows else rows["family"]
    stats = pd.DataFrame({"family": rows["family"], "k": rows["k"], "label_len": label.astype(str).str.len()})
    ranked = stats.groupby("family").agg(n_k=("k", "nunique"), label_len=("label_len", "min")).reset_index()
    ranked = ranked.sort_values(["n_k", "label_len", "family"], ascending=[False, True, True])
    return rows[rows["family"] == ranked["family"].iloc[0]]


def main_family_per(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """:func:`main_family` within each group of ``by`` (e.g. one family per e and Feature Scaling)."""
    if rows.empty:
        return rows
    parts = [main_family(g) for _, g in rows.groupby(by, dropna=False, sort=False)]
    return pd.concat(parts) if parts else rows.iloc[0:0]


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

    Returns ``[(target, used)]`` sorted by the L0 used (panels left to right); ties go to the
    smaller L0. Targets beyond what is available are dropped rather than shown twice.
    """
    avail = sorted({int(a) for a in available if a == a})
    picked: list[tuple[int, int]] = []
    for t in targets:
        free = [a for a in avail if a not in {u for _, u in picked}]
        if not free:
            break
        best = min(free, key=lambda a: (abs(math.log2(a) - math.log2(t)), a))
        picked.append((int(t), best))
    return sorted(picked, key=lambda p: p[1])


def l0_label(target: int, used: int) -> str:
    return f"L0 = {used}" if used == target else f"L0 = {used} (paper: {target})"


def sweep_experts(df: pd.DataFrame) -> float | None:
    """The N of the active-expert sweep: the Scale N with the most distinct e values."""
    scale = df[df["architecture"] == "scale"].dropna(subset=["num_experts", "active_experts"])
    if scale.empty:
        return None
    counts = scale.groupby("num_experts")["active_experts"].nunique()
    return float(counts.sort_values(kind="stable").index[-1])


def sweep_rows(df: pd.DataFrame, scaling: str) -> tuple[pd.DataFrame, float | None]:
    """The Scale SAEs of the expert sweep (N of :func:`sweep_experts`) with one Feature Scaling mode.

    One family per e (:func:`main_family`): an extension at the same N and e is not part of the sweep.
    """
    N = sweep_experts(df)
    if N is None:
        return df.iloc[0:0], None
    rows = df[(df["architecture"] == "scale") & (df["num_experts"] == N) & (df["feature_scaling"] == scaling)]
    return main_family_per(rows, ["active_experts"]), N


def main_comparison(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the paper's Fig 3 comparison: the Scale (N, e) configurations of the paper, their
    extensions, the authors' e = 1 Switch, and every configuration that is not a Scale SAE."""
    if df.empty:
        return df
    keep = df["base_architecture"] != "scale"
    keep |= df["preset"] != ""
    for match in MAIN_SCALE:
        keep |= df.index.isin(select(df, match).index)
    return df[keep]


def absent(df: pd.DataFrame, expected: list[tuple[str, dict[str, Any]]] = EXPECTED_MAIN) -> list[str]:
    """The names of the expected configurations with no row in ``df``."""
    return [name for name, match in expected if select(df, match).empty]


def expected_moe() -> list[tuple[str, dict[str, Any]]]:
    """The MoE SAEs among :data:`EXPECTED_MAIN` (the registry says which architectures are MoE)."""
    from .saes import architecture_class

    return [(name, match) for name, match in EXPECTED_MAIN if architecture_class(match["architecture"]).is_moe]


def identity_match(paper: pd.DataFrame | None, rows: pd.DataFrame) -> pd.DataFrame:
    """The paper's rows of the configuration ``rows`` is (identity columns both have must agree)."""
    if paper is None or paper.empty or rows.empty:
        return rows.iloc[0:0] if paper is None else paper.iloc[0:0]
    ours = rows.iloc[0]
    mask = paper["architecture"].astype(str) == str(ours["architecture"])
    for col in ("num_experts", "active_experts", "num_latents"):
        if col in paper and col in rows and not _missing(ours[col]):
            theirs = pd.to_numeric(paper[col], errors="coerce")
            mask &= theirs.isna() | np.isclose(theirs, float(ours[col]), rtol=1e-3)
    if "feature_scaling" in paper and ours.get("feature_scaling", ""):
        mask &= paper["feature_scaling"].isin(["", ours["feature_scaling"]])
    return paper[mask]


def paper_series(paper: pd.DataFrame | None, series: list[tuple[str, pd.DataFrame]]) -> list[tuple[str, pd.DataFrame]]:
    """Each of the paper's configurations matched to at most one of our series (the plainest label)."""
    if paper is None or paper.empty:
        return []
    claimed: dict[str, tuple[int, str]] = {}
    for label, rows in sorted(series, key=lambda s: (len(s[0]), s[0])):
        for fam in identity_match(paper, rows)["family"].unique():
            claimed.setdefault(fam, (len(label), label))
    out = []
    for label, _ in series:
        fams = [f for f, (_, lab) in claimed.items() if lab == label]
        if fams:
            out.append((label, paper[paper["family"].isin(fams)]))
    return out


def measured_l0_note(df: pd.DataFrame) -> str:
    """Which configurations are drawn at their measured L0 (a sparsity coefficient sets it, not k)."""
    names = sorted(set(df.loc[~df["l0_is_set"].astype(bool), "display_name"])) if not df.empty else []
    return f"L0 of {', '.join(names)}: measured on held-out text" if names else ""


def seeds_note(df: pd.DataFrame) -> str:
    n = df.groupby(["family", "k"])["seed"].nunique().max() if not df.empty else 1
    return f"mean ± std over {n} seeds" if n and n > 1 else "one seed"


def overlap_improvement_pct(plain: pd.DataFrame, scaled: pd.DataFrame) -> pd.DataFrame:
    """(plain − scaled) / plain · 100 on the cells both have: positive = less overlap with scaling."""
    plain, scaled = plain.align(scaled, join="inner")
    return (plain - scaled) / plain * 100


# ---- the paper's values --------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def paper_reported() -> dict[str, Any]:
    """The paper's reported values (``moesae/data/paper_reported.yaml``)."""
    import yaml

    text = resources.files("moesae").joinpath("data/paper_reported.yaml").read_text()
    return yaml.safe_load(text)


def paper_frame(paper: dict[str, Any] | None = None) -> pd.DataFrame:
    """The paper's series as rows with our metrics.csv columns, one row per configuration and L0.

    A configuration's rows share one family and label (the first the YAML gives it), whichever
    table each value comes from. When two tables give the same configuration and metric, the
    first listed wins (see the notes in the YAML for where the paper's own tables disagree).
    Fig 10's scaled overlap is derived from the plain overlap and the reported percent change.
    """
    paper = paper or paper_reported()
    M = paper["setting"]["num_latents"]
    rows: dict[tuple, dict[str, Any]] = {}
    names: dict[tuple, str] = {}

    def row_for(identity: dict[str, Any], label: str, k: int) -> dict[str, Any]:
        ident = tuple(sorted(identity.items()))
        name = names.setdefault(ident, label)
        key = ident + (("k", k),)
        if key not in rows:
            rows[key] = {"variant": f"paper: {name} k{k}", "family": name, "label": name, **identity, "k": k,
                         "seed": 0, "num_latents": identity.get("num_latents", M)}
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


def paper_autointerp(paper: dict[str, Any] | None = None) -> pd.DataFrame:
    """The paper's Fig 3d series as prepared rows (identity columns, ``k``) with an ``accuracy`` list
    over :data:`AUTOINTERP_QUANTILES`."""
    paper = paper or paper_reported()
    section = paper.get("autointerp", {})
    setting = paper["setting"]
    rows = [{"variant": f"paper: {s['label']}", "family": s["label"], "label": s["label"], **s["identity"],
             "num_latents": s["identity"].get("num_latents", setting["num_latents"]), "d_in": setting["d_in"],
             "k": section.get("k", 32), "seed": 0, "accuracy": list(s["accuracy"])}
            for s in section.get("series", [])]
    return prepare(pd.DataFrame(rows)) if rows else pd.DataFrame()


# ---- Table 1 -----------------------------------------------------------------------------------------------------
TABLE1_COLUMNS = [
    ("family", "family"), ("label", "configuration"), ("architecture", "architecture"), ("num_experts", "N"),
    ("active_experts", "e"), ("feature_scaling", "scaling"), ("num_latents", "M"), ("k", "k"),
    ("params", "parameters"), ("flops_per_token", "FLOPs/token"), ("train_tokens_per_s", "train tokens/s"),
    ("l0_heldout", "L0"), ("mse_heldout", "MSE"), ("fvu_heldout", "FVU"), ("loss_recovered_zero_heldout", "loss rec."),
    ("mse_cross", "MSE (cross)"), ("loss_recovered_zero_cross", "loss rec. (cross)"),
    ("dead_fraction", "dead"), ("redundancy_0.8", "redundancy 0.8"),
    # SAEBench core metrics (docs/evaluation.md)
    ("explained_variance_heldout", "explained var."), ("l2_ratio_heldout", "L2 ratio"),
    ("kl_div_score_cross", "KL score (cross)"), ("freq_over_10_percent", "dense >10%"),
]
TABLE1_TEXT = ["family", "configuration", "architecture", "scaling"]
TABLE1_INTEGERS = {"N", "e", "M", "k", "parameters", "FLOPs/token", "train tokens/s", "seeds"}


def table1(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (seeds averaged; ``seeds`` counts them), readable column names."""
    df = prepare(metrics)
    cols = [c for c, _ in TABLE1_COLUMNS if c in df]
    ident = [c for c in ("family", "label", "architecture", "num_experts", "active_experts", "feature_scaling",
                         "num_latents", "k") if c in cols]
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
        if col in TABLE1_TEXT or vals.notna().sum() == 0:
            out[col] = table[col].fillna("").astype(str).replace({"nan": ""})
            continue
        if col in TABLE1_INTEGERS:
            out[col] = [f"{int(round(v)):,}" if v == v else "–" for v in vals]
        else:
            out[col] = [f"{v:.4g}" if v == v else "–" for v in vals]
    return out


# ---- Fig 1's configuration -----------------------------------------------------------------------------------
def architecture_config(root: str | Path = ".", variant: str | None = None,
                        results_dir: str | Path | None = None) -> tuple[dict[str, Any], str]:
    """A Scale SAE configuration to draw: ``(cfg, where it came from)``.

    Reads the trained checkpoints' ``models/<family>/<variant>/cfg.json`` (of the variants in
    ``results/metrics.csv`` when it exists): ``variant`` if given, else the Scale SAE with Feature
    Scaling of the smallest N (every expert drawn), then the largest e and k. Without checkpoints,
    the same choice among the rows of ``results/metrics.csv``.
    """
    root = Path(root)
    results_dir = Path(results_dir) if results_dir is not None else root / "results"
    metrics = None
    if (results_dir / "metrics.csv").is_file():
        metrics = pd.read_csv(results_dir / "metrics.csv")
    listed = set(metrics["variant"].astype(str)) if metrics is not None else None

    def key(cfg: dict[str, Any], name: str) -> tuple:
        return (int(cfg.get("num_experts") or 0), -int(cfg.get("active_experts") or 0), -int(cfg.get("k") or 0), name)

    found = []
    for path in sorted((root / "models").glob("*/*/cfg.json")):
        name = path.parent.name
        if variant is not None and name != variant:
            continue
        if variant is None and listed is not None and name not in listed:
            continue
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if cfg.get("architecture") != "scale":
            continue
        if variant is None and cfg.get("feature_scaling", "mean") == "none":
            continue
        found.append((key(cfg, name), cfg, path.relative_to(root).as_posix()))
    if found:
        _, cfg, source = min(found, key=lambda f: f[0])
        return cfg, source
    if metrics is not None:
        rows = metrics[metrics["architecture"].astype(str) == "scale"]
        if variant is not None:
            rows = rows[rows["variant"].astype(str) == variant]
        elif "feature_scaling" in rows:
            rows = rows[rows["feature_scaling"].fillna("").astype(str) != "none"]
        cands = []
        for r in rows.to_dict("records"):
            try:
                _, cfg = row_config(r)
            except ValueError:
                continue
            cands.append((key(cfg, str(r["variant"])), {"architecture": "scale", **cfg}, str(r["variant"])))
        if cands:
            _, cfg, name = min(cands, key=lambda c: c[0])
            return cfg, f"results/metrics.csv, variant {name} (no trained checkpoint found)"
    what = f"variant {variant}" if variant else "a Scale SAE with Feature Scaling"
    raise FileNotFoundError(
        f"no configuration of {what} under {root}: neither models/<family>/<variant>/cfg.json nor a row of "
        "results/metrics.csv; run the train and evaluate stages first"
    )
