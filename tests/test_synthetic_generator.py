"""Ground-truth benchmark, the generator: exact firing statistics, determinism, field errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moesae.synthetic import SyntheticData, SyntheticDataConfig, true_dictionary, zipf_probabilities

# Independent firing, no hierarchy: the base the tests change one thing at a time from.
BASE = dict(d_in=16, num_features=20, mean_l0=4.0, zipf_exponent=1.0, magnitude_mean=1.0, magnitude_std=0.25,
            correlation_rank=0, correlation_strength=0.0, hierarchy_fraction=0.0, bias_norm=1.0, seed=0)


def data_config(**over) -> SyntheticDataConfig:
    return SyntheticDataConfig(**{**BASE, **over})


def test_every_field_is_required():
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(SyntheticDataConfig))
    with pytest.raises(TypeError):
        SyntheticDataConfig(d_in=8, num_features=12, mean_l0=3.0, seed=0)  # type: ignore[call-arg]


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
    cfg = dict(d_in=8, num_features=12, mean_l0=3.0, seed=3)
    data = SyntheticData(data_config(**cfg))
    x1, c1 = data.batch(5, 64)
    x2, c2 = data.batch(5, 64)
    x3, _ = data.batch(6, 64)
    assert torch.equal(x1, x2) and torch.equal(c1, c2) and not torch.equal(x1, x3)
    assert torch.allclose(x1, c1 @ data.dictionary + data.bias, atol=1e-6)
    assert (c1 >= 0).all()
    assert data.bias.norm().item() == pytest.approx(1.0, rel=1e-5)
    # the same seed rebuilds the same dictionary; another seed does not
    same = SyntheticData(data_config(**cfg))
    other = SyntheticData(data_config(**{**cfg, "seed": 4}))
    assert torch.equal(same.dictionary, data.dictionary) and not torch.equal(other.dictionary, data.dictionary)
    # training and evaluation streams differ
    assert not torch.equal(data.batch(0, 64, stream=1)[0], data.batch(0, 64, stream=2)[0])
    assert torch.equal(data.batch_fn(64)(5), x1)


@pytest.mark.parametrize("copula", [False, True])
def test_firing_rates_match_zipf_with_and_without_copula_and_hierarchy(copula):
    cfg = data_config(hierarchy_fraction=0.3, correlation_rank=3 if copula else 0,
                      correlation_strength=0.5 if copula else 0.0)
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
    independent = mean_offdiag_corr(data_config(**base))
    correlated = mean_offdiag_corr(data_config(**base, correlation_rank=1, correlation_strength=0.8))
    assert independent < 0.02
    assert correlated > 0.15


def test_data_config_errors_name_the_field():
    with pytest.raises(ValueError, match="'mean_l0'"):
        data_config(num_features=4, mean_l0=5.0)
    with pytest.raises(ValueError, match="'correlation_strength'"):
        data_config(correlation_strength=1.0)
    with pytest.raises(ValueError, match="'seed'"):
        data_config(seed=0.5)
