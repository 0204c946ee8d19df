"""The feature browser (``moesae browse``): a static, offline HTML browser of sampled features of
the selected SAEs under ``reports/features/`` (see docs/feature_browser.md).

``config`` (the ``browser`` params section), ``render`` (pure HTML rendering: every corpus,
tokenizer and LLM string is escaped there) and ``stage`` (data gathering and the files)."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from .stage import main as stage_main

    return stage_main(argv)
