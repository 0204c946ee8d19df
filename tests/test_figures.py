"""The figures' data layer (moesae.results) and drawing (moesae.figures) on small hand-made runs.

Also the two checks every figure must pass (used by test_notebooks on the micro run too): every
series drawn has a legend entry, and no two series of a figure share a colour, marker and line style.
"""
import importlib
import json
import stat
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from moesae import results  # noqa: E402
from moesae.figures import FIGURES, draw, style  # noqa: E402
from moesae.saes import describe  # noqa: E402

PAPER_SUFFIX = " (paper)"


# ---- the checks every figure passes ----------------------------------------------------------------------
def _series(fig):
    """``[(label, color, marker, linestyle)]`` of every line with data in ``fig`` (errorbar caps excluded)."""
    from matplotlib.colors import to_hex

    out = []
    for ax in fig.axes:
        containers = {id(c[0]): c.get_label() for c in ax.containers if hasattr(c, "lines") and c[0] is not None}
        for ln in ax.lines:
            if len(ln.get_xdata()) == 0 or (ln.get_linestyle() == "None" and ln.get_marker() in ("_", "|")):
                continue
            label = containers.get(id(ln), ln.get_label())
            out.append((label, to_hex(ln.get_color()), str(ln.get_marker()), str(ln.get_linestyle())))
    return out


def _legend_entries(fig):
    from matplotlib.colors import to_hex

    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    texts = {t.get_text() for leg in legends for t in leg.get_texts()}
    colors = set()
    for leg in legends:
        for h in leg.legend_handles:
            if hasattr(h, "get_color"):
                try:
                    colors.add(to_hex(h.get_color()))
                except (ValueError, TypeError):
                    pass
    return texts, colors


def assert_every_series_in_a_legend(fig, name=""):
    texts, colors = _legend_entries(fig)
    for label, color, _, _ in _series(fig):
        if label.startswith("_"):  # explained by a legend proxy of its colour (e.g. Fig 9's L0 colours)
            assert color in colors, f"{name}: a line of colour {color} has no legend entry"
        else:
            assert label in texts, f"{name}: series {label!r} is drawn but not in any legend"


def assert_distinct_series_styles(fig, name=""):
    by_style: dict[tuple, set[str]] = {}
    for label, color, marker, linestyle in _series(fig):
        if label.startswith("_") or label.endswith(PAPER_SUFFIX):
            continue
        by_style.setdefault((color, marker, linestyle), set()).add(label)
    shared = {k: v for k, v in by_style.items() if len(v) > 1}
    assert not shared, f"{name}: different series share one style: {shared}"


# ---- a small run with every kind of series ----------------------------------------------------------------
EXTENSIONS = {
    "switch_n32_moex": dict(architecture="switch", num_experts=32, router="moex"),
    "switch_n32_shared": dict(architecture="switch", num_experts=32, shared_expert=True),
    "scale_n32_e4_batchtopk": dict(architecture="scale", num_experts=32, active_experts=4, feature_scaling="mean",
                                   batch_topk=True),
}


def extended_run(root: Path, with_config_columns: bool = True) -> Path:
    """test_report's synthetic run plus baselines (measured L0) and one-L0 extensions, specialisation and
    auto-interp tables."""
    from test_report import write_synthetic_run

    write_synthetic_run(root)
    m = pd.read_csv(root / "results" / "metrics.csv")
    extra = []
    for fam, arch in [("relu", "relu"), ("gated", "gated"), ("batchtopk", "batchtopk")]:
        for k in (2, 8, 32):
            extra.append(dict(variant=f"{fam}_k{k}", family=fam, architecture=arch, d_in=16, num_latents=512, k=k, seed=0,
                              mse_heldout=30 / k ** 0.5, mse_cross=45 / k ** 0.5, l0_heldout=k * 1.07,
                              loss_recovered_zero_cross=1 - 1 / k, loss_recovered_zero_heldout=1 - 0.8 / k))
    for fam, cfg in EXTENSIONS.items():
        row = dict(variant=f"{fam}_k8", family=fam, d_in=16, num_latents=512, k=8, seed=0, mse_heldout=14.0,
                   mse_cross=20.0, loss_recovered_zero_cross=0.6, loss_recovered_zero_heldout=0.7,
                   active_experts=cfg.get("active_experts", 1), **{k: v for k, v in cfg.items() if k != "active_experts"})
        if not with_config_columns:
            for key in ("router", "shared_expert", "batch_topk"):
                row.pop(key, None)
        extra.append(row)
    m = pd.concat([m, pd.DataFrame(extra)], ignore_index=True)
    m.to_csv(root / "results" / "metrics.csv", index=False)
    spec = pd.read_csv(root / "results" / "tables" / "specialisation.csv")
    ext = [{"variant": f"{fam}_k8", "rank": r + 1, "cumulative_share": min(1.0, (r + 1) / 20)}
           for fam in EXTENSIONS for r in range(32)]
    pd.concat([spec, pd.DataFrame(ext)]).to_csv(root / "results" / "tables" / "specialisation.csv", index=False)
    scores = []
    for variant in ["scale_n16_e2_k8", "scale_n32_e4_k8", "switch_n32_k8", "topk_m32th_k8", "relu_k8",
                    "switch_n32_moex_k8", "batchtopk_k8"]:
        for scorer in ("detection", "fuzzing"):
            for i, q in enumerate(results.AUTOINTERP_QUANTILES):
                acc = 0.5 + 0.03 * i + (0.1 if scorer == "detection" else 0)
                scores.append(dict(variant=variant, family=variant.rsplit("_k", 1)[0], scorer=scorer, quantile=q,
                                   accuracy=acc, ci_low=acc - 0.05, ci_high=acc + 0.05, n=40))
    (root / "results" / "autointerp").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(scores).to_csv(root / "results" / "autointerp" / "scores.csv", index=False)
    return root


