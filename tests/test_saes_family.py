"""The rest of the SAE family (ReLU, JumpReLU, Gated, BatchTopK / Mutual Choice, Feature Choice):
hand-computed forward passes, training vs inference selection, capacities, aux_zipf, save/load."""
from __future__ import annotations

import math

import pytest
import torch

from moesae import build_sae, load_sae
from moesae.saes import REGISTRY
from moesae.saes.batchtopk import batch_topk_mask, update_threshold
from moesae.saes.feature_choice import (
    capacity_weights,
    expected_density,
    feature_capacities,
    feature_choice_mask,
)
from moesae.saes.jumprelu import jumprelu, step

R2 = math.sqrt(2.0)


def _set(sae, **tensors):
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(sae, name).copy_(torch.as_tensor(value, dtype=torch.float32))


W3 = torch.tensor([[1.0, 0], [0, 1.0], [1 / R2, 1 / R2]])  # d = 2, M = 3


# ---- ReLU ------------------------------------------------------------------------------------
def test_relu_forward_and_l1_hand_computed():
    sae = build_sae("relu", d_in=2, num_latents=3, k=1, sparsity_coefficient=0.5)
    _set(sae, W_enc=W3, W_dec=W3, b_enc=[0, -1, 0], b_dec=[0, 0], input_scale=2.0)
    x = torch.tensor([[2.0, 0.5]])
    # pre = [2, 0.5 - 1, 2.5/√2] → z = [2, 0, 2.5/√2]
    z = sae.encode(x)
    assert torch.allclose(z, torch.tensor([[2.0, 0.0, 2.5 / R2]]))
    out = sae(x)
    expected_hat = 2 * W3[0] + 2.5 / R2 * W3[2]
    assert torch.allclose(out.x_hat, expected_hat[None])
    assert torch.allclose(sae.decode(z), out.x_hat)
    # λ · s · Σ z_j ‖W_dec,j‖ with unit rows
    assert math.isclose(out.losses["l1"].item(), 0.5 * 2.0 * (2 + 2.5 / R2), rel_tol=1e-6)
    # decoder-norm weighting: doubling a row's norm doubles its term
    _set(sae, W_dec=torch.cat([2 * W3[:1], W3[1:]]))
    assert math.isclose(sae(x).losses["l1"].item(), 0.5 * 2.0 * (4 + 2.5 / R2), rel_tol=1e-6)


def test_calibration_moves_the_coefficient_towards_the_target_l0():
    sae = build_sae("relu", d_in=2, num_latents=3, k=1, calibration_rate=0.1)
    _set(sae, W_enc=W3, W_dec=W3, b_enc=[0, 0, 0], b_dec=[0, 0])
    x = torch.tensor([[2.0, 0.5], [1.0, 1.0]])  # 3 active latents per token > k = 1
    before = sae.sparsity_coefficient().item()
    sae(x)
    assert math.isclose(sae.sparsity_coefficient().item(), before * math.exp(0.1 * math.log(4 / 2)), rel_tol=1e-5)
    assert int(sae.calibration_step) == 1
    sae.eval()
    sae(x)  # inference never calibrates
    assert int(sae.calibration_step) == 1
    fixed = build_sae("relu", d_in=2, num_latents=3, k=1, sparsity_coefficient=0.3)
    fixed(x)
    assert math.isclose(fixed.sparsity_coefficient().item(), 0.3, rel_tol=1e-6)
    short = build_sae("relu", d_in=2, num_latents=3, k=1, calibration_steps=0)
    short(x)
    assert math.isclose(short.sparsity_coefficient().item(), 1.0, rel_tol=1e-6)  # frozen at its start


def test_jumprelu_calibration_also_shifts_every_threshold():
    """While λ is calibrated, each log θ_j takes the controller's step too; with a fixed λ, after
    calibration or at inference the thresholds are left to the optimiser."""
    x = torch.tensor([[2.0, 0.5], [1.0, 1.0]])
    theta = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    sae = build_sae("jumprelu", d_in=2, num_latents=3, k=1, calibration_rate=0.1)
    _set(sae, W_enc=W3, W_dec=W3, b_enc=[0, 0, 0], b_dec=[0, 0], log_threshold=theta)
    with torch.no_grad():
        l0 = float((sae.encoder_projection(x) > 0.5).sum(1).float().mean())
    sae(x)
    step = 0.01 * math.log((l0 + 1) / 2)  # the default threshold_calibration_rate
    assert step > 0  # more features fire than k: the thresholds rise
    torch.testing.assert_close(sae.log_threshold.detach(), theta + step)
    for untouched in (build_sae("jumprelu", d_in=2, num_latents=3, k=1, threshold_calibration_rate=0.0),
                      build_sae("jumprelu", d_in=2, num_latents=3, k=1, sparsity_coefficient=0.3)):
        _set(untouched, W_enc=W3, W_dec=W3, b_enc=[0, 0, 0], b_dec=[0, 0], log_threshold=theta)
        untouched(x)
        torch.testing.assert_close(untouched.log_threshold.detach(), theta)
    sae.eval()
    before = sae.log_threshold.detach().clone()
    sae(x)
    torch.testing.assert_close(sae.log_threshold.detach(), before)


