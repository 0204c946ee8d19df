"""``moesae export``: a trained SAE as a checkpoint other tools load (docs/interop.md).

    moesae export [--format saelens|safetensors] [--params params.yaml] [--subject DIR]
                  [--model-name NAME] [--hook-name HOOK] [--context-size N] MODEL_DIR OUT_DIR

- ``--format saelens`` (default): an SAELens 6.x folder (``cfg.json`` + ``sae_weights.safetensors``,
  ``sae_lens.SAE.load_from_disk(OUT_DIR)``) for TopK (``topk``), ReLU (``standard``), JumpReLU,
  Gated, and BatchTopK / Feature Choice (``jumprelu`` with their inference thresholds). A MoE SAE
  (Switch, Scale) is refused with the reason and the ``--format safetensors`` alternative.
- ``--format safetensors``: plain safetensors + a self-describing ``cfg.json`` for any
  architecture (expert layout, router and Feature Scaling tensors; :mod:`moesae.interop.plain`).

The hook name, model name, context size and BOS handling go into ``metadata``: from the subject
model's folder (``--subject``, else ``paths.subject_model`` of ``--params``, else
``models/subject``), then params.yaml, else the default profile's values with a warning.
``MODEL_DIR`` may itself be an SAELens folder (it is converted on load).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("saelens", "safetensors")


def export_sae(model_dir: str | Path, out_dir: str | Path, fmt: str = "saelens", params_path: str | Path | None = None,
               subject_dir: str | Path | None = None, overrides: dict | None = None) -> tuple[Path, list[str]]:
    """Export the SAE in ``model_dir`` to ``out_dir``; returns (out_dir, warnings)."""
    from .interop import write_plain, write_saelens
    from .interop.metadata import hook_metadata
    from .saes import load_sae

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; choose one of {list(FORMATS)}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"OUT_DIR is MODEL_DIR ({model_dir}): the export would overwrite the checkpoint; "
                         "choose another folder")
    params = None
    if params_path is not None:
        from .params import load_params

        if not Path(params_path).is_file():
            raise FileNotFoundError(f"no params file at {params_path}")
        params = load_params(params_path)
    sae = load_sae(model_dir).eval()
    metadata, warnings = hook_metadata(params, subject_dir, overrides)
    if fmt == "saelens":
        write_saelens(sae, out_dir, metadata)
    else:
        write_plain(sae, out_dir, metadata)
    return out_dir, warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae export", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a trained SAE's folder (cfg.json + sae_weights.safetensors)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the export into")
    parser.add_argument("--format", choices=FORMATS, default="saelens", dest="fmt",
                        help="saelens: SAELens 6.x folder (dense SAEs); safetensors: plain tensors + cfg.json (any SAE)")
    parser.add_argument("--params", default=None, help="params.yaml of the run (subject model path, context size, corpus)")
    parser.add_argument("--subject", default=None, help="the subject model's folder (default: paths.subject_model or models/subject)")
    parser.add_argument("--model-name", default=None, help="metadata.model_name (overrides subject.json)")
    parser.add_argument("--hook-name", default=None, help="metadata.hook_name (overrides subject.json)")
    parser.add_argument("--context-size", type=int, default=None, help="metadata.context_size")
    args = parser.parse_args(argv)
    overrides = {"model_name": args.model_name, "hook_name": args.hook_name, "context_size": args.context_size}
    out, warnings = export_sae(args.model_dir, args.out_dir, args.fmt, args.params, args.subject, overrides)
    for warning in warnings:
        print(f"[export] warning: {warning}", file=sys.stderr)
    what = "SAELens folder (sae_lens.SAE.load_from_disk)" if args.fmt == "saelens" else "plain safetensors + cfg.json"
    print(f"[export] wrote {out}: {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
