"""The openai backend and its client against a stand-in OpenAI-compatible server on 127.0.0.1:
prompts and reply parsing, retries, the response cache."""
from __future__ import annotations

import pandas as pd
import pytest

from moesae import autointerp as ai
from test_autointerp_support import acc, llm_server, openai_run  # noqa: F401  (llm_server: a fixture)


def test_openai_backend_end_to_end_with_retries_and_cache(llm_server, tmp_path, monkeypatch):
    fake, url = llm_server(3)
    df, records, client, counts = openai_run(url, tmp_path / "cache", monkeypatch)
    assert client.stats["retries"] == 3
    assert fake.auth == {"Bearer secret"}
    assert set(df["quantile"]) == set(ai.QUANTILES) and not df.accuracy.isna().any()
    # the fake model reads the explanation it wrote: token features come out well explained
    assert acc(df, "fuzzing", "q10") > 0.8 and acc(df, "detection", "q10") > 0.8
    assert all(r["explanation"] and r["fuzzing_n"] > 0 for r in records)
    calls = fake.calls
    assert calls == client.stats["requests"] and client.stats["prompt_tokens"] == 10 * (calls - 3)
    # rerun: every answer comes from the disk cache, no request reaches the server
    df2, _, client2, counts2 = openai_run(url, tmp_path / "cache", monkeypatch)
    assert fake.calls == calls and client2.stats["requests"] == 0 and client2.stats["cache_hits"] > 0
    pd.testing.assert_frame_equal(df, df2)
    # the counts: every request of this SAE, all replies parsed; the rerun made none
    (c,), (c2,) = counts, counts2
    assert c.requests == calls and c.http_retries == 3 and c.cache_hits == 0
    assert c.requests - c.http_retries == c.explanations + c.judgement_prompts
    assert c.replies_unparsed == 0 and c.explanations_degenerate == 0 and c.parse_rate == 1.0
    assert c.judgements_used == c.judgements_planned == int(df[df["quantile"].isin(["not", "q1"])].n.sum())
    assert c2.requests == 0 and c2.cache_hits == c.requests - c.http_retries and c2.parse_rate == 1.0


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


