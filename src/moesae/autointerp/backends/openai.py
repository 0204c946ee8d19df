"""Backend ``openai``: explain and score with a chat model behind any OpenAI-compatible
``/chat/completions`` endpoint (vLLM, ``transformers serve``, a hosted API), with the prompts in
``moesae/prompts``."""
from __future__ import annotations

import json
import threading
from typing import Any, Callable, Sequence

import numpy as np

from ..client import ChatClient, redact_url
from ..config import AutointerpConfig, LLMConfig
from ..examples import FeatureExamples
from ..items import Item
from ..prompting import judgement_schema, load_prompt, render_tokens
from ..replies import explanation_problem, judgement_problem, parse_explanation, parse_judgements
from .base import Explanation, Judgements


PROMPTS = ("explain_system", "explain_user", "explain_retry", "detection_system", "detection_user",
           "fuzzing_system", "fuzzing_user", "judgement_retry")
KEEP_BAD_REPLIES = 3
"""Unparseable raw replies kept per scorer call, for the error message."""


class OpenAIBackend:
    """Backend 2: explain and score with a chat model; prompts from ``moesae/prompts``.

    A reply that holds no readable answer (a degenerate explanation, a judgement reply without a
    0/1 list of the right length) is asked again ``llm.malformed_retries`` times with a stricter
    reminder of the format; what is still unreadable is counted and returned, never guessed.
    """

    name = "openai"

    def __init__(self, cfg: AutointerpConfig, token_strings: Callable[[list[int]], list[str]], client: ChatClient | None = None):
        llm: LLMConfig = cfg.llm  # type: ignore[assignment]
        if client is None:
            base_url, model, key = llm.resolved()
            client = ChatClient(base_url, model, key, llm.cache_dir, llm.max_retries, llm.backoff_seconds,
                                llm.timeout_seconds, llm.temperature)
        self.cfg, self.llm, self.client, self.token_strings = cfg, llm, client, token_strings
        self.prompts = {name: load_prompt(name) for name in PROMPTS}
        self.unparsed = 0
        """Judgements lost to unreadable replies so far (for the progress bar)."""
        self._lock = threading.Lock()

    def endpoint(self) -> dict[str, str | None]:
        return {"endpoint": redact_url(self.client.base_url), "model": self.client.model}

    def request_stats(self) -> dict[str, int]:
        """A snapshot of the client's counts (requests, cache_hits, retries, tokens)."""
        with self.client._lock:
            return dict(self.client.stats)

    def explain(self, fe: FeatureExamples) -> Explanation:
        if not fe.explain:
            return Explanation("(no activating examples)", problem="empty")
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
        # what an echo would copy: the instructions (not the excerpts, which a good explanation may quote)
        prompt = messages[0]["content"] + "\n" + self.prompts["explain_user"].substitute(examples="")
        stop = self.llm.explanation_stop or None
        retried = False
        for attempt in range(self.llm.malformed_retries + 1):
            reply = self.client.chat(messages, self.llm.explanation_max_tokens, stop=stop)
            text = parse_explanation(reply.content)
            problem = explanation_problem(reply.content, text, reply.finish_reason, prompt)
            if problem is None or attempt == self.llm.malformed_retries:
                break
            retried = True
            messages = messages[:2] + [
                {"role": "assistant", "content": reply.content or "(no reply)"},
                {"role": "user", "content": self.prompts["explain_retry"].substitute(problem=problem)},
            ]
        return Explanation(text, raw=reply.raw, problem=problem, retried=retried)

    def judge(self, explanation: Explanation, items: Sequence[Item], scorer: str, seed: int = 0) -> Judgements:
        # Shuffle so one prompt mixes positives and negatives; answers are mapped back.
        order = np.random.default_rng(seed).permutation(len(items))
        out = Judgements([None] * len(items))
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
            fmt = judgement_schema(len(batch)) if self.llm.response_format == "json_schema" else None
            out.prompts += 1
            for attempt in range(self.llm.malformed_retries + 1):
                reply = self.client.chat(messages, self.llm.judgement_max_tokens, response_format=fmt)
                parsed = parse_judgements(reply.content, len(batch))
                if parsed is not None:
                    out.recovered += attempt > 0
                    break
                if attempt == 0:
                    out.malformed += 1
                if len(out.bad_replies) < KEEP_BAD_REPLIES:
                    out.bad_replies.append(reply.content)
                if attempt == self.llm.malformed_retries:
                    break
                messages = messages[:2] + [
                    {"role": "assistant", "content": reply.content or "(no reply)"},
                    {"role": "user", "content": self.prompts["judgement_retry"].substitute(
                        problem=judgement_problem(reply.content, len(batch)), count=len(batch))},
                ]
            if parsed is None:
                with self._lock:
                    self.unparsed += len(batch)
                continue
            for i, answer in zip(batch, parsed):
                out.answers[i] = answer
        return out

    def progress_postfix(self) -> dict[str, Any]:
        s = self.request_stats()
        cost = (s["prompt_tokens"] * self.llm.price_per_million_input
                + s["completion_tokens"] * self.llm.price_per_million_output) / 1e6
        out = {"req": s["requests"], "cached": s["cache_hits"], "tok_in": s["prompt_tokens"], "tok_out": s["completion_tokens"]}
        if cost:
            out["usd"] = f"{cost:.2f}"
        if self.unparsed:
            out["unparsed"] = self.unparsed
        return out
