"""GPU check (``make gpu-check``): the paper profile's CUDA paths in under 8 minutes, offline.

On one H200-class GPU (16 CPU cores), with no network and nothing downloaded:

1. **Throughput** at paper size (d = 768, M = 24576, k = 32, batch 8192) on CUDA, bf16 autocast
   and fp32, for dense TopK (M, M/8, M/32), Switch-32 and Scale (16,2), (32,4), (64,8), through
   ``benchmarks/throughput.py`` (called, not copied) → ``benchmarks/results/cuda.json`` (the bf16
   run at the top level, as ``make benchmark`` writes it; the fp32 run under ``fp32``; the
   pipeline's measurements under ``pipeline``, which ``moesae doctor`` reads for its estimates).
2. **The paper profile's pipeline end to end** at reduced token counts, through the stage code
   ``dvc repro`` runs (``moesae doctor``, ``corpus``, ``subject-model``, ``activations``,
   ``train``, ``evaluate``): a GPT-2-small-shaped model with random weights saved to a local
   folder (``subject_model.source: pretrained`` from that folder), generated text as local
   datasets shaped like the real ones (OpenWebText as a script-based repository with a parquet
   conversion, HLE and OpenWebText2 as parquet-only), the bf16 cache under a disk budget that caps
   the train split (so training cycles over it), auto-interp contexts of 256. It catches
   CUDA-only failures: dtypes, device placement, memory.
3. **The targets**: Scale (16,2) >= 5M training tokens/s and dense TopK-24576 >= 3M on one
   H200-class GPU; Scale (16,2) >= 3x TopK-24576 in the same run.

``--device cpu --tiny`` runs the same code at toy size on the CPU in well under a minute (what
the test suite runs). Exit status 1 when a stage fails; unmet targets are printed (and fail only
with ``--strict``).
"""
from __future__ import annotations

import os

# No network, nothing downloaded: set before any HF library is imported.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
BUDGET_SECONDS = 480
FAMILIES = ("scale_n16_e2", "switch_n32", "topk_m8th", "jumprelu")
"""Grid families trained and evaluated: a Scale, a Switch, a dense-encoder TopK and a dense-code baseline."""


@dataclass
class Size:
    """Everything the check's size decides."""

    d_model: int
    n_layers: int
    n_heads: int
    n_positions: int
    model_vocab: int
    tokenizer_vocab: int
    hook_layer: int
    train_bytes: int
    autointerp_bytes: int
    train_tokens: int  # requested (max_tokens.train); the disk budget caps it to train_cap
    train_cap: int
    heldout_tokens: int
    autointerp_tokens: int
    shard_tokens: int
    num_latents: int
    k: int
    steps: int
    batch_size: int
    eval_tokens: int
    bench: dict[str, Any]


PAPER = Size(d_model=768, n_layers=12, n_heads=12, n_positions=1024, model_vocab=50257, tokenizer_vocab=8192,
             hook_layer=8, train_bytes=6_000_000, autointerp_bytes=1_500_000, train_tokens=1_000_000,
             train_cap=200_000, heldout_tokens=65_536, autointerp_tokens=262_144, shard_tokens=131_072,
             num_latents=24576, k=32, steps=60, batch_size=8192, eval_tokens=65_536,
             bench={"sizes": "paper", "batch": None, "steps": None, "warmup": None, "k": 32})
TINY = Size(d_model=32, n_layers=2, n_heads=2, n_positions=512, model_vocab=600, tokenizer_vocab=512,
            hook_layer=1, train_bytes=120_000, autointerp_bytes=30_000, train_tokens=20_000, train_cap=6_000,
            heldout_tokens=2_048, autointerp_tokens=4_096, shard_tokens=2_048, num_latents=512, k=8, steps=12,
            batch_size=1024, eval_tokens=2_048,
            bench={"sizes": "tiny:32:1024", "batch": 256, "steps": 1, "warmup": 0, "k": 8})


