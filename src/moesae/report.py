"""``moesae report``: ``reports/index.html``, the one page a researcher reads first.

It says which profile and data produced the run, how long each stage took, whether each of the
paper's headline claims holds here (computed from ``results/`` by :mod:`moesae.claims`), and shows
every figure with its caption and Table 1. The page is self-contained: figures are embedded as
base64 data URIs, styles are inline, there is no script and nothing is fetched from the network;
the only links are relative ones to the executed notebooks in ``reports/html/`` (emitted only when
that file exists, so every link resolves).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from . import claims as claims_mod
from . import results as results_mod
from .figures import FIGURES
from .io import atomic_write_text
from .timing import read_timings

PAPER_REFERENCE_LABEL = "Paper (reference only: GPT-2 small, M = 24576; a different model and scale)"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .6rem 0; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; vertical-align: top; }
th { background: #f4f6f8; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.holds { color: #1a7f37; font-weight: 600; } .fails { color: #cf222e; font-weight: 600; } .na { color: #777; }
.note { color: #555; font-size: .8rem; }
figure { margin: 1.2rem 0 2rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9rem; color: #333; max-width: 60rem; }
.missing { background: #fff7e6; border: 1px solid #e0a030; padding: .8rem; border-radius: 6px; }
.meta td:first-child { font-weight: 600; background: #fafafa; }
.scroll { overflow-x: auto; }
code { font-size: .8rem; }
"""


# ---- reading the run ----------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _profile(params_path: Path) -> str:
    from .params import load_params

    try:
        return str(load_params(params_path).get("profile", "unknown"))
    except ValueError:
        return "unknown (no params.yaml)"


# ---- small HTML helpers ----------------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _summary(value: Any, limit: int = 400) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _meta_table(data: dict[str, Any] | None, missing: str) -> str:
    if not data:
        return f'<p class="na">{esc(missing)}</p>'
    rows = "".join(f"<tr><td>{esc(k)}</td><td><code>{esc(_summary(v))}</code></td></tr>" for k, v in data.items())
    return f'<table class="meta">{rows}</table>'


AUTOINTERP_COLUMNS = [
    ("features_scored", "features scored"), ("requests", "requests"), ("cache_hits", "cache hits"),
    ("explanations_degenerate", "degenerate explanations"), ("replies_unparsed", "unparsed replies"),
    ("judgements_used", "judgements used"), ("judgements_planned", "judgements planned"), ("parse_rate", "parse rate"),
]


def autointerp_html(path: Path) -> str:
    """Per SAE: requests, degenerate explanations, unparsed replies and judgements used (all escaped)."""
    data = _read_json(path)
    if not data:
        return f'<p class="na">not available: {esc(path.as_posix())} is missing (run `moesae autointerp`)</p>'
    head = (f"<p>backend <code>{esc(data.get('backend', ''))}</code>"
            + (f", endpoint <code>{esc(data.get('endpoint') or '')}</code>, model <code>{esc(data.get('model') or '')}</code>"
               if data.get("endpoint") else "")
            + f"; the stage fails below a parse rate of {esc(data.get('min_parse_rate', ''))}.</p>")
    rows = ["<table><tr><th>SAE</th>" + "".join(f"<th>{esc(label)}</th>" for _, label in AUTOINTERP_COLUMNS) + "</tr>"]
    for name, counts in (data.get("variants") or {}).items():
        cells = []
        for key, _ in AUTOINTERP_COLUMNS:
            value = counts.get(key)
            text = f"{value:.1%}" if key == "parse_rate" and isinstance(value, (int, float)) else ("–" if value is None else str(value))
            cells.append(f'<td class="num">{esc(text)}</td>')
        rows.append(f"<tr><td>{esc(name)}</td>{''.join(cells)}</tr>")
    rows.append("</table>")
    return head + "\n".join(rows)


