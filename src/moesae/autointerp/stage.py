"""The ``moesae autointerp`` stage: load the activation cache, the subject model's tokenizer and
the selected SAEs named by params.yaml, score them, write ``results/autointerp/`` (scores.csv,
explanations.jsonl, summary.json), and print the counts of each SAE.

A run whose judgements are not usable (parse rate below ``autointerp.min_parse_rate``) raises
:class:`~.accounting.AutointerpFailure` and writes none of the three files."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..params import ParamsError, load_params
from .backends import make_backend
from .config import BACKENDS, load_config
from .examples import token_stream
from .accounting import format_table
from .outputs import RESULTS_DIR, SCORE_COLUMNS, summary, write_explanations, write_scores, write_summary
from .scoring import autointerp_saes
from .selection import select_variants

MODELS_DIR = Path("models")  # SAEs live in models/<family>/<variant>/ (grid.model_dir)


def run_stage(params_path: str | Path = "params.yaml", backend_name: str | None = None,
              variants: list[str] | None = None, out_dir: str | Path = RESULTS_DIR, progress: bool = True) -> Path:
    """Load the cache, tokenizer and SAEs named by params.yaml, score them, write the outputs."""
    from ..activations import ActivationReader
    from ..devices import resolve_device
    from ..grid import model_dir, study_variants
    from ..saes import load_sae
    from ..subject_model import load_subject_model

    params = load_params(params_path)
    cfg = load_config(params.get("autointerp"), backend_name)
    if cfg.backend == "openai":
        cfg.llm.resolved()  # a missing endpoint or model is reported before any work starts
    grid = study_variants(params)
    if variants:
        missing = [v for v in variants if v not in grid]
        if missing:
            raise ParamsError(
                f"params.yaml: the grid has no variant named '{missing[0]}' "
                f"(variants are named <family>_k<k>, e.g. {next(iter(grid))})"
            )
        selected = {v: grid[v].get("family", "") for v in variants}
    else:
        selected = select_variants(grid, cfg)
    if not selected:
        raise ValueError(
            f"no grid variant belongs to the autointerp families {cfg.families}; "
            "list existing families under 'autointerp.families'"
        )
    paths = params.get("paths") or {}
    split_dir = Path(paths.get("activations", "data/activations")) / cfg.split
    if not split_dir.exists():
        raise FileNotFoundError(f"no activation cache at {split_dir}; run `moesae activations` (split '{cfg.split}')")
    reader = ActivationReader(split_dir)
    n = reader.num_tokens if cfg.max_tokens is None else min(cfg.max_tokens, reader.num_tokens)
    stream = token_stream(np.asarray(reader.token_ids[:n]), np.asarray(reader.doc_index[:n]), np.asarray(reader.position[:n]), cfg.chunk_length)
    subject = load_subject_model(paths.get("subject_model", "models/subject"))
    saes = {}
    for name in selected:
        saes[name] = load_sae(model_dir(name, grid[name], MODELS_DIR))
        if saes[name].cfg.d_in != reader.d_model:
            raise ValueError(f"SAE {name} reads width {saes[name].cfg.d_in} but the cache has {reader.d_model}; retrain it")
    device = resolve_device(cfg.device, "autointerp.device")
    for sae in saes.values():
        sae.to(device)
    backend = make_backend(cfg, subject.token_strings)

    def batches() -> Iterator[Any]:
        return reader.iter_batches(cfg.batch_size, max_tokens=n)

    rows, records, counts = autointerp_saes(saes, stream, batches, cfg, backend, progress=progress, families=selected)
    for row in rows:
        row["family"] = selected[row["variant"]]
    endpoint = backend.endpoint()
    where = f" ({endpoint['model']} at {endpoint['endpoint']})" if endpoint.get("endpoint") else ""
    print(f"[autointerp] backend {cfg.backend}{where}, per SAE:\n{format_table(counts)}")
    out_dir = Path(out_dir)
    write_explanations(records, out_dir / "explanations.jsonl")
    write_summary(summary(counts, cfg.backend, endpoint, cfg.min_parse_rate, cfg.scorers), out_dir / "summary.json")
    write_scores(rows, out_dir / "scores.csv", SCORE_COLUMNS)
    return out_dir / "scores.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae autointerp", description="Explain-and-score features (Fig 3d)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--backend", choices=BACKENDS, help="override autointerp.backend")
    parser.add_argument("--variant", action="append", help="score this variant instead of the Fig 3d series (repeatable)")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from ..timing import record

    with record("autointerp"):
        path = run_stage(args.params, args.backend, args.variant, args.out, progress=not args.no_progress)
    print(f"[autointerp] wrote {path}")
    return 0
