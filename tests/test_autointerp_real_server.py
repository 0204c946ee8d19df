"""The LLM path end to end against a real OpenAI-compatible server: ``transformers serve`` started
on 127.0.0.1 inside the test, serving a tiny random-weight chat model built here (no download).

A random model writes garbage, which is the failure path to prove: the client talks to the real
server (stop sequences, ``response_format``, cache), the judgements it cannot parse are counted and
kept raw, and ``moesae autointerp --backend openai`` fails with the counts and a raw reply instead
of reporting scores."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from moesae import autointerp as ai
from moesae import cli
from test_autointerp_support import fake_token_strings, small_cfg, stage_workdir

pytestmark = pytest.mark.slow

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def serve_unavailable() -> str | None:
    """Why ``transformers serve`` cannot run here, or None."""
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError as exc:  # pragma: no cover
        return f"transformers has no serve command ({exc})"
    if not is_serve_available():
        return ("`transformers serve` needs its serving extras (fastapi, starlette, uvicorn, openai, pydantic): "
                "rebuild the environment from requirements.lock (bash scripts/ensure_env.sh)")
    return None


def build_tiny_chat_model(out_dir) -> None:
    """A 2-layer, 32-wide Llama with random weights, a 200-token BPE tokenizer over printable ASCII
    trained on a few lines (so its garbage is printable text, the format's own ``[``, ``1``, ``,``
    included; Metaspace, as the server's stop strings need) and a ChatML-style chat template: a
    chat model in form only."""
    import string

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    texts = ["Example 1: the cat sat on the mat", "Explanation: words about animals", "[1, 0, 1, 0]",
             "Reply with a JSON list of 0s and 1s", "Active tokens: the feature is active on marked excerpts"] * 20
    alphabet = [c for c in string.printable if not c.isspace()] + ["\u2581"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """(base_url, model name) of ``transformers serve`` on 127.0.0.1, stopped after the module."""
    reason = serve_unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("transformers_serve")
    model_dir = root / "tiny-chat"
    build_tiny_chat_model(model_dir)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited ({proc.returncode}):\n{(root / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:  # not /v1/models: see the issue
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up in 90 s:\n{(root / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield f"{url}/v1", str(model_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_chat_client_against_a_real_server(real_server, tmp_path):
    url, model = real_server
    client = ai.ChatClient(url, model, cache_dir=tmp_path / "cache", max_retries=1, backoff_seconds=0.0,
                           timeout_seconds=60)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Example 1: the cat\nReply with a JSON list of 1 entry."}]
    first = client.chat(messages, max_tokens=12)
    assert isinstance(first.content, str) and first.content == first.raw and not first.cached
    assert first.finish_reason in ("length", "stop")
    assert client.stats["requests"] == 1 and client.stats["prompt_tokens"] > 0 and client.stats["completion_tokens"] > 0
    again = client.chat(messages, max_tokens=12)
    assert again.cached and again.content == first.content and client.stats["requests"] == 1
    # a stop sequence from the middle of that (greedy, so repeatable) reply: the reply ends before it,
    # whether the server stops there (and returns it, as transformers serve does) or not
    text = first.raw
    words = text.split()
    assert len(words) >= 3, text
    stop = words[len(words) // 2]
    cut = client.chat(messages, max_tokens=12, stop=[stop])
    assert cut.content == text[:text.find(stop)] and stop not in cut.content
    # response_format is sent as the OpenAI API defines it; this server ignores it, without an error
    structured = client.chat(messages, max_tokens=8, response_format=ai.judgement_schema(1))
    assert isinstance(structured.content, str) and ai.parse_judgements(structured.content, 1) is None


def test_judgements_of_a_real_server_that_cannot_follow_the_format_are_counted_raw(real_server, tmp_path):
    url, model = real_server
    cfg = small_cfg(backend="openai", llm={"base_url": url, "model": model, "cache_dir": str(tmp_path / "cache"),
                                           "examples_per_prompt": 3, "judgement_max_tokens": 16, "max_retries": 1,
                                           "timeout_seconds": 60})
    backend = ai.make_backend(cfg, fake_token_strings)
    items = [ai.Item(np.array([1 + i, 2, 3, 4]), i % 2 == 0, 5) for i in range(6)]
    judged = backend.judge(ai.Explanation("the token t2"), items, "detection", seed=0)
    assert judged.answers == [None] * 6
    assert judged.prompts == 2 and judged.malformed == 2 and judged.recovered == 0 and judged.lost == 2
    assert judged.bad_replies and all(isinstance(r, str) for r in judged.bad_replies)
    assert backend.client.stats["requests"] == 4  # each prompt asked once more, with the reminder


def test_stage_against_a_real_server_fails_with_counts_and_a_raw_reply(real_server, tmp_path, monkeypatch, capsys):
    url, model = real_server
    cache = tmp_path / "cache"
    llm = {"cache_dir": str(cache), "concurrency": 2, "explanation_max_tokens": 24, "judgement_max_tokens": 16,
           "examples_per_prompt": 8, "max_retries": 1, "backoff_seconds": 0.0, "timeout_seconds": 60}
    stage_workdir(tmp_path, monkeypatch, autointerp={"num_features": 3, "llm": llm})
    monkeypatch.setenv("MOESAE_LLM_BASE_URL", url)
    monkeypatch.setenv("MOESAE_LLM_MODEL", model)
    rc = cli.main(["autointerp", "--backend", "openai", "--no-progress", "--variant", "switch_n32_k4"])
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    assert "judgements are not usable for switch_n32_k4" in err
    assert f"endpoint: {url}" in err and f"model: {model}" in err
    assert re.search(r"one raw (judgement|explainer) reply: '", err) and "check: (1) the model" in err
    requests = int(re.search(r"switch_n32_k4: (\d+) requests \(0 answered from the cache\)", err).group(1))
    assert requests > 0 and len(list(cache.rglob("*.json"))) == requests  # every reply received is kept
    assert "switch_n32_k4: 0 of 3 sampled features scored" in out
    assert not (tmp_path / "results/autointerp").exists()