def claims_html(rows: list[dict], profile: str) -> str:
    paper_head = "Paper" if profile == "paper" else PAPER_REFERENCE_LABEL
    out = [f"<table><tr><th>Claim</th><th>{esc(paper_head)}</th><th>This run ({esc(profile)}): mean ± spread over seeds</th>"
           "<th>Verdict</th><th>How it was computed</th></tr>"]
    classes = {"holds": "holds", "does not hold": "fails", "inconclusive": "na", "not computable": "na"}
    for r in rows:
        judged = r.get("verdict") or ("holds" if r["holds"] is True else "does not hold" if r["holds"] is False else "not computable")
        ours = claims_mod.format_value(r["our_value"], r["unit"])
        if r.get("spread") is not None:
            ours += " ± " + claims_mod.format_value(r["spread"], r["unit"]).lstrip("+")
        seeds = r.get("seed_values") or {}
        per_seed = ("per seed: " + ", ".join(f"{s}: {claims_mod.format_value(v, r['unit'])}" for s, v in seeds.items())
                    if len(seeds) > 1 else "one seed" if seeds else "")
        out.append(
            f"<tr><td>{esc(r['claim'])} <span class=\"note\">({esc(r['source'])})</span></td>"
            f"<td class=\"num\" title=\"{esc(r.get('paper_note', ''))}\">{esc(claims_mod.format_value(r['paper_value'], r['unit']))}</td>"
            f"<td class=\"num\">{esc(ours)}<br><span class=\"note\">{esc(per_seed)}</span></td>"
            f"<td><span class=\"{classes[judged]}\">{esc(judged)}</span></td><td class=\"note\">{esc(r['note'])}"
            f"<br>paper: {esc(r.get('paper_note', ''))}</td></tr>"
        )
    out.append("</table>")
    out.append(f'<p class="note">Verdict rule: {esc(claims_mod.VERDICT_RULE)}</p>')
    return "\n".join(out)


def timings_html(timings: list[dict]) -> str:
    if not timings:
        return '<p class="na">No stage timings recorded (results/timings/ is empty): not available.</p>'
    total = sum(t["seconds"] for t in timings)
    rows = "".join(
        f"<tr><td>{esc(t['stage'])}</td><td class=\"num\">{t['seconds']:,.1f}</td><td>{esc(t['finished_at'])}</td></tr>"
        for t in timings
    )
    return (f"<table><tr><th>Stage</th><th>Seconds</th><th>Finished (UTC)</th></tr>{rows}"
            f"<tr><th>total</th><th class=\"num\">{total:,.1f}</th><th>{total / 60:,.1f} min</th></tr></table>")


def figure_html(name: str, figures_dir: Path, html_dir: Path, out_dir: Path) -> str:
    title, caption = FIGURES[name]
    png = figures_dir / f"{name}.png"
    if png.is_file():
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        body = f'<img alt="{esc(title)}" src="data:image/png;base64,{data}">'
    else:
        body = (f'<div class="missing">Figure not produced: {esc(png.as_posix())} does not exist. '
                f"Run <code>dvc repro</code> to execute notebooks/{esc(name)}.ipynb.</div>")
    notebook = html_dir / f"{name}.html"
    link = ""
    if notebook.is_file():
        href = os.path.relpath(notebook, out_dir).replace(os.sep, "/")
        link = f' <a href="{esc(href)}">Notebook</a>.'
    return f'<figure id="{esc(name)}">{body}<figcaption><b>{esc(title)}.</b> {esc(caption)}{link}</figcaption></figure>'


def table1_html(metrics: pd.DataFrame) -> str:
    table = results_mod.format_table1(results_mod.table1(metrics))
    head = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    text = [c in results_mod.TABLE1_TEXT for c in table.columns]
    body = []
    for _, row in table.iterrows():
        cells = "".join((f"<td>{esc(v)}</td>" if text[i] else f'<td class="num">{esc(v)}</td>')
                        for i, v in enumerate(row.values))
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


SYNTHETIC_TITLE = "Ground-truth benchmark: feature recovery vs L0"
SYNTHETIC_CAPTION = (
    "Every architecture trained on synthetic activations built from a known dictionary (moesae synthetic). "
    "Recovery is measured against the true features: Hungarian-matched cosine, fraction of true features "
    "recovered at cos >= 0.9 and detection F1; error bars are the spread over seeds."
)