# ---- 1. throughput --------------------------------------------------------------------------------
def _throughput_module():
    spec = importlib.util.spec_from_file_location("moesae_benchmark_throughput", HERE / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def run_throughput(device: str, size: Size, workdir: Path) -> dict[str, Any]:
    """``throughput.main`` twice (bf16 autocast, fp32); returns the bf16 result with the fp32 one under ``fp32``."""
    bench = _throughput_module()
    common = ["--device", device, "--sizes", size.bench["sizes"], "--k", str(size.bench["k"])]
    for flag, key in (("--batch-size", "batch"), ("--steps", "steps"), ("--warmup", "warmup")):
        if size.bench[key] is not None:
            common += [flag, str(size.bench[key])]
    if device == "cpu":
        common += ["--in-process", "--allocator", "default"]  # no forked processes, the allocator untouched
    runs = {}
    for autocast in ("bf16", "off"):
        print(f"[gpu-check] throughput, autocast {autocast}", flush=True)
        runs[autocast] = bench.main(common + ["--autocast", autocast, "--out", str(workdir / f"throughput_{autocast}.json")])
    result = runs["bf16"]
    off = runs["off"]
    result["fp32"] = {key: off[key] for key in ("autocast", "peak_flops", "peak_source", "cases", "summary")}
    return result


# ---- 2. the pipeline --------------------------------------------------------------------------------
_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "do", "ve", "po", "an", "el", "is", "or", "um", "th",
              "ch", "st", "qu", "ba", "ze", "fy", "wo", "gi", "ha", "ju", "cr", "pl", "ex", "in"]


