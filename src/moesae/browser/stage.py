"""The ``moesae browse`` stage: for each selected SAE, one pass over the held-out activation cache
(the auto-interp scan: fire counts of every feature, codes of the sampled ones), the examples
(auto-interp's context builder), decoder-direction logits and nearest decoder neighbours, then
the static pages under ``reports/features/``."""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..io import atomic_write_text
from ..params import load_params
from . import render
from .config import BrowserConfig, load_config

OUT_DIR = Path("reports/features")
MODELS_DIR = Path("models")
EVAL_DIR = Path("results/eval")
EXPLANATIONS = Path("results/autointerp/explanations.jsonl")


def select(params: dict[str, Any], cfg: BrowserConfig) -> dict[str, dict[str, Any]]:
    """Variant name → its grid entry: ``auto`` = the auto-interp selection."""
    from ..autointerp.config import load_config as autointerp_config
    from ..autointerp.selection import select_variants
    from ..grid import study_variants

    grid = study_variants(params)
    if cfg.variants == "auto":
        names = list(select_variants(grid, autointerp_config(params.get("autointerp"))))
    else:
        missing = [v for v in cfg.variants if v not in grid]
        if missing:
            raise ValueError(f"params.yaml: browser.variants names '{missing[0]}', which is not a grid variant")
        names = list(cfg.variants)
    return {n: grid[n] for n in names}


