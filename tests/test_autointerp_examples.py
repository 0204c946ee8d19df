"""Auto-interp examples: the token stream, activating contexts and deciles, non-activating
windows, scoring items, and the SAE codes over the cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moesae import autointerp as ai
from moesae import build_sae
from test_autointerp_support import D_MODEL, ex, small_cfg, synthetic_cache


def test_token_stream_runs_and_chunks_hand_computed():
    # doc 0 positions 0..4, doc 1 positions 0..1, then doc 1 jumps to position 5 (a gap)
    doc = [0, 0, 0, 0, 0, 1, 1, 1]
    pos = [0, 1, 2, 3, 4, 0, 1, 5]
    s = ai.token_stream(np.arange(8), doc, pos, chunk_length=2)
    assert s.run_start.tolist() == [0, 0, 0, 0, 0, 5, 5, 7]
    assert s.run_end.tolist() == [5, 5, 5, 5, 5, 7, 7, 8]
    assert s.chunk.tolist() == [0, 0, 1, 1, 2, 3, 3, 4]


def test_token_stream_rejects_misaligned_arrays():
    with pytest.raises(ValueError, match="aligned"):
        ai.token_stream([1, 2, 3], [0, 0], [0, 1, 2], 4)


def test_collect_examples_windows_deciles_and_negatives():
    n = 400
    tokens = np.arange(n) % 50
    stream = ai.token_stream(tokens, np.repeat(np.arange(4), 100), np.tile(np.arange(100), 4), chunk_length=10)
    # the feature fires on the 3rd token of every chunk, with strength = chunk number + 1
    rows = np.arange(2, n, 10)
    vals = (np.arange(len(rows)) + 1).astype(np.float32)
    cfg = small_cfg(explainer_examples=5, examples_per_decile=2, window_before=3, window_after=1)
    fe = ai.collect_examples(7, rows, vals, stream, cfg, np.random.default_rng(0))
    assert fe.num_activations == 40
    # explainer: the 5 strongest contexts, peak activations 40..36
    assert [e.max_activation for e in fe.explain] == [40, 39, 38, 37, 36]
    # remaining 35 contexts (strengths 1..35) cut into deciles; 2 sampled per decile
    assert len(fe.test) == 20 and sorted({e.decile for e in fe.test}) == list(range(1, 11))
    for e in fe.test:
        # strengths 1..35 ranked weakest first: decile = 1 + rank·10 // 35
        v = int(e.max_activation)
        assert v <= 35 and e.decile == 1 + (v - 1) * 10 // 35
        # window: 3 tokens before the peak row and 1 after, clipped at its document's start
        peak = 2 + 10 * (v - 1)
        start = max(peak // 100 * 100, peak - 3)
        assert e.tokens.tolist() == tokens[start:peak + 2].tolist()
        assert e.activations[peak - start] == v and np.count_nonzero(e.activations) == 1
    assert len(fe.negatives) == len(fe.test)
    assert all(e.decile == 0 and not e.activations.any() for e in fe.negatives)


def test_collect_examples_of_a_silent_feature_is_empty():
    stream = ai.token_stream(np.arange(20), np.zeros(20), np.arange(20), 5)
    fe = ai.collect_examples(0, np.zeros(0), np.zeros(0), stream, small_cfg(), np.random.default_rng(0))
    assert fe.explain == fe.test == fe.negatives == []


def test_fuzzing_items_mark_true_and_wrong_tokens():
    fe = ai.FeatureExamples(
        0, 3, [], [ex([1, 2, 3, 4], [0, 1.0, 2.0, 0], decile=4)], [ex([6, 7, 8], [0, 0, 0], decile=0)]
    )
    items = ai.fuzzing_items(fe, np.random.default_rng(0))
    assert [(it.truth, it.decile) for it in items] == [(True, 4), (False, 4), (False, 0)]
    assert items[0].highlight.tolist() == [False, True, True, False]
    assert set(np.flatnonzero(items[1].highlight)) == {0, 3}  # the two inactive tokens
    assert sum(items[2].highlight) == 2  # as many marks as the activating excerpt
    det = ai.detection_items(fe)
    assert [(it.truth, it.decile, it.highlight) for it in det] == [(True, 4, None), (False, 0, None)]


def test_sample_features_live_and_seeded():
    counts = np.array([0, 50, 3, 20, 20, 100])
    assert ai.sample_features(counts, 10, 20, seed=0).tolist() == [1, 3, 4, 5]
    a = ai.sample_features(counts, 2, 20, seed=1)
    assert len(a) == 2 and set(a) <= {1, 3, 4, 5}
    assert a.tolist() == ai.sample_features(counts, 2, 20, seed=1).tolist()


def test_scan_cache_matches_dense_codes_and_rare_features_get_a_second_pass():
    tokens, doc, pos, x = synthetic_cache()
    sae = build_sae("topk", d_in=D_MODEL, num_latents=256, k=4, seed=0)
    counts, acts = ai.scan_cache([sae], [np.array([3, 200])], lambda: iter(x.split(300)))
    with torch.no_grad():
        z = sae.encode(x)
    assert counts[0].tolist() == (z > 0).sum(0).tolist()
    for f in (3, 200):
        rows, vals = acts[0][f]
        assert rows.tolist() == torch.nonzero(z[:, f] > 0).flatten().tolist()
        assert np.allclose(vals, z[rows, f].numpy())
    # only a few features fire often enough: some sampled ones lie beyond the first-pass candidates
    threshold = int(np.sort(counts[0])[-6])
    order = ai.feature_order(256, 0)[: 2 * 3 + 32]
    chosen = ai.sample_features(counts[0], 3, threshold, 0)
    assert len(np.setdiff1d(chosen, order)) > 0
    cfg = small_cfg(num_features=3, min_activations=threshold)
    stream = ai.token_stream(tokens, doc, pos, cfg.chunk_length)
    _, records, _ = ai.autointerp_saes({"s": sae}, stream, lambda: iter(x.split(500)), cfg, ai.TokenPatternBackend(cfg), progress=False)
    assert sorted(r["feature"] for r in records) == chosen.tolist()
    assert [r["num_activations"] for r in sorted(records, key=lambda r: r["feature"])] == counts[0][chosen].tolist()


def test_sparse_codes_of_a_dense_code_sae():
    _, _, _, x = synthetic_cache()
    sae = build_sae("relu", d_in=D_MODEL, num_latents=48, seed=0).eval()
    r, f, v = ai.sparse_codes(sae, x[:200])
    with torch.no_grad():
        z = sae.encode(x[:200])
    assert len(r) == int((z > 0).sum()) > 0
    assert np.allclose(v, z[torch.as_tensor(r), torch.as_tensor(f)].numpy())
