"""reports/index.html: self-contained, claims computed from results/, honest about what is missing.

``write_synthetic_run`` builds a small run folder (params.yaml, results/, models/, data/) with
made-up but internally consistent numbers; the notebook and browser tests reuse it when the
``micro_results`` fixture (a real micro pipeline run) is not available.
"""
import base64
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moesae import report
from moesae.figures import FIGURES
from moesae.timing import read_timings, record

FAMILIES = {
    "scale_n16_e2": dict(architecture="scale", num_experts=16, active_experts=2, feature_scaling="mean"),
    "scale_n32_e4": dict(architecture="scale", num_experts=32, active_experts=4, feature_scaling="mean"),
    "switch_n32": dict(architecture="switch", num_experts=32),
    "topk_m32th": dict(architecture="topk", width_fraction=1 / 32),
    "scale_n64_e1_plain": dict(architecture="authors_switch", num_experts=64),
    "scale_n64_e4_plain": dict(architecture="scale", num_experts=64, active_experts=4, feature_scaling="none"),
    "scale_n64_e8_plain": dict(architecture="scale", num_experts=64, active_experts=8, feature_scaling="none"),
    "scale_n64_e1_mean": dict(architecture="scale", num_experts=64, active_experts=1, feature_scaling="mean"),
    "scale_n64_e4_mean": dict(architecture="scale", num_experts=64, active_experts=4, feature_scaling="mean"),
    "scale_n64_e8_mean": dict(architecture="scale", num_experts=64, active_experts=8, feature_scaling="mean"),
    "scale_n64_e8_learned": dict(architecture="scale", num_experts=64, active_experts=8, feature_scaling="learned"),
}


def write_synthetic_run(root: Path, l0=(2, 8, 32), M=512, d=16) -> Path:
    """A run folder laid out like the repo after ``dvc repro`` (numbers made up, deterministic)."""
    rows, spec = [], []
    for fam, cfg in FAMILIES.items():
        arch = cfg["architecture"]
        for k in l0:
            name = f"{fam}_k{k}"
            m = int(M * cfg.get("width_fraction", 1))
            n = cfg.get("num_experts")
            e = cfg.get("active_experts", 1 if n else None)
            fs = cfg.get("feature_scaling", "none" if arch == "authors_switch" else "")
            quality = {"scale": 1.0, "switch": 1.3, "topk": 1.15, "authors_switch": 1.35}[arch] * (0.9 if fs == "mean" else 1)
            mse = 40 * quality / k ** 0.5
            row = dict(variant=name, family=fam, architecture="scale" if arch == "authors_switch" else arch, d_in=d,
                       num_latents=m, num_experts=n, active_experts=e, feature_scaling=fs, k=k, seed=0,
                       params=2 * m * d, flops_per_token=m * d, train_tokens_per_s=1000.0 * k,
                       mse_heldout=mse, mse_cross=1.5 * mse, fvu_heldout=mse / 100, l0_heldout=float(k),
                       loss_recovered_zero_heldout=1 - mse / 50, loss_recovered_zero_cross=1 - mse / 40,
                       dead_fraction=0.01, mean_max_cos=0.4)
            red = 0.2 / (e or 1) / k ** 0.5
            row.update({"redundancy_0.7": 2 * red, "redundancy_0.8": red, "redundancy_0.9": red / 2,
                        "in_expert_redundancy_0.8": 1.5 * red if n else None,
                        "inter_expert_redundancy_0.8": 0.8 * red if n else None,
                        "omega_mean": 0.1 * e + 0.01 * k ** 0.5 if fs in ("mean", "learned") else None,
                        "activation_overlap": (0.08 * (1.05 if fs == "mean" else 1)) if e == 1 else 0.5 * (0.9 if fs == "mean" else 1)})
            rows.append(row)
            if n:
                shares = [1 - 0.8 ** (r + 1) for r in range(n)]
                spec += [{"variant": name, "rank": r + 1, "cumulative_share": s / shares[-1]} for r, s in enumerate(shares)]
    (root / "results" / "tables").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "results" / "metrics.csv", index=False)
    pd.DataFrame(spec).to_csv(root / "results" / "tables" / "specialisation.csv", index=False)
    grid = {"num_latents": M, "l0": list(l0), "seeds": [0], "families": FAMILIES}
    (root / "params.yaml").write_text(yaml.safe_dump({"profile": "default", "grid": grid}))
    model = root / "models" / "scale_n16_e2" / "scale_n16_e2_k8"
    model.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": "scale", "d_in": d, "num_latents": M, "num_experts": 16, "active_experts": 2, "k": 8,
           "feature_scaling": "mean", "gate": "prob_softmax", "seed": 0}
    (model / "cfg.json").write_text(json.dumps(cfg))
    (root / "data" / "corpus").mkdir(parents=True, exist_ok=True)
    (root / "data" / "corpus" / "manifest.json").write_text(json.dumps({"source": "synthetic-test", "splits": {"train": 10}}))
    with record("collect", root / "results"):
        pass
    return root


PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.fixture
def run(tmp_path):
    return write_synthetic_run(tmp_path)


def test_report_is_self_contained_and_complete(run):
    figures = run / "reports" / "figures"
    figures.mkdir(parents=True)
    for name in list(FIGURES)[:3]:
        (figures / f"{name}.png").write_bytes(PNG_1PX)
    (run / "reports" / "html").mkdir()
    (run / "reports" / "html" / "fig02_omega.html").write_text("<html></html>")
    out = report.build_report(run)
    assert out == run / "reports" / "index.html"
    page = out.read_text()
    # Self-contained: no external resources, no scripts at all.
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert page.count('src="data:image/png;base64,') == 3
    # Every link is an in-page anchor or a relative file that exists.
    for href in re.findall(r'href="([^"]+)"', page):
        if href.startswith("#"):
            assert f'id="{href[1:]}"' in page, href
        else:
            assert (out.parent / href).is_file(), href
    assert 'href="html/fig02_omega.html"' in page
    assert "html/fig01_architecture.html" not in page  # not built: no dangling link
    # every figure but table1 and the three written, plus the ground-truth benchmark's figure
    assert page.count("Figure not produced") == len(FIGURES) - 1 - 3 + 1
    # Provenance, timings, claims, Table 1.
    assert "synthetic-test" in page
    assert "not available: results/subject_model.json is missing" in page
    assert "collect" in page and "Run time per stage" in page
    assert report.PAPER_REFERENCE_LABEL.split(":")[0] in page and "reference only" in page
    for c in report.claims_mod.CLAIMS:
        assert report.esc(c.claim) in page
    assert page.count("<tr>") > len(FAMILIES) * 3  # Table 1 has one row per configuration


def test_claims_in_report_are_computed_not_typed(run):
    page = report.build_report(run).read_text()
    # Scale (32,4) vs Switch in the synthetic run: 1 - 0.9/1.3 at every L0.
    assert f"{(1 - 0.9 / 1.3) * 100:.1f}%" in page
    # Make Switch better: the same claim must now fail.
    m = pd.read_csv(run / "results" / "metrics.csv")
    m.loc[m["architecture"] == "switch", "mse_heldout"] /= 10
    m.to_csv(run / "results" / "metrics.csv", index=False)
    assert report.claims_mod.CLAIMS[0].compute(m).holds is False
    assert report.claims_mod.claims_table(m)[0]["verdict"] in {"does not hold", "inconclusive"}


def test_paper_profile_labels_paper_values_plainly(run):
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["profile"] = "paper"
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    page = report.build_report(run).read_text()
    assert "reference only" not in page
    assert "<b>paper</b>" in page


def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        report.build_report(tmp_path)


def test_main_writes_report_and_timing(run, capsys):
    assert report.main(["--root", str(run)]) == 0
    assert (run / "reports" / "index.html").is_file()
    assert "report" in {t["stage"] for t in read_timings(run / "results")}


