"""``moesae doctor``: offline it fails within seconds listing every missing model and dataset with
its fix; online checks (gated access, script-based datasets, models to download) against a fake
Hub, cut by the deadline when the Hub hangs; the disk plan of the paper profile; GPU memory and
run-time estimates from benchmark numbers; offline mode from the profile or the environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moesae import doctor
from moesae.profiles import deep_merge, resolve_profile
from moesae.testing import micro_params

REPO = Path(__file__).resolve().parents[1]
PAPER_DATASETS = ("Skylion007/openwebtext", "cais/hle", "Geralt-Targaryen/openwebtext2")
# The paper-profile edit proposed with issue #15 (a no-op once profiles/paper.yaml has it).
PAPER_EDIT = {"offline": False,
              "activations": {"max_disk_gb": 33, "context_length_by_split": {"autointerp": 256},
                              "max_tokens": {"cross": 1048576}}}


def _paper() -> dict:
    return deep_merge(resolve_profile("paper"), PAPER_EDIT)


@pytest.fixture
def online(monkeypatch, tmp_path):
    """No offline variable set, an empty HF cache, and no token."""
    for var in doctor.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)


# ---- offline: every missing model and dataset, at once, with its fix ------------------------------
def test_offline_paper_profile_fails_within_seconds_listing_every_missing(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_paper(), sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf"), "PYTHONPATH": str(REPO / "src")}
    env.pop("HF_HUB_CACHE", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moesae.cli", "doctor", "--params", "params.yaml",
                           "--bench-dir", str(REPO / "benchmarks" / "results")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert seconds < 30, f"the offline preflight took {seconds:.1f} s"
    out = proc.stdout
    lines = out.splitlines()
    for name in ("model gpt2",) + tuple(f"dataset {d}" for d in PAPER_DATASETS):
        at = next(i for i, line in enumerate(lines) if "PROBLEM" in line and name in line)
        assert "offline mode is on (HF_HUB_OFFLINE=1 in the environment)" in lines[at]
        assert lines[at + 1].strip().startswith("fix:") and "hf download" in lines[at + 1]
    assert "--revision refs/convert/parquet" in out  # the script-based OpenWebText: its parquet conversion
    assert "problems: the run would stop" in out
    assert not (tmp_path / "results" / "doctor.ok").exists()
    report = json.loads((tmp_path / "results" / "doctor.json").read_text())
    assert report["problems"] == 4 and report["offline"] is True


def test_the_profile_key_makes_it_offline_and_the_environment_wins(monkeypatch):
    for var in doctor.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert doctor.offline_mode({"offline": True}) == (True, "the profile's `offline: true`")
    assert doctor.offline_mode({"offline": False})[0] is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert doctor.offline_mode({"offline": True}) == (False, "HF_HUB_OFFLINE=0 in the environment")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert doctor.offline_mode({"offline": False})[0] is True
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert doctor.apply_offline({"offline": True}) and os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_default_profile_passes_and_writes_the_stamp(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**micro_params(), "offline": True}))
    assert doctor.main(["--params", "params.yaml", "--bench-dir", str(REPO / "benchmarks" / "results")]) == 0
    out = capsys.readouterr().out
    assert "no problems" in out and "planned disk use" in out
    assert (tmp_path / "results" / "doctor.ok").read_text() == doctor.STAMP_TEXT
    report = json.loads((tmp_path / "results" / "doctor.json").read_text())
    assert report["problems"] == 0 and report["offline"] is True


# ---- online, against a fake Hub ---------------------------------------------------------------------
class FakeInfo:
    def __init__(self, gated=False, files=("data/train-00000.parquet",)):
        self.gated = gated
        self.siblings = [type("S", (), {"rfilename": f})() for f in files]


def _fake_hub(monkeypatch, *, token=None, access=True, delay=0.0):
    from huggingface_hub import HfApi

    infos = {"Skylion007/openwebtext": FakeInfo(files=("openwebtext.py", "README.md")),
             "cais/hle": FakeInfo(gated="auto"), "Geralt-Targaryen/openwebtext2": FakeInfo()}

    def dataset_info(self, repo_id, *, timeout=None, **kw):
        time.sleep(delay)
        return infos[repo_id]

    class GatedRepoError(Exception):  # stands in for huggingface_hub's (its constructor wants a response)
        pass

    def auth_check(self, repo_id, **kw):
        if not access:
            raise GatedRepoError(f"Access to dataset {repo_id} is restricted")

    refs = type("Refs", (), {"converts": [type("R", (), {"name": "parquet"})()]})()
    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, timeout=None, **kw: object())
    monkeypatch.setattr(HfApi, "auth_check", auth_check)
    monkeypatch.setattr(HfApi, "list_repo_refs", lambda self, repo_id, **kw: refs)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: token)


def _by_what(report):
    return {c.what: c for c in report.checks}


def test_online_gated_dataset_without_a_token_names_the_page_and_hf_token(online, monkeypatch):
    _fake_hub(monkeypatch, token=None)
    report = doctor.run_doctor(_paper(), timeout=5)
    checks = _by_what(report)
    hle = checks["dataset cais/hle (cross)"]
    assert hle.status == "problem" and "no HF token" in hle.message
    assert "https://huggingface.co/datasets/cais/hle" in hle.fix and "HF_TOKEN" in hle.fix
    owt = checks["dataset Skylion007/openwebtext (train)"]
    assert owt.status == "ok" and "parquet conversion" in owt.message
    assert checks["dataset Geralt-Targaryen/openwebtext2 (autointerp)"].status == "ok"
    model = checks["model gpt2"]
    assert model.status == "note" and "moesae doctor --download" in model.fix


def test_online_gated_dataset_whose_terms_are_not_accepted(online, monkeypatch):
    _fake_hub(monkeypatch, token="hf_x", access=False)
    report = doctor.run_doctor(_paper(), timeout=5, download=True)
    hle = _by_what(report)["dataset cais/hle (cross)"]
    assert hle.status == "problem" and "cannot read yet" in hle.message and "accept the terms" in hle.fix
    assert report.downloads == ["gpt2"]  # found on the Hub, scheduled for download


def test_online_everything_reachable_passes(online, monkeypatch):
    _fake_hub(monkeypatch, token="hf_x", access=True)
    report = doctor.run_doctor(_paper(), timeout=5, download=True)
    problems = [c for c in report.problems if c.what not in {"disk"}]
    assert problems == [], problems
    assert "your token has access" in _by_what(report)["dataset cais/hle (cross)"].message


def test_a_hanging_hub_is_cut_by_the_deadline(online, monkeypatch):
    _fake_hub(monkeypatch, token="hf_x", delay=60)
    t0 = time.perf_counter()
    report = doctor.run_doctor(_paper(), timeout=1.0)
    assert time.perf_counter() - t0 < 10
    stuck = [c for c in report.problems if "did not answer" in c.message]
    assert {c.what for c in stuck} == {f"dataset {d} ({r})" for d, r in zip(PAPER_DATASETS, ("train", "cross", "autointerp"))}


def test_an_already_built_corpus_needs_no_dataset(tmp_path, monkeypatch):
    from dataclasses import asdict

    from moesae.corpus import CorpusConfig
    from moesae.params import section_to

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = _paper()
    params["paths"] = {**params["paths"], "corpus": str(tmp_path / "corpus")}
    (tmp_path / "corpus").mkdir()
    cfg = section_to(CorpusConfig, params["corpus"], "corpus")
    (tmp_path / "corpus" / "manifest.json").write_text(json.dumps({"config": asdict(cfg), "splits": {}}))
    report = doctor.run_doctor(params, timeout=1)
    assert not [c for c in report.checks if c.what.startswith("dataset ")]
    assert _by_what(report)["datasets"].status == "ok"


# ---- disk --------------------------------------------------------------------------------------------
def test_paper_profile_plans_at_most_60_gb(monkeypatch):
    plan = doctor.plan_disk(_paper(), 768, doctor._param_counts(_paper(), 768))
    assert plan["total_bytes"] <= 60e9
    budget = plan["budget"]
    assert budget["capped"] and plan["cache_tokens"]["train"] == budget["train_max_tokens"] < 81_920_000
    assert sum(plan["cache_bytes"].values()) <= 33e9
    assert plan["epochs"] == pytest.approx(81_920_000 / plan["cache_tokens"]["train"])
    assert plan["items"]["SAE weights"] == pytest.approx(21.0e9, rel=0.01)  # 151 SAEs, mostly 37.7M parameters
    text = doctor.format_report(doctor.Report("paper", False, "", disk=plan))
    assert "planned disk use" in text and "capped by the budget" in text and "epochs" in text


def test_not_enough_free_disk_is_a_problem_with_the_budget_key(monkeypatch):
    plan = doctor.plan_disk(_paper(), 768, {})
    plan["free_bytes"] = 10 * 10**9
    report = doctor.Report("paper", False, "")
    doctor.check_disk(report, plan)
    assert report.problems and "activations.max_disk_gb" in report.problems[0].fix


# ---- GPU and run time ------------------------------------------------------------------------------------
def test_gpu_memory_of_the_largest_family():
    sizes = {"a_k1": {"family": "a", "params": 1000, "num_latents": 64},
             "a_k2": {"family": "a", "params": 1000, "num_latents": 64},
             "b_k1": {"family": "b", "params": 10, "num_latents": 8}}
    out = doctor.family_gpu_bytes(sizes, batch_size=2, d_model=4)
    assert out["a"] == 2 * 1000 * 16 + 2 * (3 * 64 + 16) * 4 and out["b"] < out["a"]


def test_a_stage_asking_for_cuda_without_a_gpu_is_a_problem(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = micro_params({"evaluate": {"device": "cuda"}})
    report = doctor.Report("x", True, "")
    doctor.check_gpu(report, params, {}, 32)
    assert report.problems and "evaluate.device" in report.problems[0].message


def _bench(tmp_path, device_type="cuda"):
    cases = [
        {"name": "topk-2048", "architecture": "topk", "implementation": "fast", "tokens_per_s": 1e6,
         "flops_per_token": 2048 * 64 * 2, "config": {"num_latents": 2048, "d_in": 64, "k": 32}},
        {"name": "scale-16-2", "architecture": "scale", "implementation": "fast", "tokens_per_s": 4e6,
         "flops_per_token": 30000, "config": {"num_latents": 2048, "d_in": 64, "k": 32, "num_experts": 16,
                                             "active_experts": 2}},
        {"name": "scale-16-2", "architecture": "scale", "implementation": "naive", "tokens_per_s": 1.0,
         "flops_per_token": 1, "config": {"num_latents": 2048, "d_in": 64, "k": 32, "num_experts": 16,
                                         "active_experts": 2}},
    ]
    data = {"device_type": device_type, "batch_size": 1024, "cases": cases,
            "pipeline": {"d_model": 64, "activations_tokens_per_s": 1e5, "evaluate_seconds_per_variant": 2.0,
                         "evaluate_max_tokens": 32768}}
    (tmp_path / f"{device_type}.json").write_text(json.dumps(data))
    return tmp_path


def test_run_time_estimates_from_benchmark_numbers(tmp_path):
    params = micro_params({"train": {"steps": 100, "batch_size": 1024, "device": "cuda"}})
    params["grid"] = {"num_latents": 2048, "l0": [8, 32], "seeds": [0], "families": {
        "scale_n16_e2": {"architecture": "scale", "num_experts": 16, "active_experts": 2, "feature_scaling": "mean"},
        "relu": {"architecture": "relu", "calibration_steps": 10}}}
    sizes = doctor._param_counts(params, 64)
    plan = doctor.plan_disk(params, 64, sizes)
    times = {t["stage"]: t for t in doctor.estimate_times(params, sizes, plan, doctor.load_benchmarks(_bench(tmp_path)), True)}
    scale = times["train@scale_n16_e2"]
    assert scale["seconds"] == pytest.approx(2 * 100 * 1024 / 4e6) and "scale-16-2" in scale["basis"]
    relu = times["train@relu"]
    assert relu["seconds"] > 0 and "≈ topk-2048 × FLOPs" in relu["basis"]  # no relu case: scaled from TopK
    assert times["activations"]["seconds"] == pytest.approx(sum(plan["cache_tokens"].values()) / 1e5)
    assert times["evaluate (all families)"]["seconds"] > 0
    # Training without a device setting runs on the CPU: no CPU numbers here, so no estimate.
    params["train"].pop("device")
    cpu = {t["stage"]: t for t in doctor.estimate_times(params, sizes, plan, doctor.load_benchmarks(tmp_path), True)}
    assert cpu["train@relu"]["seconds"] is None and "make benchmark" in cpu["train@relu"]["basis"]
