"""The SAEBench core metrics (sae_bench/evals/core/main.py): each pure function in moesae.metrics
against a hand-computed case, then the evaluate stage's streaming sums and its KL from the
loss-recovered pass's own forward passes."""
from __future__ import annotations

import math

import pytest
import torch

from moesae import build_sae
from moesae import evaluate as ev
from moesae import metrics as mt
from test_evaluate import CROSS, HELDOUT, MemoryReader, TinySubject, _bias_only_sae, _cache, _cfg, _identity_sae


# ---- reconstruction ---------------------------------------------------------------------------
def test_explained_variance_is_one_minus_the_centred_fvu():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[0.0, 2.0], [3.0, 2.0]])
    # Σ‖x − x̂‖² = 5; Σ‖x − x̄‖² = 4 (x̄ = (2, 3)) → 1 − 5/4 (the uncentred Σ‖x‖² = 30 would give 1 − 5/30)
    assert mt.explained_variance(x, x_hat) == pytest.approx(-0.25)
    assert mt.explained_variance(x, x) == 1.0
    assert mt.explained_variance_from_sums(5.0, x.sum(0), float(x.pow(2).sum()), 2) == pytest.approx(-0.25)
    assert math.isnan(mt.explained_variance(torch.ones(3, 2), torch.zeros(3, 2)))  # no variance: undefined


def test_cosine_similarity_per_token_and_mean():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    x_hat = torch.tensor([[0.0, 1.0], [2.0, 2.0], [1.0, 0.0]])
    # orthogonal → 0, parallel → 1, a zero vector → 0 (not NaN)
    assert mt.token_cosine_similarity(x, x_hat).tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert mt.cosine_similarity(x, x_hat) == pytest.approx(1 / 3)


def test_cosine_of_opposite_vectors_is_minus_one():
    x = torch.tensor([[1.0, 2.0]])
    assert mt.cosine_similarity(x, -3 * x) == pytest.approx(-1.0)


def test_l2_ratio_measures_shrinkage():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 1e-5]])
    x_hat = torch.tensor([[0.0, 2.5], [0.0, 3.0], [0.0, 0.5]])
    # 2.5 / 5 = 0.5; 3 / 1 = 3; ‖x‖ < 1e-4 is divided by 1 (SAEBench): 0.5 / 1
    assert mt.token_l2_ratio(x, x_hat).tolist() == pytest.approx([0.5, 3.0, 0.5])
    assert mt.l2_ratio(x, x_hat) == pytest.approx(4.0 / 3)


def test_relative_reconstruction_bias_is_the_best_rescaling():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    half = x / 2
    # Σ‖x̂‖² = 0.25 + 1 = 1.25; Σ x·x̂ = 0.5 + 2 = 2.5 → γ = 0.5: the reconstruction is shrunk by half
    assert mt.relative_reconstruction_bias(x, half) == pytest.approx(0.5)
    assert mt.relative_reconstruction_bias(x, x) == pytest.approx(1.0)
    # γ = argmin Σ‖x̂/γ − x‖² (Gated SAE paper, eq. 10): check against a grid search on another case
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(20, 3, generator=g)
    xh = 0.7 * xs + 0.1 * torch.randn(20, 3, generator=g)
    grid = torch.linspace(0.3, 2.0, 17001, dtype=torch.float64)
    loss = torch.stack([(xh.double() / gamma - xs.double()).pow(2).sum() for gamma in grid])
    assert mt.relative_reconstruction_bias(xs, xh) == pytest.approx(float(grid[loss.argmin()]), abs=2e-4)
    assert math.isnan(mt.relative_reconstruction_bias_from_sums(1.0, 0.0))


# ---- downstream -------------------------------------------------------------------------------
def test_kl_divergence_hand_computed():
    clean = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    other = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = ½ log(4/3)
    assert float(mt.kl_divergence(clean, other)[0]) == pytest.approx(expected)
    assert float(mt.kl_divergence(other, other)[0]) == pytest.approx(0.0, abs=1e-12)
    # the fast form from log-probabilities (one clean distribution, several comparisons) agrees
    log_p, log_q = torch.log_softmax(clean, -1), torch.log_softmax(other, -1)
    assert float(mt.kl_from_log_probs(log_p, log_q)[0]) == pytest.approx(expected, rel=1e-6)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 50, generator=g) * 3, torch.randn(7, 50, generator=g) * 3
    fast = mt.kl_from_log_probs(torch.log_softmax(a, -1), torch.log_softmax(b, -1))
    assert torch.allclose(fast, mt.kl_divergence(a, b), atol=1e-5)
    assert bool((mt.kl_divergence(a, b) >= 0).all())


