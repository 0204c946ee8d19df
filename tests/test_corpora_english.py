"""Corpus source ``english`` (the real profile): wikitext cleaning, files read from installed
packages with their RECORD hashes checked, and the splits from the pinned gensim wheel (skipped,
never failed, where gensim is not installed)."""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import sys
from types import SimpleNamespace

import pytest

from moesae.corpora.english import (GENSIM, NEWS_FILE, WIKI_FILE, build_english_corpus, package_file,
                                    wikitext_to_text)

WIKITEXT = """{{Infobox person|name=Ada {{nowrap|Lovelace}}|born=1815}}
'''Ada Lovelace''' (10 December 1815 – 27 November 1852)<ref name="b">{{cite book|title=X}}</ref> was an
English [[mathematician]] and [[Writer|writer]], chiefly known for her work on [[Charles Babbage]]'s
[[Analytical Engine]].<ref>Footnote.</ref> [[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]]]]
{| class="wikitable"
|-
| cell || cell
|}
== Early life ==
* She was the only child of [http://example.org Lord Byron] &amp; Annabella.
<!-- a comment -->
== References ==
* [[Some book]]
== See also ==
* [[Babbage]]
[[Category:1815 births]]
[[fr:Ada Lovelace]]
"""


def test_wikitext_becomes_plain_paragraphs():
    text = wikitext_to_text(WIKITEXT)
    assert text.startswith("Ada Lovelace (10 December 1815 – 27 November 1852) was an\nEnglish mathematician and writer")
    assert "Charles Babbage's\nAnalytical Engine." in text
    assert "Early life\nShe was the only child of Lord Byron & Annabella." in text
    for gone in ("{{", "}}", "[[", "]]", "<ref", "Footnote", "cite book", "Infobox", "portrait", "cell",
                 "References", "Some book", "See also", "Category", "fr:", "comment", "'''", "http"):
        assert gone not in text, gone


def _fake_distribution(tmp_path, monkeypatch, content: bytes, recorded: bytes):
    """An installed distribution 'moesae-fake-data' with one file whose RECORD hash is of ``recorded``."""
    site = tmp_path / "site"
    (site / "fakedata").mkdir(parents=True)
    (site / "fakedata" / "file.txt").write_bytes(content)
    info = site / "moesae_fake_data-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moesae-fake-data\nVersion: 1.0\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"fakedata/file.txt,sha256={digest},{len(recorded)}\n"
                                 "moesae_fake_data-1.0.dist-info/METADATA,,\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()


def test_package_files_are_hash_checked(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, monkeypatch, b"hello\n", b"hello\n")
    path, record = package_file("moesae-fake-data", "fakedata/file.txt")
    assert path.read_bytes() == b"hello\n"
    assert record == {"package": "moesae-fake-data", "version": "1.0", "path": "fakedata/file.txt", "bytes": 6,
                      "sha256": hashlib.sha256(b"hello\n").hexdigest()}
    with pytest.raises(RuntimeError, match="has no file"):
        package_file("moesae-fake-data", "fakedata/other.txt")


def test_a_changed_package_file_is_refused(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, monkeypatch, b"changed\n", b"hello\n")
    with pytest.raises(RuntimeError, match="does not match the SHA-256"):
        package_file("moesae-fake-data", "fakedata/file.txt")


def test_a_missing_package_names_the_install_step():
    with pytest.raises(RuntimeError, match="not installed.*requirements.lock.*ensure_env"):
        package_file("moesae-tests-no-such-package", "x.txt")


def _gensim_installed() -> bool:
    try:
        importlib.metadata.distribution(GENSIM)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _cfg(**values):
    base = {"max_train_bytes": 4_000_000, "max_cross_bytes": 600_000, "max_autointerp_bytes": 50_000_000,
            "heldout_fraction": 0.1, "seed": 0, "max_doc_chars": None}
    return SimpleNamespace(**{**base, **values})


@pytest.mark.skipif(not _gensim_installed(), reason="gensim (the wheel holding the Wikipedia excerpt and the news "
                                                    "articles) is not installed: `bash scripts/ensure_env.sh`")
def test_splits_from_the_pinned_wheel():
    splits, record = build_english_corpus(_cfg())
    train, heldout, cross, auto = (splits[s] for s in ("train", "heldout", "cross", "autointerp"))
    assert len(train[0]) + len(heldout[0]) == 106 and len(heldout[0]) >= 5  # whole articles, none twice
    assert not set(train[1]) & set(heldout[1])
    assert all(name.startswith("enwiki:") for name in train[1] + heldout[1])
    assert "Anarchism is a political philosophy" in "".join(train[0] + heldout[0])
    assert all(name.startswith("pydoc_data.topics:") for name in cross[1]) and len(cross[0]) > 50
    assert len(auto[0]) == 300 and "bushfire" in auto[0][0]
    sources = record["english_sources"]
    assert sources["train"]["path"] == WIKI_FILE and sources["autointerp"]["path"] == NEWS_FILE
    assert sources["train"]["version"] == importlib.metadata.version(GENSIM)
    assert all(len(sources[s]["sha256"]) == 64 for s in sources) and "CC BY-SA" in sources["train"]["licence"]
    again, _ = build_english_corpus(_cfg())
    assert again == splits  # deterministic
    other, _ = build_english_corpus(_cfg(seed=1))
    assert set(other["heldout"][1]) != set(heldout[1])
    small, _ = build_english_corpus(_cfg(max_train_bytes=200_000, max_cross_bytes=20_000, max_doc_chars=500))
    assert sum(len(t.encode()) for t in small["train"][0]) < 200_000 + 100_000
    assert all(len(t) <= 500 for split in small.values() for t in split[0])
    assert len(small["cross"][0]) < len(cross[0])
    assert sys.version.split()[0] == sources["cross"]["version"]