def synthetic_html(results: Path, figures_dir: Path, html_dir: Path, out_dir: Path) -> str:
    """The ground-truth benchmark: its figure, the ranking with seed spread, and the best family."""
    summary = _read_json(results / "synthetic" / "summary.json")
    png = figures_dir / "synthetic_recovery.png"
    if png.is_file():
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        body = f'<img alt="{esc(SYNTHETIC_TITLE)}" src="data:image/png;base64,{data}">'
    else:
        body = ('<div class="missing">Figure not produced: reports/figures/synthetic_recovery.png does not exist. '
                "Run <code>dvc repro figure_synthetic</code>.</div>")
    link = ""
    if (html_dir / "synthetic_recovery.html").is_file():
        href = os.path.relpath(html_dir / "synthetic_recovery.html", out_dir).replace(os.sep, "/")
        link = f' <a href="{esc(href)}">Notebook</a>.'
    figure = (f'<figure id="synthetic_recovery">{body}<figcaption><b>{esc(SYNTHETIC_TITLE)}.</b> '
              f"{esc(SYNTHETIC_CAPTION)}{link}</figcaption></figure>")
    if not summary:
        return figure + '<p class="na">Not available: results/synthetic/summary.json is missing.</p>'
    metric = summary.get("ranking_metric", "matched_cosine")
    ks = ", ".join(str(k) for k in summary.get("ranking_k", []))

    def spread(r: dict) -> str:
        return "–" if r.get("std") is None else f"{r['std']:.3f}"

    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{esc(r['family'])}</td><td class=\"num\">{r['mean']:.3f}</td>"
        f"<td class=\"num\">{spread(r)}</td></tr>"
        for i, r in enumerate(summary.get("ranking", []))
    )
    chance = summary.get("chance", {})
    chance_note = ""
    if chance:
        first = next(iter(chance.values()))
        if isinstance(first, dict) and metric in first:
            chance_note = f" A random decoder scores about {first[metric]:.3f} on this metric."
    best = esc(summary.get("best_family", "–"))
    return (
        figure
        + f"<p>Best at recovering the ground truth: <b>{best}</b> (ranked by {esc(metric)}, averaged over "
        f"L0 = {esc(ks)} and seeds).{esc(chance_note)}</p>"
        + f"<table><tr><th>rank</th><th>family</th><th>{esc(metric)} (mean)</th><th>std over seeds</th></tr>{rows}</table>"
    )


THROUGHPUT_CASES = ("topk-24576", "topk-3072", "topk-768", "switch-32", "scale-16-2", "scale-32-4", "scale-64-8")


def throughput_html(bench_dir: Path) -> str:
    """Paper-size training throughput from the committed benchmark results, and the issue's targets."""
    files = sorted(bench_dir.glob("*.json")) if bench_dir.is_dir() else []
    runs = [(f, data) for f in files if (data := _read_json(f)) and isinstance(data.get("cases"), list)]
    if not runs:
        return (f'<p class="na">Not available: no benchmark results in {esc(bench_dir.as_posix())}/ '
                "(run <code>make benchmark</code>).</p>")
    parts = ["<p>Training steps at paper size (d = 768, M = 24576, k = 32), timed by "
             "<code>make benchmark</code> (benchmarks/throughput.py), not by this run: <b>fast</b> is what the "
             "pipeline trains with, <b>naive</b> the authors' all-experts design, <b>dense</b> TopK without "
             "sparse paths.</p>"]
    if not any(d.get("device_type") == "cuda" for _, d in runs):
        parts.append('<p class="note">No GPU results: no GPU was available to measure them, so the GPU '
                     "targets (Scale (16,2) ≥ 5M and dense TopK-24576 ≥ 3M tokens/s) are not measured.</p>")
    for f, data in runs:
        rows = [r for r in data["cases"] if r.get("size") == "paper" and r.get("name") in THROUGHPUT_CASES]
        body = "".join(
            f"<tr><td>{esc(r['name'])}</td><td>{esc(r['implementation'])}</td>"
            f"<td class=\"num\">{r['tokens_per_s']:,.0f}</td><td class=\"num\">{1000 * r['seconds_per_step']:,.0f}</td>"
            f"<td class=\"num\">{r['peak_memory_mb']:,.0f}</td><td class=\"num\">{100 * r.get('fraction_of_peak', float('nan')):.0f}</td></tr>"
            for r in rows
        )
        targets = "".join(
            f"<li>{esc(t['target'])}: {t['measured']:.3g} → "
            + ('<span class="holds">met</span>' if t["met"] else '<span class="fails">not met</span>') + "</li>"
            for t in data.get("summary", {}).get("paper", {}).get("targets", [])
        )
        parts.append(
            f"<h3>{esc(f.name)}: {esc(data.get('device_type', '?'))} ({esc(data.get('device', '?'))}), "
            f"batch {esc(data.get('batch_size'))}, {esc(data.get('threads'))} threads, torch {esc(data.get('torch'))}</h3>"
            f"<table><tr><th>case</th><th>implementation</th><th>tokens/s</th><th>ms/step</th>"
            f"<th>peak MiB</th><th>% of peak FLOP/s</th></tr>{body}</table><ul>{targets}</ul>"
        )
    return "\n".join(parts)


