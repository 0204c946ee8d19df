"""Ground-truth benchmark: the generator's statistics, the recovery metrics (1.0 for the truth, chance
for a random dictionary), the matching, the stage's outputs and its resumption."""
from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
import torch
import yaml

from moesae import build_sae
from moesae.params import ParamsError
from moesae import synthetic as syn
from moesae.synthetic import (
    SyntheticConfig,
    SyntheticData,
    SyntheticDataConfig,
    chance_max_cosine,
    cosine_matrix,
    detection_scores,
    fraction_recovered,
    match_features,
    matched_cosine,
    mean_max_cosine,
    recovery_metrics,
    true_dictionary,
    zipf_probabilities,
)


# ---- generator ---------------------------------------------------------------------------------
def test_zipf_probabilities_hand_computed():
    # exponent 0: uniform, mean_l0 / n each
    assert torch.allclose(torch.as_tensor(zipf_probabilities(4, 2.0, 0.0)), torch.full((4,), 0.5, dtype=torch.float64))
    # exponent 1, n = 3, sum 1: c (1 + 1/2 + 1/3) = 1 → c = 6/11
    p = zipf_probabilities(3, 1.0, 1.0)
    assert p == pytest.approx([6 / 11, 3 / 11, 2 / 11], abs=1e-9)
    # capped at 1: the top features saturate and the rest share the remainder
    p = zipf_probabilities(10, 8.0, 2.0)
    assert p.max() == pytest.approx(1.0) and p.sum() == pytest.approx(8.0, abs=1e-6)
    assert all(a >= b for a, b in zip(p, p[1:]))


def test_true_dictionary_orthonormal_when_possible():
    g = torch.Generator().manual_seed(0)
    D = true_dictionary(8, 16, g)
    assert torch.allclose(D @ D.T, torch.eye(8), atol=1e-5)
    D = true_dictionary(40, 16, g)
    assert torch.allclose(D.norm(dim=1), torch.ones(40), atol=1e-5)


def test_generator_is_deterministic_and_exact():
    data = SyntheticData(SyntheticDataConfig(d_in=8, num_features=12, mean_l0=3.0, seed=3))
    x1, c1 = data.batch(5, 64)
    x2, c2 = data.batch(5, 64)
    x3, _ = data.batch(6, 64)
    assert torch.equal(x1, x2) and torch.equal(c1, c2) and not torch.equal(x1, x3)
    assert torch.allclose(x1, c1 @ data.dictionary + data.bias, atol=1e-6)
    assert (c1 >= 0).all()
    assert data.bias.norm().item() == pytest.approx(1.0, rel=1e-5)
    # the same seed rebuilds the same dictionary; another seed does not
    same = SyntheticData(SyntheticDataConfig(d_in=8, num_features=12, mean_l0=3.0, seed=3))
    other = SyntheticData(SyntheticDataConfig(d_in=8, num_features=12, mean_l0=3.0, seed=4))
    assert torch.equal(same.dictionary, data.dictionary) and not torch.equal(other.dictionary, data.dictionary)


@pytest.mark.parametrize("copula", [False, True])
def test_firing_rates_match_zipf_with_and_without_copula_and_hierarchy(copula):
    cfg = SyntheticDataConfig(d_in=16, num_features=20, mean_l0=4.0, hierarchy_fraction=0.3,
                              correlation_rank=3 if copula else 0, correlation_strength=0.5 if copula else 0.0)
    data = SyntheticData(cfg)
    _, codes = data.eval_set(40_000)
    fires = codes > 0
    rate = fires.float().mean(0)
    assert torch.allclose(rate, data.firing_probability, atol=0.015)
    assert fires.sum(1).float().mean().item() == pytest.approx(4.0, abs=0.08)
    # children fire only with their parent
    children = torch.nonzero(data.parent >= 0).squeeze(1)
    assert children.numel() > 0
    assert not (fires[:, children] & ~fires[:, data.parent[children]]).any()


