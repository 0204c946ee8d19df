"""The SAE zoo: hand-computed forward passes, sparsity, gates, Feature Scaling, save/load, errors."""
from __future__ import annotations

import math

import pytest
import torch

from moesae import build_sae, load_sae
from moesae.saes.moe import dispatch_experts, load_balance_loss

torch.set_grad_enabled(True)


def _set(sae, **tensors):
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(sae, name).copy_(torch.as_tensor(value, dtype=torch.float32))


# ---- hand-computed forward passes (d = 3, M = 8) -------------------------------------------
def test_topk_forward_hand_computed():
    sae = build_sae("topk", d_in=3, num_latents=4, k=2)
    W = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0]])
    _set(sae, W_enc=W, W_dec=W, b_enc=[0, 0, -0.5, 0], b_dec=[0, 0, 0])
    x = torch.tensor([[2.0, 1.0, 3.0]])
    # pre = relu([2, 1, 2.5, -2]) = [2, 1, 2.5, 0]; top-2 = {0: 2, 2: 2.5}
    z = sae.encode(x)
    assert torch.equal(z, torch.tensor([[2.0, 0, 2.5, 0]]))
    assert torch.allclose(sae.decode(z), torch.tensor([[2.0, 0, 2.5]]))
    out = sae(x)
    assert torch.allclose(out.x_hat, torch.tensor([[2.0, 0, 2.5]]))
    assert math.isclose(out.losses["mse"].item(), 1.0 + 0.25)  # (1-0)^2 + (3-2.5)^2


def test_switch_forward_hand_computed():
    sae = build_sae("switch", d_in=3, num_latents=8, k=1, num_experts=2, balance_coefficient=0.0)
    W_enc = torch.zeros(2, 4, 3)
    W_enc[0, 0] = torch.tensor([1.0, 0, 0])
    W_enc[0, 1] = torch.tensor([0, 1.0, 0])
    W_enc[1, 2] = torch.tensor([0, 0, 1.0])
    W_dec = torch.eye(3).repeat(3, 1)[:8]  # rows: e0 e1 e2 e0 | e1 e2 e0 e1
    _set(sae, W_enc=W_enc, W_dec=W_dec, W_router=[[1.0, 0, 0], [0, 0, 1.0]], b_router=[0, 0, 0], b_dec=[0, 0, 0])
    x = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 4.0]])
    out = sae(x)
    p0 = torch.softmax(torch.tensor([3.0, 1.0]), 0)[0]  # token 0 → expert 0
    p1 = torch.softmax(torch.tensor([0.0, 4.0]), 0)[1]  # token 1 → expert 1
    # token 0: expert 0 pre = [3, 2, 0, 0] → keep feature 0 (value 3) scaled by p0
    # token 1: expert 1 pre = [0, 0, 4, 0] → keep feature 4 + 2 = 6 (value 4) scaled by p1
    z = sae.encode(x)
    expected = torch.zeros(2, 8)
    expected[0, 0] = 3 * p0
    expected[1, 6] = 4 * p1
    assert torch.allclose(z, expected)
    expected_hat = torch.stack([3 * p0 * W_dec[0], 4 * p1 * W_dec[6]])
    assert torch.allclose(out.x_hat, expected_hat)
    assert torch.allclose(sae.decode(z), out.x_hat)


