"""Automated interpretability: example collection, token-pattern explainer, cumulative quantile
statistics, the stage on stand-in data, and the OpenAI-compatible client against a local server."""
from __future__ import annotations

import json
import math
import re
import sys
import threading
import types
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
import torch

from moesae import build_sae
from moesae import autointerp as ai
from moesae.params import ParamsError, section_to


# ---- stand-in data: activations that are a function of the token id ---------------------------
V, D_MODEL, DOCS, DOC_LEN = 40, 16, 40, 64


def fake_token_strings(ids):
    return [f" t{i}" for i in ids]


def synthetic_cache(token_driven: bool = True):
    """Zipf-distributed tokens in DOCS documents; activations = embedding of the token (+ noise),
    so a feature fires on a fixed set of token ids, or pure noise (token_driven=False)."""
    rng = np.random.default_rng(0)
    p = 1 / np.arange(1, V + 1)
    tokens = rng.choice(V, size=DOCS * DOC_LEN, p=p / p.sum())
    doc = np.repeat(np.arange(DOCS), DOC_LEN)
    pos = np.tile(np.arange(DOC_LEN), DOCS)
    gen = torch.Generator().manual_seed(2)
    if token_driven:
        emb = torch.randn(V, D_MODEL, generator=torch.Generator().manual_seed(1))
        x = emb[torch.as_tensor(tokens)] + 0.1 * torch.randn(len(tokens), D_MODEL, generator=gen)
    else:
        x = torch.randn(len(tokens), D_MODEL, generator=gen)
    return tokens, doc, pos, x


def small_cfg(**overrides):
    values = dict(
        num_features=8, min_activations=10, chunk_length=16, window_before=6, window_after=2,
        explainer_examples=10, examples_per_decile=3, bootstrap_samples=200,
    )
    values.update(overrides)
    return ai.AutointerpConfig(**values)


def run_offline(token_driven: bool = True, cfg=None):
    tokens, doc, pos, x = synthetic_cache(token_driven)
    cfg = cfg or small_cfg()
    stream = ai.token_stream(tokens, doc, pos, cfg.chunk_length)
    sae = build_sae("topk", d_in=D_MODEL, num_latents=32, k=4, seed=0)
    rows, records = ai.autointerp_saes(
        {"s": sae}, stream, lambda: iter(x.split(500)), cfg, ai.TokenPatternBackend(cfg, fake_token_strings),
        progress=False,
    )
    return pd.DataFrame(rows), records


def acc(df, scorer, quantile):
    return float(df[(df.scorer == scorer) & (df["quantile"] == quantile)].accuracy.iloc[0])


# ---- token stream, examples -------------------------------------------------------------------
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


# ---- token-pattern explainer and simulator ----------------------------------------------------
def ex(tokens, acts, decile=10):
    return ai.Example(np.asarray(tokens), np.asarray(acts, dtype=np.float32), decile, float(max(acts)))


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


# ---- statistics -------------------------------------------------------------------------------
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


# ---- end to end, offline backend --------------------------------------------------------------
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


def test_sample_features_live_and_seeded():
    counts = np.array([0, 50, 3, 20, 20, 100])
    assert ai.sample_features(counts, 10, 20, seed=0).tolist() == [1, 3, 4, 5]
    a = ai.sample_features(counts, 2, 20, seed=1)
    assert len(a) == 2 and set(a) <= {1, 3, 4, 5}
    assert a.tolist() == ai.sample_features(counts, 2, 20, seed=1).tolist()