def test_data_dependent_init_gives_target_l0_on_first_batch():
    torch.manual_seed(0)
    x = torch.randn(256, 8) * 3 + 1
    for arch in ("relu", "jumprelu", "gated"):
        sae = build_sae(arch, d_in=8, num_latents=32, k=4)
        sae.init_from_batch(x)
        sae.eval()
        l0 = (sae.encode(x) != 0).sum(1).float().mean().item()
        assert abs(l0 - 4) <= 0.5, (arch, l0)
        centred = x - sae.b_dec
        assert math.isclose(sae.input_scale.item(), centred.pow(2).sum(1).mean().div(8).sqrt().item(), rel_tol=1e-5)


# ---- JumpReLU --------------------------------------------------------------------------------
def test_jumprelu_forward_hand_computed():
    sae = build_sae("jumprelu", d_in=2, num_latents=3, k=1, sparsity_coefficient=0.25)
    _set(sae, W_enc=W3, W_dec=W3, b_enc=[0, 0, 0], b_dec=[0, 0], log_threshold=torch.log(torch.tensor([1.0, 1.0, 2.0])))
    x = torch.tensor([[2.0, 0.5]])
    # pre = [2, 0.5, 1.768]; θ = [1, 1, 2] → only feature 0 passes
    out = sae(x)
    assert torch.allclose(out.latents, torch.tensor([[2.0, 0.0, 0.0]]))
    assert torch.allclose(out.x_hat, torch.tensor([[2.0, 0.0]]))
    assert math.isclose(out.losses["l0"].item(), 0.25 * 1.0 * 1, rel_tol=1e-6)  # λ · s² · L0, s = 1


def test_jumprelu_straight_through_gradients():
    pre = torch.tensor([[1.01, 0.5], [0.98, 3.0], [2.0, 1.96]], requires_grad=True)
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    eps = 0.1  # window |pre − θ| < 0.05: (0,0) 1.01, (1,0) 0.98, (2,1) 1.96
    z = jumprelu(pre, theta, eps)
    assert torch.equal(z.detach(), torch.tensor([[1.01, 0.0], [0.0, 3.0], [2.0, 0.0]]))
    z.sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([-2 * 1.0 / eps, -1 * 2.0 / eps]))
    assert torch.equal(pre.grad, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    theta.grad = None
    pre.grad = None
    step(pre, theta, eps).sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([-2 / eps, -1 / eps]))
    assert torch.equal(pre.grad, torch.zeros(3, 2))  # the L0 term trains only the thresholds


# ---- Gated -----------------------------------------------------------------------------------
def test_gated_forward_and_losses_hand_computed():
    sae = build_sae("gated", d_in=2, num_latents=3, k=1, sparsity_coefficient=1.0)
    _set(sae, W_enc=W3, W_dec=W3, b_dec=[0, 0], b_gate=[-1, 0, -2], b_mag=[0.5, 0, 0], r_mag=[math.log(2), 0, 0])
    x = torch.tensor([[2.0, 0.5]])
    # proj = [2, 0.5, 1.768]; π_gate = [1, 0.5, -0.232] → gates 1, 1, 0
    # π_mag = [2·2 + 0.5, 0.5, 1.768] → z = [4.5, 0.5, 0]
    out = sae(x)
    assert torch.allclose(out.latents, torch.tensor([[4.5, 0.5, 0.0]]))
    assert torch.allclose(out.x_hat, torch.tensor([[4.5, 0.5]]))
    assert math.isclose(out.losses["l1"].item(), 1.0 + 0.5, rel_tol=1e-6)  # Σ ReLU(π_gate)
    # aux: decode ReLU(π_gate) = [1, 0.5, 0] → [1, 0.5]; ‖[2, 0.5] − [1, 0.5]‖² = 1
    assert math.isclose(out.losses["aux_gate"].item(), 1.0, rel_tol=1e-6)
    out.losses["aux_gate"].backward()
    assert sae.W_dec.grad is None or torch.count_nonzero(sae.W_dec.grad) == 0  # frozen decoder copy
    assert torch.allclose(sae.decode(sae.encode(x)), out.x_hat)


