"""Every architecture learns a synthetic sparse dictionary: FVU < 0.2 on held-out samples after a
few hundred steps of the real trainer (TrainConfig / TrainingRun / train_saes / tensor_batches)."""
from __future__ import annotations

import pytest
import torch

from moesae import build_sae
from moesae.training import TrainConfig, TrainingRun, tensor_batches, train_saes

D_IN, NUM_LATENTS, K = 16, 64, 4


def sparse_dictionary_data(
    num_samples: int, *, d: int = D_IN, num_features: int = 48, clusters: int = 4, active: int = 3,
    dictionary_seed: int = 0, sample_seed: int = 0,
) -> torch.Tensor:
    """x = Σ (3 features of one cluster) · magnitude U(1, 3) + offset, unit-norm random features.

    Features come in clusters (each sample draws from one), so routed experts can specialise,
    as they are meant to on real activations. The offset exercises the pre-bias.
    """
    dictionary = torch.randn(num_features, d, generator=torch.Generator().manual_seed(dictionary_seed))
    dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(1000 + sample_seed)
    per_cluster = num_features // clusters
    cluster = torch.randint(clusters, (num_samples, 1), generator=g)
    idx = torch.rand(num_samples, per_cluster, generator=g).topk(active, dim=1).indices + cluster * per_cluster
    magnitudes = torch.rand(num_samples, active, generator=g) * 2 + 1
    codes = torch.zeros(num_samples, num_features).scatter(1, idx, magnitudes)
    return codes @ dictionary + 0.5


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def train_on_synthetic(arch: str, steps: int = 300, **extra):
    sae = build_sae(arch, d_in=D_IN, num_latents=NUM_LATENTS, k=K, **extra)
    run = TrainingRun(name=arch, sae=sae, config=TrainConfig(steps=steps, lr=1e-2, log_every=50, checkpoint_every=0))
    train_saes([run], tensor_batches(sparse_dictionary_data(16384), 256), progress=False)
    sae.eval()
    return sae, run


ARCHITECTURES = [
    ("topk", {}),
    ("switch", {"num_experts": 4}),
    ("scale", {"num_experts": 4, "active_experts": 2}),
    ("relu", {}),
    ("jumprelu", {}),
    ("gated", {}),
    ("batchtopk", {}),
    ("feature_choice", {}),
    ("feature_choice", {"capacity": "zipf"}),
    ("scale", {"num_experts": 4, "active_experts": 2, "router": "moex"}),
    ("switch", {"num_experts": 4, "shared_expert": True}),
    ("scale", {"num_experts": 4, "active_experts": 2, "batch_topk": True}),
]


@pytest.mark.parametrize("arch,extra", ARCHITECTURES, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_learns_synthetic_dictionary(arch, extra):
    torch.manual_seed(0)
    sae, run = train_on_synthetic(arch, **extra)
    heldout = sparse_dictionary_data(4096, sample_seed=1)
    with torch.no_grad():
        out = sae(heldout)
    assert fvu(heldout, out.x_hat) < 0.2
    l0 = float(out.active_mask(NUM_LATENTS).sum(1).float().mean())
    assert 1 <= l0 <= 2 * K  # sparse, and not collapsed to nothing
    # training made progress: the final training MSE is well below the first logged one
    assert run.history[-1]["mse"] < 0.5 * run.history[0]["mse"]


@pytest.mark.parametrize(
    "arch,extra", [("batchtopk", {}), ("scale", {"num_experts": 4, "active_experts": 2, "batch_topk": True})]
)
def test_inference_threshold_reproduces_the_training_l0_on_heldout_data(arch, extra):
    """The global threshold estimated in training gives L0 within 10% of k on unseen tokens."""
    torch.manual_seed(0)
    sae, run = train_on_synthetic(arch, steps=400, **extra)
    assert run.history[-1]["l0"] == K  # training: exactly k·B per batch
    with torch.no_grad():
        out = sae(sparse_dictionary_data(4096, sample_seed=2))
    l0 = float(out.active_mask(NUM_LATENTS).sum(1).float().mean())
    assert abs(l0 - K) <= 0.1 * K, l0
