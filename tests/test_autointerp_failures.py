"""Every failure of the LLM path is counted and surfaced, on a stand-in OpenAI-compatible server:
a model that cannot follow the format fails the stage with the counts and a raw reply (nothing
written, the cache kept); a healthy one reports requests, parse rate and judgements per SAE; the
retry with a stricter reminder, ``response_format`` and the explainer's stop sequences."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from moesae import autointerp as ai
from moesae import cli
from test_autointerp_support import FakeLLM, llm_server, openai_env, openai_run, stage_workdir  # noqa: F401

LLM = {"concurrency": 2, "backoff_seconds": 0.0, "max_retries": 2}


class BrokenLLM(FakeLLM):
    """What the issue saw from a too-small model: of every three features, one explanation is a
    fake ``Example 21:``, one a sentence repeated to the token limit (the same again when asked
    once more), one readable; judgement replies hold no list."""

    def __init__(self):
        super().__init__()
        self.kinds = {}

    def explain_reply(self, user, retry, body):
        with self.lock:
            kind = self.kinds.setdefault(user, len(self.kinds) % 3)
        return ["Example 21: t3 t3 <<t5>>", "The feature is about t3. " * 30, "Explanation: t3 and t5"][kind]

    def judge_reply(self, user, retry, body):
        return "The first excerpt looks active; the others do not, I think."


def run_stage_cli(capsys, *args):
    rc = cli.main(["autointerp", "--backend", "openai", "--no-progress", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def outputs(tmp_path):
    return sorted(p.name for p in (tmp_path / "results/autointerp").glob("*")) if (tmp_path / "results/autointerp").exists() else []


def test_healthy_endpoint_reports_requests_parse_rate_and_judgements(llm_server, tmp_path, monkeypatch, capsys):
    fake, url = llm_server()
    variants = stage_workdir(tmp_path, monkeypatch, autointerp={"llm": {**LLM, "cache_dir": str(tmp_path / "cache")}})
    openai_env(monkeypatch, url)
    rc, out, err = run_stage_cli(capsys)
    assert rc == 0, err
    assert outputs(tmp_path) == ["explanations.jsonl", "scores.csv", "summary.json"]
    summary = json.loads((tmp_path / "results/autointerp/summary.json").read_text())
    assert (summary["backend"], summary["endpoint"], summary["model"]) == ("openai", url, "fake-llama")
    assert set(summary["variants"]) == set(variants)
    for name, c in summary["variants"].items():
        assert c["requests"] > 0 and c["requests"] == c["explanations"] + c["judgement_prompts"]
        assert c["features_scored"] == c["features_sampled"] == 5 and c["parse_rate"] == 1.0
        assert c["judgements_used"] == c["judgements_planned"] > 0 and c["replies_unparsed"] == 0
        # the per-SAE counts are printed: requests, parse rate, judgements
        assert re.search(rf"{name}: 5 of 5 sampled features scored .*judgements used "
                         rf"{c['judgements_used']}/{c['judgements_planned']} \(parse rate 100 %\); "
                         rf"{c['requests']} requests", out)
    assert sum(c["requests"] for c in summary["variants"].values()) == summary["totals"]["requests"] == fake.calls
    assert "judgements used" in out and "parse rate" in out and url in out
    scores = pd.read_csv(tmp_path / "results/autointerp/scores.csv")
    assert list(scores.columns) == ai.SCORE_COLUMNS and (scores.n == scores.n_planned).all()


def test_a_model_that_cannot_follow_the_format_fails_with_counts_and_a_raw_reply(llm_server, tmp_path, monkeypatch, capsys):
    fake, url = llm_server(BrokenLLM())
    cache = tmp_path / "cache"
    stage_workdir(tmp_path, monkeypatch, autointerp={"llm": {**LLM, "cache_dir": str(cache)}})
    openai_env(monkeypatch, url)
    rc, out, err = run_stage_cli(capsys, "--variant", "switch_n32_k4")
    assert rc == 1
    assert "judgements are not usable for switch_n32_k4" in err and "below autointerp.min_parse_rate = 80 %" in err
    assert f"endpoint: {url}" in err and "model: fake-llama" in err
    # the counts, and one raw reply of each kind, as received
    assert "explanations degenerate 4 of 5 (empty 2, repetition 2; 4 retried)" in err
    assert re.search(r"judgement replies unparsed (\d+) of \1 \(0 recovered by the retry, \1 lost\)", err)
    assert "one raw judgement reply: 'The first excerpt looks active; the others do not, I think.'" in err
    assert ("one raw explainer reply: 'Example 21: t3 t3 <<t5>>'" in err
            or "one raw explainer reply: 'The feature is about t3. The feature is about t3." in err)
    assert "check: (1) the model" in err and "max_tokens" in err and "response_format: json_schema" in err
    assert f"kept in {cache}" in err
    # never "N features scored" for features without a scored judgement
    assert "switch_n32_k4: 0 of 5 sampled features scored" in out
    # nothing half-written; what was paid for is cached, so a rerun costs nothing and fails the same way
    assert outputs(tmp_path) == [] and not (tmp_path / "results/timings/autointerp.json").exists()
    calls = fake.calls
    assert len(list(cache.rglob("*.json"))) == calls > 0
    rc2, _, err2 = run_stage_cli(capsys, "--variant", "switch_n32_k4")
    assert rc2 == 1 and fake.calls == calls and f"0 requests ({calls} answered from the cache)" in err2


def test_retry_with_a_stricter_reminder_recovers_malformed_replies(llm_server, tmp_path, monkeypatch):
    class Sloppy(FakeLLM):
        def explain_reply(self, user, retry, body):
            return self.explain(user) if retry else "Example 11: t3 t4"

        def judge_reply(self, user, retry, body):
            return f"Sure: {self.judge(user)}" if retry else "Hmm, the first and the third."

    fake, url = llm_server(Sloppy())
    df, records, client, (c,) = openai_run(url, tmp_path / "cache", monkeypatch)
    assert c.explanations_retried == c.explanations == 4 and c.explanations_degenerate == 0
    assert c.replies_unparsed == c.replies_recovered == c.judgement_prompts > 0 and c.prompts_lost == 0
    assert c.parse_rate == 1.0 and c.requests == 2 * (c.explanations + c.judgement_prompts)
    retries = [b for b in fake.bodies if len(b["messages"]) == 4]
    assert len(retries) == c.requests / 2
    judge_retry = next(b for b in retries if "short explanation" not in b["messages"][0]["content"])
    assert judge_retry["messages"][2] == {"role": "assistant", "content": "Hmm, the first and the third."}
    n = len(re.findall(r"Example \d+:", judge_retry["messages"][1]["content"]))
    assert "could not be read: it contained no list in square brackets" in judge_retry["messages"][3]["content"]
    assert f"exactly {n} entries" in judge_retry["messages"][3]["content"]
    assert all(r["explanation_problem"] is None and r["explanation_raw"] for r in records)


def test_without_retries_malformed_replies_are_lost_and_counted(llm_server, tmp_path, monkeypatch):
    class HalfBroken(FakeLLM):
        def judge_reply(self, user, retry, body):
            return "[1, 0]" if "correctly marked" in user else super().judge_reply(user, retry, body)

    fake, url = llm_server(HalfBroken())
    with pytest.raises(ai.AutointerpFailure) as info:
        openai_run(url, tmp_path / "cache", monkeypatch, malformed_retries=0)
    (c,) = info.value.counts
    assert c.replies_recovered == 0 and c.prompts_lost == c.replies_unparsed > 0
    assert c.by_scorer["fuzzing"]["used"] == 0 and c.by_scorer["detection"]["used"] == c.by_scorer["detection"]["planned"]
    assert c.features_scored == 4 and c.parse_rate == c.by_scorer["detection"]["planned"] / c.judgements_planned
    assert c.example_unparsed_reply == "[1, 0]" and "one raw judgement reply: '[1, 0]'" in str(info.value)
    # a lower bar lets the same replies through, with the fuzzing rows left empty
    df, _, _, (c2,) = openai_run(url, tmp_path / "cache", monkeypatch, cfg_overrides={"min_parse_rate": 0.3},
                                 malformed_retries=0)
    assert c2.parse_rate == c.parse_rate and df[df.scorer == "fuzzing"].accuracy.isna().all()
    assert (df[df.scorer == "fuzzing"].n == 0).all() and (df[df.scorer == "fuzzing"].n_planned > 0).any()


def test_fail_fast_stops_a_hopeless_sae_early(llm_server, tmp_path, monkeypatch):
    fake, url = llm_server(BrokenLLM())
    with pytest.raises(ai.AutointerpFailure, match="stopped early") as info:
        openai_run(url, tmp_path / "cache", monkeypatch, cfg_overrides={"num_features": 16, "min_activations": 2})
    (c,) = info.value.counts
    assert c.features_sampled == ai.accounting.FAIL_FAST_FEATURES and c.judgements_used == 0
    # features not yet started when it stopped were never asked (2 workers ran ahead by a few at most)
    assert len(fake.kinds) <= ai.accounting.FAIL_FAST_FEATURES + 4 < 16


def test_response_format_json_schema_is_sent_and_read(llm_server, tmp_path, monkeypatch):
    class Structured(FakeLLM):
        def judge_reply(self, user, retry, body):
            answers = self.judge(user)
            schema = body["response_format"]["json_schema"]["schema"]["properties"]["answers"]
            assert schema["minItems"] == schema["maxItems"] == len(answers)
            return json.dumps({"answers": answers})

    fake, url = llm_server(Structured())
    _, _, _, (c,) = openai_run(url, tmp_path / "cache", monkeypatch, response_format="json_schema")
    assert c.parse_rate == 1.0 and c.replies_unparsed == 0
    explain = [b for b in fake.bodies if "short explanation" in b["messages"][0]["content"]]
    assert explain and all("response_format" not in b for b in explain)


def test_explainer_stop_sequences_are_sent_and_applied(llm_server, tmp_path, monkeypatch):
    class RunsOn(FakeLLM):
        def explain_reply(self, user, retry, body):  # a server that ignores `stop`
            return 'Explanation: <b>t3</b> & "t5"\nExample 21: t3 <<t5>> t7\nActive tokens: "t5" (10)'

    fake, url = llm_server(RunsOn())
    _, records, _, (c,) = openai_run(url, tmp_path / "cache", monkeypatch)
    explain = [b for b in fake.bodies if "short explanation" in b["messages"][0]["content"]]
    assert all(b["stop"] == ["Example ", "Active tokens:"] for b in explain)
    # cut at the stop sequence here too; stored raw (no HTML escaping: the report escapes)
    assert {r["explanation"] for r in records} == {'<b>t3</b> & "t5"'}
    assert all(r["explanation_raw"].startswith('Explanation: <b>t3</b> & "t5"\nExample 21:') for r in records)
    assert c.explanations_degenerate == 0


def test_summary_is_written_by_the_stage_and_read_back(llm_server, tmp_path, monkeypatch, capsys):
    stage_workdir(tmp_path, monkeypatch)
    assert cli.main(["autointerp", "--no-progress"]) == 0  # token_pattern: no requests, every judgement used
    summary = ai.read_summary(tmp_path / "results/autointerp/summary.json")
    assert summary["backend"] == "token_pattern" and summary["endpoint"] is None
    assert all(c["requests"] == 0 and c["parse_rate"] == 1.0 for c in summary["variants"].values())
    assert summary["totals"]["judgements_used"] == summary["totals"]["judgements_planned"] > 0
    assert ai.read_summary(tmp_path / "nope.json") is None
    out = capsys.readouterr().out
    assert "backend token_pattern, per SAE:" in out and "judgements used" in out


def test_new_llm_keys_are_validated():
    from moesae.params import ParamsError

    for bad in ({"response_format": "json"}, {"malformed_retries": -1}, {"explanation_stop": ["a"] * 5},
                {"explanation_stop": [""]}):
        with pytest.raises(ParamsError, match="llm"):
            ai.load_config({"llm": bad})
    with pytest.raises(ParamsError, match="min_parse_rate"):
        ai.load_config({"min_parse_rate": 1.5})
    assert ai.load_config({"llm": {"explanation_stop": []}}).llm.explanation_stop == []