def read_explanations(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out[(str(rec["variant"]), int(rec["feature"]))] = rec
    return out


def final_norm_weight(model: Any):
    """The final layer norm's weight of a HF causal LM (GPT-2 ``ln_f``, Llama ``norm``, ...) or None."""
    base = getattr(model, "base_model", model)
    for name in ("ln_f", "norm", "final_layer_norm", "final_norm"):
        mod = getattr(base, name, None)
        w = getattr(mod, "weight", None)
        if w is not None:
            return w.detach().float().cpu()
    return None


def output_tokens(W_dec: Any, feats: np.ndarray, subject: Any, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top / bottom ``n`` token ids and logits of ``W_dec[j] ⊙ g @ W_U`` per feature (direct path)."""
    import torch

    W_U = subject.model.get_output_embeddings().weight.detach().float().cpu()  # [V, d]
    D = W_dec.detach().float().cpu()[torch.as_tensor(feats, dtype=torch.long)]
    g = final_norm_weight(subject.model)
    if g is not None and g.shape[0] == D.shape[1]:
        D = D * g
    logits = D @ W_U.T
    n = min(n, logits.shape[1])
    top = torch.topk(logits, n, dim=1)
    bot = torch.topk(-logits, n, dim=1)
    return top.indices.numpy(), top.values.numpy(), bot.indices.numpy(), -bot.values.numpy()


def nearest(W_dec: Any, feats: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` other features with the highest decoder cosine to each of ``feats``."""
    import torch

    W = torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=1)
    idx = torch.as_tensor(feats, dtype=torch.long)
    cos = W[idx] @ W.T
    cos[torch.arange(len(idx)), idx] = -2.0
    n = min(n, W.shape[0] - 1)
    top = torch.topk(cos, n, dim=1)
    return top.indices.numpy(), top.values.numpy()


def probe_experts(sae: Any, subject: Any, eval_cfg: Any) -> tuple[dict[int, list[str]], str]:
    """Expert → probe words whose top ``probe_top_features`` features it owns (evaluate's probe set)."""
    import torch

    from ..evaluate import load_probe_words, probe_positions

    words = load_probe_words(eval_cfg.probe_words)
    if eval_cfg.max_probe_words is not None:
        words = words[: eval_cfg.max_probe_words]
    owner = sae.expert_of_feature().cpu()
    served: dict[int, list[str]] = {}
    with torch.no_grad():
        for start in range(0, len(words), 256):
            chunk = words[start:start + 256]
            tokens, mask = subject.encode_texts([eval_cfg.probe_template.replace("{w}", w) for w in chunk])
            pos = probe_positions(subject, eval_cfg.probe_template, tokens)
            resid = subject.hook_activations(tokens, mask)
            x = resid[torch.arange(resid.shape[0]), pos.to(resid.device)].float()
            z = sae(x.to(sae.W_dec.device)).dense_code(sae.cfg.num_latents).cpu()
            vals, idx = torch.topk(z, min(eval_cfg.probe_top_features, z.shape[1]), dim=1)
            for w, v, i in zip(chunk, vals, idx):
                for e in sorted({int(owner[j]) for j, a in zip(i.tolist(), v.tolist()) if a > 0}):
                    served.setdefault(e, []).append(w)
    return served, str(eval_cfg.probe_words)


def choose_features(counts: np.ndarray, explained: Sequence[int], cfg: BrowserConfig) -> np.ndarray:
    """``num_features`` live features: the live ones auto-interp explained first (in auto-interp's
    seeded order, so their explanations show), then :func:`sample_features`' uniform sample."""
    from ..autointerp.codes import feature_order, sample_features

    live = counts >= cfg.min_activations
    explained_set = {int(j) for j in explained}
    first = [int(j) for j in feature_order(len(counts), cfg.seed) if int(j) in explained_set and live[j]]
    chosen = first[: cfg.num_features]
    if len(chosen) < cfg.num_features:
        extra = [int(j) for j in sample_features(counts, cfg.num_features + len(chosen), cfg.min_activations, cfg.seed)
                 if int(j) not in set(chosen)]
        chosen += extra[: cfg.num_features - len(chosen)]
    return np.sort(np.asarray(chosen, dtype=np.int64))


def scan_sae(sae: Any, batches: Callable[[], Any], cfg: BrowserConfig, explained: Sequence[int]
             ) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """One pass of ``sae`` over the cache read: fire counts, the chosen features, their (rows, values)."""
    from ..autointerp.codes import sparse_codes

    parts, offset = [], 0
    for x in batches():
        r, f, v = sparse_codes(sae, x)
        parts.append((r + offset, f, v))
        offset += int(x.shape[0])
    rows, fs, vals = (np.concatenate([p[i] for p in parts]) for i in range(3))
    counts = np.bincount(fs, minlength=int(sae.cfg.num_latents))
    feats = choose_features(counts, explained, cfg)
    keep = np.isin(fs, feats)
    rows, fs, vals = rows[keep], fs[keep], vals[keep]
    order = np.lexsort((rows, fs))
    rows, fs, vals = rows[order], fs[order], vals[order]
    a, b = np.searchsorted(fs, feats), np.searchsorted(fs, feats, side="right")
    return counts, feats, {int(j): (rows[i:k], vals[i:k]) for j, i, k in zip(feats, a, b)}


def example_dict(ex: Any, strings: Callable[[Sequence[int]], list[str]]) -> dict[str, Any]:
    return {"tokens": strings(ex.tokens.tolist()), "acts": [float(a) for a in ex.activations], "max": float(ex.max_activation)}


def build_sae(name: str, variant: dict[str, Any], sae: Any, counts: np.ndarray, codes: dict[int, tuple[np.ndarray, np.ndarray]],
              feats: np.ndarray, stream: Any, subject: Any, cfg: BrowserConfig, explanations: dict, eval_json: dict | None,
              eval_cfg: Any) -> dict[str, Any]:
    """The plain data of one SAE's pages."""
    from ..autointerp.config import AutointerpConfig
    from ..autointerp.examples import collect_examples

    ex_cfg = AutointerpConfig(explainer_examples=cfg.top_examples, examples_per_decile=max(cfg.quantile_examples, 1),
                              window_before=cfg.window_before, window_after=cfg.window_after,
                              chunk_length=cfg.chunk_length, seed=cfg.seed)
    num_tokens = len(stream)
    is_moe = bool(type(sae).is_moe)
    owner = sae.expert_of_feature().cpu().numpy() if is_moe else None
    vocab: dict[int, str] = {}

    def strings(ids: Sequence[int]) -> list[str]:
        new = sorted({int(i) for i in ids} - vocab.keys())
        if new:
            vocab.update(zip(new, subject.token_strings(new)))
        return [vocab[int(i)] for i in ids]

    pid, pval, sid, sval = output_tokens(sae.W_dec, feats, subject, cfg.logit_tokens)
    nid, ncos = nearest(sae.W_dec, feats, cfg.neighbours)
    sampled = {int(f) for f in feats}
    rng = np.random.default_rng(cfg.seed)
    features = []
    for i, fid in enumerate(feats.tolist()):
        rows, vals = codes.get(fid, (np.zeros(0, np.int64), np.zeros(0, np.float32)))
        fe = collect_examples(fid, rows, vals, stream, ex_cfg, rng)
        quantiles: dict[int, list] = {}
        if cfg.quantile_examples:
            for e in fe.test:
                quantiles.setdefault(e.decile, []).append(example_dict(e, strings))
        hc, he = np.histogram(vals, bins=cfg.histogram_bins) if len(vals) else (np.zeros(0), np.zeros(1))
        rec = explanations.get((name, fid), {})
        features.append({
            "id": fid, "expert": None if owner is None else int(owner[fid]),
            "count": int(counts[fid]), "density": float(counts[fid]) / max(num_tokens, 1),
            "max_activation": float(vals.max()) if len(vals) else 0.0,
            "explanation": rec.get("explanation"), "fuzzing": rec.get("fuzzing_accuracy"), "detection": rec.get("detection_accuracy"),
            "top": [example_dict(e, strings) for e in fe.explain],
            "quantiles": sorted(quantiles.items(), reverse=True),
            "histogram": ([int(c) for c in hc], [float(x) for x in he]),
            "promoted": list(zip(pid[i].tolist(), strings(pid[i].tolist()), pval[i].tolist())),
            "suppressed": list(zip(sid[i].tolist(), strings(sid[i].tolist()), sval[i].tolist())),
            "neighbours": [{"id": int(j), "cosine": float(c), "sampled": int(j) in sampled,
                            "expert": None if owner is None else int(owner[j]),
                            "density": float(counts[j]) / max(num_tokens, 1),
                            "explanation": explanations.get((name, int(j)), {}).get("explanation")}
                           for j, c in zip(nid[i].tolist(), ncos[i].tolist())],
        })
    from ..saes import describe
    from ..grid import sae_fields

    facts = describe(variant["architecture"], **sae_fields(variant))
    data: dict[str, Any] = {
        "name": name, "family": variant.get("family", name), "architecture": variant["architecture"],
        "label": getattr(facts, "label", ""), "is_moe": is_moe, "num_latents": int(sae.cfg.num_latents),
        "k": variant.get("k"), "num_tokens": num_tokens, "live": int((counts >= cfg.min_activations).sum()),
        "min_activations": cfg.min_activations, "features": features,
        "fvu": (eval_json or {}).get("fvu_heldout"), "experts": None,
    }
    if is_moe:
        probe, probe_words = {}, None
        if eval_cfg is not None:
            try:
                probe, probe_words = probe_experts(sae, subject, eval_cfg)
            except (FileNotFoundError, ValueError) as exc:  # no probe list: the page says so
                print(f"[browse] {name}: no probe tokens ({exc})")
        data["experts"] = {"features_per_expert": np.bincount(owner, minlength=int(sae.cfg.num_experts)).tolist(),
                           "usage": (eval_json or {}).get("expert_usage") or [], "omega": (eval_json or {}).get("omega") or [],
                           "probe": probe, "probe_words": probe_words}
    return data


def write_pages(saes: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Every page of the browser under ``out`` (replaced as a whole)."""
    if out.exists():
        if any(out.iterdir()) and not (out / "index.html").is_file():
            raise ValueError(f"{out} exists and is not a feature browser (no index.html): not replacing it")
        shutil.rmtree(out)
    written = []
    for s in saes:
        d = out / s["name"]
        written.append(atomic_write_text(d / "index.html", render.sae_index(s)))
        for f in s["features"]:
            written.append(atomic_write_text(d / render.feature_href(f["id"]), render.feature_page(s, f)))
        if s["is_moe"]:
            written.append(atomic_write_text(d / "experts.html", render.experts_page(s)))
    written.append(atomic_write_text(out / "index.html", render.top_index(saes)))
    return written


def run_stage(params_path: str | Path = "params.yaml", out: str | Path = OUT_DIR, root: str | Path = ".") -> Path:
    import torch

    from ..activations import ActivationReader
    from ..autointerp.examples import token_stream
    from ..evaluate import EvaluateConfig
    from ..grid import model_dir
    from ..saes import load_sae
    from ..subject_model import load_subject_model

    root = Path(root)
    params = load_params(params_path)
    cfg = load_config(params.get("browser"))
    selected = select(params, cfg)
    if not selected:
        raise ValueError("browser: no SAE selected (browser.variants: auto found no auto-interp family in the grid)")
    paths = params.get("paths") or {}
    reader = ActivationReader(root / paths.get("activations", "data/activations") / cfg.split)
    n = reader.num_tokens if cfg.max_tokens is None else min(cfg.max_tokens, reader.num_tokens)
    stream = token_stream(np.asarray(reader.token_ids[:n]), np.asarray(reader.doc_index[:n]), np.asarray(reader.position[:n]), cfg.chunk_length)
    subject = load_subject_model(root / paths.get("subject_model", "models/subject"))
    saes = {name: load_sae(model_dir(name, v, root / MODELS_DIR)).eval() for name, v in selected.items()}
    def batches():
        return reader.iter_batches(cfg.batch_size, max_tokens=n)

    explanations = read_explanations(root / EXPLANATIONS)
    counts, feats, codes = [], [], []
    for name, sae in saes.items():  # one pass per SAE: every positive code kept (bounded by max_tokens)
        c, f, cd = scan_sae(sae, batches, cfg, [j for (v, j) in explanations if v == name])
        counts.append(c), feats.append(f), codes.append(cd)
    try:
        eval_cfg = EvaluateConfig(**{k: v for k, v in (params.get("evaluate") or {}).items()
                                     if k in EvaluateConfig.__dataclass_fields__})
    except (TypeError, ValueError):
        eval_cfg = None
    data = []
    for (name, variant), c, f, cd in zip(selected.items(), counts, feats, codes):
        ej_path = root / EVAL_DIR / str(variant.get("family", name)) / f"{name}.json"
        ej = json.loads(ej_path.read_text()) if ej_path.is_file() else None
        with torch.no_grad():
            data.append(build_sae(name, variant, saes[name], c, cd, f, stream, subject, cfg, explanations, ej, eval_cfg))
    out = Path(out)
    write_pages(data, out)
    return out / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae browse", description="Build the static feature browser (reports/features/)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=str(OUT_DIR))
    args = parser.parse_args(argv)
    from ..timing import record

    start = time.perf_counter()
    with record("browse"):
        path = run_stage(args.params, args.out)
    print(f"[browse] wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0
