"""The feature browser (moesae browse): HTML rendering with hostile token strings (fast), and the
whole stage on the micro pipeline's models and caches (slow); every relative link resolves, no
network loads, every corpus / tokenizer / LLM string escaped."""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from moesae.browser import render
from moesae.browser.config import BrowserConfig, load_config
from moesae.browser.stage import write_pages

EVIL = "<script>alert(1)</script>"
EVIL_EXPL = 'fires on "<img src=x onerror=alert(2)>" & <b>bold</b>'


def example(tokens, acts):
    return {"tokens": tokens, "acts": acts, "max": max(acts)}


def feature(fid, expert, neighbours):
    ex = example(["a", EVIL, "\n", " b"], [0.0, 2.0, 0.5, 0.0])
    return {
        "id": fid, "expert": expert, "count": 10, "density": 0.01, "max_activation": 2.0,
        "explanation": EVIL_EXPL if fid == 3 else None, "fuzzing": 0.7 if fid == 3 else None, "detection": None,
        "top": [ex], "quantiles": [(10, [ex]), (1, [ex])], "histogram": ([1, 3, 0], [0.0, 1.0, 2.0, 3.0]),
        "promoted": [(5, EVIL, 1.5), (6, "&amp;", 1.0)], "suppressed": [(7, "</td></tr></table>", -1.0)],
        "neighbours": [{"id": j, "cosine": 0.9, "sampled": s, "expert": 0, "density": 0.02, "explanation": EVIL}
                       for j, s in neighbours],
    }


def sae_data(name, is_moe):
    feats = [feature(3, 0 if is_moe else None, [(8, True), (100, False)]),
             feature(8, 1 if is_moe else None, [(3, True)])]
    data = {"name": name, "family": "fam", "architecture": "scale" if is_moe else "topk", "label": "<x>", "is_moe": is_moe,
            "num_latents": 128, "k": 8, "num_tokens": 1000, "live": 50, "min_activations": 2, "features": feats,
            "fvu": 0.2, "experts": None}
    if is_moe:
        data["experts"] = {"features_per_expert": [64, 64], "usage": [0.6, 0.4], "omega": [],
                           "probe": {0: [EVIL, "len"]}, "probe_words": "probe_python_builtins.txt"}
    return data