def test_scale_forward_hand_computed():
    sae = build_sae(
        "scale", d_in=3, num_latents=8, k=2, num_experts=4, active_experts=2,
        feature_scaling="none", balance_coefficient=0.0,
    )
    W_enc = torch.zeros(4, 2, 3)
    W_enc[0, 0] = torch.tensor([1.0, 0, 0])   # feature 0
    W_enc[1, 1] = torch.tensor([0, 1.0, 0])   # feature 3
    W_enc[2, 0] = torch.tensor([0, 0, 1.0])   # feature 4 (expert 2 is not selected below)
    W_enc[3, 1] = torch.tensor([1.0, 1.0, 0]) # feature 7
    W_router = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, -5.0], [0.5, 0.5, 0]])
    _set(sae, W_enc=W_enc, W_router=W_router, W_dec=torch.eye(3).repeat(3, 1)[:8])
    x = torch.tensor([[2.0, 1.0, 1.0]])
    logits = torch.tensor([2.0, 1.0, -5.0, 1.5])
    p = torch.softmax(logits, 0)
    # selected experts: 0 (p largest) and 3; weights = softmax over the selected *probabilities*
    w = torch.softmax(torch.stack([p[0], p[3]]), 0)
    # expert 0 activations: [2, 0]; expert 3: [0, 3]; candidates w0*[2,0], w3*[0,3]
    z = sae.encode(x)
    expected = torch.zeros(1, 8)
    expected[0, 0] = w[0] * 2
    expected[0, 7] = w[1] * 3
    assert torch.allclose(z, expected, atol=1e-6)
    out = sae(x)
    assert torch.allclose(out.extras["gate_weights"].sum(-1), torch.ones(1))
    assert torch.allclose(out.x_hat, sae.decode(z), atol=1e-6)


# ---- sparsity and gates ---------------------------------------------------------------------
ARCHS = [
    ("topk", {}),
    ("switch", {"num_experts": 4}),
    ("scale", {"num_experts": 4, "active_experts": 2}),
    ("scale", {"num_experts": 8, "active_experts": 3, "feature_scaling": "identity"}),
    ("scale", {"num_experts": 4, "active_experts": 2, "feature_scaling": "learned", "gate": "logit_softmax"}),
    ("authors_switch", {"num_experts": 4}),
]


@pytest.mark.parametrize("arch,extra", ARCHS)
def test_at_most_k_nonzeros(arch, extra):
    torch.manual_seed(0)
    sae = build_sae(arch, d_in=16, num_latents=64, k=5, **extra)
    x = torch.randn(50, 16) * 3
    z = sae.encode(x)
    nnz = (z != 0).sum(1)
    assert int(nnz.max()) <= 5
    # with the encoder = decoder and random inputs most tokens have >= k positive candidates
    assert (nnz == 5).float().mean() > 0.8
    assert torch.allclose(sae.decode(z), sae(x).x_hat, atol=1e-5)


def test_switch_router_gets_reconstruction_gradient():
    sae = build_sae("switch", d_in=8, num_latents=32, k=4, num_experts=4, balance_coefficient=0.0)
    x = torch.randn(20, 8)
    sae(x).losses["mse"].backward()
    assert sae.W_router.grad is not None and sae.W_router.grad.abs().sum() > 0


def test_scale_gate_weights_sum_to_one_and_e1_preset_is_exactly_one():
    sae = build_sae("scale", d_in=8, num_latents=32, k=4, num_experts=4, active_experts=3)
    out = sae(torch.randn(10, 8))
    assert torch.allclose(out.extras["gate_weights"].sum(-1), torch.ones(10))
    preset = build_sae("authors_switch", d_in=8, num_latents=32, k=4, num_experts=4)
    assert torch.equal(preset(torch.randn(10, 8)).extras["gate_weights"], torch.ones(10, 1))


def test_load_balance_loss_is_one_at_perfect_balance():
    probs = torch.full((8, 4), 0.25)
    top = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert math.isclose(load_balance_loss(probs, top).item(), 1.0, rel_tol=1e-6)
    skewed = torch.tensor([[1.0, 0, 0, 0]] * 8)
    assert math.isclose(load_balance_loss(skewed, torch.zeros(8, dtype=torch.long)).item(), 4.0, rel_tol=1e-6)


def test_feature_scaling_at_init_equals_unscaled_model():
    x = torch.randn(30, 12)
    for mode in ("mean", "identity", "learned"):
        scaled = build_sae("scale", d_in=12, num_latents=48, k=6, num_experts=4, active_experts=2, feature_scaling=mode)
        plain = build_sae("scale", d_in=12, num_latents=48, k=6, num_experts=4, active_experts=2, feature_scaling="none")
        assert torch.equal(scaled(x).x_hat, plain(x).x_hat), mode
    # and a non-zero omega changes the output
    with torch.no_grad():
        scaled.omega.fill_(0.5)
    assert not torch.allclose(scaled(x).x_hat, plain(x).x_hat)


