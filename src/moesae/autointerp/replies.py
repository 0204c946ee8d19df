"""Reading the LLM's replies: the explanation line and the list of 0/1 judgements."""
from __future__ import annotations

import re


def parse_explanation(text: str) -> str:
    match = list(re.finditer(r"explanation\s*:\s*(.+)", text, flags=re.IGNORECASE))
    line = match[-1].group(1) if match else text.strip()
    return line.strip().splitlines()[0].strip() if line.strip() else ""


def parse_judgements(text: str, count: int) -> list[bool] | None:
    """The first JSON-style list of 0/1 in ``text`` with ``count`` entries, else None."""
    for match in re.finditer(r"\[([^\[\]]*)\]", text):
        parts = [p.strip() for p in match.group(1).split(",") if p.strip()]
        if len(parts) == count and all(p in {"0", "1"} for p in parts):
            return [p == "1" for p in parts]
    return None
