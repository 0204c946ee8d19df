"""The activation cache: which rows are cached, manifest contents, resume after interruption,
truncated / corrupted shard detection, and the shuffling reader's coverage and determinism."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moesae.activations import (ActivationReader, ActivationsConfig, ShardError, cache_split, disk_bytes,
                                plan_split)
from moesae.params import ParamsError, section_to
from moesae.testing import SAMPLE_TEXTS, tiny_subject_model

TEXTS = [t * (i + 1) for i, t in enumerate(SAMPLE_TEXTS)] + ["", "def f(x):\n    return x ** 2\n" * 20]


@pytest.fixture(scope="module")
def sm():
    return tiny_subject_model(context_length=32)


def _cfg(**kw):
    base = dict(context_length=16, shard_tokens=64, batch_size=4, max_tokens={"train": None}, device="cpu")
    return ActivationsConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def cached(sm, tmp_path_factory):
    out = tmp_path_factory.mktemp("acts") / "train"
    manifest = cache_split(sm, TEXTS, out, _cfg(), "train", "fp", progress=False)
    return out, manifest


def _expected_rows(sm, cfg):
    """Hook activations of every context, computed one context at a time, minus BOS."""
    rows, tokens = [], []
    for ids in sm.tokenize(TEXTS):
        for start in range(0, len(ids), cfg.context_length - 1):
            seq = [sm.bos_token_id] + ids[start:start + cfg.context_length - 1]
            t = torch.tensor([seq])
            acts = sm.hook_activations(t, torch.ones_like(t, dtype=torch.bool))[0]
            rows.append(acts[1:])
            tokens += seq[1:]
    return torch.cat(rows), tokens


def test_cache_holds_hook_activations_without_padding_or_bos(sm, cached):
    out, manifest = cached
    reader = ActivationReader(out)
    expected, tokens = _expected_rows(sm, _cfg())
    assert reader.num_tokens == len(expected) == manifest["num_tokens"]
    assert torch.allclose(reader.slice(0, reader.num_tokens), expected, atol=1e-5)
    assert reader.token_ids.tolist() == tokens
    assert (reader.position >= 1).all() and reader.position.max() == 15
    # Rebuild one context from the metadata and recompute its last row.
    seq = int(reader.sequence_index[40])
    rows = np.flatnonzero(reader.sequence_index == seq)
    context = [sm.bos_token_id] + reader.token_ids[rows].tolist()
    t = torch.tensor([context])
    again = sm.hook_activations(t, torch.ones_like(t, dtype=torch.bool))[0, -1]
    assert torch.allclose(reader.rows([rows[-1]])[0], again, atol=1e-5)
    assert set(reader.doc_index.tolist()) == {i for i, ids in enumerate(sm.tokenize(TEXTS)) if ids}


def test_manifest_contents(sm, cached):
    out, manifest = cached
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["model"] == "tiny" and manifest["hook"] == "blocks.0.hook_resid_post"
    assert manifest["dtype"] == "float32" and manifest["shape"] == [manifest["num_tokens"], sm.d_model]
    assert manifest["exclude_bos"] and not manifest["keep_padding"] and manifest["context_length"] == 16
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["num_tokens"]
    assert len(manifest["shards"]) > 2
    import hashlib
    for shard in manifest["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
        assert shard["rows"] >= 64 or shard is manifest["shards"][-1]
    assert not (out / "progress.json").exists()


def test_rerun_is_a_noop_and_deterministic(sm, cached, tmp_path):
    out, manifest = cached
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cache_split(sm, TEXTS, out, _cfg(), "train", "fp", progress=False) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    again = cache_split(sm, TEXTS, tmp_path / "again", _cfg(), "train", "fp", progress=False)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_resume_after_interruption_keeps_finished_shards(sm, cached, tmp_path):
    _, full = cached
    out = tmp_path / "train"
    partial = cache_split(sm, TEXTS, out, _cfg(), "train", "fp", progress=False, stop_after_shards=2)
    assert partial == {"interrupted": True, "shards_done": 2}
    assert not (out / "manifest.json").exists() and (out / "progress.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        ActivationReader(out)
    kept = {name: (out / name).stat().st_mtime_ns for name in ("shard_00000.npy", "shard_00001.npy")}
    (out / "shard_00001.npy.partial").write_bytes(b"")  # unrelated junk is ignored
    manifest = cache_split(sm, TEXTS, out, _cfg(), "train", "fp", progress=False)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept, "finished shards were recomputed"
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in full["shards"]]


def test_changed_settings_restart_from_scratch(sm, tmp_path):
    out = tmp_path / "train"
    cache_split(sm, TEXTS, out, _cfg(), "train", "fp", progress=False, stop_after_shards=1)
    manifest = cache_split(sm, TEXTS, out, _cfg(shard_tokens=100), "train", "fp", progress=False)
    assert all(s["rows"] >= 100 for s in manifest["shards"][:-1])
    assert ActivationReader(out).num_tokens == manifest["num_tokens"]


def test_truncated_shard_is_named_on_open(cached, tmp_path):
    import shutil
    out = tmp_path / "train"
    shutil.copytree(cached[0], out)
    shard = out / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ShardError, match="shard_00001.npy is truncated"):
        ActivationReader(out)


def test_corrupted_shard_is_named_on_read(cached, tmp_path):
    import shutil
    out = tmp_path / "train"
    shutil.copytree(cached[0], out)
    shard = out / "shard_00002.npy"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = ActivationReader(out)
    reader.slice(0, 10)  # shard 0 is intact
    with pytest.raises(ShardError, match="shard_00002.npy is corrupted"):
        reader.slice(0, reader.num_tokens)
    with pytest.raises(ShardError, match="shard_00002.npy"):
        list(ActivationReader(out).iter_batches(reader.num_tokens))


@pytest.mark.parametrize("batch_size,chunk,group", [(7, 1024, 1024), (32, 8, 3), (5, 16, 2)])
def test_shuffled_batches_cover_every_row_once_per_epoch(cached, monkeypatch, batch_size, chunk, group):
    monkeypatch.setattr(ActivationReader, "CHUNK_ROWS", chunk)
    monkeypatch.setattr(ActivationReader, "GROUP_CHUNKS", group)
    reader = ActivationReader(cached[0])
    N = reader.num_tokens
    steps = 2 * N // batch_size + 2
    index_at = reader.batch_index_fn(batch_size, seed=3)
    stream = np.concatenate([index_at(s) for s in range(steps)])
    assert all(len(index_at(s)) == batch_size for s in (0, steps - 1))
    for epoch in range(2):
        assert sorted(stream[epoch * N:(epoch + 1) * N].tolist()) == list(range(N))
    assert stream[:N].tolist() != list(range(N)), "not shuffled"
    assert stream[:N].tolist() != stream[N:2 * N].tolist(), "each epoch gets its own order"
    # Random access: a fresh function (a resumed run) gives the same batch for the same step.
    assert np.array_equal(reader.batch_index_fn(batch_size, seed=3)(steps - 1), index_at(steps - 1))
    assert not np.array_equal(reader.batch_index_fn(batch_size, seed=4)(0), index_at(0))
    batch_at = reader.batch_fn(batch_size, seed=3)
    batch = batch_at(1)
    assert batch.dtype == torch.float32 and batch.shape == (batch_size, reader.d_model)
    assert torch.equal(batch, reader.slice(0, N)[torch.from_numpy(index_at(1))])


def test_iter_batches_in_cache_order(cached):
    reader = ActivationReader(cached[0])
    batches = list(reader.iter_batches(50))
    assert [len(b) for b in batches[:-1]] == [50] * (len(batches) - 1)
    assert torch.equal(torch.cat(batches), reader.slice(0, reader.num_tokens))
    assert sum(len(b) for b in reader.iter_batches(50, max_tokens=120)) == 120


def test_max_tokens_cuts_exactly(sm):
    plan = plan_split(sm, TEXTS, _cfg(), max_tokens=100)
    assert int(plan.rows.sum()) == 100


def test_truncate_and_paper_faithful(sm):
    ids = sm.tokenize(TEXTS)
    plan = plan_split(sm, TEXTS, _cfg(long_documents="truncate"), None)
    assert plan.rows.tolist() == [min(len(x), 15) for x in ids if x]
    faithful = plan_split(sm, TEXTS, _cfg(paper_faithful=True, context_length=128), None)
    # Authors' cache: first 20 tokens of every document (BOS included here), padding rows kept.
    assert faithful.tokens.shape[1] == 20
    assert faithful.rows.tolist() == [20] * len([x for x in ids if x])
    meta = faithful.meta_arrays()
    assert meta["position"][:20].tolist() == list(range(20))


def test_bfloat16_cache_roundtrip(sm, tmp_path):
    manifest = cache_split(sm, TEXTS[:3], tmp_path / "bf", _cfg(dtype="bfloat16"), "train", progress=False)
    reader = ActivationReader(tmp_path / "bf")
    full = cache_split(sm, TEXTS[:3], tmp_path / "f32", _cfg(), "train", progress=False)
    ref = ActivationReader(tmp_path / "f32").slice(0, full["num_tokens"])
    got = reader.slice(0, manifest["num_tokens"])
    assert got.dtype == torch.float32 and torch.equal(got, ref.to(torch.bfloat16).float())
    assert manifest["shards"][0]["bytes"] < full["shards"][0]["bytes"]


def test_disk_bytes_for_the_paper_scale():
    # 82M tokens × 768 × 2 bytes (bf16) + 4 int32 metadata arrays ≈ 127.3 GB.
    assert disk_bytes(81_920_000, 768, "bfloat16") == 81_920_000 * (768 * 2 + 16)


@pytest.mark.parametrize("values,fragment", [
    ({"dtype": "int8"}, "'dtype'"),
    ({"max_tokens": {"validation": 10}}, "max_tokens.validation"),
    ({"max_tokens": {"train": 0}}, "max_tokens.train"),
    ({"long_documents": "wrap"}, "'long_documents'"),
    ({"context_length": 1}, "'context_length'"),
])
def test_config_errors_name_the_key(values, fragment):
    with pytest.raises(ParamsError, match=fragment):
        section_to(ActivationsConfig, values, "activations")


def test_missing_cache_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="moesae activations"):
        ActivationReader(tmp_path)


# ---- per-split context length ---------------------------------------------------------------------
def test_context_length_by_split(sm, tmp_path):
    cfg = _cfg(context_length_by_split={"autointerp": 32})
    assert cfg.context_for("train") == 16 and cfg.context_for("autointerp") == 32
    assert _cfg(paper_faithful=True, context_length_by_split={"autointerp": 32}).context_for("autointerp") == 20
    auto = cache_split(sm, TEXTS, tmp_path / "autointerp", cfg, "autointerp", progress=False)
    train = cache_split(sm, TEXTS, tmp_path / "train", cfg, "train", progress=False)
    assert (auto["context_length"], train["context_length"]) == (32, 16)
    # Same rows, fewer and longer contexts: one context holds up to 31 tokens after BOS.
    assert auto["num_tokens"] == train["num_tokens"] and auto["num_sequences"] < train["num_sequences"]
    positions = ActivationReader(tmp_path / "autointerp").position
    assert positions.max() == 31 and ActivationReader(tmp_path / "train").position.max() == 15


@pytest.mark.parametrize("values,fragment", [
    ({"context_length_by_split": {"validation": 64}}, "context_length_by_split.validation"),
    ({"context_length_by_split": {"autointerp": 1}}, "context_length_by_split.autointerp"),
    ({"context_length_by_split": [256]}, "'context_length_by_split'"),
    ({"max_disk_gb": 0}, "'max_disk_gb'"),
    ({"max_disk_gb": "60"}, "'max_disk_gb'"),
])
def test_new_config_errors_name_the_key(values, fragment):
    with pytest.raises(ParamsError, match=fragment):
        section_to(ActivationsConfig, values, "activations")


# ---- bounded disk: the train split is capped, training cycles over it -------------------------------
@pytest.fixture(scope="module")
def stage_inputs(sm, tmp_path_factory):
    """A corpus and a saved subject model on disk, as the activations stage reads them."""
    from moesae.corpus import save_split
    from moesae.subject_model import save_subject_model

    root = tmp_path_factory.mktemp("stage")
    texts = TEXTS * 3
    for split in ("train", "heldout", "cross", "autointerp"):
        save_split(root / "corpus", split, texts, ["t"] * len(texts))
    meta = {"name": "tiny", "hook_layer": sm.hook_layer, "prepend_bos": sm.prepend_bos,
            "context_length": sm.context_length}
    save_subject_model(root / "model", sm.model, sm.tokenizer, meta)
    return root


def _budget_cfg(max_disk_gb, **kw):
    return _cfg(**{"max_tokens": {"train": None, "heldout": 64, "cross": None}, "max_disk_gb": max_disk_gb, **kw})


def test_disk_budget_caps_the_train_split(sm, stage_inputs, tmp_path):
    from moesae.activations import GB, build_activations

    full = build_activations(_budget_cfg(None), stage_inputs / "corpus", stage_inputs / "model", tmp_path / "full",
                             progress=False)
    row = disk_bytes(1, sm.d_model, "float32")
    others = full["heldout"]["num_tokens"] + full["cross"]["num_tokens"]
    budget_rows = others + full["train"]["num_tokens"] // 3  # room for a third of the train split
    out = build_activations(_budget_cfg(budget_rows * row / GB), stage_inputs / "corpus", stage_inputs / "model",
                            tmp_path / "capped", progress=False)
    budget = out["train"]["disk_budget"]
    assert out["train"]["num_tokens"] == budget["train_tokens"] == budget["cap_tokens"]
    assert abs(budget["cap_tokens"] - full["train"]["num_tokens"] // 3) <= 1 and budget["capped"]
    assert out["heldout"]["num_tokens"] == 64 and out["cross"]["num_tokens"] == full["cross"]["num_tokens"]
    files = [p for split in ("train", "heldout", "cross") for p in (tmp_path / "capped" / split).glob("*.npy")]
    on_disk = sum(p.stat().st_size for p in files)
    assert budget["planned_bytes"] <= budget_rows * row
    assert on_disk <= budget_rows * row + 128 * len(files)  # + one 128-byte .npy header per file
    # The capped split is the start of the uncapped one: same rows, bit for bit.
    capped = ActivationReader(tmp_path / "capped" / "train")
    assert torch.equal(capped.slice(0, capped.num_tokens), ActivationReader(tmp_path / "full" / "train").slice(0, capped.num_tokens))
    assert capped.epochs(3 * capped.num_tokens) == 3.0
    # A budget that leaves no room for training is refused, naming the key.
    with pytest.raises(ValueError, match="activations.max_disk_gb"):
        build_activations(_budget_cfg(others * row / GB / 2), stage_inputs / "corpus", stage_inputs / "model",
                          tmp_path / "none", progress=False)


def test_a_budget_above_the_need_changes_nothing(sm, stage_inputs, tmp_path):
    from moesae.activations import build_activations

    out = build_activations(_budget_cfg(1000.0, max_tokens={"train": 100, "heldout": 64}), stage_inputs / "corpus",
                            stage_inputs / "model", tmp_path / "acts", progress=False)
    assert out["train"]["num_tokens"] == 100 and not out["train"]["disk_budget"]["capped"]
    assert out["train"]["disk_budget"]["requested_tokens"] == 100


def test_bounded_run_resumes_bit_for_bit(sm, stage_inputs, tmp_path):
    """Training for several epochs over a capped cache, interrupted and resumed from its checkpoint
    with a fresh reader, ends with exactly the weights of an uninterrupted run."""
    from moesae.activations import GB, build_activations
    from moesae.saes import build_sae
    from moesae.training import TrainConfig
    from moesae.training.trainer import TrainingRun, train_saes

    row = disk_bytes(1, sm.d_model, "float32")
    build_activations(_budget_cfg((64 + 300 + 200) * row / GB, max_tokens={"train": None, "heldout": 64}),
                      stage_inputs / "corpus", stage_inputs / "model", tmp_path / "acts", progress=False)
    reader = ActivationReader(tmp_path / "acts" / "train")
    assert reader.manifest["disk_budget"]["capped"] and reader.num_tokens == 500
    batch, steps = 96, 24  # 2304 tokens: 4.6 epochs over the 500 cached rows

    def runs(folder):
        sae = build_sae("topk", d_in=reader.d_model, num_latents=64, k=4, seed=0)
        return [TrainingRun("topk", sae, TrainConfig(steps=steps, log_every=4, checkpoint_every=0), out_dir=folder)]

    straight = train_saes(runs(tmp_path / "a"), reader.batch_fn(batch, seed=0), progress=False)
    first = train_saes(runs(tmp_path / "b"), ActivationReader(tmp_path / "acts" / "train").batch_fn(batch, seed=0),
                       progress=False, stop_after=11)  # mid-epoch: 1056 tokens = 2.1 epochs
    assert (tmp_path / "b" / "checkpoint.pt").is_file() and first[0].tokens_seen == 11 * batch
    resumed = train_saes(runs(tmp_path / "b"), ActivationReader(tmp_path / "acts" / "train").batch_fn(batch, seed=0),
                         progress=False)
    a, b = straight[0].sae.state_dict(), resumed[0].sae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed[0].history == straight[0].history
    assert reader.epochs(resumed[0].tokens_seen) == pytest.approx(steps * batch / 500)
