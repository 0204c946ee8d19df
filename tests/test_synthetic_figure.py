"""The ground-truth figure: one style and one legend entry per configuration, chance lines in view,
outputs written atomically, and a closure free of the benchmark's code."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest

from moesae.figures import synthetic_recovery as figure
from moesae.training.fingerprint import PACKAGE, package_imports

FAMILIES = {  # the default profile's families with their registry facts (labels as describe() gives them)
    "topk": ("topk", "TopK-128", 128), "topk_active_n8_e2": ("topk", "TopK-32", 32),
    "switch_n8": ("switch", "Switch-8", 16), "authors_switch_n8": ("authors_switch", "Switch (authors', e=1, N=8)", 16),
    "scale_n8_e2": ("scale", "Scale (8,2)", 32), "scale_n8_e2_plain": ("scale", "Scale (8,2), no FS", 32),
    "gated": ("gated", "Gated", 128), "relu": ("relu", "ReLU (L1)", 128), "jumprelu": ("jumprelu", "JumpReLU", 128),
    "batchtopk": ("batchtopk", "BatchTopK-128", 128), "feature_choice": ("feature_choice", "Feature Choice (uniform)", 128),
}


def _run(families=FAMILIES):
    rows = []
    for i, (fam, (arch, _, width)) in enumerate(sorted(families.items())):
        base = 0.3 + 0.05 * i
        for k in (2, 4, 8):
            for seed in (0, 1):
                rows.append({"family": fam, "architecture": arch, "k": k, "seed": seed, "active_width": width,
                             "matched_cosine": base + 0.01 * seed, "fraction_recovered": base / 2,
                             "mmcs_true_to_learned": base, "mmcs_learned_to_true": base, "f1": base / 3,
                             "fvu": 1 - base})
    df = pd.DataFrame(rows)
    summary = {
        "families": {f: {"architecture": a, "label": label, "is_moe": a in ("switch", "authors_switch", "scale"),
                         "active_width": w} for f, (a, label, w) in families.items()},
        "chance": {"128": {"matched_cosine": 0.2, "f1": 0.02}, "32": {"matched_cosine": 0.1, "f1": 0.03}},
        "ranking_metric": "matched_cosine", "ranking_k": [2, 4, 8], "best_family": "topk",
        "ranking": [{"family": "topk", "mean": 0.5, "std": 0.01}],
        "compute_matched_pairs": [{"family": "scale_n8_e2", "baseline": "topk_active_n8_e2", "active_width": 32}],
        "table": [{"family": "topk", "k": 2, "matched_cosine_mean": 0.5}],
    }
    return df, summary


def test_every_series_has_its_own_style_and_one_legend_entry(tmp_path):
    df, summary = _run()
    styles = figure.series(df, summary)
    pairs = [(s["color"], s["marker"]) for s in styles.values()]
    assert len(set(pairs)) == len(pairs) == len(FAMILIES)
    assert {s["label"] for s in styles.values()} == {label for _, label, _ in FAMILIES.values()}
    fig = figure.plot(df, summary)
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == [s["label"] for s in styles.values()] + ["random decoder of width M"]
    assert len(fig.axes) == 6  # 5 metrics + the compute panel
    for ax in fig.axes[:5]:  # each family drawn once per panel, in its own colour and marker
        drawn = [(line.get_color(), line.get_marker()) for line in ax.get_lines() if line.get_marker() not in ("None", "", "_")]
        assert len(drawn) == len(set(drawn)) == len(FAMILIES)
    assert fig.axes[0].get_ylim()[0] <= 0.1  # the chance lines are in view
    image = figure.save(fig, figure.summary_table(summary), "synthetic_recovery", tmp_path)
    for suffix in ("png", "svg", "csv"):
        assert (tmp_path / f"synthetic_recovery.{suffix}").stat().st_mode & 0o777 == 0o644
    assert image.filename.endswith("synthetic_recovery.png")
    assert not list(tmp_path.glob("*.tmp*"))


def test_the_reported_colour_clashes_are_gone():
    """Authors' Switch vs the compute-matched TopK, and Scale (8,2) vs JumpReLU, used to share a colour."""
    df, summary = _run()
    s = figure.series(df, summary)
    assert s["authors_switch_n8"]["color"] != s["topk_active_n8_e2"]["color"]
    assert s["scale_n8_e2"]["color"] != s["jumprelu"]["color"]


def test_families_sharing_a_label_are_told_apart():
    families = {"gated": ("gated", "Gated", 128), "gated_long": ("gated", "Gated", 128)}
    df, summary = _run(families)
    styles = figure.series(df, summary)
    assert {s["label"] for s in styles.values()} == {"Gated [gated]", "Gated [gated_long]"}
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == 2


def test_without_registry_facts_the_family_names_the_series():
    df, summary = _run({"topk": ("topk", "TopK-128", 128), "switch_n8": ("switch", "Switch-8", 16)})
    del summary["families"]
    styles = figure.series(df, summary)
    assert [s["label"] for s in styles.values()] == ["switch_n8", "topk"]


def test_tables_and_loading(tmp_path):
    df, summary = _run()
    folder = tmp_path / "synthetic"
    with pytest.raises(FileNotFoundError, match="dvc repro synthetic"):
        figure.load(tmp_path)
    folder.mkdir()
    df.to_csv(folder / "metrics.csv", index=False)
    (folder / "summary.json").write_text(json.dumps(summary))
    loaded, loaded_summary = figure.load(tmp_path)
    pd.testing.assert_frame_equal(loaded, df)
    assert list(figure.ranking_table(loaded_summary).columns) == ["family", "matched_cosine (mean)", "std over seeds"]
    pairs = figure.compute_matched_table(loaded, loaded_summary)
    assert list(pairs["family"]) == ["scale_n8_e2", "topk_active_n8_e2"]
    assert list(figure.chance_table(loaded_summary).index) == ["128", "32"]


def test_file_names_agree_with_the_runner_and_the_closure_is_lean():
    from moesae.synthetic import runner

    assert (figure.METRICS_FILE, figure.SUMMARY_FILE) == (runner.METRICS_FILE, runner.SUMMARY_FILE)
    assert runner.OUTPUT_DIR.name == figure.RESULTS_SUBDIR
    closure = {p.relative_to(PACKAGE).as_posix() for p in package_imports([PACKAGE / "figures" / "synthetic_recovery.py"])}
    assert not any(p.startswith(("synthetic/", "training/", "saes/")) for p in closure), closure


def test_the_notebook_runs_and_writes_its_outputs(tmp_path):
    """The notebook is thin: it loads the results, draws with this module, and saves through it."""
    pytest.importorskip("papermill")
    from moesae.notebooks import run_notebook

    df, summary = _run()
    folder = tmp_path / "results" / "synthetic"
    folder.mkdir(parents=True)
    df.to_csv(folder / "metrics.csv", index=False)
    (folder / "summary.json").write_text(json.dumps(summary))
    repo = PACKAGE.parents[1]
    html = run_notebook(figure.NAME, notebooks_dir=repo / "notebooks", reports_dir=tmp_path / "reports",
                        parameters={"results_dir": str(tmp_path / "results"), "profile": "default"}, cwd=tmp_path)
    assert html.is_file()
    for suffix in ("png", "svg", "csv"):
        assert (tmp_path / "reports" / "figures" / f"{figure.NAME}.{suffix}").is_file()
    assert pd.read_csv(tmp_path / "reports" / "figures" / f"{figure.NAME}.csv").equals(figure.summary_table(summary))
