"""Every figure notebook executes under papermill against a run folder and saves its PNG.

The run folder is the ``micro_results`` fixture (a micro run of every stage, tests/conftest.py):
the figures are drawn from numbers a real run produced.
"""
import json
import os
from pathlib import Path

import pytest

from moesae import plotting

REPO = Path(__file__).resolve().parents[1]
NAMES = list(plotting.FIGURES)  # the figure notebooks (other notebooks have their own tests)
NOTEBOOKS = [REPO / "notebooks" / f"{name}.ipynb" for name in NAMES]


@pytest.fixture(scope="module")
def run_root(micro_results):
    return Path(micro_results)


def test_every_figure_has_a_notebook():
    assert [p.name for p in NOTEBOOKS if not p.is_file()] == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_source_is_thin_and_clean(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "moesae"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "commit without outputs"
    params = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1
    source = "".join(params[0]["source"])
    for key in ("results_dir", "profile", "figures_dir", "name"):
        assert f"{key} = " in source
    assert f'name = "{path.stem}"' in source
    body = "".join("".join(c["source"]) for c in code)
    assert "torch" not in body and "train" not in body.replace("plotting", "")


@pytest.mark.parametrize("profile", ["default", pytest.param("paper", marks=pytest.mark.slow)])
def test_all_figures_in_process(run_root, tmp_path, profile, monkeypatch):
    """Every figure function on the run (no kernel): fast, and covers the paper overlays."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(run_root)
    ctx = plotting.load_context("results", profile)
    cfg, source = plotting.architecture_config(".")
    assert cfg["architecture"] == "scale" and source
    figs = {"fig01_architecture": plotting.fig01_architecture(cfg, source),
            "table1_configurations": plotting.fig_table1(ctx.metrics)}
    for name in plotting.FIGURES:
        if name not in figs:
            figs[name] = getattr(plotting, name)(ctx)
    for name, fig in figs.items():
        paths = plotting.save_figure(fig, name, tmp_path, formats=("png",))
        assert paths[0].stat().st_size > 1000, name
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_under_papermill(run_root, tmp_path, name):
    import papermill
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("moesae")
    except NoSuchKernel:
        pytest.fail("Jupyter kernel 'moesae' is not installed: run `bash scripts/ensure_env.sh`")
    figures = tmp_path / "figures"
    os.environ.setdefault("MPLBACKEND", "Agg")
    papermill.execute_notebook(
        str(REPO / "notebooks" / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
        parameters={"results_dir": "results", "profile": "default", "figures_dir": str(figures), "name": name},
        kernel_name="moesae", cwd=str(run_root), progress_bar=False,
    )
    assert (figures / f"{name}.png").stat().st_size > 1000
    assert (figures / f"{name}.svg").is_file()
    executed = json.loads((tmp_path / f"{name}.ipynb").read_text())
    outputs = [o for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook displays its figure"
