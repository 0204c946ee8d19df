"""The three data stages end to end on the micro profile (what `dvc repro` runs, scaled down), and
the CLI's error path. ``run_micro_data_pipeline`` lives in moesae.testing for other tests."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from moesae import cli
from moesae.activations import ActivationReader
from moesae.corpus import load_split
from moesae.subject_model import load_subject_model
from moesae.testing import micro_params, run_micro_data_pipeline


@pytest.mark.slow
def test_micro_data_pipeline_end_to_end(tmp_path):
    out = run_micro_data_pipeline(tmp_path)
    assert out["params"].is_file() and len(load_split(out["corpus"], "cross")) > 0
    metrics = json.loads(out["metrics"].read_text())
    sm = load_subject_model(out["subject_model"])
    assert metrics["hook"] == sm.hook_name == "blocks.1.hook_resid_post"
    assert metrics["val_loss"] < math.log(sm.vocab_size), "worse than a uniform guess: training did nothing"
    expected = micro_params()["activations"]["max_tokens"]
    for split, n in expected.items():
        reader = ActivationReader(out["activations"] / split)
        assert reader.num_tokens == n and reader.d_model == sm.d_model == 32
        assert reader.manifest["hook"] == sm.hook_name
        assert reader.batch_fn(256)(3).shape == (256, 32)
    for stage in ("corpus", "subject_model", "activations"):
        assert json.loads((tmp_path / "results" / "timings" / f"{stage}.json").read_text())["stage"] == stage
    assert sum(out["seconds"].values()) < 120


def test_micro_params_overrides_merge_sections():
    params = micro_params({"activations": {"dtype": "bfloat16"}, "extra": [1]})
    assert params["activations"]["dtype"] == "bfloat16"
    assert params["activations"]["context_length"] == 64  # the rest of the section is kept
    assert params["extra"] == [1]


def test_cli_reports_a_missing_subject_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = micro_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(["activations", "--params", "params.yaml"]) == 1
    assert "run `moesae subject-model` first" in capsys.readouterr().err


def test_cli_reports_an_unknown_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = micro_params({"corpus": {"max_bytes": 1}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(["corpus", "--params", "params.yaml"]) == 1
    assert "corpus.max_bytes" in capsys.readouterr().err
