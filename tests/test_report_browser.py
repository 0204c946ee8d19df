"""The report in a real headless browser: the page loads, every image decodes, every link resolves.

Uses the system Chromium (``apt-get install chromium``) through its command line: a copy of the
page gets a small script that, once loaded, decodes every image and lists every link's resolved
URL into the DOM, which ``--dump-dom`` prints. Skipped when no Chromium is installed.
"""
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

import importlib

from moesae import report, results
from moesae.figures import draw

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)

pytestmark = [pytest.mark.browser, pytest.mark.skipif(BROWSER is None, reason="no Chromium installed")]

CHECK_SCRIPT = """
<script>
window.addEventListener('load', () => {
  // After 'load' every image has been fetched and decoded or has failed; failed ones have naturalWidth 0.
  const imgs = Array.from(document.images);
  const decoded = imgs.map(i => i.complete && i.naturalWidth > 0);
  const out = document.createElement('pre');
  out.id = 'browser-check';
  out.textContent = JSON.stringify({
    title: document.title,
    images: imgs.length,
    decoded: decoded.filter(Boolean).length,
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
    ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  });
  document.body.appendChild(out);
});
</script>
"""


def chromium(*args, timeout=90):
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def built_report(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from test_report import write_synthetic_run

    run = write_synthetic_run(tmp_path)
    ctx = results.load_context(run / "results", "default")
    figures = run / "reports" / "figures"
    for name in ("fig02_omega", "fig07_redundancy"):
        figure = importlib.import_module(f"moesae.figures.{name}")
        draw.save_figure(figure.plot(ctx), name, figures, formats=("png",))
    (run / "reports" / "html").mkdir(parents=True)
    (run / "reports" / "html" / "fig02_omega.html").write_text("<html><body>notebook</body></html>")
    return report.build_report(run)


def test_report_loads_images_decode_links_resolve(built_report, tmp_path):
    page = built_report.read_text()
    checked = built_report.with_name("index_check.html")
    checked.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    result = chromium("--virtual-time-budget=15000", "--dump-dom", checked.as_uri())
    match = re.search(r'<pre id="browser-check">(.*?)</pre>', result.stdout, re.S)
    assert match, f"the page did not finish loading in Chromium: {result.stderr[-2000:]}"
    info = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    assert info["title"].startswith("moesae report")
    assert info["images"] == 2 and info["decoded"] == 2
    assert info["links"], "the page has links (table of contents, notebook)"
    for url in info["links"]:
        parsed = urlparse(url)
        assert parsed.scheme == "file", f"link leaves the report folder: {url}"
        target = Path(unquote(parsed.path))
        assert target.is_file(), f"link does not resolve: {url}"
        if parsed.fragment:
            assert target != checked or parsed.fragment in info["ids"], f"no anchor #{parsed.fragment}"
    shot = tmp_path / "report.png"
    chromium("--window-size=1280,2400", f"--screenshot={shot}", built_report.as_uri())
    assert shot.is_file() and shot.stat().st_size > 20_000