def test_unselected_expert_is_never_computed():
    """NaN in the weights of an expert no token selects: reconstruction and loss stay finite."""
    sae = build_sae("scale", d_in=8, num_latents=64, k=4, num_experts=8, active_experts=2)
    x = torch.rand(32, 8) + 1.0  # positive inputs: a very negative router row never wins
    with torch.no_grad():
        sae.W_router[7].fill_(-1e4)  # expert 7 never wins the router
        sae.W_enc[7].fill_(float("nan"))
        sae.b_enc[7].fill_(float("nan"))
    out = sae(x)
    assert not (out.extras["selected_experts"] == 7).any()
    assert torch.isfinite(out.x_hat).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(sae.W_enc.grad[:7]).all()
    sw = build_sae("switch", d_in=8, num_latents=64, k=4, num_experts=8)
    with torch.no_grad():
        sw.W_router[3].fill_(-1e4)
        sw.W_enc[3].fill_(float("nan"))
    assert torch.isfinite(sw(x).loss)


@pytest.mark.parametrize("mode", ["grouped", "loop"])
def test_dispatch_matches_all_experts_reference(mode):
    torch.manual_seed(1)
    W = torch.randn(6, 5, 4)
    b = torch.randn(6, 5)
    x = torch.randn(40, 4)
    experts = torch.stack([torch.randperm(6)[:3] for _ in range(40)])
    ref = dispatch_experts(x, experts, lambda ids: W[ids], b, 6, "all")
    fast = dispatch_experts(x, experts, lambda ids: W[ids], b, 6, mode)
    assert torch.allclose(ref, fast, atol=1e-6)


# ---- save / load ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,extra", ARCHS)
def test_save_load_round_trip_bit_for_bit(tmp_path, arch, extra):
    sae = build_sae(arch, d_in=16, num_latents=64, k=5, **extra)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sae.save(tmp_path / "m")
    assert (tmp_path / "m" / "cfg.json").is_file() and (tmp_path / "m" / "sae_weights.safetensors").is_file()
    loaded = load_sae(tmp_path / "m")
    x = torch.randn(20, 16)
    assert torch.equal(sae(x).x_hat, loaded(x).x_hat)


def test_load_corrupt_checkpoint_is_a_clear_error(tmp_path):
    sae = build_sae("topk", d_in=4, num_latents=8, k=2)
    sae.save(tmp_path)
    data = (tmp_path / "sae_weights.safetensors").read_bytes()
    (tmp_path / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt SAE weights"):
        load_sae(tmp_path)
    with pytest.raises(FileNotFoundError, match="cfg.json|sae_weights"):
        load_sae(tmp_path / "nowhere")


# ---- configuration errors ------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,config,field",
    [
        ("topk", {"d_in": 4, "num_latents": 8, "k": 9}, "k"),
        ("scale", {"d_in": 4, "num_latents": 8, "k": 2, "num_experts": 2, "active_experts": 3}, "active_experts"),
        ("scale", {"d_in": 4, "num_latents": 10, "k": 2, "num_experts": 3}, "num_latents"),
        ("switch", {"d_in": 4, "num_latents": 10, "k": 2, "num_experts": 4}, "num_latents"),
        ("switch", {"d_in": 4, "num_latents": 16, "k": 5, "num_experts": 4}, "k"),
        ("scale", {"d_in": 4, "num_latents": 16, "k": 2, "num_experts": 4, "feature_scaling": "fourier"}, "feature_scaling"),
        ("nonsense", {"d_in": 4, "num_latents": 8}, "architecture"),
        ("topk", {"d_in": 4, "num_latents": 8, "k": 2, "bogus": 1}, "bogus"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(arch, config, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        build_sae(arch, **config)


def test_flops_per_token_formula():
    assert build_sae("topk", d_in=10, num_latents=80, k=4).flops_per_token() == 80 * 10 + 4 * 10
    sc = build_sae("scale", d_in=10, num_latents=80, k=4, num_experts=8, active_experts=2)
    assert sc.flops_per_token() == 8 * 10 + 2 * 10 * 10 + 4 * 10
    sw = build_sae("switch", d_in=10, num_latents=80, k=4, num_experts=8)
    assert sw.flops_per_token() == 8 * 10 + 10 * 10 + 4 * 10
