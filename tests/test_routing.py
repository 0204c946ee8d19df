"""Routing options of the MoE SAEs: MoE-X-style sparsity routing, the always-on shared expert,
and Scale SAE's batch-level global TopK."""
from __future__ import annotations

import math

import pytest
import torch

from moesae import build_sae, load_sae
from moesae.saes.moe import encoder_statistics, load_balance_loss, sparsity_router_logits


def _set(sae, **tensors):
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(sae, name).copy_(torch.as_tensor(value, dtype=torch.float32))


def _phi(v: float) -> float:
    return 0.5 * (1 + math.erf(v / math.sqrt(2)))


# ---- MoE-X routing ---------------------------------------------------------------------------
def test_sparsity_router_logits_hand_computed():
    # expert 0: rows [1, 0] and [3, 0] → mean [2, 0], var [1, 0]; expert 1: rows [0, 1], [0, -1]
    W = torch.tensor([[[1.0, 0], [3.0, 0]], [[0, 1.0], [0, -1.0]]])
    stats = encoder_statistics(W, None)
    assert torch.allclose(stats[0], torch.tensor([[2.0, 0], [0, 0]]))
    assert torch.allclose(stats[1], torch.tensor([[1.0, 0], [0, 1.0]]))
    x = torch.tensor([[1.0, 2.0]])
    logits = sparsity_router_logits(x, *stats, expert_size=2)
    # expert 0: mean 2, std 1 → Φ(2); expert 1: mean 0, std 2 → Φ(0) = 0.5
    expected = torch.tensor([[-math.log1p(2 * _phi(2.0)), -math.log1p(2 * 0.5)]])
    assert torch.allclose(logits, expected, atol=1e-6)


def test_moex_switch_routes_to_the_expert_with_the_sparsest_code():
    sae = build_sae("switch", d_in=2, num_latents=8, k=1, num_experts=2, router="moex")
    # expert 0 rows point along +x, expert 1 rows along −x
    W_enc = torch.tensor([[[1.0, 0], [1.0, 0.1], [1.0, -0.1], [0.9, 0]], [[-1.0, 0], [-1.0, 0.1], [-1.0, -0.1], [-0.9, 0]]])
    _set(sae, W_enc=W_enc, b_dec=[0, 0])
    x = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
    out = sae(x)
    # token +x activates every row of expert 0, none of expert 1 → expert 1 is the sparser
    assert torch.equal(out.extras["selected_experts"][:, 0], torch.tensor([1, 0]))
    assert torch.equal(out.extras["gate_weights"], torch.ones(2, 1))  # ungated
    assert "load_balance" not in out.losses
    out.loss.backward()
    assert sae.W_router.grad is None  # no learned router


def test_moex_scale_statistics_match_the_materialised_effective_encoders():
    torch.manual_seed(0)
    sae = build_sae("scale", d_in=6, num_latents=24, k=3, num_experts=4, active_experts=2, router="moex")
    with torch.no_grad():
        sae.omega.copy_(torch.tensor([0.5, -0.2, 0.0, 1.0]))
        sae.T.add_(0.1 * torch.randn(6, 6))
        sae.b_enc.copy_(torch.randn(4, 6))
    W_hat = sae.effective_encoders(torch.arange(4))
    ref = encoder_statistics(W_hat, sae.b_enc)
    for got, want in zip(sae.encoder_statistics(), ref):
        assert torch.allclose(got, want, atol=1e-5)
    x = torch.randn(10, 6)
    out = sae(x)
    best = sparsity_router_logits(x - sae.b_dec, *ref, expert_size=6).topk(2, dim=-1).indices
    assert torch.equal(out.extras["selected_experts"], best)


# ---- shared expert ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,extra",
    [
        ("switch", {"num_experts": 4}),
        ("scale", {"num_experts": 4, "active_experts": 2}),
        ("scale", {"num_experts": 4, "active_experts": 3, "router": "moex"}),
        ("switch", {"num_experts": 4, "router": "moex"}),
    ],
)
def test_shared_expert_is_selected_for_every_token_and_routed_for_none(arch, extra):
    torch.manual_seed(0)
    sae = build_sae(arch, d_in=8, num_latents=32, k=4, shared_expert=True, **extra)
    out = sae(torch.randn(50, 8) * 3)
    selected = out.extras["selected_experts"]
    assert (selected[:, -1] == 0).all()
    assert not (selected[:, :-1] == 0).any()
    assert torch.equal(out.extras["gate_weights"][:, -1], torch.ones(50))
    assert torch.all(out.extras["router_probs"][:, 0] == 0)
    held = torch.randn(5, 8) * 3
    assert torch.allclose(sae.decode(sae.encode(held)), sae(held).x_hat, atol=1e-5)


