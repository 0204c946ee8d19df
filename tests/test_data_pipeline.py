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


# ---- offline mode is a profile setting (issue #15) ----------------------------------------------
def _make_env(tmp_path, params_text: str | None, **env: str) -> dict[str, str]:
    """The HF offline variables `make` exports with this params.yaml (and these variables set)."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "Makefile", tmp_path / "Makefile")
    if params_text is not None:
        (tmp_path / "params.yaml").write_text(params_text)
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DVC_NO_ANALYTICS")
    base = {k: v for k, v in os.environ.items() if k not in names}
    show = "show-env: ; @echo " + " ".join(f"{n}=[$${n}]" for n in names)
    out = subprocess.run(["make", "-s", "--eval", show, "show-env"], cwd=tmp_path, env={**base, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return dict(item.rstrip("]").split("=[", 1) for item in out)


def test_makefile_offline_only_for_offline_profiles(tmp_path):
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    offline = _make_env(tmp_path, "profile: default\noffline: true\n")
    assert offline == {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "DVC_NO_ANALYTICS": "1"}
    online = _make_env(tmp_path, "profile: paper\noffline: false\n")
    assert online == {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "DVC_NO_ANALYTICS": "1"}
    assert _make_env(tmp_path, "profile: x\n")["HF_HUB_OFFLINE"] == ""  # no key: not forced
    # The user's own variables win.
    assert _make_env(tmp_path, "offline: true\n", HF_HUB_OFFLINE="0")["HF_HUB_OFFLINE"] == "0"
    assert _make_env(tmp_path, "offline: false\n", HF_HUB_OFFLINE="1")["HF_HUB_OFFLINE"] == "1"
