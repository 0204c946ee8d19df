"""``moesae <stage> [options]``: one sub-command per pipeline stage (the commands in dvc.yaml).

Each stage is one module with a ``main(argv)``; this file only maps names to modules, so the
heavy imports (torch, transformers) happen only for the stage that runs.
"""
from __future__ import annotations

import importlib
import os
import sys

STAGES = {
    "doctor": ("moesae.doctor", "preflight: models, datasets (gated access), disk, GPU, run-time estimate"),
    "corpus": ("moesae.corpus", "prepare the training / held-out / cross-domain text"),
    "subject-model": ("moesae.subject_model", "train (default) or fetch (paper) the subject model"),
    "activations": ("moesae.activations", "cache the subject model's activations at the hook"),
    "profile": ("moesae.profiles", "write params.yaml from profiles/NAME.yaml (merged onto the default)"),
    "train": ("moesae.training.stage", "train a grid family (or named variants) in one pass"),
    "evaluate": ("moesae.evaluate", "evaluate one trained SAE on held-out data"),
    "collect": ("moesae.collect", "collect every evaluation into results/ tables and DVC metrics"),
    "export": ("moesae.export", "export a trained SAE for SAELens (or as plain safetensors)"),
    "autointerp": ("moesae.autointerp", "explain-and-score features (Fig 3d)"),
    "synthetic": ("moesae.synthetic", "ground-truth feature-recovery benchmark"),
    "figure": ("moesae.notebooks", "execute one figure notebook (papermill) and export its HTML"),
    "report": ("moesae.report", "build reports/index.html"),
    "browse": ("moesae.browser", "build the static feature browser (reports/features/)"),
}


def usage() -> str:
    lines = ["usage: moesae <stage> [options]", "", "stages:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"moesae: unknown stage '{stage}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    entry = getattr(module, f"main_{stage.replace('-', '_')}", None) or module.main
    try:
        return int(entry(rest) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Errors raised on purpose by our own code carry the explanation and the fix: print the
        # message only. Anything raised elsewhere (torch, numpy, a bug) keeps its traceback, as
        # does every error with MOESAE_TRACEBACK=1.
        if os.environ.get("MOESAE_TRACEBACK") or not raised_by_moesae(exc):
            raise
        print(f"moesae {stage}: error: {exc}", file=sys.stderr)
        return 1


def raised_by_moesae(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc`` is this package's own ``raise`` statement."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package + os.sep)

if __name__ == "__main__":
    raise SystemExit(main())
