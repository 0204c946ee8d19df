"""Declared = read: every stage in ``dvc.yaml`` declares the package modules its command imports
and the params sections it reads; and the real ``dvc repro`` reruns exactly what a change affects.

The import closure of a stage is derived from its command (``moesae <stage>`` → the module
``cli.STAGES`` maps it to; ``moesae figure NAME`` → ``notebooks.py`` plus what the notebook's
cells import) with the same import walker the training fingerprint uses.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moesae import cli
from moesae.training.fingerprint import PACKAGE, package_imports

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _stages() -> dict[str, dict]:
    """Every stage, foreach expanded (``${key}`` / ``${item}`` substituted)."""
    out = {}
    for name, stage in DVC_YAML["stages"].items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        items = stage["foreach"]
        items = PARAMS["grid"]["families"] if items == "${grid.families}" else items
        for key in items:
            text = yaml.safe_dump(stage["do"]).replace("${key}", key).replace("${item}", key)
            if isinstance(items, dict) and isinstance(items[key], dict):
                for field, value in items[key].items():
                    text = text.replace("${item.%s}" % field, str(value))
            out[f"{name}@{key}"] = yaml.safe_load(text)
    return out


STAGES = _stages()


def _module_file(dotted: str) -> Path:
    parts = dotted.split(".")[1:]
    if not parts:
        return PACKAGE / "__init__.py"
    rel = Path(*parts)
    path = PACKAGE / rel.with_suffix(".py")
    return path if path.is_file() else PACKAGE / rel / "__init__.py"


def _notebook_imports(notebook: Path) -> list[Path]:
    files = []
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moesae":
                files.append(_module_file(node.module))
                files += [f for a in node.names if (f := _module_file(f"{node.module}.{a.name}")).is_file()]
            elif isinstance(node, ast.Import):
                files += [_module_file(a.name) for a in node.names if a.name.split(".")[0] == "moesae"]
    return [f for f in files if f.is_file()]


def closure(stage: dict) -> set[str]:
    """Repository-relative paths of the package files the stage's command imports."""
    words = stage["cmd"].split()
    assert words[0] == "moesae", stage["cmd"]
    roots = [_module_file(cli.STAGES[words[1]][0])]
    if words[1] == "figure":
        roots += _notebook_imports(REPO / "notebooks" / f"{words[2]}.ipynb")
    files = package_imports(roots)
    return {f.relative_to(REPO).as_posix() for f in files if f != PACKAGE / "__init__.py"}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_declares_the_modules_it_imports(name):
    stage = STAGES[name]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    needed = closure(stage)
    missing = sorted(p for p in needed if not _covered(p, deps))
    assert missing == [], f"{name}: add these to its deps in dvc.yaml"
    # and nothing superfluous: every declared package path holds a module the stage imports
    # (package data such as src/moesae/data and src/moesae/prompts is read, not imported)
    declared_code = [d for d in deps if d.startswith("src/moesae") and not d.startswith(("src/moesae/data", "src/moesae/prompts"))]
    unused = [d for d in declared_code if not any(_covered(p, [d]) for p in needed)]
    assert unused == [], f"{name}: these deps are not imported by its command; drop them"


def _declared_sections(stage: dict) -> set[str]:
    out = set()
    for entry in stage.get("params", []):
        key = entry if isinstance(entry, str) else next(iter(entry))
        out.add(key.split(".")[0])
    return out


@pytest.mark.slow
def test_each_stage_declares_the_params_sections_it_reads(micro_results):
    read = json.loads((micro_results / "params_read.json").read_text())
    by_command = {"subject_model": "subject_model", "corpus": "corpus", "activations": "activations",
                  "collect": "collect", "autointerp": "autointerp", "synthetic": "synthetic"}
    family = next(iter(PARAMS["grid"]["families"]))
    by_command.update({"train": f"train@{family}", "evaluate": f"evaluate@{family}"})
    gaps = {}
    for command, sections in read.items():
        declared = _declared_sections(STAGES[by_command[command]])
        missing = sorted(set(sections) - declared)
        if missing:
            gaps[by_command[command]] = missing
    assert gaps == {}, "add these params sections to the stages in dvc.yaml"


# ---- the real dvc repro on a micro pipeline ---------------------------------------------------------
def _dvc(args: list[str], cwd: Path, env: dict) -> str:
    dvc = Path(sys.executable).parent / "dvc"
    result = subprocess.run([str(dvc), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_dvc_repro_reruns_exactly_what_a_params_edit_affects(tmp_path):
    from moesae.testing import micro_params

    from conftest import MICRO_OVERRIDES

    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    params = micro_params(MICRO_OVERRIDES)
    params["grid"]["families"] = {f: params["grid"]["families"][f] for f in ("switch_n32", "topk_m8th")}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(project / "src"), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    _dvc(["init", "--no-scm", "-q"], project, env)
    _dvc(["config", "core.analytics", "false"], project, env)
    _dvc(["repro", "collect"], project, env)
    assert (project / "results" / "metrics.csv").is_file()
    assert "changed" not in _dvc(["status", "collect", "--with-deps"], project, env)  # up to date

    topk_weights = project / "models" / "topk_m8th" / "topk_m8th_k2" / "sae_weights.safetensors"
    before = topk_weights.stat().st_mtime_ns
    params["grid"]["families"]["switch_n32"]["num_experts"] = 16
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _dvc(["status", "collect", "--with-deps", "--json"], project, env)
    assert sorted(json.loads(status)) == ["collect", "doctor", "evaluate@switch_n32", "train@switch_n32"]
    out = _dvc(["repro", "collect"], project, env)
    assert "Running stage 'train@switch_n32'" in out and "Running stage 'train@topk_m8th'" not in out
    assert "Stage 'train@topk_m8th' didn't change" in out
    assert topk_weights.stat().st_mtime_ns == before
    cfg = json.loads((project / "models" / "switch_n32" / "switch_n32_k2" / "cfg.json").read_text())
    assert cfg["num_experts"] == 16
