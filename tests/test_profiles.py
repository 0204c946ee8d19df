"""Profiles are overlays on the default profile; dataclass defaults agree with the default profile."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from moesae.params import ParamsError
from moesae.profiles import deep_merge, resolve_profile, write_params


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": [1, 2], "z": {"q": 1}}, "b": 2, "gone": {"k": 1}}
    merged = deep_merge(base, {"a": {"y": [3], "z": {"r": 2}}, "b": None, "gone": "__delete__"})
    assert merged == {"a": {"x": 1, "y": [3], "z": {"q": 1, "r": 2}}, "b": None}
    assert base["a"]["y"] == [1, 2]  # inputs untouched
    with pytest.raises(ParamsError, match="deletes 'nope'"):
        deep_merge(base, {"nope": "__delete__"})


def test_the_paper_profile_states_only_what_differs(tmp_path):
    default = yaml.safe_load(open("profiles/default.yaml"))
    overlay = yaml.safe_load(open("profiles/paper.yaml"))

    def repeats(over, base, path=""):
        for key, value in over.items():
            where = f"{path}.{key}"
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                yield from repeats(value, base[key], where)
            elif key in base and base[key] == value:
                yield where

    assert list(repeats(overlay, default)) == []
    paper = resolve_profile("paper")
    assert paper["grid"]["families"]["gated"] == {"architecture": "gated", "calibration_steps": 8000, "seeds": [0]}
    assert paper["grid"]["num_latents"] == 24576 and paper["subject_model"]["hook_layer"] == 8
    assert paper["synthetic"]["data"]["d_in"] == 768  # the paper-size ground-truth benchmark
    out = write_params("paper", tmp_path / "params.yaml")
    assert out["_variants"] > 100
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["profile"] == "paper"


def test_unknown_profile_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="no profile"):
        write_params("nope", tmp_path / "params.yaml")


def _section_classes():
    from moesae.activations import ActivationsConfig
    from moesae.autointerp import AutointerpConfig
    from moesae.corpus import CorpusConfig
    from moesae.evaluate import EvaluateConfig
    from moesae.subject_model import SubjectModelConfig
    from moesae.synthetic import SyntheticConfig
    from moesae.training import TrainConfig

    return {"activations": ActivationsConfig, "autointerp": AutointerpConfig, "corpus": CorpusConfig,
            "evaluate": EvaluateConfig, "subject_model": SubjectModelConfig, "synthetic": SyntheticConfig,
            "train": TrainConfig}


@pytest.mark.parametrize("section", sorted(_section_classes()))
def test_dataclass_defaults_equal_the_default_profile(section):
    """One definition of every value: where a stage's config class has a default, it is the
    default profile's value (a field the default profile does not set keeps its class default)."""
    cls = _section_classes()[section]
    profile = resolve_profile("default")[section]
    mismatches = []
    for f in dataclasses.fields(cls):
        if f.name not in profile:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            continue
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
            value = {**default, **profile[f.name]}
        else:
            value = profile[f.name]
        if default != value:
            mismatches.append(f"{section}.{f.name}: class default {default!r} != profile {value!r}")
    assert mismatches == []