def test_copula_correlates_firing():
    def mean_offdiag_corr(cfg):
        _, codes = SyntheticData(cfg).eval_set(20_000)
        f = (codes > 0).float()
        c = torch.corrcoef(f.T)
        off = c[~torch.eye(c.shape[0], dtype=torch.bool)]
        return off.nan_to_num().abs().mean().item()  # random loadings: correlations of both signs

    base = dict(d_in=16, num_features=10, mean_l0=3.0, zipf_exponent=0.0)
    independent = mean_offdiag_corr(SyntheticDataConfig(**base))
    correlated = mean_offdiag_corr(SyntheticDataConfig(**base, correlation_rank=1, correlation_strength=0.8))
    assert independent < 0.02
    assert correlated > 0.15


def test_data_config_errors_name_the_field():
    with pytest.raises(ValueError, match="'mean_l0'"):
        SyntheticDataConfig(num_features=4, mean_l0=5.0)
    with pytest.raises(ValueError, match="'correlation_strength'"):
        SyntheticDataConfig(correlation_strength=1.0)


# ---- metrics -----------------------------------------------------------------------------------
def _truth(d=16, n=24, tokens=4000, seed=0):
    data = SyntheticData(SyntheticDataConfig(d_in=d, num_features=n, mean_l0=3.0, zipf_exponent=0.5, seed=seed))
    _, codes = data.eval_set(tokens)
    return data, codes > 0


def test_true_dictionary_scores_one():
    data, active = _truth()
    m = recovery_metrics(data.dictionary, data.dictionary, active, active)
    for key in ["mmcs_learned_to_true", "mmcs_true_to_learned", "matched_cosine", "fraction_recovered",
                "precision", "recall", "f1"]:
        assert m[key] == pytest.approx(1.0, abs=1e-9), key
    assert m["dead_fraction"] == 0.0


def test_permuted_and_wider_true_dictionary_still_scores_one():
    data, active = _truth()
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    extra = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    W = torch.cat([data.dictionary[perm], extra])  # 32 latents: the truth, shuffled, plus 8 others
    latent_active = torch.cat([active[:, perm], torch.zeros(active.shape[0], 8, dtype=torch.bool)], 1)
    m = recovery_metrics(W, data.dictionary, latent_active, active)
    assert m["mmcs_true_to_learned"] == pytest.approx(1.0)
    assert m["matched_cosine"] == pytest.approx(1.0)
    assert m["fraction_recovered"] == 1.0
    assert m["f1"] == pytest.approx(1.0)
    assert m["mmcs_learned_to_true"] < 1.0  # the 8 extra rows are not true features
    assert m["dead_fraction"] == pytest.approx(8 / 32)


def test_random_dictionary_scores_near_chance():
    d, n, L = 16, 200, 200
    g = torch.Generator().manual_seed(0)
    true = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    learned = torch.nn.functional.normalize(torch.randn(L, d, generator=g), dim=1)
    cos = cosine_matrix(learned, true)
    l2t, t2l = mean_max_cosine(cos)
    chance = chance_max_cosine(d, n)  # analytic
    assert l2t == pytest.approx(chance, abs=0.02)
    assert t2l == pytest.approx(chance_max_cosine(d, L), abs=0.02)
    assert fraction_recovered(cos, 0.9) == 0.0  # P(cos ≥ 0.9) in 16 dims is ~1e-7 per pair
    rows, cols = match_features(cos)
    matched = matched_cosine(cos, rows, cols)
    assert 0.1 < matched < chance  # one-to-one can only do worse than each feature's best
    # and far below what the truth gets
    assert matched < 0.6


def test_chance_max_cosine_hand_values_and_simulation():
    assert chance_max_cosine(8, 1) == pytest.approx(0.0, abs=1e-7)  # E[cos] of one random vector
    # d = 3: cos is uniform on [-1, 1], so the max of 2 has mean 1/3
    assert chance_max_cosine(3, 2) == pytest.approx(1 / 3, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(2000, 10, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(30, 10, generator=g), dim=1)
    simulated = (u @ v.T).max(1).values.mean().item()
    assert chance_max_cosine(10, 30) == pytest.approx(simulated, abs=0.01)


def test_detection_scores_hand_computed():
    latent = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    feature = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    # pair (latent 0, feature 0): both=1, fired=2, present=2 → P=R=F1=0.5
    # pair (latent 1, feature 2): latent never fires → P=R=F1=0
    # pair (latent 2, feature 1): feature never fires → skipped
    s = detection_scores(latent, feature, torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1]))
    assert s["precision"] == pytest.approx(0.25)
    assert s["recall"] == pytest.approx(0.25)
    assert s["f1"] == pytest.approx(0.25)


