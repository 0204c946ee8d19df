"""HTML of the feature browser, from plain data (no torch): pure functions returning strings.

Every string that comes from the corpus, the tokenizer or an LLM reply goes through :func:`esc`
(tokens can contain markup and scripts). Pages are self-contained: inline CSS, one small inline
script for sorting / filtering the index tables, no network loads."""
from __future__ import annotations

import html
import math
from typing import Any, Sequence

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:72em;color:#222}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}th.s{cursor:pointer}th.s:after{content:" \\2195";color:#999}
.ctx{font-family:ui-monospace,monospace;font-size:.85em;white-space:pre-wrap;margin:.15em 0;padding:.2em;border-left:3px solid #eee}
.ctx span{border-radius:2px}.tok{font-family:ui-monospace,monospace;background:#f4f4f4;padding:0 .2em}
.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#777}.row{display:flex;gap:2em;flex-wrap:wrap}
h2{margin-top:1.4em}nav a{margin-right:1em}
"""

SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th.s').forEach(function(th,i){th.addEventListener('click',function(){
  var b=t.tBodies[0],r=Array.prototype.slice.call(b.rows),c=th.cellIndex,d=th.dataset.d=th.dataset.d==='1'?'-1':'1';
  r.sort(function(x,y){var a=parseFloat(x.cells[c].dataset.v),z=parseFloat(y.cells[c].dataset.v);
   if(isNaN(a))a=-Infinity;if(isNaN(z))z=-Infinity;return (a-z)*d;});r.forEach(function(x){b.appendChild(x);});});});});
var f=document.getElementById('expert-filter');
if(f){f.addEventListener('change',function(){document.querySelectorAll('tr[data-expert]').forEach(function(r){
 r.style.display=(f.value===''||r.dataset.expert===f.value)?'':'none';});});}
"""


def esc(value: Any) -> str:
    """HTML-escaped text (quotes too: safe inside attributes)."""
    return html.escape(str(value), quote=True)


def token_text(token: str) -> str:
    """A token shown visibly: escaped, newlines as ↵, tabs as →."""
    return esc(token).replace("\r", "").replace("\n", "\u21b5").replace("\t", "\u2192")


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "\u2013"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def sortval(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "NaN"
    return repr(float(x))


def page(title: str, body: str, nav: Sequence[tuple[str, str]] = (), script: bool = False) -> str:
    links = "".join(f'<a href="{esc(href)}">{esc(text)}</a>' for href, text in nav)
    js = f"<script>{SCRIPT}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><nav>{links}</nav><h1>{esc(title)}</h1>{body}{js}</body></html>\n")


def context_html(tokens: Sequence[str], acts: Sequence[float], scale: float) -> str:
    """One context, each token shaded by its activation relative to ``scale`` (the feature's max)."""
    parts = []
    for tok, a in zip(tokens, acts):
        a = float(a)
        if a > 0:
            alpha = min(1.0, a / scale) if scale > 0 else 1.0
            parts.append(f'<span style="background:rgba(255,110,0,{0.15 + 0.75 * alpha:.2f})" '
                         f'title="{a:.3g}">{token_text(tok)}</span>')
        else:
            parts.append(token_text(tok))
    peak = max((float(a) for a in acts), default=0.0)
    return f'<div class="ctx" title="max {peak:.3g}">{"".join(parts)}</div>'


def histogram_svg(counts: Sequence[int], edges: Sequence[float], width: int = 420, height: int = 120) -> str:
    """Inline SVG bar chart of an activation histogram (counts on a linear axis)."""
    if not len(counts):
        return '<p class="muted">no activations</p>'
    top = max(max(counts), 1)
    bw = width / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = (height - 20) * c / top
        bars.append(f'<rect x="{i * bw:.1f}" y="{height - 20 - h:.1f}" width="{max(bw - 1, 1):.1f}" height="{h:.1f}" '
                    f'fill="#e86a00"><title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): {int(c)}</title></rect>')
    labels = (f'<text x="0" y="{height - 5}" font-size="10">{edges[0]:.3g}</text>'
              f'<text x="{width}" y="{height - 5}" font-size="10" text-anchor="end">{edges[-1]:.3g}</text>'
              f'<text x="{width}" y="10" font-size="10" text-anchor="end">max count {int(top)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="activation histogram">{"".join(bars)}{labels}</svg>')


def feature_href(fid: int) -> str:
    return f"f{int(fid)}.html"


def feature_page(sae: dict[str, Any], f: dict[str, Any]) -> str:
    """The page of one sampled feature."""
    scale = f["max_activation"] or 1.0
    is_moe = sae["is_moe"]
    facts = [("density (share of cached tokens)", fmt(f["density"])), ("fires on", f"{f['count']} of {sae['num_tokens']} tokens"),
             ("max activation", fmt(f["max_activation"]))]
    if is_moe:
        facts.append(("expert", str(f["expert"])))
    for key, label in (("fuzzing", "auto-interp fuzzing accuracy"), ("detection", "auto-interp detection accuracy")):
        if f.get(key) is not None:
            facts.append((label, fmt(f[key])))
    body = ["<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts) + "</table>"]
    expl = f.get("explanation")
    body.append(f"<h2>Auto-interp explanation</h2><p>{esc(expl) if expl else '<span class=muted>none (not in the auto-interp sample)</span>'}</p>")
    body.append("<h2>Top-activating contexts</h2>")
    body += [context_html(e["tokens"], e["acts"], scale) for e in f["top"]] or ['<p class="muted">none</p>']
    body.append("<h2>Contexts by activation decile</h2>")
    if not f["quantiles"]:
        body.append('<p class="muted">too few contexts beyond the top ones</p>')
    for decile, exs in f["quantiles"]:
        body.append(f"<h3>decile {int(decile)}</h3>" + "".join(context_html(e["tokens"], e["acts"], scale) for e in exs))
    body.append("<h2>Activation histogram</h2>" + histogram_svg(*f["histogram"]))
    body.append("<h2>Output tokens (approximate: direct path)</h2>"
                "<p class=muted>W_dec[j] \u2299 final-norm weight, then the unembedding; ignores every later layer.</p>")
    cols = []
    for key, label in (("promoted", "most promoted"), ("suppressed", "most suppressed")):
        rows = "".join(f'<tr><td><span class="tok" title="token id {int(i)}">{token_text(t)}</span></td><td class="num">{v:.3g}</td></tr>'
                       for i, t, v in f[key])
        cols.append(f"<div><h3>{label}</h3><table><tr><th>token</th><th>logit</th></tr>{rows}</table></div>")
    body.append(f'<div class="row">{"".join(cols)}</div>')
    body.append("<h2>Nearest features by decoder cosine</h2>")
    if f["neighbours"]:
        expert_th = f"<th>expert (this: {int(f['expert'])})</th>" if is_moe else ""
        head = f"<tr><th>feature</th><th>cosine</th>{expert_th}<th>density</th><th>explanation</th></tr>"
        rows = []
        for n in f["neighbours"]:
            name = f'<a href="{feature_href(n["id"])}">{int(n["id"])}</a>' if n["sampled"] else str(int(n["id"]))
            same = ""
            if is_moe:
                same = f"<td>{int(n['expert'])}{' (same)' if n['expert'] == f['expert'] else ''}</td>"
            rows.append(f"<tr><td>{name}</td><td class=num>{n['cosine']:.3f}</td>{same}<td class=num>{fmt(n['density'])}</td>"
                        f"<td>{esc(n.get('explanation') or '')}</td></tr>")
        body.append(f"<table>{head}{''.join(rows)}</table>")
    nav = [("../index.html", "all SAEs"), ("index.html", f"{sae['name']} features")]
    if is_moe:
        nav.append(("experts.html", "experts"))
    return page(f"{sae['name']} \u00b7 feature {int(f['id'])}", "".join(body), nav)


def sae_index(sae: dict[str, Any]) -> str:
    """The sortable feature index of one SAE (filter by expert for MoE SAEs)."""
    is_moe = sae["is_moe"]
    body = [f"<p>{esc(sae['architecture'])} \u00b7 {esc(sae['label'])} \u00b7 M = {sae['num_latents']} \u00b7 k = {sae['k']} \u00b7 "
            f"{len(sae['features'])} sampled live features (of {sae['live']} firing \u2265 {sae['min_activations']} times "
            f"on {sae['num_tokens']} cached tokens). Click a column header to sort.</p>"]
    if is_moe:
        experts = sorted({int(f["expert"]) for f in sae["features"]})
        opts = "".join(f'<option value="{e}">{e}</option>' for e in experts)
        body.append(f'<p><a href="experts.html">expert overview</a> \u00b7 <label>expert <select id="expert-filter">'
                    f'<option value="">all</option>{opts}</select></label></p>')
    head = ("<tr><th class=s>feature</th>" + ("<th class=s>expert</th>" if is_moe else "")
            + "<th class=s>density</th><th class=s>max act</th><th class=s>fuzzing</th><th class=s>detection</th><th>explanation</th></tr>")
    rows = []
    for f in sae["features"]:
        attr = f' data-expert="{int(f["expert"])}"' if is_moe else ""
        cells = [f'<td data-v="{int(f["id"])}"><a href="{feature_href(f["id"])}">{int(f["id"])}</a></td>']
        if is_moe:
            cells.append(f'<td data-v="{int(f["expert"])}">{int(f["expert"])}</td>')
        for key in ("density", "max_activation", "fuzzing", "detection"):
            cells.append(f'<td class=num data-v="{sortval(f.get(key))}">{fmt(f.get(key))}</td>')
        cells.append(f"<td>{esc(f.get('explanation') or '')}</td>")
        rows.append(f"<tr{attr}>{''.join(cells)}</tr>")
    body.append(f'<table class="sortable"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>')
    nav = [("../index.html", "all SAEs")] + ([("experts.html", "experts")] if is_moe else [])
    return page(f"{sae['name']}: features", "".join(body), nav, script=True)


def experts_page(sae: dict[str, Any]) -> str:
    """Expert overview of an MoE SAE: features per expert, routing share, ω, probe tokens served."""
    ex = sae["experts"]
    n = len(ex["features_per_expert"])
    have = {k: bool(ex.get(k)) for k in ("usage", "omega", "probe")}
    body = ["<p>Routing share: share of (token, selected expert) assignments on the held-out pass; "
            "\u03c9: the trained per-expert scale (from the evaluation JSON, when trained). "
            f"Probe tokens: the words of the probe set ({esc(ex.get('probe_words') or 'none')}) whose top features "
            "this expert owns. Click a header to sort.</p>"]
    head = ("<tr><th class=s>expert</th><th class=s>features</th><th class=s>routing share</th><th class=s>\u03c9</th>"
            "<th class=s>probe tokens</th><th>sampled features</th><th>probe words</th></tr>")
    by_expert: dict[int, list[int]] = {}
    for f in sae["features"]:
        by_expert.setdefault(int(f["expert"]), []).append(int(f["id"]))
    rows = []
    for e in range(n):
        usage = ex["usage"][e] if have["usage"] and e < len(ex["usage"]) else None
        omega = ex["omega"][e] if have["omega"] and e < len(ex["omega"]) else None
        words = (ex.get("probe") or {}).get(e, [])
        links = " ".join(f'<a href="{feature_href(i)}">{i}</a>' for i in by_expert.get(e, []))
        rows.append(f"<tr><td data-v={e}>{e}</td><td class=num data-v={ex['features_per_expert'][e]}>{ex['features_per_expert'][e]}</td>"
                    f"<td class=num data-v=\"{sortval(usage)}\">{fmt(usage)}</td><td class=num data-v=\"{sortval(omega)}\">{fmt(omega)}</td>"
                    f"<td class=num data-v={len(words)}>{len(words)}</td><td>{links}</td>"
                    f"<td>{' '.join(f'<span class=tok>{token_text(w)}</span>' for w in words[:12])}</td></tr>")
    body.append(f'<table class="sortable"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>')
    return page(f"{sae['name']}: experts", "".join(body), [("../index.html", "all SAEs"), ("index.html", "features")], script=True)


def top_index(saes: Sequence[dict[str, Any]]) -> str:
    """reports/features/index.html: one row per SAE."""
    rows = []
    for s in saes:
        extra = ' \u00b7 <a href="{0}/experts.html">experts</a>'.format(esc(s["name"])) if s["is_moe"] else ""
        rows.append(f'<tr><td><a href="{esc(s["name"])}/index.html">{esc(s["name"])}</a>{extra}</td><td>{esc(s["family"])}</td>'
                    f"<td>{esc(s['architecture'])}</td><td class=num>{s['num_latents']}</td><td class=num>{s['k']}</td>"
                    f"<td class=num>{len(s['features'])}</td><td class=num>{s['live']}</td><td class=num>{fmt(s.get('fvu'))}</td></tr>")
    body = ("<p>Sampled live features of each SAE: top-activating and per-decile contexts, activation histogram, "
            "output tokens of the decoder direction (approximate: direct path), nearest features by decoder cosine, "
            "auto-interp explanations where scored. Static pages, no network access.</p>"
            "<table><tr><th>SAE</th><th>family</th><th>architecture</th><th>M</th><th>k</th><th>sampled</th>"
            f"<th>live</th><th>FVU (held-out)</th></tr>{''.join(rows)}</table>")
    return page("Feature browser", body)
