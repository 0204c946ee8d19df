"""The train stage retrains a variant exactly when its fingerprint changes: config, recipe or code."""
from __future__ import annotations

import shutil

import pytest

from moesae import grid
from moesae.params import ParamsError, load_params


def test_package_imports_follow_relative_imports_transitively(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "a.py").write_text("from .b import f\nimport os\n")
    (pkg / "sub" / "b.py").write_text("from ..c import g\nfrom .missing import h\n")
    (pkg / "c.py").write_text("x = 1\n")
    (pkg / "sub" / "unrelated.py").write_text("y = 2\n")
    found = grid._package_imports([pkg / "sub" / "a.py"])
    assert found == sorted([pkg / "sub" / "a.py", pkg / "sub" / "b.py", pkg / "c.py"])


def test_code_fingerprint_follows_the_architecture_closure():
    assert grid.code_fingerprint("authors_switch") == grid.code_fingerprint("scale")  # a preset of scale
    assert grid.code_fingerprint("topk") != grid.code_fingerprint("batchtopk")
    assert grid.code_fingerprint("topk") == grid.code_fingerprint("topk")
    with pytest.raises(ParamsError, match="unknown architecture 'nope'"):
        grid.code_fingerprint("nope")


def test_training_fingerprint_covers_config_recipe_and_code(monkeypatch):
    variant = {"family": "topk_m8th", "architecture": "topk", "num_latents": 64, "k": 4, "seed": 0}
    base = grid.training_fingerprint(variant, {"steps": 10})
    assert grid.training_fingerprint(variant, {"steps": 10}) == base
    assert grid.training_fingerprint({**variant, "k": 8}, {"steps": 10}) != base
    assert grid.training_fingerprint(variant, {"steps": 11}) != base
    real = grid.code_fingerprint
    monkeypatch.setattr(grid, "code_fingerprint", lambda arch: real(arch) + "-edited")
    assert grid.training_fingerprint(variant, {"steps": 10}) != base


@pytest.mark.slow
def test_a_code_change_retrains_only_the_architectures_it_affects(micro_results, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(micro_results / "params.yaml", run / "params.yaml")
    shutil.copytree(micro_results / "data" / "activations", run / "data" / "activations")
    shutil.copytree(micro_results / "models", run / "models")
    monkeypatch.chdir(run)
    variants = load_params("params.yaml")["variants"]
    names = sorted(n for n, v in variants.items() if v["architecture"] in ("topk", "switch"))
    switch = {n for n in names if variants[n]["architecture"] == "switch"}
    assert switch and len(switch) < len(names)
    assert grid.train_variants(names, "params.yaml", progress=False) == []  # everything up to date
    real = grid.code_fingerprint
    monkeypatch.setattr(grid, "code_fingerprint", lambda arch: real(arch) + ("-edited" if arch == "switch" else ""))
    assert set(grid.train_variants(names, "params.yaml", progress=False)) == switch
    assert grid.train_variants(names, "params.yaml", progress=False) == []  # and now those are up to date too
