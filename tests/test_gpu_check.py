"""``make gpu-check`` (benchmarks/gpu_check.py): its CPU-runnable parts. The whole check at toy size
on the CPU (throughput through benchmarks/throughput.py in bf16 and fp32, then the paper profile's
stages end to end on a random GPT-2-shaped model and generated local datasets), the paper-size
settings it would run on a GPU, and the message without one."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(args, tmp_path, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cpu_tiny_runs_every_part(tmp_path):
    out = tmp_path / "cpu_tiny.json"
    t0 = time.perf_counter()
    proc = _run(["--device", "cpu", "--tiny", "--out", str(out), "--workdir", str(tmp_path / "work")], tmp_path)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert seconds < 90, f"took {seconds:.0f} s"
    result = json.loads(out.read_text())
    # 1. throughput: every case of benchmarks/throughput.py, bf16 at the top level and fp32 beside it
    names = {(c["name"], c["implementation"]) for c in result["cases"]}
    assert {("topk-1024", "fast"), ("topk-128", "fast"), ("topk-32", "fast"), ("switch-32", "fast"),
            ("scale-16-2", "fast"), ("scale-32-4", "fast"), ("scale-64-8", "fast")} <= names
    assert result["autocast"] == "bfloat16" and result["fp32"]["autocast"] == "off"
    assert len(result["fp32"]["cases"]) == len(result["cases"])
    # 2. the pipeline through the stage code
    pipeline = result["pipeline"]
    stages = set(pipeline["stage_seconds"])
    assert {"doctor", "corpus", "subject_model", "activations"} <= stages
    assert {f"train@{f}" for f in ("scale_n16_e2", "switch_n32", "topk_m8th", "jumprelu")} <= stages
    assert len(pipeline["checks"]) == 4 and pipeline["activations_tokens_per_s"] > 0
    assert all(r["mse_heldout"] is not None for r in pipeline["results"].values())
    # 3. the targets are printed (the GPU ones apply to CUDA at paper size only)
    assert result["gpu_check"]["failure"] is None and result["gpu_check"]["targets"]
    assert "target [tiny] Scale (16,2) >= 3x dense TopK-M" in proc.stdout
    assert "disk budget" in proc.stdout and "local parquet conversion" in proc.stdout
    assert json.loads((tmp_path / "work" / "run" / "results" / "doctor.json").read_text())["problems"] == 0


def test_paper_size_settings_are_valid_and_capped(gpu_check, tmp_path):
    """What the GPU run would execute: the paper profile at reduced token counts, validated by each
    stage's config class, with the disk budget capping the train split below what is requested."""
    from moesae.activations import ActivationsConfig, disk_bytes
    from moesae.corpus import CorpusConfig
    from moesae.evaluate import EvaluateConfig
    from moesae.grid import study_variants
    from moesae.params import section_to
    from moesae.subject_model import SubjectModelConfig

    size = gpu_check.PAPER
    params = gpu_check.pipeline_params(size, {"train": tmp_path / "owt", "cross": tmp_path / "hle",
                                               "autointerp": tmp_path / "owt2"}, tmp_path / "model")
    for cls, section in ((CorpusConfig, "corpus"), (SubjectModelConfig, "subject_model"),
                         (ActivationsConfig, "activations"), (EvaluateConfig, "evaluate")):
        section_to(cls, params[section], section)
    assert params["profile"] == "paper" and params["subject_model"]["source"] == "pretrained"
    assert params["activations"]["dtype"] == "bfloat16" and params["grid"]["num_latents"] == 24576
    assert sorted(v["family"] for v in study_variants(params).values()) == sorted(gpu_check.FAMILIES)
    acts = section_to(ActivationsConfig, params["activations"], "activations")
    assert acts.context_for("autointerp") == 256
    room = acts.max_disk_gb * 1e9 / disk_bytes(1, 768, "bfloat16")
    assert size.train_cap < room - size.heldout_tokens - size.autointerp_tokens < size.train_tokens
    assert size.steps * size.batch_size > 2 * size.train_cap  # training cycles over the capped split


def test_without_a_gpu_it_says_what_to_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = _run(["--device", "cuda", "--skip-pipeline"], tmp_path, timeout=120)
    assert proc.returncode == 2 and "--device cpu --tiny" in proc.stderr
