"""The `figure` stage: execute one notebook with papermill, export HTML with inputs hidden.

``moesae figure NAME`` runs ``notebooks/NAME.ipynb`` with the ``moesae`` Jupyter kernel into
``reports/notebooks/NAME.ipynb`` and writes ``reports/html/NAME.html``. The notebook itself saves
``reports/figures/NAME.png`` / ``.svg`` (drawn by ``moesae.figures.NAME``). Outputs are written
to temporary names first and renamed (:mod:`moesae.io`), so a failed notebook leaves no
half-written report behind.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .io import atomic_path, atomic_write_text

KERNEL = "moesae"


def run_notebook(
    name: str,
    notebooks_dir: str | Path = "notebooks",
    reports_dir: str | Path = "reports",
    parameters: dict | None = None,
    kernel: str = KERNEL,
    cwd: str | Path = ".",
) -> Path:
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    source = Path(notebooks_dir) / f"{name}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"no notebook {source}; notebooks are {sorted(p.stem for p in Path(notebooks_dir).glob('*.ipynb'))}")
    reports_dir = Path(reports_dir)
    executed = reports_dir / "notebooks" / f"{name}.ipynb"
    html = reports_dir / "html" / f"{name}.html"
    executed.parent.mkdir(parents=True, exist_ok=True)
    html.parent.mkdir(parents=True, exist_ok=True)
    (reports_dir / "figures").mkdir(parents=True, exist_ok=True)
    params = {"name": name, "figures_dir": str(reports_dir / "figures"), **(parameters or {})}
    os.environ.setdefault("MPLBACKEND", "Agg")
    with atomic_path(executed) as tmp_nb:
        papermill.execute_notebook(
            str(source), str(tmp_nb), parameters=params, kernel_name=kernel, cwd=str(cwd), progress_bar=False
        )
        exporter = HTMLExporter()
        exporter.exclude_input = True
        exporter.exclude_input_prompt = True
        exporter.exclude_output_prompt = True
        body, _ = exporter.from_notebook_node(nbformat.read(str(tmp_nb), as_version=4))
        atomic_write_text(html, body)
    return html


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae figure", description="Execute a figure notebook and export HTML")
    parser.add_argument("name", help="notebook name without .ipynb, e.g. fig03_main_comparison")
    parser.add_argument("--profile", default=None, help="profile name passed to the notebook (default: params.yaml's)")
    args = parser.parse_args(argv)
    from .params import load_params
    from .timing import record

    profile = args.profile or load_params().get("profile", "default")
    with record(f"figure@{args.name}"):
        html = run_notebook(args.name, parameters={"profile": profile, "results_dir": "results"})
    print(f"[figure] {args.name}: {html}")
    return 0