def test_shared_expert_switch_hand_computed():
    sae = build_sae("switch", d_in=3, num_latents=6, k=2, num_experts=3, shared_expert=True, balance_coefficient=0.0)
    W_enc = torch.zeros(3, 2, 3)
    W_enc[0, 0] = torch.tensor([0, 0, 1.0])  # shared feature 0
    W_enc[1, 0] = torch.tensor([1.0, 0, 0])  # feature 2
    W_enc[2, 1] = torch.tensor([0, 1.0, 0])  # feature 5
    _set(sae, W_enc=W_enc, W_dec=torch.eye(3).repeat(2, 1), W_router=[[9.0, 9, 9], [1.0, 0, 0], [0, 1.0, 0]], b_router=[0, 0, 0], b_dec=[0, 0, 0])
    x = torch.tensor([[2.0, 1.0, 0.5]])
    out = sae(x)
    p = torch.softmax(torch.tensor([2.0, 1.0]), 0)[0]  # router over experts 1, 2 only → expert 1
    expected = torch.zeros(1, 6)
    expected[0, 2] = 2 * p  # routed, scaled by its probability
    expected[0, 0] = 0.5  # shared, weight 1
    assert torch.allclose(sae.encode(x), expected)
    assert torch.equal(out.extras["selected_experts"], torch.tensor([[1, 0]]))


def test_shared_expert_balance_loss_ignores_the_shared_expert():
    sae = build_sae("scale", d_in=4, num_latents=16, k=2, num_experts=4, active_experts=1, shared_expert=True)
    probs = torch.tensor([[0.0, 1 / 3, 1 / 3, 1 / 3]] * 3)
    assert math.isclose(sae.routed_balance_loss(probs, torch.tensor([1, 2, 3])).item(), 1.0, rel_tol=1e-6)
    assert math.isclose(load_balance_loss(probs[:, 1:], torch.tensor([0, 1, 2])).item(), 1.0, rel_tol=1e-6)


# ---- Scale with a batch-level budget ---------------------------------------------------------
def test_scale_batch_topk_budget_and_threshold():
    torch.manual_seed(0)
    sae = build_sae("scale", d_in=8, num_latents=32, k=3, num_experts=4, active_experts=2, batch_topk=True)
    x = torch.randn(40, 8) * 2
    sae.train()
    out = sae(x)
    nnz = (out.top_values != 0).sum(1)
    assert int(nnz.sum()) == 3 * 40  # exactly k·B over the batch
    assert int(nnz.max()) > 3 or int(nnz.min()) < 3  # shared, not per token
    kept_min = out.top_values[out.top_values != 0].min()
    assert torch.isclose(sae.threshold, kept_min)
    sae.eval()
    ev = sae(x)
    dense = ev.dense_code(32)
    assert (dense[dense != 0] > sae.threshold).all()
    assert torch.allclose(sae.decode(sae.encode(x)), ev.x_hat, atol=1e-5)
    one = sae.encode(x[:1])
    assert torch.allclose(one, sae.encode(x)[:1])  # inference code does not depend on the batch


@pytest.mark.parametrize(
    "extra",
    [{"router": "moex"}, {"shared_expert": True}, {"batch_topk": True}, {"router": "moex", "shared_expert": True, "batch_topk": True}],
)
def test_routing_options_save_load_round_trip(tmp_path, extra):
    torch.manual_seed(0)
    sae = build_sae("scale", d_in=8, num_latents=32, k=3, num_experts=4, active_experts=2, **extra)
    x = torch.randn(30, 8)
    sae(x)
    sae.save(tmp_path / "m")
    loaded = load_sae(tmp_path / "m")
    sae.eval()
    loaded.eval()
    assert torch.equal(sae(x).x_hat, loaded(x).x_hat)


def test_defaults_keep_the_published_designs():
    a = build_sae("scale", d_in=8, num_latents=32, k=3, num_experts=4)
    b = build_sae("scale", d_in=8, num_latents=32, k=3, num_experts=4, router="learned", shared_expert=False, batch_topk=False)
    x = torch.randn(20, 8)
    assert torch.equal(a(x).x_hat, b(x).x_hat)
    assert "threshold" not in a.state_dict()  # default checkpoints unchanged


@pytest.mark.parametrize(
    "arch,config,field",
    [
        ("switch", {"router": "hash"}, "router"),
        ("scale", {"num_experts": 4, "active_experts": 4, "shared_expert": True}, "active_experts"),
        ("switch", {"num_experts": 1, "shared_expert": True, "num_latents": 8}, "shared_expert"),
        ("scale", {"num_experts": 4, "threshold_decay": 2.0}, "threshold_decay"),
    ],
)
def test_bad_routing_config_names_the_field(arch, config, field):
    base = {"d_in": 4, "num_latents": 16, "k": 2}
    with pytest.raises(ValueError, match=f"'{field}'"):
        build_sae(arch, **{**base, **config})


def test_flops_with_routing_options():
    moex = build_sae("scale", d_in=10, num_latents=80, k=4, num_experts=8, active_experts=2, router="moex")
    assert moex.flops_per_token() == 2 * 8 * 10 + 2 * 10 * 10 + 4 * 10
    shared = build_sae("switch", d_in=10, num_latents=80, k=4, num_experts=8, shared_expert=True)
    assert shared.flops_per_token() == 8 * 10 + 2 * 10 * 10 + 4 * 10