def synthetic_documents(num_bytes: int, seed: int, prefix: str = "") -> list[str]:
    """Deterministic pseudo-English: Zipf-distributed made-up words in sentences, documents from
    one sentence to a few thousand characters (long ones span several contexts)."""
    rng = np.random.default_rng(seed)
    vocab = np.array(sorted({"".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(6000)}))
    vocab = vocab[rng.permutation(len(vocab))]  # frequent words of every length
    probs = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    words = vocab[rng.choice(len(vocab), size=num_bytes // 4 + 64, p=probs / probs.sum())]  # ≈ 6 bytes a word
    docs, total, i = [], 0, 0
    while total < num_bytes:
        sentences = []
        for _ in range(int(rng.integers(1, 40))):
            n = int(rng.integers(4, 18))
            chunk = words[i % len(words): i % len(words) + n]
            i += n
            text = " ".join(chunk) or "ka"
            sentences.append(text[0].upper() + text[1:] + str(rng.choice([".", ".", ".", "?", "!"])))
        doc = prefix + " ".join(sentences)
        docs.append(doc)
        total += len(doc.encode())
    return docs


def _parquet(path: Path, rows: list[dict[str, Any]], files: int = 1, name: str = "{i:04d}.parquet") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    per = math.ceil(len(rows) / files)
    for i in range(files):
        pq.write_table(pa.Table.from_pylist(rows[i * per:(i + 1) * per]), path / name.format(i=i, n=files))


def write_datasets(root: Path, size: Size) -> dict[str, Path]:
    """Local stand-ins shaped like the paper's datasets (see the module docstring)."""
    owt = root / "openwebtext"
    owt.mkdir(parents=True, exist_ok=True)
    (owt / "openwebtext.py").write_text("import datasets\n\n\nclass Openwebtext(datasets.GeneratorBasedBuilder):\n    pass\n")
    train_docs = synthetic_documents(int(size.train_bytes * 1.15), seed=1)
    _parquet(owt / "refs" / "convert" / "parquet" / "plain_text" / "partial-train", [{"text": t} for t in train_docs], 3)
    hle_rows = []
    for i, text in enumerate(synthetic_documents(max(20_000, size.train_bytes // 50), seed=2)):
        question, _, rationale = text.partition(". ")
        category = "Biology/Medicine" if i % 3 else "Math"
        hle_rows.append({"id": f"q{i}", "question": question + "?", "rationale": rationale, "category": category,
                         "answer": "A"})
    _parquet(root / "hle" / "data", hle_rows, name="test-{i:05d}-of-{n:05d}.parquet")  # the split from the file name
    auto_docs = synthetic_documents(int(size.autointerp_bytes * 1.2), seed=3)
    _parquet(root / "openwebtext2" / "data", [{"text": t} for t in auto_docs], 2, name="train-{i:05d}-of-{n:05d}.parquet")
    return {"train": owt, "cross": root / "hle", "autointerp": root / "openwebtext2"}


def write_random_model(folder: Path, size: Size, texts: list[str]) -> Path:
    """A GPT-2-architecture model of the given shape with random weights, plus a BPE tokenizer
    trained on the generated text, saved as the subject-model stage loads a local model folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from moesae.subject_model import SPECIAL_TOKEN, TOKENIZER_FILE, train_tokenizer

    tokenizer = train_tokenizer(texts, size.tokenizer_vocab)
    special = tokenizer.token_to_id(SPECIAL_TOKEN)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=size.model_vocab, n_positions=size.n_positions, n_embd=size.d_model,
                        n_layer=size.n_layers, n_head=size.n_heads, bos_token_id=special, eos_token_id=special)
    model = GPT2LMHeadModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / TOKENIZER_FILE))
    return folder


def pipeline_params(size: Size, data: dict[str, Path], model: Path) -> dict[str, Any]:
    """The paper profile (profiles/default.yaml + profiles/paper.yaml) at reduced token counts."""
    from moesae.activations import GB, disk_bytes
    from moesae.profiles import resolve_profile

    with contextlib.chdir(REPO):
        params = copy.deepcopy(resolve_profile("paper"))
    params["corpus"].update(
        train_dataset=str(data["train"]), cross_dataset=str(data["cross"]), autointerp_dataset=str(data["autointerp"]),
        max_train_bytes=size.train_bytes, max_autointerp_bytes=size.autointerp_bytes, heldout_fraction=0.05,
        max_cross_bytes=size.train_bytes // 50 * 2)
    params["subject_model"].update(name=str(model), hook_layer=size.hook_layer, val_windows=32)
    cross_upper = size.train_bytes // 50 * 2 // 4  # what the doctor assumes for the cross split: 4 bytes a token
    others = size.heldout_tokens + size.autointerp_tokens + cross_upper
    acts = params["activations"]
    acts.update(shard_tokens=size.shard_tokens, batch_size=64,
                max_tokens={"train": size.train_tokens, "heldout": size.heldout_tokens, "cross": None,
                            "autointerp": size.autointerp_tokens},
                max_disk_gb=disk_bytes(others + size.train_cap, size.d_model, acts.get("dtype", "bfloat16")) / GB)
    acts.setdefault("context_length_by_split", {"autointerp": 256})
    params["train"].update(steps=size.steps, batch_size=size.batch_size, log_every=10, checkpoint_every=size.steps // 2,
                           dead_tokens_threshold=size.steps * size.batch_size // 2)
    families = params["grid"]["families"]
    params["grid"] = {"num_latents": size.num_latents, "l0": [size.k], "seeds": [0],
                      "families": {f: dict(families[f]) for f in FAMILIES}}
    params["grid"]["families"]["jumprelu"]["calibration_steps"] = size.steps // 2
    small = size.d_model < 768
    params["evaluate"].update(max_tokens=size.eval_tokens, batch_tokens=min(8192, size.eval_tokens),
                              loss_batches=1 if small else 2, loss_batch_sequences=4 if small else 8,
                              max_probe_words=4 if small else 16, redundancy_subsets=2)
    return params


def _stage(name: str, argv: list[str], seconds: dict[str, float]) -> None:
    from moesae import cli

    print(f"[gpu-check] stage {name}: moesae {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = cli.main(argv)
    seconds[name] = time.perf_counter() - t0
    if rc:
        raise RuntimeError(f"stage {name} (moesae {' '.join(argv)}) exited with {rc}")


def run_pipeline(device: str, size: Size, workdir: Path) -> dict[str, Any]:
    """The paper profile's stages on generated data; returns measurements and what was checked."""
    import torch

    from moesae.activations import ActivationReader
    from moesae.grid import study_variants

    t0 = time.perf_counter()
    data = write_datasets(workdir / "datasets", size)
    texts = synthetic_documents(size.train_bytes // 2, seed=1)
    model = write_random_model(workdir / "gpt2-random", size, texts)
    params = pipeline_params(size, data, model)
    for section in ("subject_model", "activations", "evaluate"):
        params[section]["device"] = device
    run = workdir / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seconds = {"setup": time.perf_counter() - t0}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with contextlib.chdir(run):
        _stage("doctor", ["doctor", "--params", "params.yaml", "--bench-dir", str(RESULTS)], seconds)
        _stage("corpus", ["corpus", "--params", "params.yaml"], seconds)
        _stage("subject_model", ["subject-model", "--params", "params.yaml", "--no-progress"], seconds)
        _stage("activations", ["activations", "--params", "params.yaml", "--no-progress"], seconds)
        for family in FAMILIES:
            _stage(f"train@{family}", ["train", "--family", family, "--no-progress"], seconds)
        for family in FAMILIES:
            _stage(f"evaluate@{family}", ["evaluate", "--family", family, "--no-progress"], seconds)
        manifest = json.loads((Path("data/corpus") / "manifest.json").read_text())
        readers = {s: ActivationReader(Path("data/activations") / s) for s in ("train", "heldout", "cross", "autointerp")}
        variants = study_variants(params)
        checks: list[str] = []
        sources = manifest["dataset_sources"]
        _require(sources["train"]["kind"] == "local parquet conversion", f"train read from {sources['train']}")
        checks.append("corpus: the script-based stand-in read through its parquet conversion, the others as parquet")
        budget = readers["train"].manifest["disk_budget"]
        _require(budget["capped"] and readers["train"].num_tokens <= size.train_cap * 2, f"budget {budget}")
        on_disk = sum(p.stat().st_size for s in readers for p in (Path("data/activations") / s).glob("*.npy"))
        _require(on_disk <= budget["max_disk_gb"] * 1e9 + 128 * 1000, f"cache {on_disk} B over the budget")
        epochs = readers["train"].epochs(size.steps * size.batch_size)
        checks.append(f"activations: bf16, train split capped at {readers['train'].num_tokens:,} tokens by the disk "
                      f"budget ({epochs:.1f} epochs of training), {on_disk / 1e6:.1f} MB on disk")
        _require(readers["autointerp"].manifest["context_length"] == 256, "autointerp context is not 256")
        _require(readers["train"].manifest["dtype"] == "bfloat16", "cache dtype is not bf16")
        checks.append("activations: autointerp contexts of 256 tokens, the others 128")
        train_rates, results = {}, {}
        for name, variant in variants.items():
            log = [json.loads(line) for line in (Path("models") / variant["family"] / name / "train_log.jsonl").read_text().splitlines()]
            summary = next(r for r in log if r.get("summary"))
            _require(summary["tokens_seen"] == size.steps * size.batch_size, f"{name} saw {summary['tokens_seen']} tokens")
            train_rates[name] = summary["tokens_per_second"]
            result = json.loads((Path("results") / "eval" / variant["family"] / f"{name}.json").read_text())
            for key in ("mse_heldout", "mse_cross", "fvu_heldout"):
                _require(isinstance(result.get(key), (int, float)) and math.isfinite(result[key]), f"{name}: {key} = {result.get(key)}")
            results[name] = {k: result.get(k) for k in ("mse_heldout", "fvu_heldout", "l0_heldout", "eval_seconds")}
        checks.append(f"train + evaluate: {len(variants)} variants at M = {size.num_latents}, finite metrics on both splits")
    act_tokens = sum(r.num_tokens for r in readers.values())
    evals = [r["eval_seconds"] for r in results.values() if r.get("eval_seconds")]
    out = {
        "device": device, "d_model": size.d_model, "n_layers": size.n_layers, "hook_layer": size.hook_layer,
        "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "activations_tokens": act_tokens,
        "activations_tokens_per_s": act_tokens / seconds["activations"],
        "train_tokens_per_s": train_rates,
        "evaluate_seconds_per_variant": sum(evals) / len(evals) if evals else None,
        "evaluate_max_tokens": size.eval_tokens,
        "results": results, "checks": checks,
    }
    if device == "cuda":
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(f"gpu-check: {what}")


# ---- 3. targets --------------------------------------------------------------------------------------
def targets(bench: dict[str, Any] | None, pipeline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's throughput targets (bf16 run, paper size on CUDA) and the pipeline's training rate."""
    out: list[dict[str, Any]] = []
    if bench:
        for size, summary in bench.get("summary", {}).items():
            for t in summary.get("targets", []):
                if "naive" in t["target"]:
                    continue
                out.append({**t, "size": size, "autocast": bench.get("autocast")})
    if bench and pipeline:
        # The pipeline's own training rate against the benchmark's same configuration: far below
        # means the train stage is not on the device the benchmark measured (e.g. the CPU).
        rows = {r["name"]: r["tokens_per_s"] for r in bench["cases"] if r.get("implementation") == "fast"}
        for variant, rate in pipeline["train_tokens_per_s"].items():
            ref = rows.get("scale-16-2") if variant.startswith("scale_n16_e2") else None
            if ref and bench.get("device_type") == pipeline["device"] == "cuda":
                out.append({"target": f"train stage {variant} >= 10% of the benchmark's scale-16-2 tokens/s "
                            "(the train stage trains on the GPU)", "measured": rate, "threshold": 0.1 * ref,
                            "met": bool(rate >= 0.1 * ref), "size": "pipeline"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the test suite's CPU run)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/cuda.json on CUDA at "
                        "paper size, else results/gpu_check/<device>[_tiny].json)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to torch "
              f"({'CPU-only build ' + torch.__version__ if not torch.version.cuda else 'CUDA ' + torch.version.cuda}); "
              "run it on a GPU machine, or run the CPU-runnable parts with --device cpu --tiny", file=sys.stderr)
        return 2
    size = TINY if args.tiny else PAPER
    if args.out:
        out = Path(args.out)
    elif args.device == "cuda" and not args.tiny:
        out = RESULTS / "cuda.json"
    else:
        out = REPO / "results" / "gpu_check" / f"{args.device}{'_tiny' if args.tiny else ''}.json"
    scratch = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="moesae-gpu-check-"))
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = pipeline = None
    failure = None
    try:
        if not args.skip_throughput:
            bench = run_throughput(args.device, size, scratch)
        if not args.skip_pipeline:
            pipeline = run_pipeline(args.device, size, scratch)
    except Exception as exc:  # reported below with what ran; the traceback helps with CUDA errors
        import traceback

        traceback.print_exc()
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - t0
    result = dict(bench) if bench else {"device_type": args.device, "cases": []}
    if not bench:
        result.pop("cases")
    result["pipeline"] = pipeline
    result["gpu_check"] = {"seconds": round(seconds, 1), "tiny": args.tiny, "failure": failure,
                           "targets": targets(bench, pipeline), "budget_seconds": BUDGET_SECONDS,
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)
    print(f"\n[gpu-check] wrote {out} ({seconds:.0f} s{'' if seconds <= BUDGET_SECONDS else f', over the {BUDGET_SECONDS} s budget'})")
    if pipeline:
        for line in pipeline["checks"]:
            print(f"[gpu-check] ok: {line}")
        print(f"[gpu-check] activations {pipeline['activations_tokens_per_s']:,.0f} tokens/s; train tokens/s "
              + ", ".join(f"{k} {v:,.0f}" for k, v in pipeline["train_tokens_per_s"].items()))
    unmet = []
    for t in result["gpu_check"]["targets"]:
        print(f"[gpu-check] target [{t['size']}] {t['target']}: {t['measured']:.3g} -> {'met' if t['met'] else 'NOT met'}")
        if not t["met"]:
            unmet.append(t)
    if args.device == "cpu":
        print("[gpu-check] CPU run: the GPU targets (Scale (16,2) >= 5M, dense TopK-24576 >= 3M tokens/s) apply "
              "to CUDA at paper size only")
    if failure:
        print(f"[gpu-check] FAILED: {failure}", file=sys.stderr)
        return 1
    return 1 if args.strict and unmet else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
