"""Reading the LLM's replies: the explanation line, the list of 0/1 judgements, and the signs of a
model that cannot follow the format (an empty explanation, an echo of the prompt's scaffolding
such as ``Example 21:``, a repetition loop, a reply that ran to the token limit)."""
from __future__ import annotations

import json
import re
from typing import Any

EXPLANATION_PROBLEMS = ("empty", "scaffolding", "repetition", "truncated")
"""Why an explanation is degenerate (see :func:`explanation_problem`)."""

_MARKER = re.compile(r"explanation\s*:", re.IGNORECASE)
_SCAFFOLDING = re.compile(r"^(example\s*\d+\s*[:.)]?|active tokens\s*:|explanation\s*:)", re.IGNORECASE)
_TRUE, _FALSE = {"1", "true", "yes"}, {"0", "false", "no"}
_FENCE = re.compile(r"```[a-zA-Z]*")


def parse_explanation(text: str) -> str:
    """The text after the last ``Explanation:`` (its line), else the reply's first line."""
    match = list(re.finditer(r"explanation\s*:\s*(.+)", text, flags=re.IGNORECASE))
    line = match[-1].group(1) if match else text.strip()
    return line.strip().splitlines()[0].strip() if line.strip() else ""


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _normal(text: str) -> str:
    return " ".join(_words(text))


def is_repetitive(text: str) -> bool:
    """A repetition loop: a phrase of 1..8 words repeated back to back (4 times for one word, 3
    for longer phrases), a sentence or line occurring 3 times or more, or a long reply of very few
    distinct words."""
    words = _words(text)
    n_words = len(words)
    for n in range(1, 9):
        times = 4 if n == 1 else 3
        for i in range(0, n_words - n * times + 1):
            gram = words[i:i + n]
            if all(words[i + k * n:i + (k + 1) * n] == gram for k in range(1, times)):
                return True
    pieces = [_normal(p) for p in re.split(r"[.!?\n]+", text)]
    pieces = [p for p in pieces if len(p.split()) >= 3]
    if any(pieces.count(p) >= 3 for p in set(pieces)):
        return True
    return n_words >= 20 and len(set(words)) / n_words < 0.3


def explanation_problem(raw: str, parsed: str, finish_reason: str | None = None, prompt: str = "") -> str | None:
    """Why an explainer reply holds no usable explanation, or None when it does.

    - ``empty``: nothing readable (no letter or digit) after parsing;
    - ``scaffolding``: it echoes the prompt, not explains: starts like the prompt's own structure
      (``Example 21:``, ``Active tokens:``) or is a run of at least four words copied from
      ``prompt`` (the instructions of the request);
    - ``repetition``: a loop (:func:`is_repetitive`) in the explanation, or in a reply that ran to
      the token limit;
    - ``truncated``: the reply ran to the token limit without ever writing ``Explanation:``.
    """
    text = parsed.strip().strip("\"'*` ")
    if not re.search(r"\w", text):
        return "empty"
    if _SCAFFOLDING.match(text):
        return "scaffolding"
    norm = _normal(text)
    if prompt and len(norm.split()) >= 4 and norm in _normal(prompt):
        return "scaffolding"
    if is_repetitive(text) or (finish_reason == "length" and is_repetitive(raw)):
        return "repetition"
    if finish_reason == "length" and not _MARKER.search(raw):
        return "truncated"
    return None


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().strip("'\"").lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    return None


def _as_bools(values: list[Any], count: int) -> list[bool] | None:
    if len(values) != count:
        return None
    out = [_as_bool(v) for v in values]
    return None if any(v is None for v in out) else out  # type: ignore[return-value]


def _entries(body: str) -> list[str]:
    return [p for p in re.split(r"[,;\s]+", body.strip()) if p]


def parse_judgements(text: str, count: int) -> list[bool] | None:
    """The ``count`` answers (1 / 0) in a judgement reply, or None when it holds none.

    Tolerant of the usual ways models wrap the list: a JSON object (``{"answers": [...]}``, what
    ``response_format: json_schema`` asks for), code fences, prose around the list (the first
    bracketed list of exactly ``count`` entries wins), ``true``/``false`` or ``yes``/``no`` entries,
    a list cut before its closing bracket, one ``Example N: 1`` line per excerpt, or the bare
    entries alone.
    """
    text = _FENCE.sub(" ", text or "")
    stripped = text.strip()
    for candidate in [stripped] + re.findall(r"\{[^{}]*\}", stripped):
        if not candidate.startswith("{"):
            continue
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(obj, dict):
            for value in obj.values():
                if isinstance(value, list) and (answers := _as_bools(value, count)) is not None:
                    return answers
    for match in re.finditer(r"\[([^\[\]]*)\]", text):
        if (answers := _as_bools(_entries(match.group(1)), count)) is not None:
            return answers
    tail = re.search(r"\[([^\[\]]*)$", text)
    if tail and (answers := _as_bools(_entries(tail.group(1)), count)) is not None:
        return answers
    lines = re.findall(r"(?im)^\s*(?:example\s*)?(\d+)\s*[:.)=-]\s*\**\s*(1|0|yes|no|true|false)\**\s*[.,;]?\s*$", text)
    numbered = {}
    for index, value in lines:
        numbered.setdefault(int(index), _as_bool(value))
    if sorted(numbered) == list(range(1, count + 1)):
        return [bool(numbered[i]) for i in range(1, count + 1)]
    return _as_bools(_entries(stripped), count) if stripped else None


def judgement_problem(text: str, count: int) -> str:
    """What is wrong with an unreadable judgement reply, in words for the retry prompt."""
    lists = [_entries(m.group(1)) for m in re.finditer(r"\[([^\[\]]*)\]", text or "")]
    if not (text or "").strip():
        return "it was empty"
    if not lists:
        return "it contained no list in square brackets"
    sizes = sorted({len(x) for x in lists})
    if count not in sizes:
        return f"its list had {sizes[0]} entries, not {count}"
    return "its list had entries other than 0 and 1"
