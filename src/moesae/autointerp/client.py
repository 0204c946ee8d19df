"""A minimal OpenAI-compatible chat-completions client (standard library only): retries with
backoff, an on-disk response cache, and request / token counts."""
from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..io import atomic_write_text


@dataclass
class Reply:
    """One chat completion: its text (cut at the stop sequences), why generation ended
    (``stop``, ``length`` = ran into max_tokens, or None when the server does not say), and
    whether it came from the cache."""

    content: str
    finish_reason: str | None = None
    cached: bool = False
    raw: str = ""
    """The text as the server sent it (before the cut at the stop sequences)."""


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """``text`` up to the first occurrence of any stop sequence (OpenAI semantics: the stop
    sequence itself is not part of the reply)."""
    cut = len(text)
    for s in stop or []:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def redact_url(url: str) -> str:
    """The URL without any user:password part, for messages and the summary."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


class ChatClient:
    """Minimal OpenAI-compatible chat-completions client (standard library only).

    Retries HTTP 429 / 5xx / connection errors with exponential backoff (a ``Retry-After`` header
    wins), caches every response on disk keyed by the full request, and counts requests, cache
    hits and tokens for the progress bar. Thread-safe. Never calls ``GET /models`` (some servers
    answer it with an error while chat completions work).
    """

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, cache_dir: str | Path | None = None,
        max_retries: int = 6, backoff_seconds: float = 1.0, timeout_seconds: float = 120.0,
        temperature: float = 0.0, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_retries, self.backoff_seconds, self.timeout_seconds = max_retries, backoff_seconds, timeout_seconds
        self.temperature, self.sleep = temperature, sleep
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._lock = threading.Lock()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.stats[k] += v

    def cache_key(self, payload: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def complete(self, messages: list[dict[str, str]], max_tokens: int = 200) -> str:
        """The reply's text (see :meth:`chat`)."""
        return self.chat(messages, max_tokens).content

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 200, stop: list[str] | None = None,
             response_format: dict[str, Any] | None = None) -> Reply:
        """One chat completion: from the disk cache when this exact request was made before.

        ``stop`` and ``response_format`` are sent only when given (so a request without them has
        the same cache key as before they existed); the reply is cut at the first stop sequence
        here too, since some servers return it or ignore it.
        """
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature,
                                   "max_tokens": max_tokens}
        if stop:
            payload["stop"] = list(stop)
        if response_format:
            payload["response_format"] = response_format
        key = self.cache_key(payload)
        path = self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                entry = json.loads(path.read_text())
                self._count(cache_hits=1)
                return Reply(cut_at_stop(entry["content"], stop), entry.get("finish_reason"), True, entry["content"])
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a corrupt entry is simply re-requested
        data = self._post(payload)
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"{self.url} answered without choices[0].message.content: {str(data)[:300]}") from exc
        finish_reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        usage = data.get("usage") or {}
        self._count(prompt_tokens=int(usage.get("prompt_tokens", 0) or 0),
                    completion_tokens=int(usage.get("completion_tokens", 0) or 0))
        if path is not None:
            entry = {"request": payload, "content": content, "finish_reason": finish_reason, "usage": usage}
            atomic_write_text(path, json.dumps(entry, ensure_ascii=False))
        return Reply(cut_at_stop(content, stop), finish_reason, False, content)

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
            self._count(requests=1)
            retry_after: float | None = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                    return json.loads(response.read().decode())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:300]
                if exc.code != 429 and exc.code < 500:
                    hint = ("check the model name and the API key variable (autointerp.llm.model / api_key_env)")
                    if "response_format" in payload and exc.code in (400, 422):
                        hint = ("the server may not support structured output: set autointerp.llm.response_format: "
                                "none, or " + hint)
                    raise RuntimeError(f"{self.url} refused the request (HTTP {exc.code}): {detail}; {hint}") from exc
                last_error = f"HTTP {exc.code}: {detail}"
                header = exc.headers.get("Retry-After") if exc.headers else None
                try:
                    retry_after = float(header) if header is not None else None
                except ValueError:
                    retry_after = None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except json.JSONDecodeError as exc:
                last_error = f"the answer is not JSON ({exc})"
            if attempt < self.max_retries:
                delay = retry_after if retry_after is not None else min(60.0, self.backoff_seconds * 2**attempt)
                self.sleep(delay)
        raise RuntimeError(
            f"{self.url} failed after {self.max_retries + 1} attempts ({last_error}); is the server up? "
            "(autointerp.llm.base_url / MOESAE_LLM_BASE_URL)"
        )
