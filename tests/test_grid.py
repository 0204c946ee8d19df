"""The grid is defined once (params['grid']); the train stage retrains a variant exactly when its
fingerprint changes: config, recipe or code."""
from __future__ import annotations

import shutil

import pytest
import yaml

from moesae import grid
from moesae.params import ParamsError, load_params
from moesae.training import fingerprint, stage


def test_package_imports_follow_relative_and_absolute_imports_transitively(tmp_path, monkeypatch):
    pkg = tmp_path / "moesae"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def __getattr__(n):\n    from . import lazy\n")
    (pkg / "lazy.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import registered\n")
    (pkg / "sub" / "registered.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from .b import f\nimport os\n")
    (pkg / "sub" / "b.py").write_text("from ..c import g\nfrom .missing import h\n\ndef later():\n    import moesae.d\n")
    (pkg / "c.py").write_text("x = 1\n")
    (pkg / "d.py").write_text("from . import c\n")
    (pkg / "sub" / "unrelated.py").write_text("y = 2\n")
    monkeypatch.setattr(fingerprint, "PACKAGE", pkg)
    explicit = fingerprint.package_imports([pkg / "sub" / "a.py"], with_package_inits=False)
    assert explicit == sorted([pkg / "sub" / "a.py", pkg / "sub" / "b.py", pkg / "c.py", pkg / "d.py"])
    # As Python runs it: a subpackage's __init__ (and what it registers) comes with its modules;
    # the lazy root __init__ is not followed.
    found = fingerprint.package_imports([pkg / "sub" / "a.py"])
    assert found == sorted(explicit + [pkg / "sub" / "__init__.py", pkg / "sub" / "registered.py"])


def test_code_fingerprint_follows_the_architecture_closure():
    assert fingerprint.code_fingerprint("authors_switch") == fingerprint.code_fingerprint("scale")  # a preset
    assert fingerprint.code_fingerprint("topk") != fingerprint.code_fingerprint("batchtopk")
    assert fingerprint.code_fingerprint("topk") == fingerprint.code_fingerprint("topk")
    with pytest.raises(ParamsError, match="unknown architecture 'nope'"):
        fingerprint.code_fingerprint("nope")


def test_training_fingerprint_covers_config_recipe_and_code(monkeypatch):
    variant = {"family": "topk_m8th", "architecture": "topk", "num_latents": 64, "k": 4, "seed": 0}
    base = fingerprint.training_fingerprint(variant, {"steps": 10})
    assert fingerprint.training_fingerprint(variant, {"steps": 10}) == base
    assert fingerprint.training_fingerprint({**variant, "k": 8}, {"steps": 10}) != base
    assert fingerprint.training_fingerprint(variant, {"steps": 11}) != base
    real = fingerprint.code_fingerprint
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda arch: real(arch) + "-edited")
    assert fingerprint.training_fingerprint(variant, {"steps": 10}) != base


def _spec(**families):
    return grid.GridSpec(num_latents=64, l0=[2, 8, 32], families=families, seeds=[0, 1])


def test_grid_expansion_names_widths_and_skips():
    skipped: list[str] = []
    variants = grid.expand_grid(_spec(
        topk_quarter={"architecture": "topk", "width_fraction": 0.25},
        switch={"architecture": "switch", "num_experts": 8, "train": {"steps": 7}},
        ext={"architecture": "scale", "num_experts": 4, "l0": [8]},
        one_seed={"architecture": "topk", "seeds": [3]},
        full={"architecture": "topk"},
    ), skipped)
    assert "full_k32" in variants
    assert sorted(n for n in variants if n.startswith("one_seed")) == ["one_seed_k2_s3", "one_seed_k32_s3", "one_seed_k8_s3"]
    assert variants["topk_quarter_k8_s1"] == {"family": "topk_quarter", "architecture": "topk", "num_latents": 16,
                                               "k": 8, "seed": 1}
    assert variants["switch_k2"]["train"] == {"steps": 7}
    assert sorted(n for n in variants if n.startswith("ext")) == ["ext_k8", "ext_k8_s1"]
    # k = 32 exceeds what a 16-wide TopK and an 8-wide Switch expert can keep: skipped, and said so
    assert "topk_quarter_k32" not in variants and "switch_k32" not in variants
    assert skipped == ["topk_quarter at k=32 (its largest k is 16)", "switch at k=32 (its largest k is 8)"]