def test_detection_scores_of_random_firing_are_chance():
    g = torch.Generator().manual_seed(0)
    T = 50_000
    feature = torch.rand(T, 5, generator=g) < torch.tensor([0.05, 0.1, 0.2, 0.3, 0.4])
    latent = torch.rand(T, 5, generator=g) < 0.25  # independent of the features
    s = detection_scores(latent, feature, torch.arange(5), torch.arange(5))
    assert s["precision"] == pytest.approx(0.21, abs=0.01)  # mean feature rate
    assert s["recall"] == pytest.approx(0.25, abs=0.01)  # the latent's rate


def test_matching_hungarian_beats_greedy_on_hand_case():
    cos = torch.tensor([[0.9, 0.8], [0.8, 0.1]], dtype=torch.float64)
    rows, cols = match_features(cos, "hungarian")
    assert matched_cosine(cos, rows, cols) == pytest.approx(1.6 / 2)
    rows, cols = match_features(cos, "greedy")
    assert matched_cosine(cos, rows, cols) == pytest.approx(1.0 / 2)
    # narrower dictionary: unmatched true features count 0
    rows, cols = match_features(cos[:1], "hungarian")
    assert matched_cosine(cos[:1], rows, cols) == pytest.approx(0.9 / 2)
    with pytest.raises(ValueError, match="matching method"):
        match_features(cos, "best")


def test_oracle_topk_sae_recovers_everything():
    """A TopK SAE whose encoder and decoder are the (orthonormal) truth is scored perfect."""
    data = SyntheticData(SyntheticDataConfig(d_in=16, num_features=12, mean_l0=3.0, seed=0))
    x, codes = data.eval_set(2000)
    sae = build_sae("topk", d_in=16, num_latents=12, k=12)
    with torch.no_grad():
        sae.W_enc.copy_(data.dictionary)
        sae.W_dec.copy_(data.dictionary)
        sae.b_dec.copy_(data.bias)
        sae.b_enc.fill_(-1e-3)  # float noise of order 1e-7 must not count as firing
    cfg = SyntheticConfig(families={"topk": {"architecture": "topk"}})
    m = syn.evaluate_sae(sae, x, codes, data.dictionary, cfg)
    assert m["matched_cosine"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(1.0)
    assert m["fvu"] == pytest.approx(0.0, abs=1e-4)  # only the 1e-3 threshold is lost
    assert m["l0"] == pytest.approx(float((codes > 0).sum(1).float().mean()))


# ---- config ------------------------------------------------------------------------------------
def test_config_errors_name_the_key():
    with pytest.raises(ParamsError, match="synthetic"):
        syn.load_config({})
    with pytest.raises(ParamsError, match="synthetic.bogus"):
        syn.load_config({"synthetic": {"families": {"t": {"architecture": "topk"}}, "bogus": 1}})
    with pytest.raises(ParamsError, match="families.t"):
        syn.load_config({"synthetic": {"families": {"t": {"num_experts": 4}}}})
    with pytest.raises(ParamsError, match="data.seed"):
        syn.load_config({"synthetic": {"families": {"t": {"architecture": "topk"}}, "data": {"seed": 1}}})
    with pytest.raises(ParamsError, match="'mean_l0'"):
        syn.load_config({"synthetic": {"families": {"t": {"architecture": "topk"}}, "data": {"mean_l0": -1}}})


def test_paper_preset_is_the_issue_scale():
    cfg = syn.load_config({"synthetic": {"preset": "paper", "families": {"t": {"architecture": "topk"}},
                                         "data": {"bias_norm": 2.0}}})
    data = cfg.data_config(0)
    assert (data.d_in, data.num_features, data.mean_l0, data.bias_norm) == (768, 16384, 30.0, 2.0)


def test_default_profile_section_is_valid():
    from pathlib import Path

    profile = yaml.safe_load((Path(__file__).resolve().parents[1] / "profiles" / "default.yaml").read_text())
    cfg = syn.load_config(profile)
    assert cfg.device == "cpu" and len(cfg.seeds) >= 2
    assert syn._cells(cfg, 0)  # every family expands at some k


# ---- the stage ---------------------------------------------------------------------------------
def _tiny_params(tmp_path):
    section = {
        "data": {"d_in": 8, "num_features": 8, "mean_l0": 2.0},
        "num_latents": 16, "l0": [2], "seeds": [0, 1], "steps": 15, "batch_size": 64, "lr": 0.01,
        "eval_tokens": 512, "output_dir": str(tmp_path / "out"),
        "families": {"topk": {"architecture": "topk"},
                     "scale_n4_e2": {"architecture": "scale", "num_experts": 4, "active_experts": 2}},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"synthetic": section}))
    return path


