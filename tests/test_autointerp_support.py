"""Helpers shared by the auto-interp test files (this module holds no tests): stand-in activations
that are a function of the token id, a small config, a stand-in OpenAI-compatible server, and the
stage run on stand-ins for the activation cache and the subject model."""
from __future__ import annotations

import json
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

from moesae import autointerp as ai
from moesae import build_sae

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
    rows, records, _ = ai.autointerp_saes(
        {"s": sae}, stream, lambda: iter(x.split(500)), cfg, ai.TokenPatternBackend(cfg, fake_token_strings),
        progress=False,
    )
    return pd.DataFrame(rows), records


def acc(df, scorer, quantile):
    return float(df[(df.scorer == scorer) & (df["quantile"] == quantile)].accuracy.iloc[0])


def ex(tokens, acts, decile=10):
    return ai.Example(np.asarray(tokens), np.asarray(acts, dtype=np.float32), decile, float(max(acts)))


# ---- a stand-in OpenAI-compatible server -------------------------------------------------------
class FakeLLM:
    """A deterministic 'model' behind /v1/chat/completions. It explains by listing the most often
    marked words, detects by looking for them, and fuzzes by checking the marked words. The first
    ``fail_first`` calls fail (500, then 429 with Retry-After: 0)."""

    def __init__(self, fail_first: int = 0):
        self.calls = 0
        self.fail_first = fail_first
        self.auth = set()
        self.bodies: list[dict] = []
        self.lock = threading.Lock()

    def explain(self, user: str) -> str:
        marked = Counter(w for span in re.findall(r"<<(.*?)>>", user) for w in span.split())
        return "Explanation: " + " ".join(w for w, _ in marked.most_common(4))

    def judge(self, user: str) -> list[int]:
        words = set(re.search(r"Explanation: (.*)", user).group(1).split())
        answers = []
        for text in re.findall(r"Example \d+: (.*)", user):
            if "correctly marked" in user:  # fuzzing
                marked = [w for span in re.findall(r"<<(.*?)>>", text) for w in span.split()]
                answers.append(int(bool(marked) and sum(w in words for w in marked) >= len(marked) / 2))
            else:
                answers.append(int(any(w in words for w in text.split())))
        return answers

    def explain_reply(self, user: str, retry: bool, body: dict) -> str:
        return self.explain(user)

    def judge_reply(self, user: str, retry: bool, body: dict) -> str:
        return f"Here you go: {self.judge(user)}"

    def answer(self, body: dict) -> str:
        """Subclasses change ``explain_reply`` / ``judge_reply``; ``retry``: the request repeats
        a malformed reply with the reminder (two more messages)."""
        messages = body["messages"]
        system, user, retry = messages[0]["content"], messages[1]["content"], len(messages) > 2
        if "short explanation" in system:
            return self.explain_reply(user, retry, body)
        return self.judge_reply(user, retry, body)

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
                    fake.bodies.append(body)
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
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
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
    """``start(fake_or_fail_first)`` → (fake, base_url) of a stand-in server on 127.0.0.1."""
    servers = []

    def start(fake: FakeLLM | int = 0):
        fake = fake if isinstance(fake, FakeLLM) else FakeLLM(fake)
        server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return fake, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def openai_env(monkeypatch, url, model="fake-llama"):
    monkeypatch.setenv("MOESAE_LLM_BASE_URL", url)
    monkeypatch.setenv("MOESAE_LLM_MODEL", model)
    monkeypatch.setenv("MOESAE_LLM_API_KEY", "secret")


def openai_run(url, cache_dir, monkeypatch, cfg_overrides=None, **llm_overrides):
    """The backend as the stage builds it: endpoint, model and key from the environment.
    Returns (scores, explanation records, the client, the per-SAE counts)."""
    openai_env(monkeypatch, url)
    llm = {"examples_per_prompt": 7, "concurrency": 2, "max_retries": 4, "backoff_seconds": 0.0, "cache_dir": str(cache_dir)}
    llm.update(llm_overrides)
    cfg = small_cfg(**{"num_features": 4, "backend": "openai", "llm": llm, **(cfg_overrides or {})})
    backend = ai.make_backend(cfg, fake_token_strings)
    tokens, doc, pos, x = synthetic_cache()
    stream = ai.token_stream(tokens, doc, pos, cfg.chunk_length)
    sae = build_sae("topk", d_in=D_MODEL, num_latents=32, k=4, seed=0)
    rows, records, counts = ai.autointerp_saes({"s": sae}, stream, lambda: iter(x.split(500)), cfg, backend, progress=False)
    return pd.DataFrame(rows), records, backend.client, counts


# ---- the stage on stand-ins for the activation cache and the subject model --------------------
STAGE_FAMILIES = {"topk_m8th": {"architecture": "topk"}, "switch_n32": {"architecture": "switch", "num_experts": 4}}
STAGE_AUTOINTERP = {"num_features": 5, "min_activations": 5, "chunk_length": 16, "window_before": 6,
                    "window_after": 2, "explainer_examples": 8, "examples_per_decile": 2, "bootstrap_samples": 100}


def stage_workdir(tmp_path, monkeypatch, families=None, autointerp=None):
    """A folder laid out like the repository after the data and train stages: params.yaml whose grid
    has ``families`` at k = 4 (32 latents), their saved random SAEs, an (empty) cache folder; the
    activation reader and the subject model are stand-ins over :func:`synthetic_cache`. Returns
    the grid variants (name → variant)."""
    from moesae.grid import model_dir, study_variants

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
    params = {
        "paths": {"activations": "data/activations", "subject_model": "models/subject"},
        "autointerp": {**STAGE_AUTOINTERP, **(autointerp or {})},
        "grid": {"num_latents": 32, "l0": [4], "families": families or STAGE_FAMILIES},
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    variants = study_variants(params)
    for name, v in variants.items():
        fields = {k: val for k, val in v.items() if k not in {"family", "architecture"}}
        build_sae(v["architecture"], d_in=D_MODEL, **fields).save(model_dir(name, v, tmp_path / "models"))
    return variants
