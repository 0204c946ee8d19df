"""SAE codes over the activation cache: one pass that counts how often every feature fires and
keeps the codes of the candidate features only, and the seeded uniform sample of live features."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np


def sparse_codes(sae: Any, x: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, feature, value) of every positive latent of ``sae`` on the batch ``x``."""
    import torch

    with torch.no_grad():
        out = sae(x.to(sae.W_dec.device))
        if out.top_indices is not None:
            values, indices = out.top_values, out.top_indices
            rows = torch.arange(values.shape[0], device=indices.device).unsqueeze(1).expand_as(indices)
            keep = values > 0
            r, f, v = rows[keep], indices[keep], values[keep]
        else:
            z = out.dense_code(sae.cfg.num_latents)
            r, f = (z > 0).nonzero(as_tuple=True)
            v = z[r, f]
    return r.cpu().numpy().astype(np.int64), f.cpu().numpy().astype(np.int64), v.float().cpu().numpy()


def scan_cache(
    saes: Sequence[Any], features: Sequence[np.ndarray], batches: Callable[[], Iterator[Any]]
) -> tuple[list[np.ndarray], list[dict[int, tuple[np.ndarray, np.ndarray]]]]:
    """One pass over the cache: for each SAE, how many tokens every feature fires on, and
    ``feature → (rows, values)`` for the listed ``features`` only (memory stays small)."""
    counts = [np.zeros(sae.cfg.num_latents, dtype=np.int64) for sae in saes]
    parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in saes]
    offset = 0
    for x in batches():
        for i, (sae, chosen) in enumerate(zip(saes, features)):
            r, f, v = sparse_codes(sae, x)
            counts[i] += np.bincount(f, minlength=len(counts[i]))
            keep = np.isin(f, chosen)
            parts[i].append((r[keep] + offset, f[keep], v[keep]))
        offset += int(x.shape[0])
    result = []
    for i, chosen in enumerate(features):
        chosen = np.asarray(chosen, dtype=np.int64)
        if parts[i]:
            rows, feats, vals = (np.concatenate([p[j] for p in parts[i]]) for j in range(3))
        else:
            rows, feats, vals = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        order = np.lexsort((rows, feats))
        rows, feats, vals = rows[order], feats[order], vals[order]
        starts, ends = np.searchsorted(feats, chosen), np.searchsorted(feats, chosen, side="right")
        result.append({int(f): (rows[a:b], vals[a:b]) for f, a, b in zip(chosen, starts, ends)})
    return counts, result


def feature_order(num_latents: int, seed: int) -> np.ndarray:
    """The seeded random order in which features are considered for sampling."""
    return np.random.default_rng(seed).permutation(num_latents)


def sample_features(counts: np.ndarray, num: int, min_activations: int, seed: int) -> np.ndarray:
    """``num`` random features among those firing on at least ``min_activations`` tokens (sorted):
    the first eligible ones in :func:`feature_order`, i.e. a uniform sample without replacement."""
    counts = np.asarray(counts)
    order = feature_order(len(counts), seed)
    return np.sort(order[counts[order] >= min_activations][:num])