# ---- BatchTopK / Mutual Choice ---------------------------------------------------------------
def test_mutual_choice_is_batchtopk():
    assert REGISTRY["mutual_choice"] is REGISTRY["batchtopk"]
    assert build_sae("mutual_choice", d_in=4, num_latents=8, k=2).architecture == "batchtopk"


def test_batchtopk_training_shares_the_budget_and_inference_uses_the_threshold():
    sae = build_sae("batchtopk", d_in=3, num_latents=3, k=2, threshold_decay=0.5, aux_coefficient=0.0)
    _set(sae, W_enc=torch.eye(3), W_dec=torch.eye(3), b_enc=[0, 0, 0], b_dec=[0, 0, 0])
    x = torch.tensor([[5.0, 4.0, 3.0], [1.0, 0.5, 0.0]])
    out = sae(x)  # budget k·B = 4: 5, 4, 3 from token 0 and 1 from token 1
    assert torch.equal(out.dense_code(3), torch.tensor([[5.0, 4.0, 3.0], [1.0, 0.0, 0.0]]))
    assert out.l0() == 2.0  # padding entries (zeros) are not counted
    assert sae.threshold.item() == 1.0  # first update sets θ to the smallest kept value
    sae(torch.tensor([[3.0, 2.0, 0.0], [0.0, 0.0, 1.0]]))  # all 3 positives kept: smallest 1
    assert sae.threshold.item() == 1.0
    sae(torch.tensor([[3.0, 2.0, 5.0], [0.0, 0.0, 4.0]]))  # kept 5, 4, 3, 2 → smallest 2
    assert math.isclose(sae.threshold.item(), 0.5 * 1.0 + 0.5 * 2.0)
    sae.eval()  # θ = 1.5: per token, independent of the batch
    z = sae.encode(torch.tensor([[1.4, 1.6, 9.0]]))
    assert torch.equal(z, torch.tensor([[0.0, 1.6, 9.0]]))
    alone = sae.encode(torch.tensor([[1.4, 1.6, 9.0], [0.0, 0.0, 0.0]]))[:1]
    assert torch.equal(z, alone)


def test_batch_topk_mask_and_threshold_helpers():
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.3]])
    assert torch.equal(batch_topk_mask(scores, 3), torch.tensor([[False, True], [True, True]]))
    t = torch.tensor(-1.0)
    update_threshold(t, torch.tensor([0.0, 0.0]), 0.9)  # nothing positive: stays unset
    assert t.item() == -1.0
    update_threshold(t, torch.tensor([0.0, 2.0, 3.0]), 0.9)
    assert t.item() == 2.0


# ---- Feature Choice --------------------------------------------------------------------------
def test_feature_capacities_hand_computed():
    uniform = capacity_weights(4, "uniform", 1.0)
    assert torch.equal(feature_capacities(uniform, k=2, batch_size=6), torch.tensor([3, 3, 3, 3]))
    zipf = capacity_weights(4, "zipf", 1.0)  # w = 1, 1/2, 1/3, 1/4; Σ = 25/12
    # k·B·w/Σw with k·B = 10: 4.8, 2.4, 1.6, 1.2 → 5, 2, 2, 1
    assert torch.equal(feature_capacities(zipf, k=2, batch_size=5), torch.tensor([5, 2, 2, 1]))
    # k·B = 12: 5.76, 2.88, 1.92, 1.44 → 6, 3, 2, 1, then never above B = 3
    assert torch.equal(feature_capacities(zipf, k=4, batch_size=3), torch.tensor([3, 3, 2, 1]))
    # never below 1: k·B = 2 gives 0.96, 0.48, 0.32, 0.24 → 1, 0, 0, 0 → 1, 1, 1, 1
    assert torch.equal(feature_capacities(zipf, k=1, batch_size=2), torch.tensor([1, 1, 1, 1]))
    assert torch.allclose(expected_density(zipf, k=1), torch.tensor([12 / 25, 6 / 25, 4 / 25, 3 / 25]))


def test_feature_choice_mask_hand_computed():
    pre = torch.tensor([[3.0, 0.0], [1.0, 2.0], [2.0, 0.0]])
    keep, t = feature_choice_mask(pre, torch.tensor([2, 2]))
    # feature 0 keeps its 2 largest (3, 2); feature 1 has one positive entry only
    assert torch.equal(keep, torch.tensor([[True, False], [False, True], [True, False]]))
    assert torch.equal(t, torch.tensor([2.0, 0.0]))


