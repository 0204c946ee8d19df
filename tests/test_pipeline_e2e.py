"""End to end: the micro run of every stage produces every column for every variant, the report builds."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

CONTRACT_COLUMNS = [
    "variant", "family", "architecture", "d_in", "num_latents", "num_experts", "active_experts",
    "feature_scaling", "k", "seed", "params", "flops_per_token", "train_tokens_per_s", "dead_fraction",
    "redundancy_0.7", "redundancy_0.8", "redundancy_0.9", "mean_max_cos", "in_expert_redundancy_0.8",
    "inter_expert_redundancy_0.8", "omega_mean", "activation_overlap",
] + [f"{m}_{s}" for s in ("heldout", "cross") for m in (
    "mse", "fvu", "l0", "loss_recovered_zero", "loss_recovered_mean", "ce_clean", "ce_recon", "ce_zero", "ce_mean")]


def test_every_variant_has_every_metric(micro_results):
    params = yaml.safe_load((micro_results / "params.yaml").read_text())
    metrics = pd.read_csv(micro_results / "results" / "metrics.csv")
    from moesae.grid import study_variants

    assert sorted(metrics["variant"]) == sorted(study_variants(params))
    assert [c for c in CONTRACT_COLUMNS if c not in metrics.columns] == []
    always = ["mse_heldout", "fvu_heldout", "l0_heldout", "mse_cross", "loss_recovered_zero_heldout",
              "loss_recovered_zero_cross", "redundancy_0.8", "flops_per_token", "params", "train_tokens_per_s"]
    assert not metrics[always].isna().any().any()
    moe = metrics[metrics["architecture"].isin(["scale", "switch"])]
    assert not moe[["in_expert_redundancy_0.8", "inter_expert_redundancy_0.8"]].isna().any().any()
    scaled = metrics[metrics["feature_scaling"].isin(["mean", "identity", "learned"])]
    assert not scaled["omega_mean"].isna().any()
    # TopK-style codes keep at most k latents per token on held-out data
    topk = metrics[metrics["architecture"].isin(["topk", "scale", "switch"]) & (metrics["family"] != "scale_n32_e4_batchtopk")]
    assert (topk["l0_heldout"] <= topk["k"] + 1e-6).all()


def test_training_actually_reconstructs(micro_results):
    metrics = pd.read_csv(micro_results / "results" / "metrics.csv")
    fig3 = metrics[metrics["family"].isin(["scale_n16_e2", "switch_n32", "topk_m8th"]) & (metrics["k"] == 8)]
    assert (fig3["fvu_heldout"] < 1.0).all(), fig3[["variant", "fvu_heldout"]]


def test_auxiliary_stages_wrote_their_tables(micro_results):
    scores = pd.read_csv(micro_results / "results" / "autointerp" / "scores.csv")
    assert {"not", "q1", "q10"} <= set(scores["quantile"])
    summary = json.loads((micro_results / "results" / "synthetic" / "summary.json").read_text())
    assert summary["best_family"] and summary["ranking"]
    assert (micro_results / "results" / "tables" / "specialisation.csv").is_file()


def test_report_builds_from_the_run(micro_results, tmp_path):
    from moesae.report import build_report

    out = build_report(micro_results, out=tmp_path / "index.html")
    html = out.read_text()
    assert "claims" in html and "Table 1" in html and "Ground-truth benchmark" in html
