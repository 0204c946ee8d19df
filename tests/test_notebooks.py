"""Every figure notebook executes under papermill against a run folder and saves its PNG.

The run folder is the ``micro_results`` fixture (a micro run of every stage, tests/conftest.py):
the figures are drawn from numbers a real run produced. Each notebook imports only its own
figure module (plus :mod:`moesae.results` and :mod:`moesae.figures.draw`), so that its DVC stage
depends on that module alone among the figures.
"""
import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moesae.figures import FIGURES
from moesae.training.fingerprint import package_imports

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "moesae"
NAMES = list(FIGURES)  # the figure notebooks (other notebooks have their own tests)
NOTEBOOKS = [REPO / "notebooks" / f"{name}.ipynb" for name in NAMES]


@pytest.fixture(scope="module")
def run_root(micro_results):
    return Path(micro_results)


def notebook_code(path: Path) -> str:
    nb = json.loads(path.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_every_figure_has_a_notebook_and_a_module():
    assert [p.name for p in NOTEBOOKS if not p.is_file()] == []
    assert [n for n in NAMES if not (PACKAGE / "figures" / f"{n}.py").is_file()] == []
    assert not (PACKAGE / "plotting.py").exists()


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
    body = "\n".join("".join(c["source"]) for c in code if c is not params[0])
    assert "torch" not in body and "train" not in body
    lines = [ln for ln in body.splitlines() if ln.strip()]
    assert len(lines) <= 8, "the drawing code belongs in moesae.figures, not in the notebook"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_imports_only_its_own_figure_module(name):
    """Editing one figure's module must not rerun another figure's stage."""
    tree = ast.parse(notebook_code(REPO / "notebooks" / f"{name}.ipynb"))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moesae"):
            modules |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            modules |= {a.name for a in node.names if a.name.startswith("moesae")}
    figures = {m.removeprefix("moesae.figures.") for m in modules if m.startswith("moesae.figures.")}
    assert figures == {"draw", name}, figures
    assert modules - {f"moesae.figures.{f}" for f in figures} <= {"moesae.results"}
    closure = {p.relative_to(PACKAGE).as_posix() for p in package_imports([PACKAGE / "figures" / f"{name}.py",
                                                                            PACKAGE / "results.py",
                                                                            PACKAGE / "figures" / "draw.py"])}
    others = {f"figures/{n}.py" for n in NAMES if n != name}
    assert not closure & others, closure & others
    assert "figures/synthetic_recovery.py" not in closure


def test_the_figures_package_imports_no_figure_module():
    tree = ast.parse((PACKAGE / "figures" / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]


def test_results_imports_no_matplotlib():
    code = ("import sys; import moesae.results, moesae.claims, moesae.report, moesae.figures.draw; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def draw_all(root: Path, profile: str):
    from moesae import results

    ctx = results.load_context(root / "results", profile)
    figs = {}
    for name in NAMES:
        module = importlib.import_module(f"moesae.figures.{name}")
        if name == "fig01_architecture":
            cfg, source = results.architecture_config(root)
            assert cfg["architecture"] == "scale" and source
            figs[name] = module.plot(cfg, source)
        elif name == "table1_configurations":
            figs[name] = module.plot(ctx.metrics)
        else:
            figs[name] = module.plot(ctx)
    return ctx, figs


@pytest.mark.parametrize("profile", ["default", pytest.param("paper", marks=pytest.mark.slow)])
def test_all_figures_in_process(run_root, tmp_path, profile):
    """Every figure function on the run (no kernel): fast, and covers the paper overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from test_figures import assert_distinct_series_styles, assert_every_series_in_a_legend

    from moesae.figures import draw

    _, figs = draw_all(run_root, profile)
    for name, fig in figs.items():
        if name not in ("fig01_architecture", "table1_configurations"):  # a diagram and a table: no series
            assert_every_series_in_a_legend(fig, name)
            assert_distinct_series_styles(fig, name)
        paths = draw.save_figure(fig, name, tmp_path, formats=("png",))
        assert paths[0].stat().st_size > 1000, name
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


@pytest.mark.slow
def test_figure_stage_writes_html_atomically(run_root, tmp_path):
    """``moesae figure``'s runner: executed notebook and HTML written, no temporary file left behind."""
    from moesae.notebooks import run_notebook

    reports = tmp_path / "reports"
    html = run_notebook("fig07_redundancy", notebooks_dir=REPO / "notebooks", reports_dir=reports,
                        parameters={"results_dir": str(run_root / "results"), "profile": "default"}, cwd=run_root)
    assert html.is_file() and "<img" in html.read_text()
    assert (reports / "notebooks" / "fig07_redundancy.ipynb").is_file()
    assert (reports / "figures" / "fig07_redundancy.png").is_file()
    assert not [p for p in reports.rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fig01_architecture", "fig03_main_comparison"])
def test_notebook_runs_as_it_is_from_the_notebooks_folder(run_root, tmp_path, name):
    """As in JupyterLab: kernel in notebooks/, no parameters passed; figures go to the scratch folder."""
    import shutil

    import papermill

    root = tmp_path / "run"
    shutil.copytree(run_root / "results", root / "results")
    if (run_root / "models").is_dir():
        shutil.copytree(run_root / "models", root / "models", ignore=shutil.ignore_patterns("*.pt"))
    (root / "notebooks").mkdir()
    os.environ.setdefault("MPLBACKEND", "Agg")
    papermill.execute_notebook(str(REPO / "notebooks" / f"{name}.ipynb"), str(tmp_path / "out.ipynb"),
                               kernel_name="moesae", cwd=str(root / "notebooks"), progress_bar=False)
    assert (root / "reports" / "scratch" / f"{name}.png").stat().st_size > 1000
    assert not (root / "reports" / "figures").exists()