@pytest.fixture
def run(tmp_path):
    return extended_run(tmp_path)


@pytest.fixture
def ctx(run):
    return results.load_context(run / "results", "default")


def plot(name, ctx):
    return importlib.import_module(f"moesae.figures.{name}").plot(ctx)


# ---- results: facts from the registry -------------------------------------------------------------------------
def test_labels_and_facts_come_from_the_registry(ctx):
    m = ctx.metrics.drop_duplicates("family").set_index("family")
    assert m.loc["scale_n16_e2", "label"] == "Scale (16,2)"
    assert m.loc["switch_n32", "label"] == "Switch-32"
    assert m.loc["switch_n32_moex", "label"] == describe("switch", d_in=16, num_latents=512, num_experts=32,
                                                          router="moex").label
    assert m.loc["scale_n32_e4_batchtopk", "label"] != m.loc["scale_n32_e4", "label"]
    assert m.loc["topk_m32th", "label"] == "TopK-16"
    assert m.loc["scale_n64_e1_plain", "preset"] == "authors_switch"
    assert m.loc["scale_n64_e1_plain", "label"].startswith("Switch (authors'")
    assert m.loc["relu", "l0_is_set"] == False and m.loc["topk_m32th", "l0_is_set"] == True  # noqa: E712
    assert m.loc["switch_n32", "is_moe"] and not m.loc["gated", "is_moe"]
    relu = ctx.metrics[ctx.metrics["family"] == "relu"]
    assert np.allclose(relu["x_l0"], relu["k"] * 1.07)  # measured L0 where a coefficient sets sparsity
    topk = ctx.metrics[ctx.metrics["family"] == "topk_m32th"]
    assert (topk["x_l0"] == topk["k"]).all()


def test_families_that_metrics_cannot_tell_apart_are_named(tmp_path):
    ctx = results.load_context(extended_run(tmp_path, with_config_columns=False) / "results")
    labels = set(ctx.metrics["label"])
    assert {"Switch-32 [switch_n32]", "Switch-32 [switch_n32_moex]", "Switch-32 [switch_n32_shared]"} <= labels
    assert ctx.metrics["label"].nunique() == ctx.metrics["family"].nunique()


def test_a_label_written_by_evaluate_is_kept():
    df = pd.DataFrame([dict(variant="a", family="a", architecture="topk", d_in=4, num_latents=8, k=2,
                            label="TopK-8 (from evaluate)")])
    assert results.prepare(df)["label"].iloc[0] == "TopK-8 (from evaluate)"


def test_an_unknown_architecture_does_not_break_the_figures():
    df = pd.DataFrame([dict(variant="a", family="a", architecture="matryoshka", d_in=4, num_latents=8, k=2)])
    out = results.prepare(df)
    assert out["label"].iloc[0] == "matryoshka" and bool(out["l0_is_set"].iloc[0])


def test_main_family_is_the_grid_family(ctx):
    rows = results.select(ctx.metrics, {"architecture": "switch", "num_experts": 32})
    assert set(results.main_family(rows)["family"]) == {"switch_n32"}
    rows = results.select(ctx.metrics, results.MAIN_SCALE[1])
    assert set(results.main_family(rows)["family"]) == {"scale_n32_e4"}


def test_main_comparison_series(ctx):
    fams = set(results.main_comparison(ctx.metrics)["family"])
    assert {"scale_n16_e2", "scale_n32_e4", "scale_n64_e8_mean", "switch_n32", "scale_n64_e1_plain", "topk_m32th",
            "relu", "gated", "batchtopk", *EXTENSIONS} == fams
    assert results.absent(results.main_comparison(ctx.metrics)) == []
    order = results.configurations(results.main_comparison(ctx.metrics))
    moe = set(ctx.metrics.loc[ctx.metrics["is_moe"], "label"])
    assert all(lab in moe for lab in order[: len(moe & set(order))]), "MoE SAEs first in every legend"


def test_architecture_config_reads_the_checkpoint(run):
    cfg, source = results.architecture_config(run)
    assert source == "models/scale_n16_e2/scale_n16_e2_k8/cfg.json" and cfg["num_experts"] == 16
    (run / "models" / "scale_n16_e2" / "scale_n16_e2_k8" / "cfg.json").unlink()
    cfg, source = results.architecture_config(run)
    assert "results/metrics.csv" in source and cfg["architecture"] == "scale" and cfg["feature_scaling"] != "none"