def test_timing_record_is_atomic_and_skips_failures(tmp_path):
    with record("train@scale k=8", tmp_path):
        pass
    with pytest.raises(RuntimeError):
        with record("evaluate", tmp_path):
            raise RuntimeError("boom")
    timings = read_timings(tmp_path)
    assert [t["stage"] for t in timings] == ["train@scale k=8"]
    assert timings[0]["seconds"] >= 0
    assert sorted(p.name for p in (tmp_path / "timings").iterdir()) == ["train@scale_k_8.json"]
    with pytest.raises(ValueError, match="stage name"):
        with record("", tmp_path):
            pass


def test_throughput_section_reads_the_benchmark_results(run):
    page = report.build_report(run).read_text()
    assert "Not available: no benchmark results" in page  # the synthetic run has no benchmarks/results
    bench = run / "benchmarks" / "results"
    bench.mkdir(parents=True)
    case = dict(size="paper", implementation="fast", seconds_per_step=0.5, peak_memory_mb=900.0, fraction_of_peak=0.3)
    data = {
        "device_type": "cpu", "device": "x86_64", "batch_size": 8192, "threads": 2, "torch": "2.13.0+cpu",
        "cases": [dict(case, name="topk-24576", tokens_per_s=2833.4), dict(case, name="scale-16-2", tokens_per_s=12113.0),
                  dict(case, name="scale-16-2", size="default", tokens_per_s=99.0)],
        "summary": {"paper": {"targets": [
            {"target": "Scale (16,2) >= 3x dense TopK-M tokens/s", "measured": 4.275, "threshold": 3.0, "met": True},
            {"target": "Scale (16,2) >= 5x naive all-experts", "measured": 2.5, "threshold": 5.0, "met": False},
        ]}},
    }
    (bench / "cpu.json").write_text(json.dumps(data))
    page = report.build_report(run).read_text()
    section = page[page.index('id="throughput"'):]
    assert "2,833" in section and "12,113" in section
    assert section.count("<tr><td>scale-16-2</td>") == 1  # paper size only
    assert "4.28 → <span class=\"holds\">met</span>" in section
    assert "2.5 → <span class=\"fails\">not met</span>" in section
    assert "No GPU results" in section


def test_text_from_the_data_is_escaped(run):
    m = pd.read_csv(run / "results" / "metrics.csv")
    m.loc[m["family"] == "topk_m32th", "family"] = '<script>alert("x")</script>'
    m.to_csv(run / "results" / "metrics.csv", index=False)
    (run / "data" / "corpus" / "manifest.json").write_text(json.dumps({"source": "<img src=x onerror=alert(1)>"}))
    page = report.build_report(run).read_text()
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_autointerp_counts_and_browser_link_are_shown_escaped(run):
    import json

    summary = {"backend": "openai", "endpoint": "http://127.0.0.1:1/v1", "model": "<b>m</b>", "min_parse_rate": 0.8,
               "variants": {"switch_n32_k8<script>": {"features_scored": 3, "requests": 59, "replies_unparsed": 40,
                                                      "judgements_used": 2, "judgements_planned": 50, "parse_rate": 0.04}}}
    (run / "results" / "autointerp").mkdir(parents=True, exist_ok=True)
    (run / "results" / "autointerp" / "summary.json").write_text(json.dumps(summary))
    (run / "reports" / "features").mkdir(parents=True, exist_ok=True)
    (run / "reports" / "features" / "index.html").write_text("<html></html>")
    page = report.build_report(run).read_text()
    assert "switch_n32_k8&lt;script&gt;" in page and "<script>" not in page and "&lt;b&gt;m&lt;/b&gt;" in page
    assert "4.0%" in page and ">59<" in page
    assert 'href="features/index.html"' in page


def test_table1_has_the_core_metrics():
    import pandas as pd

    from moesae import results

    m = pd.DataFrame([{"variant": "t_k8", "family": "t", "architecture": "topk", "num_latents": 64, "k": 8, "seed": 0,
                       "mse_heldout": 1.0, "explained_variance_heldout": 0.9, "l2_ratio_heldout": 0.95,
                       "kl_div_score_cross": 0.8, "freq_over_10_percent": 0.01}])
    table = results.table1(m)
    assert {"explained var.", "L2 ratio", "KL score (cross)", "dense >10%"} <= set(table.columns)
    assert table["explained var."].iloc[0] == 0.9
