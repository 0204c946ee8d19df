"""The ``moesae autointerp`` stage: on stand-ins for the activation cache and the subject model,
and (slow) on a real cache and tokenizer."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from moesae import autointerp as ai
from moesae import build_sae
from moesae.params import ParamsError
from test_autointerp_support import stage_workdir


def test_stage_writes_scores_csv(tmp_path, monkeypatch):
    variants = stage_workdir(tmp_path, monkeypatch)
    assert ai.main(["--no-progress"]) == 0
    scores = pd.read_csv(tmp_path / "results/autointerp/scores.csv", keep_default_na=False, na_values=[""])
    assert list(scores.columns) == ai.SCORE_COLUMNS
    assert len(scores) == 2 * 2 * 11  # variants × scorers × quantiles
    assert set(scores.family) == {"topk_m8th", "switch_n32"}
    assert scores.accuracy.between(0, 1).all() and (scores.n > 0).all()
    assert "not" in set(scores["quantile"])
    lines = (tmp_path / "results/autointerp/explanations.jsonl").read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[0])["explanation"]
    assert json.loads((tmp_path / "results/timings/autointerp.json").read_text())["stage"] == "autointerp"
    table = ai.fig3d_table(scores)
    assert list(table.columns) == ai.QUANTILES and set(table.index) == set(variants)


def test_stage_variant_option_and_unknown_variant(tmp_path, monkeypatch):
    stage_workdir(tmp_path, monkeypatch)
    assert ai.main(["--no-progress", "--variant", "switch_n32_k4"]) == 0
    scores = pd.read_csv(tmp_path / "results/autointerp/scores.csv")
    assert set(scores.variant) == {"switch_n32_k4"}
    with pytest.raises(ParamsError, match="no variant named 'nope'"):
        ai.main(["--no-progress", "--variant", "nope"])


@pytest.mark.slow
def test_stage_on_a_real_activation_cache_and_tokenizer(tmp_path, monkeypatch):
    """The real ActivationReader (token ids / doc index / position arrays) and a real, tiny
    subject model's token strings; random SAEs."""
    from moesae import activations, subject_model
    from moesae.testing import SAMPLE_TEXTS, tiny_subject_model

    sm = tiny_subject_model(context_length=32)
    texts = [f"{t} # note {i}\n" for i in range(30) for t in SAMPLE_TEXTS]
    acfg = activations.ActivationsConfig(context_length=32, max_tokens={"heldout": None}, device="cpu", shard_tokens=1024)
    activations.cache_split(sm, texts, tmp_path / "data/activations/heldout", acfg, "heldout", progress=False)
    monkeypatch.setattr(subject_model, "load_subject_model", lambda path, device="cpu": sm)
    monkeypatch.chdir(tmp_path)
    name = "scale_n16_e2_k8"
    build_sae("scale", d_in=sm.d_model, num_latents=64, k=8, num_experts=4, active_experts=2, seed=0).save(
        tmp_path / "models" / "scale_n16_e2" / name)
    params = {
        "paths": {"activations": "data/activations", "subject_model": "models/subject"},
        "autointerp": {"num_features": 6, "min_activations": 5, "chunk_length": 8, "window_before": 4,
                       "window_after": 1, "explainer_examples": 5, "examples_per_decile": 1, "bootstrap_samples": 50},
        "grid": {"num_latents": 64, "l0": [8], "families": {
            "scale_n16_e2": {"architecture": "scale", "num_experts": 4, "active_experts": 2}}},
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    assert ai.main(["--no-progress"]) == 0
    scores = pd.read_csv("results/autointerp/scores.csv", keep_default_na=False, na_values=[""])
    assert len(scores) == 22 and set(scores.variant) == {name}
    records = [json.loads(line) for line in open("results/autointerp/explanations.jsonl")]
    assert len(records) == 6
    # explanations name real token strings of the tiny tokenizer, not placeholder ids
    assert all(r["explanation"].startswith("active on the tokens") and "<" not in r["explanation"] for r in records)
