"""Shared fixtures. ``micro_results``: a whole micro run of the real pipeline, once per session.

The micro run uses the same stage entry points as ``dvc repro`` (corpus → subject model →
activations → train every grid variant → evaluate → collect → autointerp → synthetic) on a tiny
profile, in a temporary folder laid out like the repository root after ``dvc repro``. Notebook
and report tests execute against it, so every figure is drawn from numbers a real run produced.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]

# The grid's structure at toy size: every family of the default profile, two L0 values.
MICRO_OVERRIDES = {
    "grid": {"num_latents": 512, "l0": [2, 8]},
    "train": {"steps": 40, "batch_size": 256, "checkpoint_every": 0, "log_every": 10,
              "dead_tokens_threshold": 5000},
    "evaluate": {"batch_tokens": 1024, "max_tokens": 2048, "loss_batches": 4, "loss_batch_sequences": 4,
                 "redundancy_subsets": 2, "max_probe_words": 24},
    "autointerp": {"num_features": 8, "min_activations": 2, "bootstrap_samples": 50, "target_l0": 8},
}
MICRO_SYNTHETIC = {
    "data": {"d_in": 8, "num_features": 16, "mean_l0": 2.0},
    "num_latents": 32, "l0": [2], "seeds": [0, 1], "steps": 40, "batch_size": 64, "eval_tokens": 512,
}


def run_micro_pipeline(workdir: Path) -> Path:
    """Run every non-notebook stage on the micro profile inside ``workdir``; returns ``workdir``."""
    import yaml

    from moesae import autointerp, collect, evaluate, synthetic
    from moesae.grid import study_variants
    from moesae.params import accessed_sections
    from moesae.testing import micro_params
    from moesae.training.stage import train_variants

    params = micro_params(MICRO_OVERRIDES)
    synth = dict(params.get("synthetic", {}))
    synth.update({k: v for k, v in MICRO_SYNTHETIC.items() if k != "data"})
    synth["data"] = {**synth.get("data", {}), **MICRO_SYNTHETIC["data"]}
    synth["families"] = {name: fam for name, fam in synth.get("families", {}).items()
                         if fam["architecture"] in {"topk", "scale", "switch"}}
    params["synthetic"] = synth
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    variants = study_variants(params)
    cwd = os.getcwd()
    read: dict[str, list[str]] = {}  # params sections each stage read (checked against dvc.yaml)

    def stage(name, fn, *args, **kwargs):
        accessed_sections(reset=True)
        out = fn(*args, **kwargs)
        read[name] = sorted(accessed_sections(reset=True))
        return out

    try:
        os.chdir(workdir)
        _run_data_stages(stage)
        stage("train", train_variants, sorted(variants), "params.yaml", progress=False)  # one pass feeds them all
        for name in sorted(variants):
            stage("evaluate", evaluate.run_evaluation, name, "params.yaml", "results")
        stage("collect", collect.collect, "results", "params.yaml")
        stage("autointerp", autointerp.run_stage, "params.yaml", progress=False)
        stage("synthetic", synthetic.main, ["--params", "params.yaml", "--no-progress"])
    finally:
        os.chdir(cwd)
    (workdir / "params_read.json").write_text(json.dumps(read, indent=1))
    return workdir


def _run_data_stages(stage) -> None:
    """The data stages on the params.yaml in the current folder (the entry points dvc calls)."""
    from moesae import activations, corpus, subject_model

    stage("corpus", corpus.main, ["--params", "params.yaml"])
    stage("subject_model", subject_model.main, ["--params", "params.yaml", "--no-progress"])
    stage("activations", activations.main, ["--params", "params.yaml", "--no-progress"])


@pytest.fixture(scope="session")
def micro_results(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("micro_run")
    shutil.copytree(REPO / "notebooks", workdir / "notebooks")
    return run_micro_pipeline(workdir)