class Tags(HTMLParser):
    """The real tags and attributes of a page (escaped text does not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(html: str) -> list[tuple[str, dict]]:
    p = Tags()
    p.feed(html)
    return p.tags


def check_tree(out: Path, no_urls: bool = False) -> list[Path]:
    """Every page: relative links resolve to files, nothing loaded from the network, no raw EVIL."""
    pages = sorted(out.rglob("*.html"))
    assert pages
    for p in pages:
        text = p.read_text(encoding="utf-8")
        tags = parse(text)
        assert sum(t == "script" for t, _ in tags) <= 1  # the one inline sorting script, nothing from the corpus
        assert EVIL not in text and not any(t in ("img", "b", "iframe", "link") for t, _ in tags)
        assert not any(k.startswith("on") for _, a in tags for k in a), f"{p}: event handler attribute"
        assert all("src" not in a for t, a in tags if t == "script")
        for _, attrs in tags:
            for key in ("href", "src"):
                if key not in attrs:
                    continue
                u = urlparse(attrs[key])
                assert not u.scheme and not u.netloc, f"{p}: external {key} {attrs[key]}"
                target = (p.parent / unquote(u.path)).resolve()
                assert target.is_file(), f"{p}: broken link {attrs[key]}"
        if no_urls:  # corpus text may mention URLs (escaped, as text): only the synthetic pages have none
            assert "https://" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    return pages


def test_render_escapes_hostile_tokens(tmp_path):
    saes = [sae_data("scale_k8", True), sae_data("topk_k8", False)]
    write_pages(saes, tmp_path / "features")
    pages = check_tree(tmp_path / "features", no_urls=True)
    names = {p.relative_to(tmp_path / "features").as_posix() for p in pages}
    assert {"index.html", "scale_k8/index.html", "scale_k8/experts.html", "scale_k8/f3.html", "scale_k8/f8.html",
            "topk_k8/index.html", "topk_k8/f3.html"} <= names
    assert "topk_k8/experts.html" not in names
    f3 = (tmp_path / "features/scale_k8/f3.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in f3
    assert "&lt;img src=x onerror=alert(2)&gt;" in f3
    assert "&amp;amp;" in f3 and "&lt;/td&gt;&lt;/tr&gt;&lt;/table&gt;" in f3
    assert "approximate" in f3 and "<svg" in f3 and "\u21b5" in f3
    assert 'href="f8.html"' in f3 and 'href="f100.html"' not in f3  # only sampled neighbours link
    idx = (tmp_path / "features/scale_k8/index.html").read_text()
    assert 'id="expert-filter"' in idx and 'data-expert="1"' in idx
    assert "&lt;script&gt;" in (tmp_path / "features/scale_k8/experts.html").read_text()


def test_context_shading_and_histogram():
    html = render.context_html(["x", "y"], [0.0, 1.0], 1.0)
    assert "background:rgba(255,110,0,0.90)" in html and html.count("<span") == 1
    assert render.histogram_svg([], [0.0]).startswith("<p")


def test_config_validation():
    assert load_config(None) == BrowserConfig()
    with pytest.raises(ValueError, match="unknown key"):
        load_config({"nope": 1})
    with pytest.raises(ValueError, match="num_features"):
        load_config({"num_features": 0})
    with pytest.raises(ValueError, match="variants"):
        load_config({"variants": "some"})


@pytest.fixture(scope="module")
def micro_browser(micro_results, tmp_path_factory):
    import yaml

    from moesae.browser.stage import run_stage

    params = yaml.safe_load((micro_results / "params.yaml").read_text())
    params["browser"] = {"num_features": 5, "min_activations": 2, "top_examples": 4, "quantile_examples": 1,
                         "max_tokens": 4096, "neighbours": 3}
    tmp = tmp_path_factory.mktemp("browser")
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = tmp / "features"
    from moesae.params import accessed_sections

    accessed_sections(reset=True)
    run_stage(tmp / "params.yaml", out=out, root=micro_results)
    read = set(accessed_sections(reset=True))
    assert read <= {"browser", "autointerp", "grid", "paths", "evaluate"}, read  # the dvc.yaml stage's params
    return out, params


@pytest.mark.slow
def test_browser_on_micro_run(micro_browser):
    from moesae.autointerp.config import load_config as ai_config
    from moesae.autointerp.selection import select_variants
    from moesae.grid import study_variants

    out, params = micro_browser
    check_tree(out)
    selected = select_variants(study_variants(params), ai_config(params["autointerp"]))
    index = (out / "index.html").read_text()
    for name in selected:
        assert (out / name / "index.html").is_file()
        assert f'href="{name}/index.html"' in index
        pages = list((out / name).glob("f*.html"))
        assert 1 <= len(pages) <= 5
        text = pages[0].read_text()
        assert "Top-activating contexts" in text and "approximate" in text
    moe = [n for n in selected if (out / n / "experts.html").is_file()]
    assert moe, "the auto selection has MoE SAEs: each gets an expert overview"


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


@pytest.mark.browser
@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed")
def test_pages_load_offline_in_chromium(tmp_path):
    """Headless Chromium with every host unresolvable: the pages still load whole (nothing needed
    from the network) and the injected token never runs as a script."""
    write_pages([sae_data("scale_k8", True)], tmp_path / "features")
    for page in ("index.html", "scale_k8/index.html", "scale_k8/f3.html", "scale_k8/experts.html"):
        url = (tmp_path / "features" / page).as_uri()
        proc = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom", url],
                              capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "</html>" in proc.stdout and "alert(1)" not in proc.stdout.replace("&lt;script&gt;alert(1)", "")


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("not a browser")
    with pytest.raises(ValueError, match="not a feature browser"):
        write_pages([sae_data("topk_k8", False)], tmp_path)
    assert (tmp_path / "keep.txt").is_file()
    write_pages([sae_data("topk_k8", False)], tmp_path / "features")
    write_pages([sae_data("topk_k8", False)], tmp_path / "features")  # a previous browser is replaced