def test_kl_and_ce_scores():
    assert mt.kl_div_score(0.1, 0.4) == pytest.approx(0.75)
    assert mt.kl_div_score(0.0, 0.4) == 1.0 and mt.kl_div_score(0.4, 0.4) == 0.0
    assert math.isnan(mt.kl_div_score(0.1, 0.0))  # ablation changes nothing: undefined
    assert mt.ce_loss_score(2.0, 2.5, 4.0) == pytest.approx(0.75)  # (4 − 2.5) / (4 − 2)
    assert mt.ce_loss_score(2.0, 2.0, 4.0) == 1.0 and mt.ce_loss_score(2.0, 4.0, 4.0) == 0.0


# ---- feature density --------------------------------------------------------------------------
def test_feature_density_histogram_and_summary():
    counts = torch.tensor([0, 1, 10, 100, 1000])
    density = mt.feature_density(counts, 1000)
    assert density.tolist() == pytest.approx([0.0, 0.001, 0.01, 0.1, 1.0])
    s = mt.density_summary(density)
    # strictly more than 1 % / 10 % of tokens: 0.1 and 1.0 / only 1.0, out of 5 latents
    assert s["freq_over_1_percent"] == pytest.approx(2 / 5)
    assert s["freq_over_10_percent"] == pytest.approx(1 / 5)
    # over the 4 latents that fire: log10 = −3, −2, −1, 0
    assert s["log10_density_mean"] == pytest.approx(-1.5)
    assert s["log10_density_median"] == pytest.approx(-2.0)  # lower median of an even count
    hist, edges, dead = mt.log10_density_histogram(density)
    assert edges.tolist() == pytest.approx(list(mt.DENSITY_BIN_EDGES)) and edges[0] == -8 and edges[-1] == 0
    assert dead == 1 and int(hist.sum()) == 4 and hist.numel() == len(mt.DENSITY_BIN_EDGES) - 1
    # bin i holds [−8 + i/4, −8 + (i+1)/4): −3 → 20, −2 → 24, −1 → 28, 0 → the last bin (its right edge)
    assert {i for i, c in enumerate(hist.tolist()) if c} == {20, 24, 28, 31}
    # below the first edge: the first bin
    low, _, _ = mt.log10_density_histogram(torch.tensor([1e-12]))
    assert low[0] == 1
    with pytest.raises(ValueError, match="increasing"):
        mt.log10_density_histogram(density, [0.0, -1.0])


# ---- the evaluate stage -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    subject = TinySubject()
    readers = {"heldout": MemoryReader(_cache(subject, HELDOUT)), "cross": MemoryReader(_cache(subject, CROSS))}
    return subject, readers, {"heldout": HELDOUT, "cross": CROSS}


def _trained_topk(data):
    from moesae.training import TrainConfig, TrainingRun, tensor_batches, train_saes

    sae = build_sae("topk", d_in=data.shape[1], num_latents=32, k=3)
    run = TrainingRun(name="topk", sae=sae, out_dir=None, config=TrainConfig(steps=8, lr=3e-3, log_every=4, checkpoint_every=0))
    train_saes([run], tensor_batches(data, 32, seed=0), progress=False)
    return sae.eval()


def test_streamed_reconstruction_metrics_equal_the_pure_functions(world):
    subject, readers, texts = world
    data = readers["heldout"].data
    sae = _trained_topk(data)
    p = ev.reconstruction_pass(sae, readers["heldout"], _cfg(batch_tokens=37), "heldout")  # uneven batches
    with torch.no_grad():
        x_hat = sae(data).x_hat
    assert p["explained_variance"] == pytest.approx(mt.explained_variance(data, x_hat), rel=1e-6)
    assert p["explained_variance"] == pytest.approx(1 - p["fvu"], rel=1e-9)
    assert p["cossim"] == pytest.approx(mt.cosine_similarity(data, x_hat), rel=1e-6)
    assert p["l2_ratio"] == pytest.approx(mt.l2_ratio(data, x_hat), rel=1e-6)
    assert p["relative_reconstruction_bias"] == pytest.approx(mt.relative_reconstruction_bias(data, x_hat), rel=1e-6)


