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

    def fake_open(name, config, split, streaming=True, gated=False, data_files=None, role="train"):
        calls.append((name, split, streaming, gated))
        rows = {"Skylion007/openwebtext": web, "cais/hle": hle, "Geralt-Targaryen/openwebtext2": web2}[name]
        return rows, {"kind": "stand-in", "detail": role}

    monkeypatch.setattr(corpus_mod, "_open_hf", fake_open)
    return calls


def test_hf_source_on_local_stand_ins(monkeypatch, tmp_path):
    calls = _stand_ins(monkeypatch)
    cfg = CorpusConfig(source="hf", max_train_bytes=10_000, max_cross_bytes=1000, heldout_fraction=0.2,
                       max_autointerp_bytes=300)
    manifest = build_corpus(cfg, tmp_path)
    assert ("cais/hle", "test", True, True) in calls  # HLE opened (streamed) as a gated dataset
    assert manifest["dataset_sources"]["cross"] == {"kind": "stand-in", "detail": "cross"}
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
        corpus_mod._open_hf("cais/hle", None, "test", streaming=False, gated=True, role="cross")
    message = str(info.value)
    assert "gated" in message and "HF_TOKEN" in message and "default profile" in message
    assert "https://huggingface.co/datasets/cais/hle" in message and "cross dataset 'cais/hle'" in message


# ---- loading without scripts: local stand-ins of both kinds of Hub dataset ----------------------
def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


SCRIPT = "import datasets\n\nclass OpenWebText(datasets.GeneratorBasedBuilder):\n    pass\n"


@pytest.fixture
def stand_ins(tmp_path):
    """Local folders shaped like the paper's datasets: OpenWebText as a script-based repository
    with the Hub's parquet conversion (partial, two files), HLE and OpenWebText2 as parquet-only."""
    owt = tmp_path / "openwebtext"
    owt.mkdir()
    (owt / "openwebtext.py").write_text(SCRIPT)
    (owt / "README.md").write_text("# OpenWebText\n")
    conv = owt / "refs" / "convert" / "parquet" / "plain_text" / "partial-train"
    _parquet(conv / "0000.parquet", [{"text": f"web document number {i} " * 5} for i in range(200)])
    _parquet(conv / "0001.parquet", [{"text": f"later web document {i} " * 5} for i in range(200)])
    hle = tmp_path / "hle"
    _parquet(hle / "data" / "test-00000-of-00001.parquet", [
        {"question": "What does ATP synthase make?", "rationale": "It makes ATP.", "category": "Biology/Medicine"},
        {"question": "Integrate x dx.", "rationale": "x^2/2", "category": "Math"},
    ])
    web2 = tmp_path / "openwebtext2"
    _parquet(web2 / "train-00000.parquet", [{"text": f"second web text {i}"} for i in range(50)])
    return {"train": owt, "cross": hle, "autointerp": web2}


def test_script_based_and_parquet_only_local_datasets(stand_ins, tmp_path, capsys):
    cfg = CorpusConfig(source="hf", train_dataset=str(stand_ins["train"]), cross_dataset=str(stand_ins["cross"]),
                       autointerp_dataset=str(stand_ins["autointerp"]), max_train_bytes=30_000,
                       max_cross_bytes=1000, heldout_fraction=0.2, max_autointerp_bytes=300)
    manifest = build_corpus(cfg, tmp_path / "corpus")
    sources = manifest["dataset_sources"]
    assert sources["train"]["kind"] == "local parquet conversion"
    assert sources["train"]["files"] == ["plain_text/partial-train/0000.parquet", "plain_text/partial-train/0001.parquet"]
    assert "partial conversion" in sources["train"]["detail"]
    assert sources["cross"]["kind"] == sources["autointerp"]["kind"] == "local folder"
    printed = capsys.readouterr().out
    assert "[corpus] train:" in printed and "local parquet conversion" in printed and "[corpus] cross:" in printed
    train = load_split(tmp_path / "corpus", "train")["text"]
    assert any(t.startswith("later web document") for t in train)  # read across both parquet files
    assert load_split(tmp_path / "corpus", "cross")["text"] == ["What does ATP synthase make?\nIt makes ATP."]


def test_script_without_conversion_says_what_to_do(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "ds.py").write_text(SCRIPT)
    with pytest.raises(corpus_mod.DatasetUnavailable) as info:
        corpus_mod.open_dataset(str(tmp_path / "ds"), None, "train")
    assert "no longer runs" in str(info.value) and "corpus.<role>_data_files" in str(info.value)


def test_explicit_data_files(stand_ins):
    files = sorted(str(p) for p in stand_ins["train"].rglob("*.parquet"))
    rows, source = corpus_mod.open_dataset("anything", None, "train", data_files=files)
    assert source["kind"] == "data files" and len(list(rows)) == 400
    with pytest.raises(ParamsError, match="train_data_files"):
        section_to(CorpusConfig, {"train_data_files": []}, "corpus")