# ---- style ----------------------------------------------------------------------------------------------------
def test_every_configuration_of_a_run_gets_its_own_style(ctx):
    styles = draw.styles(ctx)
    labels = results.configurations(ctx.metrics)
    assert set(styles) == set(labels)
    assert len({s["color"] for s in styles.values()}) == len(labels)
    assert styles["Scale (16,2)"] == {"color": style.PINNED["Scale (16,2)"][0], "marker": style.PINNED["Scale (16,2)"][1]}
    again = style.assign_styles(results.style_groups(ctx.metrics))
    assert again == styles  # the same run: the same styles in every figure


def test_many_configurations_never_share_colour_and_marker():
    series = [(f"Scale ({n},{e})", "scale") for n in (16, 32, 64, 128) for e in (1, 2, 4, 8, 16, 32)] * 1
    series += [(f"TopK-{m}", "topk") for m in range(10)]
    styles = style.assign_styles(series)
    pairs = [(s["color"], s["marker"]) for s in styles.values()]
    assert len(pairs) == len(set(pairs)) == len(series)


# ---- the figures ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in FIGURES if n not in ("fig01_architecture", "table1_configurations")])
def test_every_series_has_a_legend_entry_and_its_own_style(ctx, name):
    fig = plot(name, ctx)
    assert_every_series_in_a_legend(fig, name)
    assert_distinct_series_styles(fig, name)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_fig06_names_every_series_and_only_absent_ones(ctx):
    fig = plot("fig06_specialisation", ctx)
    texts, _ = _legend_entries(fig)
    drawn = {lab for lab, *_ in _series(fig)}
    assert {"Switch-32", "Scale (32,4)"} <= drawn
    assert all(lab in texts for lab in drawn)
    notes = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    for lab in drawn:
        assert lab not in notes.replace("absent at this L0:", ""), "a series drawn is also called absent"


def test_fig03_splits_autointerp_into_moe_and_dense_panels(ctx):
    fig = plot("fig03_main_comparison", ctx)
    axes = fig.axes
    moe_ax, dense_ax, legend_ax = axes[3], axes[4], axes[5]
    moe = set(ctx.metrics.loc[ctx.metrics["is_moe"], "label"])
    moe_labels = {c.get_label() for c in moe_ax.containers}
    dense_labels = {c.get_label() for c in dense_ax.containers}
    assert moe_labels and dense_labels
    assert moe_labels <= moe and not dense_labels & moe
    assert not legend_ax.axison and legend_ax.get_legend() is not None  # the legend has a panel of its own
    for ax in (moe_ax, dense_ax):
        assert ax.get_legend() is None
        for c in ax.containers:
            assert len(c[0].get_xdata()) == len(results.AUTOINTERP_QUANTILES)  # fuzzing only, not detection too
        assert "MoE" in moe_ax.get_title() and "dense" in dense_ax.get_title()


def test_fig01_prints_the_registrys_flops(run):
    from moesae.figures import fig01_architecture

    cfg, source = results.architecture_config(run)
    fig = fig01_architecture.plot(cfg, source)
    ours = describe("scale", **{k: v for k, v in cfg.items() if k != "architecture"}).flops_per_token
    text = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert f"{ours:,}" in text and source in text


def test_table1_has_one_row_per_configuration_and_the_label(run):
    table = results.table1(pd.read_csv(run / "results" / "metrics.csv"))
    assert "configuration" in table.columns
    assert len(table) == len(table[["family", "k"]].drop_duplicates())
    shown = results.format_table1(table)
    assert shown.loc[table["family"] == "topk_m32th", "configuration"].iloc[0] == "TopK-16"


def test_save_figure_is_atomic_and_world_readable(ctx, tmp_path):
    fig = plot("fig07_redundancy", ctx)
    paths = draw.save_figure(fig, "fig07_redundancy", tmp_path / "figs")
    assert [p.name for p in paths] == ["fig07_redundancy.png", "fig07_redundancy.svg"]
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["fig07_redundancy.png", "fig07_redundancy.svg"]
    assert stat.S_IMODE(paths[0].stat().st_mode) == 0o644
    table = draw.save_table(pd.DataFrame({"a": [1]}), "t", tmp_path / "figs")
    assert table.read_text().startswith("a")


def test_paper_profile_overlays(ctx, run):
    paper_ctx = results.load_context(run / "results", "paper")
    assert paper_ctx.paper is not None and "label" in paper_ctx.paper
    for name in ("fig02_omega", "fig03_main_comparison", "fig04_active_experts", "fig05_feature_scaling"):
        fig = plot(name, paper_ctx)
        assert_every_series_in_a_legend(fig, name)


def test_paper_frame_gives_one_family_per_configuration():
    paper = results.prepare(results.paper_frame())
    ident = ["architecture", "num_experts", "active_experts", "feature_scaling", "num_latents"]
    per = paper.fillna({"num_experts": -1, "active_experts": -1}).groupby(ident, dropna=False)["family"].nunique()
    assert (per == 1).all()
    assert json.dumps(results.paper_autointerp()["label"].tolist())
