"""Ground-truth benchmark, the stage: its config (every key stated, no presets), its cells (keyed by
parameters, device and the source of its import closure), its outputs, resumption, and the
architecture facts it takes from the registry."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from moesae import synthetic as syn
from moesae.params import ParamsError
from moesae.synthetic import runner
from moesae.training.fingerprint import PACKAGE

REPO = Path(__file__).resolve().parents[1]
DATA = {"d_in": 8, "num_features": 8, "mean_l0": 2.0, "zipf_exponent": 1.0, "magnitude_mean": 1.0,
        "magnitude_std": 0.25, "correlation_rank": 2, "correlation_strength": 0.3, "hierarchy_fraction": 0.1,
        "bias_norm": 1.0}


def section(**over) -> dict:
    """A complete, tiny ``synthetic`` section."""
    base = {
        "data": dict(DATA), "num_latents": 16, "l0": [2], "seeds": [0, 1], "steps": 15, "batch_size": 64,
        "lr": 0.01, "dead_tokens_threshold": 50_000, "eval_tokens": 512, "recovery_threshold": 0.9,
        "redundancy_thresholds": [0.7, 0.8, 0.9], "matching": "auto", "device": "cpu", "workers": 1, "threads": 1,
        "families": {"topk": {"architecture": "topk"},
                     "scale_n4_e2": {"architecture": "scale", "num_experts": 4, "active_experts": 2}},
    }
    return {**base, **over}


# ---- config ------------------------------------------------------------------------------------
def test_config_errors_name_the_key():
    with pytest.raises(ParamsError, match="synthetic"):
        syn.load_config({})
    with pytest.raises(ParamsError, match="synthetic.bogus"):
        syn.load_config({"synthetic": section(bogus=1)})
    with pytest.raises(ParamsError, match="families.t"):
        syn.load_config({"synthetic": section(families={"t": {"num_experts": 4}})})
    with pytest.raises(ParamsError, match="data.seed"):
        syn.load_config({"synthetic": section(data={**DATA, "seed": 1})})
    with pytest.raises(ParamsError, match="'mean_l0'"):
        syn.load_config({"synthetic": section(data={**DATA, "mean_l0": -1})})
    with pytest.raises(ParamsError, match="synthetic.device"):
        syn.load_config({"synthetic": section(device="gpu")})
    with pytest.raises(ParamsError, match="synthetic.matching"):
        syn.load_config({"synthetic": section(matching="best")})


def test_every_key_the_profile_sets_is_required():
    no_default = {f.name for f in dataclasses.fields(syn.SyntheticConfig)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert {f.name for f in dataclasses.fields(syn.SyntheticConfig)} - no_default == {"output_dir"}
    for key in sorted(no_default):
        values = section()
        del values[key]
        with pytest.raises(ParamsError, match=f"'synthetic.{key}' is missing"):
            syn.load_config({"synthetic": values})
    values = section(data={k: v for k, v in DATA.items() if k != "bias_norm"})
    with pytest.raises(ParamsError, match="synthetic.data.bias_norm"):
        syn.load_config({"synthetic": values})


def test_presets_are_gone():
    assert not hasattr(syn, "PRESETS") and not hasattr(runner, "PRESETS")
    with pytest.raises(ParamsError, match="synthetic.preset"):
        syn.load_config({"synthetic": section(preset="paper")})


def test_default_profile_section_is_valid():
    profile = yaml.safe_load((REPO / "profiles" / "default.yaml").read_text())
    cfg = syn.load_config(profile)
    assert cfg.device == "cpu" and len(cfg.seeds) >= 2
    assert cfg.output_dir == str(syn.OUTPUT_DIR)
    assert syn.cells(cfg, 0)  # every family expands at some k


def test_no_architecture_lists_and_no_spec_citations():
    """Architecture knowledge comes from the registry; docstrings cite docs/method.md."""
    assert not hasattr(syn, "MOE_ARCHITECTURES")
    for path in sorted((PACKAGE / "synthetic").glob("*.py")) + [PACKAGE / "figures" / "synthetic_recovery.py"]:
        text = path.read_text()
        assert "hasattr(" not in text, path
        assert "SPEC" not in text, path
        tree = ast.parse(text)
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert not any(s in ("scale", "switch", "authors_switch") for s in strings), path


# ---- cells and their keys ----------------------------------------------------------------------
def test_code_fingerprint_covers_the_import_closure():
    files = {p.relative_to(PACKAGE).as_posix() for p in syn.code_files()}
    assert {"synthetic/runner.py", "synthetic/generator.py", "synthetic/recovery.py", "synthetic/__init__.py",
            "training/trainer.py", "grid.py", "metrics.py", "saes/scale.py", "saes/topk.py"} <= files
    assert not any(f.startswith("figures/") for f in files)  # the figure does not change results
    assert len(syn.code_fingerprint()) == 16


def test_cell_key_changes_with_code_parameters_and_device(monkeypatch):
    cfg = syn.load_config({"synthetic": section()})
    name, variant = next(iter(syn.cells(cfg, 0).items()))
    assert name == "scale_n4_e2_k2" or name == "topk_k2"
    key = syn.cell_key(cfg, variant, 0, "cpu")
    assert key == syn.cell_key(cfg, variant, 0, torch.device("cpu"))
    assert key != syn.cell_key(cfg, variant, 1, "cpu")
    assert key != syn.cell_key(cfg, variant, 0, "cuda")
    assert key != syn.cell_key(syn.load_config({"synthetic": section(steps=16)}), variant, 0, "cpu")
    monkeypatch.setattr(runner, "code_fingerprint", lambda: "0" * 16)
    assert key != syn.cell_key(cfg, variant, 0, "cpu")


def test_family_facts_come_from_the_registry():
    cfg = syn.load_config({"synthetic": section(families={
        "topk": {"architecture": "topk"},
        "topk_quarter": {"architecture": "topk", "width_fraction": 0.25},
        "switch_n4": {"architecture": "switch", "num_experts": 4},
        "authors_switch_n4": {"architecture": "authors_switch", "num_experts": 4},
        "scale_n4_e1": {"architecture": "scale", "num_experts": 4, "active_experts": 1},
        "gated": {"architecture": "gated"},
    })})
    facts = syn.family_facts(syn.cells(cfg, 0), 8)
    assert {f for f, v in facts.items() if v["is_moe"]} == {"switch_n4", "authors_switch_n4", "scale_n4_e1"}
    assert facts["scale_n4_e1"]["label"] == "Scale (4,1)"
    assert facts["authors_switch_n4"]["base_architecture"] == "scale"
    assert {f: v["active_width"] for f, v in facts.items()} == {
        "topk": 16, "topk_quarter": 4, "switch_n4": 4, "authors_switch_n4": 4, "scale_n4_e1": 4, "gated": 16}
    df = pd.DataFrame([{"family": f, "active_width": v["active_width"]} for f, v in facts.items()])
    pairs = {(p["family"], p["baseline"]) for p in syn.compute_matched_pairs(df, facts)}
    assert pairs == {("switch_n4", "topk_quarter"), ("authors_switch_n4", "topk_quarter"),
                     ("scale_n4_e1", "topk_quarter")}  # MoE beside dense only, never MoE beside MoE


# ---- the stage ---------------------------------------------------------------------------------
def _tiny_params(tmp_path, **over):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"synthetic": section(output_dir=str(tmp_path / "out"), **over)}))
    return path


def test_stage_writes_outputs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # timing files land here
    params = _tiny_params(tmp_path)
    assert syn.main(["--params", str(params), "--no-progress"]) == 0
    out = tmp_path / "out"
    df = pd.read_csv(out / syn.METRICS_FILE)
    assert len(df) == 4 and set(df["family"]) == {"topk", "scale_n4_e2"}
    for column in ["family", "architecture", "k", "seed", "active_width", "flops_per_token", "matched_cosine",
                   "mmcs_learned_to_true", "mmcs_true_to_learned", "fraction_recovered", "precision", "recall",
                   "f1", "redundancy_0.9", "dead_fraction", "l0", "fvu"]:
        assert column in df.columns, column
    assert df["matched_cosine"].between(0, 1).all()
    scale = df[df["family"] == "scale_n4_e2"]
    assert set(scale["active_width"]) == {8} and set(scale["active_experts"]) == {2}  # e·M/N = 2·16/4
    assert df.loc[df["family"] == "topk", "active_experts"].isna().all()
    summary = json.loads((out / syn.SUMMARY_FILE).read_text())
    assert summary["best_family"] in {"topk", "scale_n4_e2"}
    assert {r["family"] for r in summary["ranking"]} == {"topk", "scale_n4_e2"}
    assert "16" in summary["chance"] and 0 < summary["chance"]["16"]["matched_cosine"] < 1
    assert summary["families"]["scale_n4_e2"] == {"architecture": "scale", "base_architecture": "scale",
                                                  "label": "Scale (4,2)", "is_moe": True, "active_width": 8}
    assert "preset" not in summary["config"]
    assert not list(out.rglob("*.tmp*"))
    assert (out / syn.METRICS_FILE).stat().st_mode & 0o777 == 0o644
    assert len(list((out / syn.CELLS_DIR).glob("*.json"))) == 4

    # a second run reuses every finished cell: no training at all
    def no_training(*args, **kwargs):
        raise AssertionError("finished cells must not be retrained")

    monkeypatch.setattr(runner, "train_saes", no_training)
    assert syn.main(["--params", str(params), "--no-progress"]) == 0
    again = pd.read_csv(out / syn.METRICS_FILE)
    pd.testing.assert_frame_equal(df, again)
    assert (tmp_path / "results" / "timings" / "synthetic.json").is_file()

    # a changed parameter invalidates the cells it touches (here: all of them)
    _tiny_params(tmp_path, steps=16)
    with pytest.raises(AssertionError, match="must not be retrained"):
        syn.main(["--params", str(params), "--no-progress"])

    # and so does a change of the code (the fingerprint of the import closure)
    _tiny_params(tmp_path)
    monkeypatch.setattr(runner, "code_fingerprint", lambda: "f" * 16)
    with pytest.raises(AssertionError, match="must not be retrained"):
        syn.main(["--params", str(params), "--no-progress"])


def test_worker_processes_change_no_result(tmp_path, monkeypatch):
    """``workers`` splits a seed's SAEs among processes: the same rows as one process."""
    monkeypatch.chdir(tmp_path)
    frames = []
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        params = _tiny_params(folder, workers=workers)
        assert syn.main(["--params", str(params), "--no-progress"]) == 0
        frames.append(pd.read_csv(folder / "out" / syn.METRICS_FILE).drop(columns=["train_seconds"], errors="ignore"))
    pd.testing.assert_frame_equal(frames[0], frames[1])


def test_cli_maps_synthetic_to_the_package_main():
    import importlib

    from moesae import cli

    module = importlib.import_module(cli.STAGES["synthetic"][0])
    assert module.main is runner.main
