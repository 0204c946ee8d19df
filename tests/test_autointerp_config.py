"""The auto-interp config (params errors name the key) and which grid variants are scored."""
from __future__ import annotations

import pytest

from moesae import autointerp as ai
from moesae.params import ParamsError, section_to


def test_config_errors_name_the_key():
    with pytest.raises(ParamsError, match="backend"):
        section_to(ai.AutointerpConfig, {"backend": "gpt"}, "autointerp")
    with pytest.raises(ParamsError, match="num_features"):
        section_to(ai.AutointerpConfig, {"num_features": 0}, "autointerp")
    with pytest.raises(ParamsError, match="autointerp.llm.colour"):
        section_to(ai.AutointerpConfig, {"llm": {"colour": 1}}, "autointerp")
    with pytest.raises(ParamsError, match="llm.concurrency"):
        section_to(ai.AutointerpConfig, {"llm": {"concurrency": 0}}, "autointerp")


def test_llm_config_resolves_from_environment(monkeypatch):
    for var in ("MOESAE_LLM_BASE_URL", "OPENAI_BASE_URL", "MOESAE_LLM_MODEL", "MOESAE_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="MOESAE_LLM_BASE_URL"):
        ai.LLMConfig().resolved()
    monkeypatch.setenv("MOESAE_LLM_BASE_URL", "http://h/v1")
    with pytest.raises(ValueError, match="MOESAE_LLM_MODEL"):
        ai.LLMConfig().resolved()
    monkeypatch.setenv("MOESAE_LLM_MODEL", "m")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert ai.LLMConfig().resolved() == ("http://h/v1", "m", "k")
    assert ai.LLMConfig(base_url="http://p/v1", model="q").resolved() == ("http://p/v1", "q", "k")




def test_config_refuses_the_replaced_extra_architectures_key():
    with pytest.raises(ParamsError, match="extra_families"):
        ai.load_config({"extra_architectures": ["gated"]})
    with pytest.raises(ParamsError, match="extra_families"):
        ai.load_config({"extra_families": "gated"})
    with pytest.raises(ParamsError, match="autointerp.*device"):
        ai.load_config({"device": "gpu"})
    assert ai.load_config({"device": "cuda:1"}, backend="openai").backend == "openai"


def variant(family, architecture, k, seed=0, **fields):
    return {"family": family, "architecture": architecture, "num_latents": 1024, "k": k, "seed": seed, **fields}


GRID = {
    "scale_n16_e2_k8": variant("scale_n16_e2", "scale", 8, num_experts=16, active_experts=2),
    "scale_n16_e2_k32": variant("scale_n16_e2", "scale", 32, num_experts=16, active_experts=2),
    "scale_n16_e2_k32_s1": variant("scale_n16_e2", "scale", 32, seed=1, num_experts=16, active_experts=2),
    "topk_m8th_k16": variant("topk_m8th", "topk", 16),
    "topk_m8th_k48": variant("topk_m8th", "topk", 48),
    "gated_k30": variant("gated", "gated", 30),
    "other_k32": variant("other", "topk", 32),
    "switch_x_k32": variant("switch_x", "switch", 32, num_experts=4),  # MoE, not listed: not scored
    "authors_k32": variant("authors", "authors_switch", 32, num_experts=4),  # a preset of Scale: MoE
}


def test_select_variants_nearest_l0_lowest_seed_and_every_baseline():
    chosen = ai.select_variants(GRID, ai.AutointerpConfig())
    assert chosen == {"scale_n16_e2_k32": "scale_n16_e2", "topk_m8th_k16": "topk_m8th", "gated_k30": "gated",
                      "other_k32": "other"}


def test_select_variants_listed_families_only():
    cfg = ai.AutointerpConfig(families=["switch_x", "gated", "absent"], extra_families="none")
    assert ai.select_variants(GRID, cfg) == {"switch_x_k32": "switch_x", "gated_k30": "gated"}