def _hub_stand_in(monkeypatch, stand_ins, listing_root):
    """datasets.load_dataset behaves as with datasets >= 4 on a script-based Hub repository;
    the conversion branch's listing and files come from a local folder."""
    import datasets
    from huggingface_hub import HfApi

    real = datasets.load_dataset

    def load_dataset(path, *args, **kwargs):
        if path == "Skylion007/openwebtext":
            raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")
        return real(path, *args, **kwargs)

    class Entry:
        def __init__(self, path):
            self.path = path

    listed = []

    def list_repo_tree(self, repo_id, path_in_repo=None, *, recursive=False, revision=None, repo_type=None, **kw):
        listed.append((repo_id, revision, repo_type))
        return [Entry(p.relative_to(listing_root).as_posix()) for p in listing_root.rglob("*.parquet")]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(HfApi, "list_repo_tree", list_repo_tree)
    monkeypatch.setattr(corpus_mod, "conversion_url", lambda name, path: str(listing_root / path))
    return listed


def test_script_based_hub_dataset_falls_back_to_the_parquet_conversion(monkeypatch, stand_ins, capsys):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    listed = _hub_stand_in(monkeypatch, stand_ins, stand_ins["train"] / "refs" / "convert" / "parquet")
    rows, source = corpus_mod._open_hf("Skylion007/openwebtext", None, "train", role="train")
    assert listed == [("Skylion007/openwebtext", "refs/convert/parquet", "dataset")]
    assert source["kind"] == "hub parquet conversion" and source["revision"] == "refs/convert/parquet"
    assert len(list(rows)) == 400
    out = capsys.readouterr().out
    assert "script-based" in out and "hub parquet conversion" in out and "plain_text/partial-train" in out
    assert corpus_mod.conversion_files(["plain_text/partial-train/0000.parquet"], None, "train")[1] == "partial-train"


def test_offline_script_based_dataset_reads_the_cached_conversion(monkeypatch, stand_ins):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_stand_in(monkeypatch, stand_ins, stand_ins["train"])
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs.get("revision"), kwargs.get("local_files_only")))
        if kwargs.get("revision") is None:  # the main branch: only the loading script was cached
            return str(stand_ins["train"])
        return str(stand_ins["train"] / "refs" / "convert" / "parquet")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    rows, source = corpus_mod.open_dataset("Skylion007/openwebtext", None, "train")
    assert asked == [("Skylion007/openwebtext", None, True), ("Skylion007/openwebtext", "refs/convert/parquet", True)]
    assert source["kind"] == "hf-cache parquet conversion" and len(list(rows)) == 400
    assert "parquet conversion" in corpus_mod.cached_dataset_source("Skylion007/openwebtext")


def test_offline_missing_dataset_fails_at_once_with_the_fix(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.perf_counter()
    with pytest.raises(corpus_mod.DatasetUnavailable) as info:
        corpus_mod.open_dataset("Geralt-Targaryen/openwebtext2", None, "train", role="autointerp")
    assert time.perf_counter() - t0 < 5
    message = str(info.value)
    assert "not in the local HF cache" in message and "hf download Geralt-Targaryen/openwebtext2" in message
    assert "HF_HUB_OFFLINE=1" in message and corpus_mod.cached_dataset_source("Geralt-Targaryen/openwebtext2") is None


def test_conversion_layout_choices():
    listing = ["a/train/0.parquet", "b/train/0.parquet", "default/test/0.parquet", "README.md"]
    assert corpus_mod.conversion_files(listing, "a", "train") == ("a", "train", ["a/train/0.parquet"])
    with pytest.raises(corpus_mod.DatasetUnavailable, match="no split 'train'"):
        corpus_mod.conversion_files(listing, None, "train")  # several configs: 'default' is chosen
    with pytest.raises(corpus_mod.DatasetUnavailable, match="several configs"):
        corpus_mod.conversion_files(listing[:2], None, "train")
    with pytest.raises(corpus_mod.DatasetUnavailable, match="no config 'c'"):
        corpus_mod.conversion_files(listing, "c", "train")
    assert corpus_mod.conversion_url("Skylion007/openwebtext", "plain_text/partial-train/0000.parquet") == (
        "hf://datasets/Skylion007/openwebtext@refs%2Fconvert%2Fparquet/plain_text/partial-train/0000.parquet")


def test_offline_hint_names_only_variables_that_are_set(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert "unset" not in corpus_mod.offline_hint() and "network" in corpus_mod.offline_hint()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hint = corpus_mod.offline_hint()
    assert "HF_DATASETS_OFFLINE=1" in hint and "HF_HUB_OFFLINE" not in hint and corpus_mod.hub_offline()
