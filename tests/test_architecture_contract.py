"""The contract every registered architecture meets, checked the moment it is registered:
its facts are consistent, it builds, trains a few steps, saves, loads bit for bit, and evaluates.

Parametrized over ``available_architectures()``: a new file in ``saes/`` with ``@register`` is
covered without editing this test.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moesae import available_architectures, build_sae, load_sae
from moesae.figures.style import series_style
from moesae.saes import architecture_class, describe
from moesae.training import TrainConfig, TrainingRun, tensor_batches, train_saes
from test_evaluate import CROSS, HELDOUT, MemoryReader, TinySubject, _cache, _cfg

D, M, K = 8, 32, 4


def _config(architecture: str) -> dict:
    fields = {f.name for f in dataclasses.fields(architecture_class(architecture).config_class)}
    cfg = {"d_in": D, "num_latents": M, "k": K, "dead_tokens_threshold": 64}
    if "num_experts" in fields:
        cfg["num_experts"] = 4
    if "calibration_steps" in fields:
        cfg["calibration_steps"] = 3
    return cfg


@pytest.fixture(scope="module")
def world():
    subject = TinySubject()
    readers = {"heldout": MemoryReader(_cache(subject, HELDOUT)), "cross": MemoryReader(_cache(subject, CROSS))}
    return subject, readers, {"heldout": HELDOUT, "cross": CROSS}


@pytest.mark.parametrize("architecture", available_architectures())
def test_facts_are_consistent(architecture):
    cfg = _config(architecture)
    facts = describe(architecture, **cfg)
    sae = build_sae(architecture, **cfg)
    cls = type(sae)
    assert facts.display_name and facts.label and isinstance(facts.label, str)
    assert facts.flops_per_token == sae.flops_per_token() > 0
    assert K <= facts.max_k <= M and 0 < facts.active_width <= M
    assert facts.is_moe == cls.is_moe == hasattr(sae, "expert_of_feature")
    assert facts.l0_is_set == cls.l0_is_set
    if facts.is_moe:
        assert facts.active_width == (cls.experts_per_token(sae.cfg) + int(sae.cfg.shared_expert)) * sae.cfg.expert_size
    # a k beyond max_k is refused by the config itself, naming the field
    if facts.max_k < M:
        with pytest.raises(ValueError, match="'k'"):
            describe(architecture, **{**cfg, "k": facts.max_k + 1})
    style = series_style(facts.label, facts.base_architecture)
    assert style["color"] and style["marker"]


@pytest.mark.parametrize("architecture", available_architectures())
def test_build_train_save_load_evaluate(architecture, tmp_path, world):
    from moesae import evaluate as ev

    subject, readers, texts = world
    sae = build_sae(architecture, **_config(architecture))
    data = readers["heldout"].data
    run = TrainingRun(name=architecture, sae=sae, out_dir=tmp_path / "run",
                      config=TrainConfig(steps=6, lr=1e-3, log_every=2, checkpoint_every=0))
    train_saes([run], tensor_batches(data, 16, seed=0), progress=False)
    assert all(math.isfinite(v) for entry in run.history for k, v in entry.items() if isinstance(v, float))
    sae.eval()
    sae.save(tmp_path / "sae")
    assert (tmp_path / "sae" / "sae_weights.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others
    loaded = load_sae(tmp_path / "sae").eval()
    x = data[:32]
    with torch.no_grad():
        assert torch.equal(loaded(x).x_hat, sae(x).x_hat)
    r = ev.evaluate_sae(loaded, subject, readers["heldout"], readers["cross"], texts, _cfg(), train_log={})
    for key in ("mse_heldout", "mse_cross", "l0_heldout", "loss_recovered_zero_cross", "redundancy_0.8"):
        assert math.isfinite(r[key]), key
    assert r["flops_per_token"] == describe(architecture, **_config(architecture)).flops_per_token
