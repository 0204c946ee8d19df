"""The openai backend and its client against a stand-in OpenAI-compatible server on 127.0.0.1:
prompts and reply parsing, retries, the response cache."""
from __future__ import annotations

import pandas as pd
import pytest

from moesae import autointerp as ai
from test_autointerp_support import acc, llm_server, openai_run  # noqa: F401  (llm_server: a fixture)


def test_prompt_parsing_and_rendering():
    assert ai.render_tokens([" a", " b", " c", " d"], [False, True, True, False]) == " a<< b c>> d"
    assert ai.render_tokens([" a", " b"], [False, True]) == " a<< b>>"
    assert ai.parse_explanation("Sure.\nExplanation: the word 'def'\nmore") == "the word 'def'"
    assert ai.parse_judgements("Answer: [1, 0,1]", 3) == [True, False, True]
    assert ai.parse_judgements("[1, 0] then [0, 0, 1]", 3) == [False, False, True]
    assert ai.parse_judgements("[1, 2, 0]", 3) is None
    for name in ("explain_system", "explain_user", "detection_system", "detection_user", "fuzzing_system", "fuzzing_user"):
        assert ai.load_prompt(name).template


def test_openai_backend_end_to_end_with_retries_and_cache(llm_server, tmp_path, monkeypatch):
    fake, url = llm_server(3)
    df, records, client = openai_run(url, tmp_path / "cache", monkeypatch)
    assert client.stats["retries"] == 3
    assert fake.auth == {"Bearer secret"}
    assert set(df["quantile"]) == set(ai.QUANTILES) and not df.accuracy.isna().any()
    # the fake model reads the explanation it wrote: token features come out well explained
    assert acc(df, "fuzzing", "q10") > 0.8 and acc(df, "detection", "q10") > 0.8
    assert all(r["explanation"] and r["fuzzing_n"] > 0 for r in records)
    calls = fake.calls
    assert calls == client.stats["requests"] and client.stats["prompt_tokens"] == 10 * (calls - 3)
    # rerun: every answer comes from the disk cache, no request reaches the server
    df2, _, client2 = openai_run(url, tmp_path / "cache", monkeypatch)
    assert fake.calls == calls and client2.stats["requests"] == 0 and client2.stats["cache_hits"] > 0
    pd.testing.assert_frame_equal(df, df2)


def test_chat_client_gives_up_and_refuses_clearly(llm_server, tmp_path):
    fake, url = llm_server(100)
    slept = []
    client = ai.ChatClient(url, "m", None, None, max_retries=2, backoff_seconds=0.5, sleep=slept.append)
    with pytest.raises(RuntimeError, match="after 3 attempts"):
        client.complete([{"role": "user", "content": "hi"}])
    assert fake.calls == 3 and slept == [0.0, 0.0]  # Retry-After: 0 wins over the backoff
    bad = ai.ChatClient(url.replace("/v1", "/v2"), "m", max_retries=3)
    with pytest.raises(RuntimeError, match="HTTP 404"):
        bad.complete([{"role": "user", "content": "hi"}])
    assert fake.calls == 4  # a 404 is not retried


def test_backoff_doubles_without_retry_after(tmp_path):
    slept = []
    client = ai.ChatClient("http://127.0.0.1:9/v1", "m", max_retries=3, backoff_seconds=0.25,
                           timeout_seconds=2, sleep=slept.append)  # port 9: connection refused
    with pytest.raises(RuntimeError, match="failed after 4 attempts"):
        client.complete([{"role": "user", "content": "hi"}])
    assert slept == [0.25, 0.5, 1.0]


