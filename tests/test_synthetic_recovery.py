"""Ground-truth benchmark, the recovery metrics: 1.0 for the truth, chance for a random dictionary,
hand-computed detection scores and matchings."""
from __future__ import annotations

import pytest
import torch

from moesae import build_sae
from moesae.synthetic import (
    SyntheticData,
    chance_levels,
    chance_max_cosine,
    cosine_matrix,
    detection_scores,
    evaluate_sae,
    fraction_recovered,
    match_features,
    matched_cosine,
    mean_max_cosine,
    recovery_metrics,
)
from test_synthetic_generator import data_config


def _truth(d=16, n=24, tokens=4000, seed=0):
    data = SyntheticData(data_config(d_in=d, num_features=n, mean_l0=3.0, zipf_exponent=0.5, seed=seed))
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


def test_chance_levels_are_the_random_decoders_metrics():
    data, active = _truth()
    levels = chance_levels(data, 24, active, seed=0)
    assert levels == chance_levels(data, 24, active, seed=0)  # seeded
    assert 0 < levels["matched_cosine"] < levels["mmcs_true_to_learned"] < 1
    assert levels["fraction_recovered"] == 0.0


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
    data = SyntheticData(data_config(d_in=16, num_features=12, mean_l0=3.0, seed=0))
    x, codes = data.eval_set(2000)
    sae = build_sae("topk", d_in=16, num_latents=12, k=12)
    with torch.no_grad():
        sae.W_enc.copy_(data.dictionary)
        sae.W_dec.copy_(data.dictionary)
        sae.b_dec.copy_(data.bias)
        sae.b_enc.fill_(-1e-3)  # float noise of order 1e-7 must not count as firing
    m = evaluate_sae(sae, x, codes, data.dictionary, 0.9, [0.7, 0.8, 0.9], "auto")
    assert m["matched_cosine"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(1.0)
    assert m["fvu"] == pytest.approx(0.0, abs=1e-4)  # only the 1e-3 threshold is lost
    assert m["l0"] == pytest.approx(float((codes > 0).sum(1).float().mean()))
