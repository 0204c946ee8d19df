"""Backend ``openai``: explain and score with a chat model behind any OpenAI-compatible
``/chat/completions`` endpoint (vLLM, ``transformers serve``, a hosted API), with the prompts in
``moesae/prompts``."""
from __future__ import annotations

import json
import threading
from typing import Any, Callable, Sequence

import numpy as np

from ..client import ChatClient
from ..config import AutointerpConfig, LLMConfig
from ..examples import FeatureExamples
from ..items import Item
from ..prompting import load_prompt, render_tokens
from ..replies import parse_explanation, parse_judgements
from .base import Explanation


class OpenAIBackend:
    """Backend 2: explain and score with a chat model; prompts from ``moesae/prompts``."""

    name = "openai"

    def __init__(self, cfg: AutointerpConfig, token_strings: Callable[[list[int]], list[str]], client: ChatClient | None = None):
        llm: LLMConfig = cfg.llm  # type: ignore[assignment]
        if client is None:
            base_url, model, key = llm.resolved()
            client = ChatClient(base_url, model, key, llm.cache_dir, llm.max_retries, llm.backoff_seconds,
                                llm.timeout_seconds, llm.temperature)
        self.cfg, self.llm, self.client, self.token_strings = cfg, llm, client, token_strings
        self.prompts = {name: load_prompt(name) for name in (
            "explain_system", "explain_user", "detection_system", "detection_user", "fuzzing_system", "fuzzing_user")}
        self.unparsed = 0
        self._lock = threading.Lock()

    def explain(self, fe: FeatureExamples) -> Explanation:
        if not fe.explain:
            return Explanation("(no activating examples)")
        top = max(e.max_activation for e in fe.explain) or 1.0
        blocks = []
        for i, e in enumerate(fe.explain, 1):
            strings = self.token_strings([int(t) for t in e.tokens])
            active = e.activations > 0
            listed = ", ".join(
                f"{json.dumps(s, ensure_ascii=False)} ({round(10 * float(a) / top)})"
                for s, a, m in zip(strings, e.activations, active) if m
            )
            blocks.append(f"Example {i}: {render_tokens(strings, active)}\nActive tokens: {listed}")
        messages = [
            {"role": "system", "content": self.prompts["explain_system"].substitute()},
            {"role": "user", "content": self.prompts["explain_user"].substitute(examples="\n\n".join(blocks))},
        ]
        text = parse_explanation(self.client.complete(messages, self.llm.explanation_max_tokens))
        return Explanation(text or "(the explainer gave no explanation)")

    def judge(self, explanation: Explanation, items: Sequence[Item], scorer: str, seed: int = 0) -> list[bool | None]:
        # Shuffle so one prompt mixes positives and negatives; answers are mapped back.
        order = np.random.default_rng(seed).permutation(len(items))
        answers: list[bool | None] = [None] * len(items)
        per = self.llm.examples_per_prompt
        for start in range(0, len(order), per):
            batch = [int(i) for i in order[start:start + per]]
            blocks = []
            for n, i in enumerate(batch, 1):
                strings = self.token_strings([int(t) for t in items[i].tokens])
                blocks.append(f"Example {n}: {render_tokens(strings, items[i].highlight)}")
            messages = [
                {"role": "system", "content": self.prompts[f"{scorer}_system"].substitute()},
                {"role": "user", "content": self.prompts[f"{scorer}_user"].substitute(
                    explanation=explanation.text, examples="\n".join(blocks), count=len(batch))},
            ]
            parsed = parse_judgements(self.client.complete(messages, self.llm.judgement_max_tokens), len(batch))
            if parsed is None:
                with self._lock:
                    self.unparsed += len(batch)
                continue
            for i, answer in zip(batch, parsed):
                answers[i] = answer
        return answers

    def progress_postfix(self) -> dict[str, Any]:
        s = self.client.stats
        cost = (s["prompt_tokens"] * self.llm.price_per_million_input
                + s["completion_tokens"] * self.llm.price_per_million_output) / 1e6
        out = {"req": s["requests"], "cached": s["cache_hits"], "tok_in": s["prompt_tokens"], "tok_out": s["completion_tokens"]}
        if cost:
            out["usd"] = f"{cost:.2f}"
        if self.unparsed:
            out["unparsed"] = self.unparsed
        return out