def test_evaluate_sae_reports_the_core_metrics(world):
    subject, readers, texts = world
    r = ev.evaluate_sae(_identity_sae(), subject, readers["heldout"], readers["cross"], texts, _cfg())
    for split in ("heldout", "cross"):
        assert r[f"explained_variance_{split}"] == pytest.approx(1.0, abs=1e-9)
        assert r[f"cossim_{split}"] == pytest.approx(1.0, abs=1e-6)
        assert r[f"l2_ratio_{split}"] == pytest.approx(1.0, abs=1e-6)
        assert r[f"relative_reconstruction_bias_{split}"] == pytest.approx(1.0, abs=1e-6)
        assert r[f"kl_div_with_sae_{split}"] == pytest.approx(0.0, abs=1e-6)
        assert r[f"kl_div_with_ablation_{split}"] > 1e-3
        assert r[f"kl_div_score_{split}"] == pytest.approx(1.0, abs=1e-4)
        assert r[f"ce_loss_score_{split}"] == pytest.approx(1.0, abs=1e-4)
    # identity SAE: every one of its 2d latents fires on about half the tokens
    assert r["freq_over_1_percent"] == 1.0 and r["freq_over_10_percent"] == 1.0
    assert len(r["feature_density_hist"]) == len(r["feature_density_bin_edges"]) - 1
    assert sum(r["feature_density_hist"]) == 16  # none dead
    assert -1.0 < r["log10_density_mean"] <= 0.0

    # an SAE that outputs 0 is zero ablation: KL equal to the ablation's, both scores 0
    r0 = ev.evaluate_sae(_bias_only_sae(torch.zeros(8)), subject, readers["heldout"], readers["cross"], texts, _cfg())
    assert r0["kl_div_with_sae_heldout"] == pytest.approx(r0["kl_div_with_ablation_heldout"], rel=1e-9)
    assert r0["kl_div_score_heldout"] == pytest.approx(0.0, abs=1e-9)
    assert r0["ce_loss_score_heldout"] == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(r0["log10_density_mean"]) and sum(r0["feature_density_hist"]) == 0  # all dead
    assert r0["freq_over_1_percent"] == 0.0


def test_kl_by_hand_on_one_batch(world):
    subject, readers, texts = world
    sae = _trained_topk(readers["heldout"].data)
    cfg = _cfg(loss_batches=1, loss_batch_sequences=6)
    r = ev.loss_recovered_pass(sae, subject, texts["heldout"], readers["heldout"].data.mean(0), cfg, "heldout")
    tokens, mask = subject.encode_texts(texts["heldout"][:6])
    resid = subject.hook_activations(tokens, mask)
    replace = mask.clone()
    replace[:, 0] = False  # BOS kept clean
    with torch.no_grad():
        recon = resid.clone()
        recon[replace] = sae(resid[replace]).x_hat
    zero = resid.clone()
    zero[replace] = 0.0
    valid = mask[:, 1:] & mask[:, :-1]
    scored = replace[:, :-1][valid]  # positions whose residual was replaced (not BOS)
    clean = subject.logits_after_hook(tokens, mask, resid)
    kl_sae = mt.kl_divergence(clean, subject.logits_after_hook(tokens, mask, recon))[scored].mean()
    kl_zero = mt.kl_divergence(clean, subject.logits_after_hook(tokens, mask, zero))[scored].mean()
    assert r["kl_div_with_sae"] == pytest.approx(float(kl_sae), rel=1e-4)
    assert r["kl_div_with_ablation"] == pytest.approx(float(kl_zero), rel=1e-4)
    assert r["kl_div_score"] == pytest.approx(1 - float(kl_sae / kl_zero), rel=1e-4)
    targets = tokens[:, 1:][valid][scored]

    def ce(logits):
        return float(torch.nn.functional.cross_entropy(logits[scored], targets))

    expected = (ce(subject.logits_after_hook(tokens, mask, zero)) - ce(subject.logits_after_hook(tokens, mask, recon))) / (
        ce(subject.logits_after_hook(tokens, mask, zero)) - ce(clean))
    assert r["ce_loss_score"] == pytest.approx(expected, rel=1e-4)
    # the per-batch cross-entropies are the ones loss_after_hook gives (every valid position)
    assert r["ce_recon"] == pytest.approx(float(subject.loss_after_hook(tokens, mask, recon)), rel=1e-6)


