"""Ground-truth benchmark: do the SAEs find the *right* features? (docs/method.md, "Ground-truth
recovery")

Reconstruction error and redundancy cannot say whether an SAE recovered the features that made
the data. Here the data is built from a known dictionary, so recovery is measured directly.

- :mod:`.generator`: the known dictionary and its seeded activation stream (:class:`SyntheticData`);
- :mod:`.recovery`: the recovery metrics, pure functions of decoders, the truth and firing;
- :mod:`.runner`: the ``moesae synthetic`` stage (``main``): config, cells, training, outputs.

The figure is :mod:`moesae.figures.synthetic_recovery`.
"""
from .generator import SyntheticData, SyntheticDataConfig, seed_of, true_dictionary, zipf_probabilities
from .recovery import (
    HUNGARIAN_MAX_PAIRS, MATCHING_METHODS, chance_levels, chance_max_cosine, cosine_matrix, detection_scores,
    fraction_recovered, match_features, matched_cosine, mean_max_cosine, recovery_metrics,
)
from .runner import (
    CELLS_DIR, METRICS_FILE, OUTPUT_DIR, RANKING_METRIC, SUMMARY_FILE, SyntheticConfig, cell_key, cells, code_files,
    code_fingerprint, compute_matched_pairs, evaluate_sae, family_facts, load_config, main, run_benchmark, summarize,
    summary_table,
)

__all__ = [
    "SyntheticDataConfig", "SyntheticData", "seed_of", "true_dictionary", "zipf_probabilities",
    "HUNGARIAN_MAX_PAIRS", "MATCHING_METHODS", "chance_levels", "chance_max_cosine", "cosine_matrix",
    "detection_scores", "fraction_recovered", "match_features", "matched_cosine", "mean_max_cosine",
    "recovery_metrics",
    "CELLS_DIR", "METRICS_FILE", "OUTPUT_DIR", "RANKING_METRIC", "SUMMARY_FILE", "SyntheticConfig", "cell_key",
    "cells", "code_files", "code_fingerprint", "compute_matched_pairs", "evaluate_sae", "family_facts",
    "load_config", "main", "run_benchmark", "summarize", "summary_table",
]
