"""The subject model: the hook equals the HF hidden state, the losses equal HF's, the loss after the
hook runs only the later blocks, save/load, the offline error, and the paper path on a local
random-weight GPT-2 stand-in."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from moesae.params import ParamsError, section_to
from moesae.subject_model import (SubjectModelConfig, build_subject_model, fetch_pretrained, load_subject_model,
                                  save_subject_model, unigram_loss)
from moesae.testing import SAMPLE_TEXTS, tiny_subject_model



@pytest.fixture(scope="module")
def sm():
    return tiny_subject_model(n_layers=3, hook_layer=1)


def _batch(sm):
    return sm.encode_texts(SAMPLE_TEXTS)


def test_encode_texts_bos_padding_and_truncation(sm):
    tokens, mask = sm.encode_texts(["def add(a, b):", "", "The quick brown fox " * 40])
    assert tokens.shape == (3, sm.context_length) and tokens.dtype == torch.long and mask.dtype == torch.bool
    assert (tokens[:, 0] == sm.bos_token_id).all()
    lengths = mask.sum(1).tolist()
    assert lengths[1] == 1  # an empty text is just BOS
    assert lengths[2] == sm.context_length  # long text truncated
    assert lengths[0] == 1 + len(sm.tokenize(["def add(a, b):"])[0])
    assert (tokens[~mask] == sm.pad_token_id).all()
    short, _ = sm.encode_texts(["The quick brown fox " * 40], context_length=8)
    assert short.shape == (1, 8)
    with pytest.raises(ValueError, match="exceeds"):
        sm.encode_texts(["x"], context_length=sm.context_length + 1)


def test_token_strings_rebuild_the_text(sm):
    text = "def add(a, b):\n    return a + b"
    ids = sm.tokenize([text])[0]
    assert "".join(sm.token_strings(ids)) == text


def test_hook_is_the_block_output_hidden_state(sm):
    tokens, mask = _batch(sm)
    out = sm.model(tokens, attention_mask=mask.long(), output_hidden_states=True)
    hook = sm.hook_activations(tokens, mask)
    assert hook.shape == (*tokens.shape, sm.d_model)
    # hidden_states[0] is the embedding; [L + 1] is the output of block L.
    assert torch.allclose(hook[mask], out.hidden_states[sm.hook_layer + 1][mask], atol=1e-5)
    assert sm.hook_name == "blocks.1.hook_resid_post"


def test_clean_loss_equals_hf_loss_with_padding(sm):
    tokens, mask = _batch(sm)
    labels = torch.where(mask, tokens, torch.full_like(tokens, -100))
    hf = sm.model(tokens, attention_mask=mask.long(), labels=labels).loss
    assert torch.allclose(sm.clean_loss(tokens, mask), hf, atol=1e-5)
    per_token = sm.clean_loss(tokens, mask, reduction="none")
    valid = mask[:, 1:] & mask[:, :-1]
    assert per_token.shape == valid.shape and (per_token[~valid] == 0).all()
    assert math.isclose(float((per_token.sum() / valid.sum()).detach()), float(hf.detach()), rel_tol=1e-5)


def test_loss_after_hook_runs_only_later_blocks(sm, monkeypatch):
    tokens, mask = _batch(sm)
    resid = sm.hook_activations(tokens, mask)
    clean = sm.clean_loss(tokens, mask)

    def boom(*args, **kwargs):
        raise AssertionError("an early block ran")

    for block in sm.model.transformer.h[: sm.hook_layer + 1]:
        monkeypatch.setattr(block, "forward", boom)
    monkeypatch.setattr(sm.model.transformer.wte, "forward", boom)
    assert torch.allclose(sm.loss_after_hook(tokens, mask, resid), clean, atol=1e-5)
    zero = sm.loss_after_hook(tokens, mask, torch.zeros_like(resid))
    assert not torch.allclose(zero, clean)
    with pytest.raises(ValueError, match="resid must have shape"):
        sm.loss_after_hook(tokens, mask, resid[:, :-1])


def test_tokenizer_training_is_deterministic():
    from moesae.subject_model import train_tokenizer

    a, b = train_tokenizer(SAMPLE_TEXTS * 4, 300), train_tokenizer(SAMPLE_TEXTS * 4, 300)
    assert a.to_str() == b.to_str()


def test_unigram_loss_hand_computed():
    train = torch.tensor([[0, 1, 1, 2]])
    train_mask = torch.ones_like(train, dtype=torch.bool)
    # counts + 1 = [2, 3, 2] / 7; targets of [[0, 1, 2, pad]] with the pad masked are 1 and 2.
    tokens = torch.tensor([[0, 1, 2, 0]])
    mask = torch.tensor([[True, True, True, False]])
    expected = -(math.log(3 / 7) + math.log(2 / 7)) / 2
    assert math.isclose(unigram_loss(train, train_mask, tokens, mask, 3), expected, rel_tol=1e-9)


def test_save_and_load_roundtrip(sm, tmp_path):
    meta = {"name": "tiny", "hook_layer": sm.hook_layer, "prepend_bos": True, "context_length": sm.context_length}
    save_subject_model(tmp_path / "m", sm.model, sm.tokenizer, meta)
    loaded = load_subject_model(tmp_path / "m")
    tokens, mask = _batch(sm)
    assert loaded.tokenize(SAMPLE_TEXTS) == sm.tokenize(SAMPLE_TEXTS)
    assert torch.allclose(loaded.hook_activations(tokens, mask), sm.hook_activations(tokens, mask))
    assert (loaded.hook_layer, loaded.d_model, loaded.hook_name) == (sm.hook_layer, sm.d_model, sm.hook_name)
    with pytest.raises(FileNotFoundError, match="moesae subject-model"):
        load_subject_model(tmp_path / "nothing")


def test_missing_pretrained_model_fails_at_once():
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        fetch_pretrained("moesae-tests/no-such-model")
    assert time.perf_counter() - start < 5, "must not retry the network"
    message = str(info.value)
    assert "not in the local HuggingFace cache" in message and "hf download moesae-tests/no-such-model" in message
    assert "default profile" in message


def test_paper_path_on_local_random_gpt2(sm, tmp_path, monkeypatch):
    """source: pretrained, with `name` a local GPT-2-architecture folder: fetch, score, save, reload."""
    from moesae.corpus import CorpusConfig, save_split

    stand_in = tmp_path / "gpt2-random"
    sm.model.save_pretrained(stand_in)
    sm.tokenizer.save(str(stand_in / "tokenizer.json"))
    corpus = tmp_path / "corpus"
    save_split(corpus, "train", SAMPLE_TEXTS * 3, ["t"] * 18)
    save_split(corpus, "heldout", SAMPLE_TEXTS, ["h"] * 6)
    cfg = SubjectModelConfig(source="pretrained", name=str(stand_in), hook_layer=1, context_length=16, device="cpu")
    metrics = build_subject_model(cfg, corpus, tmp_path / "subject", metrics_path=tmp_path / "m.json", progress=False)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    assert metrics["hook"] == "blocks.1.hook_resid_post" and metrics["val_loss"] > 0
    loaded = load_subject_model(tmp_path / "subject")
    assert loaded.context_length == 16 and loaded.hook_layer == 1
    tokens, mask = loaded.encode_texts(SAMPLE_TEXTS)
    ref = sm.model(tokens, attention_mask=mask.long(), output_hidden_states=True).hidden_states[2]
    assert torch.allclose(loaded.hook_activations(tokens, mask)[mask], ref[mask], atol=1e-5)


@pytest.mark.parametrize("values,fragment", [
    ({"source": "download"}, "'source'"),
    ({"hook_layer": 4, "n_layers": 4}, "'hook_layer'"),
    ({"d_model": 30, "n_heads": 4}, "'d_model'"),
    ({"steps": 0}, "'steps'"),
    ({"device": "tpu"}, "'device'"),
])
def test_config_errors_name_the_field(values, fragment):
    with pytest.raises(ParamsError, match=fragment):
        section_to(SubjectModelConfig, values, "subject_model")


@pytest.mark.slow
def test_transformer_lens_gives_the_same_hook(tmp_path):
    """TransformerLens's blocks.L.hook_resid_post (TransformerBridge, raw HF weights, no weight
    processing) equals our hook on a random-weight GPT-2 saved locally."""
    tl = pytest.importorskip("transformer_lens")
    from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerFast

    sm = tiny_subject_model(n_layers=3, hook_layer=1, d_model=32, n_heads=2)
    folder = tmp_path / "gpt2-random"
    sm.model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=sm.tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)
    hf_model = GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    try:
        bridge = tl.TransformerBridge.boot_transformers(str(folder), hf_model=hf_model, tokenizer=tokenizer, device="cpu")
    except Exception as exc:  # TransformerLens cannot boot this local model offline
        pytest.skip(f"TransformerBridge could not load a local model offline: {exc}")
    tokens, mask = sm.encode_texts(SAMPLE_TEXTS[:1])
    n = int(mask[0].sum())
    _, cache = bridge.run_with_cache(tokens[:, :n])
    ours = sm.hook_activations(tokens[:, :n], mask[:, :n])
    assert torch.allclose(cache["blocks.1.hook_resid_post"].detach(), ours, atol=1e-5)