class _CrossEntropyOnly(TinySubject):
    """A subject model that gives losses but no logits."""

    logits_after_hook = None

    def loss_after_hook(self, tokens, mask, resid):
        logits = TinySubject.logits_after_hook(self, tokens, mask, resid)
        valid = mask[:, 1:] & mask[:, :-1]
        return torch.nn.functional.cross_entropy(logits, tokens[:, 1:][valid])


def test_subject_without_logits_keeps_the_cross_entropies(world):
    subject, readers, texts = world
    sae = _trained_topk(readers["heldout"].data)
    mean = readers["heldout"].data.mean(0)
    with_logits = ev.loss_recovered_pass(sae, subject, texts["cross"], mean, _cfg(), "cross")
    without = ev.loss_recovered_pass(sae, _CrossEntropyOnly(), texts["cross"], mean, _cfg(), "cross")
    for key in ("ce_clean", "ce_recon", "ce_zero", "ce_mean", "loss_recovered_zero", "loss_recovered_mean"):
        assert without[key] == pytest.approx(with_logits[key], rel=1e-6), key
    assert math.isnan(without["kl_div_with_sae"]) and math.isnan(without["kl_div_score"])
    assert math.isfinite(without["ce_loss_score"])


def test_subject_model_logits_match_its_loss():
    from moesae.testing import tiny_subject_model

    subject = tiny_subject_model()
    fn = ev.logits_after_hook_fn(subject)
    assert fn is not None
    tokens, mask = subject.encode_texts(["def add(a, b):\n    return a + b\n", "x = 1"])
    with torch.no_grad():
        resid = subject.hook_activations(tokens, mask)
        logits = fn(tokens, mask, resid)
        valid = mask[:, 1:] & mask[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits, tokens[:, 1:][valid])
        assert logits.shape == (int(valid.sum()), subject.vocab_size)
        assert float(ce) == pytest.approx(float(subject.loss_after_hook(tokens, mask, resid)), rel=1e-6)
        assert float(ce) == pytest.approx(float(subject.clean_loss(tokens, mask)), rel=1e-5)


def _without_timing(result):
    return {k: v for k, v in result.items() if k != "eval_seconds"}


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), key


def test_a_stage_cache_of_the_sae_independent_runs_changes_no_result(world, monkeypatch):
    """The evaluate stage computes the clean, zero- and mean-ablation runs and the probe residuals
    once and reuses them for every SAE: each SAE's metrics equal a fresh evaluation, bit for bit,
    also when the clean distribution is too large to keep and is recomputed per SAE."""
    subject, readers, texts = world
    saes = [_trained_topk(readers["heldout"].data), _identity_sae(), _bias_only_sae(torch.zeros(8))]
    fresh = [ev.evaluate_sae(s, subject, readers["heldout"], readers["cross"], texts, _cfg()) for s in saes]
    cache: dict = {}
    cached = [ev.evaluate_sae(s, subject, readers["heldout"], readers["cross"], texts, _cfg(), cache=cache) for s in saes]
    assert {key[0] for key in cache} == {"loss_baseline", "probe"}
    for a, b in zip(fresh, cached):
        _same(_without_timing(a), _without_timing(b))
    monkeypatch.setattr(ev, "P_CLEAN_CACHE_BYTES", 0)  # a vocabulary too large to keep its clean distribution
    small: dict = {}
    recomputed = [ev.evaluate_sae(s, subject, readers["heldout"], readers["cross"], texts, _cfg(), cache=small) for s in saes]
    assert all(b["p_clean"] is None for b in small[("loss_baseline", "heldout")][1])
    for a, b in zip(fresh, recomputed):
        _same(_without_timing(a), _without_timing(b))
