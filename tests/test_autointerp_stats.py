"""Auto-interp statistics: Wilson and bootstrap intervals, cumulative quantiles."""
from __future__ import annotations

import math

import numpy as np
import pytest

from moesae import autointerp as ai


def test_wilson_interval_hand_computed():
    lo, hi = ai.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = ai.wilson_interval(0, 4)
    assert lo == 0.0 and hi == pytest.approx(0.4899, abs=1e-4)
    assert all(math.isnan(v) for v in ai.wilson_interval(0, 0))


def test_quantiles_are_cumulative_from_the_top():
    # deciles of 6 judgements: two non-activating, and activating ones from deciles 1, 5, 10, 10
    feature = np.array([0, 0, 1, 1, 2, 2])
    decile = np.array([0, 0, 1, 5, 10, 10])
    correct = np.array([True, False, False, True, True, False])
    rows = {r["quantile"]: r for r in ai.quantile_accuracy(feature, decile, correct, ci="wilson")}
    assert list(rows) == ai.QUANTILES
    assert rows["not"]["n"] == 2 and rows["not"]["accuracy"] == 0.5
    assert rows["q1"]["n"] == 4 and rows["q1"]["accuracy"] == 0.5       # deciles 1..10
    assert rows["q2"]["n"] == 3 and rows["q2"]["accuracy"] == pytest.approx(2 / 3)  # deciles 2..10
    assert rows["q5"]["n"] == 3 and rows["q6"]["n"] == 2
    assert rows["q10"]["n"] == 2 and rows["q10"]["accuracy"] == 0.5   # top decile alone
    assert (rows["q2"]["ci_low"], rows["q2"]["ci_high"]) == pytest.approx(ai.wilson_interval(2, 3))


def test_bootstrap_interval_over_features():
    assert ai.bootstrap_interval(np.array([3, 5]), np.array([3, 5])) == (1.0, 1.0)
    lo, hi = ai.bootstrap_interval(np.array([0, 10, 5, 9]), np.array([10, 10, 10, 10]), samples=500)
    assert lo < 24 / 40 < hi and 0 <= lo and hi <= 1
    # one feature: every resample is that feature
    assert ai.bootstrap_interval(np.array([2]), np.array([4])) == (0.5, 0.5)
