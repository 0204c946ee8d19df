"""Stage `corpus`: the offline stdlib corpus (splits, disjointness, determinism, manifest) and the
paper-profile HuggingFace path on local stand-in datasets."""
from __future__ import annotations

import hashlib
import json

import pytest

from moesae import corpus as corpus_mod
from moesae.corpus import CorpusConfig, build_corpus, load_split, module_docstrings, read_manifest
from moesae.params import ParamsError, section_to

SMALL = dict(source="stdlib", max_train_bytes=120_000, max_cross_bytes=40_000, heldout_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest = build_corpus(CorpusConfig(**SMALL), root)
    return root, manifest


def _file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_stdlib_splits_load_through_datasets(small_corpus):
    root, manifest = small_corpus
    for split in corpus_mod.SPLITS:
        ds = load_split(root, split)
        assert "text" in ds.column_names
        assert len(ds) == manifest["splits"][split]["documents"] > 0
        assert sum(len(t.encode()) for t in ds["text"]) == manifest["splits"][split]["bytes"]
    assert read_manifest(root) == json.loads((root / "manifest.json").read_text())


def test_stdlib_budgets_and_disjoint_files(small_corpus):
    root, manifest = small_corpus
    train, heldout, cross = (load_split(root, s) for s in ("train", "heldout", "cross"))
    # Budgets: stop at the first file past the limit, so at most one file over.
    assert SMALL["max_train_bytes"] <= manifest["splits"]["train"]["bytes"] < SMALL["max_train_bytes"] + 600_000
    train_files, heldout_files = set(train["source"]), set(heldout["source"])
    assert not train_files & heldout_files, "held-out code must not share a file with training code"
    assert all(s.endswith(".py") for s in train_files | heldout_files)
    # Cross-domain text: help topics first, docstrings only from modules never used in training.
    assert cross["source"][0].startswith("pydoc_data.topics:")
    doc_files = {s.split(":", 1)[1] for s in cross["source"] if s.startswith("docstrings:")}
    assert not doc_files & (train_files | heldout_files)
    assert load_split(root, "autointerp")["text"] == heldout["text"]


def test_stdlib_manifest_records_what_was_read(small_corpus):
    _, manifest = small_corpus
    assert manifest["source"] == "stdlib"
    assert len(manifest["stdlib_file_list_sha256"]) == 64
    assert manifest["stdlib_files"] > 100 and manifest["stdlib_bytes"] > 1_000_000
    assert manifest["help_topics"] > 10
    for entry in manifest["splits"].values():
        assert set(entry) == {"documents", "bytes", "sha256"}
    assert "/" not in json.dumps(manifest["config"]).replace("Biology/Medicine", "").replace("cais/hle", "").replace(
        "Skylion007/openwebtext", "").replace("Geralt-Targaryen/openwebtext2", ""), "no machine paths in the manifest"


def test_stdlib_corpus_is_byte_identical_on_rerun(small_corpus, tmp_path):
    root, _ = small_corpus
    build_corpus(CorpusConfig(**SMALL), tmp_path)
    assert _file_hashes(tmp_path) == _file_hashes(root)


def test_seed_changes_the_split(small_corpus, tmp_path):
    root, manifest = small_corpus
    other = build_corpus(CorpusConfig(**{**SMALL, "seed": 1}), tmp_path)
    assert other["splits"]["train"]["sha256"] != manifest["splits"]["train"]["sha256"]


def test_module_docstrings_hand_example():
    source = '''"""Module docstring that is long enough to be kept by the filter."""
def f():
    """short"""
class C:
    """A class docstring that is also comfortably longer than forty chars."""
'''
    assert module_docstrings(source) == (
        "Module docstring that is long enough to be kept by the filter.\n\n"
        "A class docstring that is also comfortably longer than forty chars."
    )
    assert module_docstrings("def broken(:\n") == ""


@pytest.mark.parametrize("key,value,fragment", [
    ("source", "web", "'source'"),
    ("heldout_fraction", 1.5, "'heldout_fraction'"),
    ("max_train_bytes", 0, "'max_train_bytes'"),
    ("cross_fields", [], "'cross_fields'"),
])
def test_config_errors_name_the_key(key, value, fragment):
    with pytest.raises(ParamsError, match=fragment):
        section_to(CorpusConfig, {key: value}, "corpus")
    with pytest.raises(ParamsError, match="corpus.colour"):
        section_to(CorpusConfig, {"colour": 1}, "corpus")


def test_load_split_missing_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="moesae corpus"):
        load_split(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown corpus split"):
        load_split(tmp_path, "validation")


# ---- paper profile: the HF code path on local stand-ins ---------------------------------------
def _stand_ins(monkeypatch):
    web = [{"text": f"web document number {i} " * 5} for i in range(400)] + [{"text": ""}]
    hle = [
        {"question": "What does ATP synthase make?", "rationale": "It makes ATP.", "category": "Biology/Medicine"},
        {"question": "Integrate x dx.", "rationale": "x^2/2", "category": "Math"},
        {"question": "Name a neurotransmitter.", "rationale": None, "category": "Biology/Medicine"},
    ]
    web2 = [{"text": f"second web text {i}"} for i in range(50)]
    calls = []

    def fake_open(name, config, split, streaming, gated=False):
        calls.append((name, split, streaming, gated))
        return {"Skylion007/openwebtext": web, "cais/hle": hle, "Geralt-Targaryen/openwebtext2": web2}[name]

    monkeypatch.setattr(corpus_mod, "_open_hf", fake_open)
    return calls


def test_hf_source_on_local_stand_ins(monkeypatch, tmp_path):
    calls = _stand_ins(monkeypatch)
    cfg = CorpusConfig(source="hf", max_train_bytes=10_000, max_cross_bytes=1000, heldout_fraction=0.2,
                       max_autointerp_bytes=300)
    manifest = build_corpus(cfg, tmp_path)
    assert ("cais/hle", "test", False, True) in calls  # HLE opened as a gated dataset
    cross = load_split(tmp_path, "cross")["text"]
    assert cross == ["What does ATP synthase make?\nIt makes ATP.", "Name a neurotransmitter."]
    train, heldout = load_split(tmp_path, "train")["text"], load_split(tmp_path, "heldout")["text"]
    assert not set(train) & set(heldout) and heldout
    assert 10_000 <= sum(len(t) for t in train) < 10_000 + 100
    # The held-out choice hashes each document, so it does not depend on the stream's order.
    assert all(corpus_mod._is_heldout(t, 0, 0.2) for t in heldout)
    assert not any(corpus_mod._is_heldout(t, 0, 0.2) for t in train)
    assert 300 <= manifest["splits"]["autointerp"]["bytes"] < 330


def test_hf_category_filter_error(monkeypatch, tmp_path):
    _stand_ins(monkeypatch)
    cfg = CorpusConfig(source="hf", max_train_bytes=2000, cross_category="Chemistry")
    with pytest.raises(RuntimeError, match="corpus.cross_category"):
        build_corpus(cfg, tmp_path)


def test_hf_unreachable_dataset_error_names_gating_and_default_profile(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'cais/hle' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError) as info:
        corpus_mod._open_hf("cais/hle", None, "test", streaming=False, gated=True)
    message = str(info.value)
    assert "gated" in message and "huggingface-cli login" in message and "default profile" in message