def test_stage_writes_outputs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # timing files land here
    params = _tiny_params(tmp_path)
    assert syn.main(["--params", str(params), "--no-progress"]) == 0
    out = tmp_path / "out"
    df = pd.read_csv(out / syn.METRICS_FILE)
    assert len(df) == 4 and set(df["family"]) == {"topk", "scale_n4_e2"}
    for column in ["family", "architecture", "k", "seed", "active_width", "flops_per_token", "matched_cosine",
                   "mmcs_learned_to_true", "mmcs_true_to_learned", "fraction_recovered", "precision", "recall",
                   "f1", "redundancy_0.9", "dead_fraction", "l0", "fvu"]:
        assert column in df.columns, column
    assert df["matched_cosine"].between(0, 1).all()
    assert set(df.loc[df["family"] == "scale_n4_e2", "active_width"]) == {8}  # e·M/N = 2·16/4
    summary = json.loads((out / syn.SUMMARY_FILE).read_text())
    assert summary["best_family"] in {"topk", "scale_n4_e2"}
    assert {r["family"] for r in summary["ranking"]} == {"topk", "scale_n4_e2"}
    assert "16" in summary["chance"] and 0 < summary["chance"]["16"]["matched_cosine"] < 1
    assert not list(out.rglob("*.tmp"))

    # a second run reuses every finished cell: no training at all
    def no_training(*args, **kwargs):
        raise AssertionError("finished cells must not be retrained")

    monkeypatch.setattr("moesae.train.train_saes", no_training)
    assert syn.main(["--params", str(params), "--no-progress"]) == 0
    again = pd.read_csv(out / syn.METRICS_FILE)
    pd.testing.assert_frame_equal(df, again)
    assert (tmp_path / "results" / "timings" / "synthetic.json").is_file()

    # a changed parameter invalidates the cells it touches (here: all of them)
    section = yaml.safe_load(params.read_text())
    section["synthetic"]["steps"] = 16
    params.write_text(yaml.safe_dump(section))
    with pytest.raises(AssertionError, match="must not be retrained"):
        syn.main(["--params", str(params), "--no-progress"])


def test_plot_recovery_draws_every_family(tmp_path):
    rows = []
    for fam, base in [("topk", 0.8), ("switch_n8", 0.5)]:
        for k in (2, 4):
            for seed in (0, 1):
                rows.append({"family": fam, "k": k, "seed": seed, "active_width": 128 if fam == "topk" else 16,
                             "matched_cosine": base + 0.01 * seed, "fraction_recovered": base / 2,
                             "mmcs_true_to_learned": base, "f1": base / 3, "fvu": 1 - base})
    fig = syn.plot_recovery(pd.DataFrame(rows), chance={"128": {"matched_cosine": 0.3}})
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["switch_n8", "topk"]
    assert len(fig.axes) == 6  # 5 metrics + the compute panel
    assert fig.axes[0].get_ylim()[0] <= 0.3  # the chance line is in view
    fig.savefig(tmp_path / "f.png")