def test_select_variants_nearest_l0_lowest_seed_and_extra_architectures():
    variants = {
        "scale_n16_e2_k8": {"family": "scale_n16_e2", "architecture": "scale", "k": 8, "seed": 0},
        "scale_n16_e2_k32": {"family": "scale_n16_e2", "architecture": "scale", "k": 32, "seed": 0},
        "scale_n16_e2_k32_s1": {"family": "scale_n16_e2", "architecture": "scale", "k": 32, "seed": 1},
        "topk_m8th_k16": {"family": "topk_m8th", "architecture": "topk", "k": 16, "seed": 0},
        "topk_m8th_k48": {"family": "topk_m8th", "architecture": "topk", "k": 48, "seed": 0},
        "gated_k30": {"family": "gated", "architecture": "gated", "k": 30, "seed": 0},
        "other_k32": {"family": "other", "architecture": "topk", "k": 32, "seed": 0},
    }
    chosen = ai.select_variants(variants, ai.AutointerpConfig())
    assert chosen == {"scale_n16_e2_k32": "scale_n16_e2", "topk_m8th_k16": "topk_m8th", "gated_k30": "gated"}


def test_config_errors_name_the_key():
    with pytest.raises(ParamsError, match="backend"):
        section_to(ai.AutointerpConfig, {"backend": "gpt"}, "autointerp")
    with pytest.raises(ParamsError, match="num_features"):
        section_to(ai.AutointerpConfig, {"num_features": 0}, "autointerp")
    with pytest.raises(ParamsError, match="autointerp.llm.colour"):
        section_to(ai.AutointerpConfig, {"llm": {"colour": 1}}, "autointerp")
    with pytest.raises(ParamsError, match="llm.concurrency"):
        section_to(ai.AutointerpConfig, {"llm": {"concurrency": 0}}, "autointerp")