# ---- the page ----------------------------------------------------------------------------------------------
def build_report(root: str | Path = ".", out: str | Path | None = None, results_dir: str | Path = "results",
                 reports_dir: str | Path = "reports", params_path: str | Path = "params.yaml",
                 benchmarks_dir: str | Path = "benchmarks/results") -> Path:
    """Write the report for the run rooted at ``root`` and return its path."""
    root = Path(root)
    results = root / results_dir
    reports = root / reports_dir
    out = Path(out) if out is not None else reports / "index.html"
    profile = _profile(root / params_path)
    metrics = results_mod.load_metrics(results)
    paper = results_mod.paper_frame()
    claim_rows = claims_mod.claims_table(metrics, paper)
    manifest = _read_json(root / "data" / "corpus" / "manifest.json")
    subject = _read_json(results / "subject_model.json")
    timings = read_timings(results)
    n_variants = len(metrics)
    seeds = sorted(pd.to_numeric(metrics.get("seed", pd.Series([0])), errors="coerce").dropna().astype(int).unique())

    figures = [n for n in FIGURES if n != "table1_configurations"]
    fig_html = "\n".join(figure_html(n, reports / "figures", reports / "html", out.parent) for n in figures)
    t1_link = ""
    if (reports / "html" / "table1_configurations.html").is_file():
        href = os.path.relpath(reports / "html" / "table1_configurations.html", out.parent).replace(os.sep, "/")
        t1_link = f' <a href="{esc(href)}">Notebook</a>.'
    scale_note = ("" if profile == "paper" else
                  f"<p class=\"note\">This run uses the <b>{esc(profile)}</b> profile: a different subject model and a much "
                  "smaller scale than the paper (docs/" + ("real_profile.md" if profile == "real" else "method.md") +
                  " says what differs). The paper's numbers are shown for reference only; each verdict is judged on "
                  "this run's own numbers (the direction of each effect, against its seed-to-seed spread).</p>")
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    browser_index = reports / "features" / "index.html"
    browser_link = ""
    if browser_index.is_file():
        href = os.path.relpath(browser_index, out.parent).replace(os.sep, "/")
        browser_link = f' · <a href="{esc(href)}">Feature browser</a>'
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>moesae report · profile {esc(profile)}</title>
<style>{CSS}</style></head>
<body>
<h1>Scale SAE replication: report</h1>
<p class="note">Replication of “Beyond Redundancy: Diverse and Specialized Multi-Expert Sparse Autoencoder”
(Xu et al., arXiv 2511.05745) with Switch SAE and TopK baselines. Generated {esc(generated)} by <code>moesae report</code>.</p>
<p><a href="#provenance">Provenance</a> · <a href="#claims">Claims</a> · <a href="#timings">Run time</a> ·
<a href="#figures">Figures</a> · <a href="#table1">Table 1</a> · <a href="#synthetic">Ground truth</a> ·
<a href="#throughput">Throughput</a>{browser_link}</p>

<h2 id="provenance">What produced this run</h2>
<table class="meta">
<tr><td>profile</td><td><b>{esc(profile)}</b> (params.yaml)</td></tr>
<tr><td>configurations evaluated</td><td>{n_variants} (seeds: {esc(", ".join(map(str, seeds)) or "–")})</td></tr>
</table>
<h3>Data (data/corpus/manifest.json)</h3>
{_meta_table(manifest, "not available: data/corpus/manifest.json is missing")}
<h3>Subject model (results/subject_model.json)</h3>
{_meta_table(subject, "not available: results/subject_model.json is missing")}

<h2 id="claims">The paper's headline claims in this run</h2>
{scale_note}
{claims_html(claim_rows, profile)}

<h2 id="timings">Run time per stage</h2>
{timings_html(timings)}

<h2 id="figures">Figures</h2>
{fig_html}

<h3 id="autointerp">Auto-interpretability runs behind Fig 3d (results/autointerp/summary.json)</h3>
{autointerp_html(results / "autointerp" / "summary.json")}

<h2 id="table1">Table 1 · Configurations</h2>
<p>{esc(FIGURES["table1_configurations"][1])}{t1_link}</p>
{table1_html(metrics)}

<h2 id="synthetic">Ground-truth benchmark</h2>
{synthetic_html(results, reports / "figures", reports / "html", out.parent)}

<h2 id="throughput">Training throughput (benchmark)</h2>
{throughput_html(root / benchmarks_dir)}
</body></html>
"""
    atomic_write_text(out, page)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae report", description="Build reports/index.html from results/")
    parser.add_argument("--root", default=".", help="the run's root folder (holds params.yaml, results/, reports/)")
    parser.add_argument("--out", default=None, help="output file (default: <root>/reports/index.html)")
    args = parser.parse_args(argv)
    from .timing import record

    with record("report", Path(args.root) / "results"):
        path = build_report(args.root, args.out)
    print(f"[report] wrote {path}")
    return 0