def test_an_l0_no_family_can_keep_is_an_error():
    with pytest.raises(ParamsError, match=r"grid.l0 value\(s\) \[5000\]"):
        grid.expand_grid(grid.GridSpec(num_latents=64, l0=[2, 5000], families={"t": {"architecture": "topk"}}))


def test_bad_family_values_name_the_family():
    with pytest.raises(ParamsError, match="family 'sw'.*num_experts"):
        grid.expand_grid(_spec(sw={"architecture": "switch", "num_experts": 5}))
    with pytest.raises(ParamsError, match="family 'x'.*unknown architecture 'nope'"):
        grid.expand_grid(_spec(x={"architecture": "nope"}))
    with pytest.raises(ParamsError, match="width_fraction"):
        grid.expand_grid(_spec(t={"architecture": "topk", "width_fraction": 2}))
    with pytest.raises(ParamsError, match="no variants of grid family 'missing'"):
        grid.family_variants({"grid": {"num_latents": 64, "l0": [2], "families": {"t": {"architecture": "topk"}}}},
                             "missing")


def test_the_committed_params_are_the_default_profile_and_hold_no_expanded_copy():
    from moesae.profiles import resolve_profile

    params = load_params("params.yaml")
    assert "variants" not in params
    assert {k: v for k, v in params.items()} == resolve_profile("default")
    assert len(grid.study_variants(params)) > 20


@pytest.mark.slow
def test_a_code_change_retrains_only_the_architectures_it_affects(micro_results, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(micro_results / "params.yaml", run / "params.yaml")
    shutil.copytree(micro_results / "data" / "activations", run / "data" / "activations")
    shutil.copytree(micro_results / "models", run / "models")
    monkeypatch.chdir(run)
    variants = grid.study_variants(load_params("params.yaml"))
    names = sorted(n for n, v in variants.items() if v["architecture"] in ("topk", "switch"))
    switch = {n for n in names if variants[n]["architecture"] == "switch"}
    assert switch and len(switch) < len(names)
    assert stage.train_variants(names, "params.yaml", progress=False) == []  # everything up to date
    real = fingerprint.code_fingerprint
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda arch: real(arch) + ("-edited" if arch == "switch" else ""))
    assert set(stage.train_variants(names, "params.yaml", progress=False)) == switch
    assert stage.train_variants(names, "params.yaml", progress=False) == []  # and now those are up to date too


@pytest.mark.slow
def test_a_params_edit_of_one_family_retrains_only_its_variants(micro_results, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    params = yaml.safe_load((micro_results / "params.yaml").read_text())
    shutil.copytree(micro_results / "data" / "activations", run / "data" / "activations")
    shutil.copytree(micro_results / "models", run / "models")
    monkeypatch.chdir(run)
    params["grid"]["families"]["switch_n32"]["num_experts"] = 16
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    variants = grid.study_variants(params)
    names = sorted(n for n, v in variants.items() if v["family"] in ("switch_n32", "switch_n32_shared", "topk_m8th"))
    expected = {n for n in names if variants[n]["family"] == "switch_n32"}
    assert set(stage.train_variants(names, "params.yaml", progress=False)) == expected


def test_train_device_is_validated_and_enters_the_fingerprint_as_its_type():
    settings = stage.stage_settings({"batch_size": 8, "data_seed": 0, "device": "auto"})
    assert settings["device"] == "auto"
    with pytest.raises(ParamsError, match="train.device"):
        stage.stage_settings({"batch_size": 8, "data_seed": 0, "device": "gpu"})
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert stage.fingerprint_recipe({"steps": 3, "device": "auto"}) == {"steps": 3, "device": expected}
    assert stage.fingerprint_recipe({"steps": 3, "workers": 4}) == {"steps": 3}  # where it trains is not what it is