def test_llm_config_resolves_from_environment(monkeypatch):
    for var in ("MOESAE_LLM_BASE_URL", "OPENAI_BASE_URL", "MOESAE_LLM_MODEL", "MOESAE_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="MOESAE_LLM_BASE_URL"):
        ai.LLMConfig().resolved()
    monkeypatch.setenv("MOESAE_LLM_BASE_URL", "http://h/v1")
    with pytest.raises(ValueError, match="MOESAE_LLM_MODEL"):
        ai.LLMConfig().resolved()
    monkeypatch.setenv("MOESAE_LLM_MODEL", "m")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert ai.LLMConfig().resolved() == ("http://h/v1", "m", "k")
    assert ai.LLMConfig(base_url="http://p/v1", model="q").resolved() == ("http://p/v1", "q", "k")


def test_prompt_parsing_and_rendering():
    assert ai.render_tokens([" a", " b", " c", " d"], [False, True, True, False]) == " a<< b c>> d"
    assert ai.render_tokens([" a", " b"], [False, True]) == " a<< b>>"
    assert ai.parse_explanation("Sure.\nExplanation: the word 'def'\nmore") == "the word 'def'"
    assert ai.parse_judgements("Answer: [1, 0,1]", 3) == [True, False, True]
    assert ai.parse_judgements("[1, 0] then [0, 0, 1]", 3) == [False, False, True]
    assert ai.parse_judgements("[1, 2, 0]", 3) is None
    for name in ("explain_system", "explain_user", "detection_system", "detection_user", "fuzzing_system", "fuzzing_user"):
        assert ai.load_prompt(name).template


# ---- backend 2 against a local OpenAI-compatible server ---------------------------------------
class FakeLLM:
    """A deterministic 'model' behind /v1/chat/completions. It explains by listing the most often
    marked words, detects by looking for them, and fuzzes by checking the marked words. The first
    ``fail_first`` calls fail (500, then 429 with Retry-After: 0)."""

    def __init__(self, fail_first: int = 0):
        self.calls = 0
        self.fail_first = fail_first
        self.auth = set()
        self.lock = threading.Lock()

    def answer(self, body: dict) -> str:
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if "short explanation" in system:
            marked = Counter(w for span in re.findall(r"<<(.*?)>>", user) for w in span.split())
            return "Explanation: " + " ".join(w for w, _ in marked.most_common(4))
        words = set(re.search(r"Explanation: (.*)", user).group(1).split())
        answers = []
        for text in re.findall(r"Example \d+: (.*)", user):
            if "correctly marked" in user:  # fuzzing
                marked = [w for span in re.findall(r"<<(.*?)>>", text) for w in span.split()]
                answers.append(int(bool(marked) and sum(w in words for w in marked) >= len(marked) / 2))
            else:
                answers.append(int(any(w in words for w in text.split())))
        return f"Here you go: {answers}"

    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.calls += 1
                    call = fake.calls
                    fake.auth.add(self.headers.get("Authorization"))
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                if call <= fake.fail_first:
                    self.send_response(500 if call % 2 else 429)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b"busy")
                    return
                content = fake.answer(body)
                out = json.dumps({
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 2},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        return Handler


@pytest.fixture
def llm_server():
    servers = []

    def start(fail_first: int = 0):
        fake = FakeLLM(fail_first)
        server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return fake, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def openai_run(url, cache_dir, monkeypatch):
    """The backend as the stage builds it: endpoint, model and key from the environment."""
    monkeypatch.setenv("MOESAE_LLM_BASE_URL", url)
    monkeypatch.setenv("MOESAE_LLM_MODEL", "fake-llama")
    monkeypatch.setenv("MOESAE_LLM_API_KEY", "secret")
    llm = {"examples_per_prompt": 7, "concurrency": 2, "max_retries": 4, "backoff_seconds": 0.0, "cache_dir": str(cache_dir)}
    cfg = small_cfg(num_features=4, backend="openai", llm=llm)
    backend = ai.make_backend(cfg, fake_token_strings)
    tokens, doc, pos, x = synthetic_cache()
    stream = ai.token_stream(tokens, doc, pos, cfg.chunk_length)
    sae = build_sae("topk", d_in=D_MODEL, num_latents=32, k=4, seed=0)
    rows, records = ai.autointerp_saes({"s": sae}, stream, lambda: iter(x.split(500)), cfg, backend, progress=False)
    return pd.DataFrame(rows), records, backend.client


def test_openai_backend_end_to_end_with_retries_and_cache(llm_server, tmp_path, monkeypatch):
    fake, url = llm_server(fail_first=3)
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
    fake, url = llm_server(fail_first=100)
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


# ---- the stage, with stand-ins for the activation cache and the subject model -----------------
def test_stage_writes_scores_csv(tmp_path, monkeypatch):
    tokens, doc, pos, x = synthetic_cache()

    class Reader:
        def __init__(self, split_dir):
            assert split_dir.name == "heldout"
            self.d_model, self.num_tokens, self.manifest = D_MODEL, len(tokens), {}
            self.token_ids, self.doc_index, self.position = tokens, doc, pos

        def iter_batches(self, batch_size, max_tokens=None):
            yield from x[:max_tokens].split(batch_size)

    class Subject:
        token_strings = staticmethod(fake_token_strings)

    monkeypatch.setitem(sys.modules, "moesae.activations", types.SimpleNamespace(ActivationReader=Reader))
    monkeypatch.setitem(sys.modules, "moesae.subject_model", types.SimpleNamespace(load_subject_model=lambda path: Subject()))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/activations/heldout").mkdir(parents=True)
    variants = {}
    for fam, arch, extra in [("topk_m8th", "topk", {}), ("switch_n32", "switch", {"num_experts": 4})]:
        name = f"{fam}_k4"
        variants[name] = {"family": fam, "architecture": arch, "num_latents": 32, "k": 4, "seed": 0, **extra}
        build_sae(arch, d_in=D_MODEL, num_latents=32, k=4, **extra).save(tmp_path / "models" / fam / name)
    params = {
        "paths": {"activations": "data/activations", "subject_model": "models/subject"},
        "autointerp": {"num_features": 5, "min_activations": 5, "chunk_length": 16, "window_before": 6,
                       "window_after": 2, "explainer_examples": 8, "examples_per_decile": 2, "bootstrap_samples": 100},
        "variants": variants,
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    assert ai.main(["--no-progress"]) == 0
    scores = pd.read_csv(tmp_path / "results/autointerp/scores.csv", keep_default_na=False, na_values=[""])
    assert list(scores.columns) == ai.SCORE_COLUMNS
    assert len(scores) == 2 * 2 * 11  # variants × scorers × quantiles
    assert set(scores.family) == {"topk_m8th", "switch_n32"}
    assert scores.accuracy.between(0, 1).all() and (scores.n > 0).all()
    assert "not" in set(scores["quantile"])
    lines = (tmp_path / "results/autointerp/explanations.jsonl").read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[0])["explanation"]
    assert json.loads((tmp_path / "results/timings/autointerp.json").read_text())["stage"] == "autointerp"
    table = ai.fig3d_table(scores)
    assert list(table.columns) == ai.QUANTILES and set(table.index) == set(variants)


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
    _, records = ai.autointerp_saes({"s": sae}, stream, lambda: iter(x.split(500)), cfg, ai.TokenPatternBackend(cfg), progress=False)
    assert sorted(r["feature"] for r in records) == chosen.tolist()
    assert [r["num_activations"] for r in sorted(records, key=lambda r: r["feature"])] == counts[0][chosen].tolist()


def test_simulate_many_keeps_bigrams_inside_items():
    e = ai.Explanation("x", ((4, 8), (2,)))
    items = [ai.Item(np.array([1, 4]), True, 1), ai.Item(np.array([8, 3]), True, 1),
             ai.Item(np.array([4, 8]), True, 1), ai.Item(np.array([7, 2]), True, 1, np.array([False, True]))]
    assert ai.simulate_many(e, items, "detection") == [False, False, True, True]
    assert ai.simulate_many(e, items[3:], "fuzzing") == [True]
    assert [ai.simulate(e, it, "detection") for it in items] == [False, False, True, True]


@pytest.mark.slow
def test_stage_on_a_real_activation_cache_and_tokenizer(tmp_path, monkeypatch):
    """The real ActivationReader (token ids / doc index / position arrays) and a real, tiny
    subject model's token strings; random SAEs."""
    from moesae import activations, subject_model
    from moesae.testing import SAMPLE_TEXTS, tiny_subject_model

    sm = tiny_subject_model(context_length=32)
    texts = [f"{t} # note {i}\n" for i in range(30) for t in SAMPLE_TEXTS]
    acfg = activations.ActivationsConfig(context_length=32, max_tokens={"heldout": None}, device="cpu", shard_tokens=1024)
    activations.cache_split(sm, texts, tmp_path / "data/activations/heldout", acfg, "heldout", progress=False)
    monkeypatch.setattr(subject_model, "load_subject_model", lambda path, device="cpu": sm)
    monkeypatch.chdir(tmp_path)
    name = "scale_n16_e2_k8"
    build_sae("scale", d_in=sm.d_model, num_latents=64, k=8, num_experts=4, active_experts=2).save(
        tmp_path / "models" / "scale_n16_e2" / name)
    params = {
        "paths": {"activations": "data/activations", "subject_model": "models/subject"},
        "autointerp": {"num_features": 6, "min_activations": 5, "chunk_length": 8, "window_before": 4,
                       "window_after": 1, "explainer_examples": 5, "examples_per_decile": 1, "bootstrap_samples": 50},
        "variants": {name: {"family": "scale_n16_e2", "architecture": "scale", "num_latents": 64, "k": 8,
                            "num_experts": 4, "active_experts": 2, "seed": 0}},
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    assert ai.main(["--no-progress"]) == 0
    scores = pd.read_csv("results/autointerp/scores.csv", keep_default_na=False, na_values=[""])
    assert len(scores) == 22 and set(scores.variant) == {name}
    records = [json.loads(line) for line in open("results/autointerp/explanations.jsonl")]
    assert len(records) == 6
    # explanations name real token strings of the tiny tokenizer, not placeholder ids
    assert all(r["explanation"].startswith("active on the tokens") and "<" not in r["explanation"] for r in records)


def test_sparse_codes_of_a_dense_code_sae():
    _, _, _, x = synthetic_cache()
    sae = build_sae("relu", d_in=D_MODEL, num_latents=48, seed=0).eval()
    r, f, v = ai.sparse_codes(sae, x[:200])
    with torch.no_grad():
        z = sae.encode(x[:200])
    assert len(r) == int((z > 0).sum()) > 0
    assert np.allclose(v, z[torch.as_tensor(r), torch.as_tensor(f)].numpy())
