"""A minimal OpenAI-compatible chat-completions client (standard library only): retries with
backoff, an on-disk response cache, and request / token counts."""
from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from ..io import atomic_write_text


class ChatClient:
    """Minimal OpenAI-compatible chat-completions client (standard library only).

    Retries HTTP 429 / 5xx / connection errors with exponential backoff (a ``Retry-After`` header
    wins), caches every response on disk keyed by the full request, and counts requests, cache
    hits and tokens for the progress bar. Thread-safe.
    """

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, cache_dir: str | Path | None = None,
        max_retries: int = 6, backoff_seconds: float = 1.0, timeout_seconds: float = 120.0,
        temperature: float = 0.0, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
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
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": max_tokens}
        key = self.cache_key(payload)
        path = self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                content = json.loads(path.read_text())["content"]
                self._count(cache_hits=1)
                return content
            except (json.JSONDecodeError, KeyError):
                pass  # a corrupt entry is simply re-requested
        data = self._post(payload)
        try:
            content = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"{self.url} answered without choices[0].message.content: {str(data)[:300]}") from exc
        usage = data.get("usage") or {}
        self._count(prompt_tokens=int(usage.get("prompt_tokens", 0) or 0),
                    completion_tokens=int(usage.get("completion_tokens", 0) or 0))
        if path is not None:
            atomic_write_text(path, json.dumps({"request": payload, "content": content, "usage": usage}, ensure_ascii=False))
        return content

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
                    raise RuntimeError(
                        f"{self.url} refused the request (HTTP {exc.code}): {detail}; check the model name "
                        "and the API key variable (autointerp.llm.model / api_key_env)"
                    ) from exc
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
