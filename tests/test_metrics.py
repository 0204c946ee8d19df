"""Metric functions against hand-computed values, including the pitfalls listed in docs/method.md#metrics."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from moesae import build_sae
from moesae import metrics as mt


def _angles(*degrees: float, scale: list[float] | None = None) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    W = torch.stack([rad.cos(), rad.sin()], 1).float()
    if scale is not None:
        W = W * torch.tensor(scale)[:, None]
    return W


# ---- reconstruction ---------------------------------------------------------------------------
def test_mse_sums_over_dims_and_averages_over_tokens():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[0.0, 2.0], [3.0, 2.0]])
    # token errors: 1² = 1 and 2² = 4 → mean 2.5
    assert mt.mse(x, x_hat) == pytest.approx(2.5)


def test_fvu_is_centred_on_the_mean():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[0.0, 2.0], [3.0, 2.0]])
    # Σ‖x − x̂‖² = 5;  x̄ = (2, 3);  Σ‖x − x̄‖² = 2 + 2 = 4  → 1.25 (zero-centred would give 5/30)
    assert mt.fvu(x, x_hat) == pytest.approx(1.25)
    assert mt.fvu(x, x) == 0.0


def test_fvu_from_running_sums_matches_whole_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g) + 3.0
    x_hat = x + 0.3 * torch.randn(50, 4, generator=g)
    sse, sum_x, sum_sq, n = 0.0, torch.zeros(4, dtype=torch.float64), 0.0, 0
    for chunk, chunk_hat in zip(x.split(7), x_hat.split(7)):
        sse += float((chunk - chunk_hat).double().pow(2).sum())
        sum_x += chunk.double().sum(0)
        sum_sq += float(chunk.double().pow(2).sum())
        n += chunk.shape[0]
    assert mt.fvu_from_sums(sse, sum_x, sum_sq, n) == pytest.approx(mt.fvu(x, x_hat), rel=1e-9)
    assert math.isnan(mt.fvu_from_sums(1.0, torch.ones(2), 1.0, 2))  # x = (.5, .5) twice: no variance


def test_mse_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        mt.mse(torch.zeros(2, 3), torch.zeros(2, 4))


def test_l0_counts_nonzeros_dense_or_sparse():
    assert mt.l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])) == pytest.approx(1.5)
    # sparse kept values with a zero slot (TopK kept a ReLU zero): not counted
    assert mt.l0(torch.tensor([[2.0, 0.0], [1.0, 1.0]])) == pytest.approx(1.5)


def test_fire_counts_and_dead_fraction():
    indices = torch.tensor([[0, 2], [2, 1]])
    values = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    counts = mt.feature_fire_counts(indices, values, 4)
    assert counts.tolist() == [1, 1, 1, 0]
    assert mt.dead_fraction(counts) == pytest.approx(0.25)


def test_loss_recovered_hand_computed():
    assert mt.loss_recovered(ce_clean=2.0, ce_recon=3.0, ce_ablate=6.0) == pytest.approx(0.75)
    assert mt.loss_recovered(2.0, 2.0, 6.0) == pytest.approx(1.0)
    assert mt.loss_recovered(2.0, 6.0, 6.0) == pytest.approx(0.0)
    assert math.isnan(mt.loss_recovered(2.0, 3.0, 2.0))


def test_mean_and_std_sample():
    mean, std = mt.mean_and_std([1, 2, 3, 4])
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(math.sqrt(5 / 3))
    assert math.isnan(mt.mean_and_std([1.0])[1])


# ---- redundancy -------------------------------------------------------------------------------
def test_max_cosine_to_others_hand_computed():
    # unit vectors at 0°, 30°, 100°, 200° (rows scaled: cosine ignores norms)
    W = _angles(0, 30, 100, 200, scale=[1.0, 2.0, 0.5, 3.0])
    expected = [math.cos(math.radians(30)), math.cos(math.radians(30)), math.cos(math.radians(70)), math.cos(math.radians(100))]
    assert mt.max_cosine_to_others(W).tolist() == pytest.approx(expected, abs=1e-6)
    # chunk boundaries must still exclude exactly the row itself
    assert mt.max_cosine_to_others(W, chunk_size=1).tolist() == pytest.approx(expected, abs=1e-6)
    assert mt.max_cosine_to_others(W, chunk_size=3).tolist() == pytest.approx(expected, abs=1e-6)


def test_identical_rows_are_redundant_self_is_not():
    W = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert mt.max_cosine_to_others(W).tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_decoder_redundancy_thresholds():
    W = _angles(0, 30, 100, 200)
    r = mt.decoder_redundancy(W, [0.7, 0.8, 0.9])
    assert r["redundancy_0.7"] == pytest.approx(0.5)
    assert r["redundancy_0.8"] == pytest.approx(0.5)
    assert r["redundancy_0.9"] == pytest.approx(0.0)
    c30, c70, c100 = (math.cos(math.radians(a)) for a in (30, 70, 100))
    assert r["mean_max_cos"] == pytest.approx((2 * c30 + c70 + c100) / 4, abs=1e-6)


def test_in_expert_redundancy_averages_over_experts():
    W = _angles(0, 30, 100, 200)
    # expert 0 = {0°, 30°}: both max cos .866 > .8 → 1;  expert 1 = {100°, 200°}: cos 100° → 0
    assert mt.in_expert_redundancy(W, torch.tensor([0, 0, 1, 1]), 0.8) == pytest.approx(0.5)
    # grouping the similar rows apart removes all in-expert redundancy
    assert mt.in_expert_redundancy(W, torch.tensor([0, 1, 0, 1]), 0.8) == pytest.approx(0.0)


def test_random_subset_redundancy():
    W = _angles(0, 30, 100, 200, 5, 260)
    whole = mt.redundancy(mt.max_cosine_to_others(W), 0.8)
    # a "subset" of the whole dictionary is the dictionary itself, whatever the draw
    assert mt.random_subset_redundancy(W, 6, 0.8, num_subsets=3, seed=1) == pytest.approx(whole)
    a = mt.random_subset_redundancy(W, 3, 0.8, num_subsets=5, seed=7)
    assert a == mt.random_subset_redundancy(W, 3, 0.8, num_subsets=5, seed=7)  # seeded
    assert 0.0 <= a <= 1.0
    # parallel rows are redundant in every subset
    same = torch.ones(5, 3)
    assert mt.random_subset_redundancy(same, 2, 0.9, num_subsets=4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="subset_size"):
        mt.random_subset_redundancy(W, 1, 0.8, 2)


# ---- experts ----------------------------------------------------------------------------------
def test_expert_usage_shares():
    usage = mt.expert_usage(torch.tensor([[0, 1], [0, 2]]), 4)
    assert usage.tolist() == pytest.approx([0.5, 0.25, 0.25, 0.0])


def test_specialisation_cdf_hand_computed():
    # probe top features owned by experts: 1,1,2 and 1,3 (−1 = slot without an active feature)
    cdf = mt.specialisation_cdf(torch.tensor([[1, 1, 2], [1, 3, -1]]), 4)
    # counts [0, 3, 1, 1] → ranked [3, 1, 1, 0] of 5
    assert cdf.tolist() == pytest.approx([0.6, 0.8, 1.0, 1.0])


def test_activation_overlap_hand_computed():
    idx = torch.tensor([[1, 2], [2, 3], [1, 2]])
    # pairs (0,1): {2} → 1; (0,2): {1,2} → 2; (1,2): {2} → 1  → (1 + 2 + 1) / 3 pairs / k=2
    assert mt.activation_overlap(idx, k=2) == pytest.approx(4 / 3 / 2)
    # invalid (zero-valued) slots do not count as shared
    valid = torch.tensor([[True, False], [True, True], [True, True]])
    # S0 = {1}: (0,1): 0; (0,2): 1; (1,2): 1 → 2 / 3 / 2
    assert mt.activation_overlap(idx, k=2, valid=valid) == pytest.approx(2 / 3 / 2)
    assert math.isnan(mt.activation_overlap(idx[:1], k=2))


def test_activation_overlap_matches_brute_force_pairs():
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(12, generator=g)[:4] for _ in range(9)])
    sets = [set(row.tolist()) for row in idx]
    pairs = list(itertools.combinations(range(len(sets)), 2))  # i < j, each once
    brute = sum(len(sets[i] & sets[j]) / 4 for i, j in pairs) / len(pairs)
    assert mt.activation_overlap(idx, k=4) == pytest.approx(brute)


def test_omega_stats():
    s = mt.omega_stats(torch.tensor([0.0, 0.5, 1.0]))
    assert s["omega_mean"] == pytest.approx(0.5)
    assert s["omega_std"] == pytest.approx(0.5)
    assert (s["omega_min"], s["omega_max"]) == (0.0, 1.0)
    assert all(math.isnan(v) for v in mt.omega_stats(None).values())


def test_flops_per_token_by_hand():
    # dense: M·d + k·d = 16·4 + 2·4;  MoE: N·d + e·m·d + k·d = 4·4 + 2·4·4 + 2·4
    assert build_sae("topk", d_in=4, num_latents=16, k=2).flops_per_token() == 72
    scale = build_sae("scale", d_in=4, num_latents=16, k=2, num_experts=4, active_experts=2)
    assert scale.flops_per_token() == 56
    # MoE-X routing costs 2·N·d; a shared expert adds its m·d encoder rows
    assert build_sae("switch", d_in=4, num_latents=16, k=2, num_experts=4, router="moex").flops_per_token() == 32 + 16 + 8
    assert build_sae("switch", d_in=4, num_latents=16, k=2, num_experts=4, shared_expert=True).flops_per_token() == 16 + 32 + 8