@pytest.mark.parametrize("capacity", ["uniform", "zipf"])
def test_feature_choice_never_exceeds_a_feature_capacity(capacity):
    torch.manual_seed(0)
    sae = build_sae("feature_choice", d_in=8, num_latents=32, k=3, capacity=capacity)
    x = torch.randn(40, 8) * 2
    sae.init_from_batch(x)
    caps = sae.capacities(40)
    for _ in range(3):
        out = sae(torch.randn(40, 8) * 2)
        per_feature = (out.latents != 0).sum(0)
        assert (per_feature <= caps).all()
        assert int((out.latents != 0).sum()) <= int(caps.sum())
    if capacity == "zipf":
        assert caps[0] > caps[-1]


def test_feature_choice_inference_uses_per_feature_thresholds():
    sae = build_sae("feature_choice", d_in=2, num_latents=2, k=1, threshold_decay=0.0, aux_coefficient=0.0)
    _set(sae, W_enc=torch.eye(2), W_dec=torch.eye(2), b_enc=[0, 0], b_dec=[0, 0])
    # B = 2, k = 1: each feature keeps 1 token; thresholds = each column's largest value
    sae(torch.tensor([[3.0, 1.0], [2.0, 4.0]]))
    assert torch.equal(sae.thresholds, torch.tensor([3.0, 4.0]))
    sae.eval()
    assert torch.equal(sae.encode(torch.tensor([[3.5, 3.9]])), torch.tensor([[3.5, 0.0]]))


def test_aux_zipf_targets_under_firing_features():
    sae = build_sae("feature_choice", d_in=2, num_latents=4, k=1, capacity="zipf", aux_zipf_fraction=0.5, aux_k=1)
    rho = sae.expected_density.clone()
    with torch.no_grad():
        sae.firing_density.copy_(torch.stack([rho[0], rho[1] * 0.4, rho[2] * 0.6, torch.tensor(0.0)]))
    assert torch.equal(sae.under_firing(), torch.tensor([False, True, False, True]))
    # dead-like and under-firing features reconstruct the residual: the loss is positive and
    # its gradient reaches only their encoder rows
    _set(sae, W_enc=torch.tensor([[1.0, 0], [0, 1.0], [1, 1], [1, -1]]), b_dec=[0, 0])
    out = sae(torch.tensor([[1.0, 2.0], [2.0, 0.5], [0.1, 3.0]]))
    assert out.losses["aux_zipf"].item() > 0
    out.losses["aux_zipf"].backward()
    grads = sae.W_enc.grad.abs().sum(1)
    assert grads[0] == 0 and grads[2] == 0 and (grads[1] > 0 or grads[3] > 0)


# ---- shared contract: save/load, decode(encode) = x_hat, errors ------------------------------
FAMILY = [
    ("relu", {}),
    ("relu", {"unit_norm_decoder": False}),
    ("jumprelu", {}),
    ("gated", {}),
    ("batchtopk", {}),
    ("mutual_choice", {}),
    ("feature_choice", {}),
    ("feature_choice", {"capacity": "zipf", "zipf_exponent": 1.2}),
]


@pytest.mark.parametrize("arch,extra", FAMILY)
def test_save_load_round_trip_after_training_step(tmp_path, arch, extra):
    torch.manual_seed(0)
    sae = build_sae(arch, d_in=8, num_latents=32, k=3, **extra)
    x = torch.randn(64, 8) * 2 + 1
    sae.init_from_batch(x)
    sae(x).loss.backward()  # training-mode forward updates thresholds / calibration buffers
    sae.save(tmp_path / "m")
    loaded = load_sae(tmp_path / "m")
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    sae.eval()
    loaded.eval()
    held = torch.randn(20, 8) * 2 + 1
    assert torch.equal(sae(held).x_hat, loaded(held).x_hat)
    assert torch.allclose(sae.decode(sae.encode(held)), sae(held).x_hat, atol=1e-5)


def test_unconstrained_decoder_is_not_renormalised():
    sae = build_sae("relu", d_in=4, num_latents=8, k=2, unit_norm_decoder=False)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((8,), 3.0))


@pytest.mark.parametrize(
    "arch,config,field",
    [
        ("relu", {"sparsity_coefficient": -1.0}, "sparsity_coefficient"),
        ("jumprelu", {"bandwidth": 0.0}, "bandwidth"),
        ("gated", {"calibration_steps": -1}, "calibration_steps"),
        ("batchtopk", {"threshold_decay": 1.0}, "threshold_decay"),
        ("feature_choice", {"capacity": "pareto"}, "capacity"),
        ("feature_choice", {"aux_zipf_fraction": 0.0}, "aux_zipf_fraction"),
    ],
)
def test_bad_config_names_the_field(arch, config, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        build_sae(arch, d_in=4, num_latents=8, k=2, **config)


def test_flops_per_token():
    for arch in ("relu", "jumprelu", "gated", "batchtopk", "feature_choice"):
        assert build_sae(arch, d_in=10, num_latents=80, k=4).flops_per_token() == 80 * 10 + 4 * 10
