"""The LLM prompts: templates from ``moesae/prompts/<name>.txt`` and excerpts rendered as text with
marked tokens (``<<like this>>``)."""
from __future__ import annotations

import string
from importlib import resources
from typing import Sequence


def load_prompt(name: str) -> string.Template:
    """A prompt template from ``moesae/prompts/<name>.txt`` (``$placeholders``)."""
    try:
        text = resources.files("moesae").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"prompt template moesae/prompts/{name}.txt is missing; reinstall the package") from exc
    return string.Template(text.strip())


def render_tokens(strings: Sequence[str], mark: Sequence[bool] | None = None) -> str:
    """Concatenate token strings, wrapping each run of marked tokens in ``<<...>>``."""
    out, inside = [], False
    for s, m in zip(strings, mark if mark is not None else [False] * len(strings)):
        if m and not inside:
            out.append("<<")
        elif not m and inside:
            out.append(">>")
        inside = bool(m)
        out.append(s)
    if inside:
        out.append(">>")
    return "".join(out)


def judgement_schema(count: int) -> dict:
    """The OpenAI ``response_format`` of a judgement reply: ``{"answers": [...]}`` with exactly
    ``count`` entries, each 0 or 1 (an object at the root, as OpenAI's structured output requires)."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "judgements",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"answers": {"type": "array", "items": {"type": "integer", "enum": [0, 1]},
                                           "minItems": count, "maxItems": count}},
                "required": ["answers"],
                "additionalProperties": False,
            },
        },
    }
