"""The token_pattern backend: explanations, the simulator, and the offline end-to-end scores."""
from __future__ import annotations

import numpy as np
import pandas as pd

from moesae import autointerp as ai
from test_autointerp_support import acc, ex, fake_token_strings, run_offline


def test_token_pattern_explanation_hand_computed():
    examples = [
        ex([5, 1, 2, 5], [2.0, 0, 0, 1.0]),   # token 5 always active: mass 3, precision 1
        ex([3, 7, 3, 7], [0, 1.0, 0, 0]),      # token 7 active 1 of 2 (precision 0.5), bigram (3,7) too
        ex([9, 9, 1], [0.5, 0, 0]),            # token 9 precision 0.5, mass 0.5
    ]
    e = ai.token_pattern_explanation(examples, max_patterns=5, min_precision=0.6)
    # scores: (5,) 3·1 = 3; (3,7) bigram not more precise than (7,) (0.5 = 0.5) → not a candidate;
    # (7,) 1·0.5 and (9,) 0.5·0.5 are below min_precision 0.6; bigrams (1,5)→ mass 1, precision 1
    # but its last token (5,) is already chosen; (9,9)? not active.  → only (5,)
    assert e.patterns == ((5,),)
    e = ai.token_pattern_explanation(examples, max_patterns=2, min_precision=0.5)
    assert e.patterns == ((5,), (7,))
    assert e.text == 'active on the tokens "<5>", "<7>"'
    named = ai.token_pattern_explanation(examples, 1, 0.5, token_strings=fake_token_strings)
    assert named.text == 'active on the tokens " t5"'


def test_bigram_chosen_when_more_precise_than_its_token():
    examples = [ex([4, 8, 2, 8], [0, 1.0, 0, 0]), ex([4, 8, 6, 8], [0, 2.0, 0, 0])]
    e = ai.token_pattern_explanation(examples, max_patterns=3, min_precision=0.6)
    assert e.patterns == ((4, 8),)  # 8 alone: precision 0.5; after 4: precision 1
    assert ai.pattern_matches(e.patterns, [8, 4, 8, 8]).tolist() == [False, False, True, False]


def test_simulator_detection_and_fuzzing():
    e = ai.Explanation("x", ((5,),))
    assert ai.simulate(e, ai.Item((1, 5, 2), True, 3), "detection") is True
    assert ai.simulate(e, ai.Item((1, 2, 2), False, 0), "detection") is False
    assert ai.simulate(e, ai.Item((1, 5, 2), True, 3, (False, True, False)), "fuzzing") is True
    assert ai.simulate(e, ai.Item((1, 5, 2), False, 3, (True, False, True)), "fuzzing") is False
    assert ai.simulate(e, ai.Item((5, 5, 2), True, 3, (True, False, True)), "fuzzing") is True  # half match
    assert ai.simulate(e, ai.Item((5, 5, 2), True, 3, (False, False, False)), "fuzzing") is False


def test_simulate_many_keeps_bigrams_inside_items():
    e = ai.Explanation("x", ((4, 8), (2,)))
    items = [ai.Item(np.array([1, 4]), True, 1), ai.Item(np.array([8, 3]), True, 1),
             ai.Item(np.array([4, 8]), True, 1), ai.Item(np.array([7, 2]), True, 1, np.array([False, True]))]
    assert ai.simulate_many(e, items, "detection") == [False, False, True, True]
    assert ai.simulate_many(e, items[3:], "fuzzing") == [True]
    assert [ai.simulate(e, it, "detection") for it in items] == [False, False, True, True]


def test_offline_scores_separate_token_features_from_noise():
    df, records = run_offline(token_driven=True)
    assert set(df["quantile"]) == set(ai.QUANTILES) and set(df.scorer) == {"detection", "fuzzing"}
    assert acc(df, "fuzzing", "q10") > 0.9 and acc(df, "detection", "q10") > 0.9
    assert acc(df, "detection", "not") > 0.8
    assert acc(df, "fuzzing", "q10") >= acc(df, "fuzzing", "q1")
    assert (df.ci_low <= df.accuracy + 1e-12).all() and (df.accuracy <= df.ci_high + 1e-12).all()
    assert len(records) == 8 and records[0]["explanation"].startswith("active on the tokens")
    # control: activations unrelated to the tokens → token patterns explain nothing (chance)
    noise, _ = run_offline(token_driven=False)
    assert abs(acc(noise, "fuzzing", "q1") - 0.5) < 0.1
    assert acc(noise, "fuzzing", "q10") < 0.75


def test_offline_backend_is_deterministic():
    a, _ = run_offline()
    b, _ = run_offline()
    pd.testing.assert_frame_equal(a, b)
