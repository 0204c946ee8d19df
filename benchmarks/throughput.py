"""Training throughput of the SAE zoo: tokens/s, peak memory, FLOPs/token, share of peak (issue #7).

One command (see benchmarks/README.md):

    python benchmarks/throughput.py                 # device auto-detected; writes results/benchmarks/<device>.json

Every case is one full training step as the trainer runs it (renormalise decoder → forward →
backward → clip → project decoder gradients → Adam step → dead-latent statistics), timed over
``--steps`` steps after ``--warmup`` steps on the same random batch. Side by side in one run:

- the fast paths the pipeline uses (expert dispatch of only the selected experts, sparse encoder
  backward through the k kept latents only, sparse decode);
- ``naive``: the same MoE model with ``dispatch="all"`` (every expert for every token, then
  masked, dense autograd — the public Switch/Scale SAE design);
- ``dense``: TopK with dense autograd through all M pre-activations and dense decoding
  ``z @ W_dec`` over the full ``[batch, M]`` code (the public TopK SAE design).

On CPU every case runs in its own forked process so its peak resident memory is its own.

``--families``: the default profile's grid families at the default size instead (d = 64,
M = 2048, k in {2, 8, 32}, batch 1024), each family's variants trained together by the real
trainer (``train_saes``) exactly as the train stage does: per variant tokens/s of its own steps,
per family the wall time per SAE-step. ``--workers``/``--threads`` choose the configuration;
against an older checkout (``PYTHONPATH=<old>/src``) it times that code (see README).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # noqa: F401  (imported by the first optimiser; once here, not in every forked case)

from moesae import build_sae
from moesae.precision import autocast_context, keep_freed_cpu_memory, make_adam, maybe_compile, resolve_autocast
from moesae.saes.base import SAEOutput, lr_for_width, reconstruction_mse
from moesae.saes.topk import TopKSAE

RESULTS_DIR = Path("results/benchmarks")

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by device-name substring; else measured.
GPU_BF16_PEAK = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


@dataclass
class Case:
    """One SAE configuration to time."""

    name: str
    architecture: str
    config: dict[str, Any]
    implementation: str = "fast"
    """fast (what the pipeline uses) | naive (all experts, masked) | dense (TopK without sparse paths)."""


@dataclass
class Size:
    name: str
    d_in: int
    num_latents: int


SIZES = {"paper": Size("paper", 768, 24576), "default": Size("default", 64, 2048)}


def cases_for(size: Size, k: int) -> list[Case]:
    """Dense TopK at M, M/8, M/32; Switch N=32; Scale (16,2), (32,4), (64,8); plus the references."""
    M = size.num_latents
    cases = [
        Case(f"topk-{M}", "topk", {"num_latents": M}),
        Case(f"topk-{M}", "topk", {"num_latents": M}, "dense"),
        Case(f"topk-{M // 8}", "topk", {"num_latents": M // 8}),
        Case(f"topk-{M // 32}", "topk", {"num_latents": M // 32}),
    ]
    moe = [("switch-32", "switch", {"num_experts": 32})]
    for n, e in ((16, 2), (32, 4), (64, 8)):
        moe.append((f"scale-{n}-{e}", "scale", {"num_experts": n, "active_experts": e}))
    for name, arch, extra in moe:
        for impl in ("fast", "naive"):
            config = {"num_latents": M, **extra, "dispatch": "auto" if impl == "fast" else "all"}
            cases.append(Case(name, arch, config, impl))
    for case in cases:
        case.config.update(d_in=size.d_in, k=k)
    return cases


class DenseTopK(TopKSAE):
    """TopK SAE with dense autograd and dense decoding: the reference for the sparse paths."""

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, indices, values)
        x_hat = z @ self.W_dec + self.b_dec
        return SAEOutput(x_hat=x_hat, losses={"mse": reconstruction_mse(x, x_hat)}, top_values=values, top_indices=indices)


def build(case: Case, device: torch.device):
    if case.implementation == "dense":
        fields = {f.name for f in dataclasses.fields(DenseTopK.config_class)}
        sae = DenseTopK(DenseTopK.config_class(**{k: v for k, v in case.config.items() if k in fields}))
    else:
        sae = build_sae(case.architecture, **case.config)
    return sae.to(device)


@torch.no_grad()
def update_dead_statistics(sae, out: SAEOutput, batch_size: int) -> None:
    """Sparse form of ``SAE.update_dead_statistics``: no ``[batch, M]`` mask."""
    fired = out.top_indices[out.top_values != 0]
    sae.tokens_since_fired += batch_size
    sae.tokens_since_fired[fired] = 0


def train_step(sae, optimizer, x: torch.Tensor, autocast_dtype) -> None:
    """The trainer's step order (docs/method.md#training-recipe), forward under autocast, Adam on fp32 master weights."""
    sae.normalize_decoder()
    with autocast_context(x.device, autocast_dtype):
        out = sae(x)
        loss = out.loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    sae.project_decoder_grad()
    optimizer.step()
    update_dead_statistics(sae, out, x.shape[0])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def executed_macs_per_token(sae, case: Case) -> int:
    """Forward multiply-accumulates actually executed (the naive paths compute more than needed)."""
    cfg = sae.cfg
    if case.implementation == "naive":
        return cfg.num_experts * cfg.d_in + cfg.num_latents * cfg.d_in + cfg.k * cfg.d_in
    if case.implementation == "dense":
        return 2 * cfg.num_latents * cfg.d_in
    return sae.flops_per_token()


def executed_train_macs_per_token(sae, case: Case) -> int:
    """Forward + backward multiply-accumulates actually executed per token.

    Dense autograd (naive, dense) pays two backward matmuls per forward one. The fast paths'
    backward touches only the k kept latents: k·d for the encoder's input gradient, k·d for its
    weight gradient, the same two for the decoder, plus the router's two N·d products.
    """
    forward = executed_macs_per_token(sae, case)
    if case.implementation in ("naive", "dense"):
        return 3 * forward
    cfg = sae.cfg
    learned_router = getattr(cfg, "num_experts", None) and getattr(cfg, "router", "learned") == "learned"
    router = 2 * cfg.num_experts * cfg.d_in if learned_router else 0
    return forward + router + 4 * cfg.k * cfg.d_in


def _initialise_libraries(device: torch.device) -> None:
    """One tiny training step, so one-time allocations of the kernels are not counted in a case's memory."""
    sae = build_sae("scale", d_in=16, num_latents=64, k=4, num_experts=4, active_experts=2).to(device)
    train_step(sae, make_adam(sae.parameters(), 1e-3), torch.randn(32, 16, device=device), None)


def time_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build, warm up and time one case; returns its row."""
    if device.type == "cpu":
        if args.allocator == "keep":
            keep_freed_cpu_memory()  # as the train stage does
        _initialise_libraries(device)
    torch.manual_seed(0)
    rss0 = _rss_bytes() if device.type == "cpu" else 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sae = build(case, device)
    x = torch.randn(args.batch_size, sae.cfg.d_in, device=device)
    sae.init_from_batch(x[: min(1024, args.batch_size)])
    frozen = sae.frozen_parameter_names()
    optimizer = make_adam([p for n, p in sae.named_parameters() if n not in frozen], lr_for_width(sae.cfg.num_latents))
    maybe_compile(sae, args.compile)
    dtype = resolve_autocast(args.autocast, device)
    for _ in range(args.warmup):
        train_step(sae, optimizer, x, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            train_step(sae, optimizer, x, dtype)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1000.0
        peak = torch.cuda.max_memory_allocated(device)
    else:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step(sae, optimizer, x, dtype)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    macs = sae.flops_per_token()
    return {
        "size": args._size_name,
        "name": case.name,
        "implementation": case.implementation,
        "architecture": case.architecture,
        "config": {k: v for k, v in case.config.items()},
        "batch_size": args.batch_size,
        "steps": args.steps,
        "seconds_per_step": seconds / args.steps,
        "tokens_per_s": args.batch_size * args.steps / seconds,
        "peak_memory_mb": peak / 2**20,
        "params": sae.num_parameters(),
        "flops_per_token": macs,
        "executed_macs_per_token": executed_macs_per_token(sae, case),
        "train_flops_per_token": 2 * executed_train_macs_per_token(sae, case),
    }


def _child(case: Case, args: argparse.Namespace, device: torch.device, queue) -> None:
    try:
        queue.put(("ok", time_case(case, args, device)))
    except BaseException as exc:  # reported by the parent with the case name
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if device.type != "cpu" or args.in_process:
        return time_case(case, args, device)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(case, args, device, queue))
    proc.start()
    status, payload = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmark case {case.name} ({case.implementation}) failed: {payload}")
    return payload


def device_peak_flops(device: torch.device, autocast_dtype) -> tuple[float, str]:
    """Peak FLOP/s of the device for the dtype the matmuls run in, and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if autocast_dtype is not None:
            for key in sorted(GPU_BF16_PEAK, key=len, reverse=True):
                if key in name:
                    return GPU_BF16_PEAK[key], f"datasheet dense bf16 ({key})"
    dtype = autocast_dtype or torch.float32
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf  # the fastest of several timings: the peak, not the average under noise
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best, f"measured {n}x{n} {str(dtype).replace('torch.', '')} matmul (best of 5)"


def summarise(rows: list[dict], device: torch.device, peak: float) -> dict[str, Any]:
    """Ratios and the issue's targets, per size, from the rows of one run."""
    for row in rows:
        achieved = row["tokens_per_s"] * row["train_flops_per_token"]
        row["achieved_tflops"] = achieved / 1e12
        row["fraction_of_peak"] = achieved / peak

    def tps(size, name, impl="fast"):
        hit = [r for r in rows if r["size"] == size and r["name"] == name and r["implementation"] == impl]
        return hit[0]["tokens_per_s"] if hit else math.nan

    summary: dict[str, Any] = {}
    for size in sorted({r["size"] for r in rows}):
        M = next(r["config"]["num_latents"] for r in rows if r["size"] == size and r["name"].startswith("topk-"))
        scale, dense = tps(size, "scale-16-2"), tps(size, f"topk-{M}")
        ratios = {
            "scale-16-2 / topk-M": scale / dense,
            "scale-16-2 / scale-16-2 naive": scale / tps(size, "scale-16-2", "naive"),
            "scale-32-4 / scale-32-4 naive": tps(size, "scale-32-4") / tps(size, "scale-32-4", "naive"),
            "scale-64-8 / scale-64-8 naive": tps(size, "scale-64-8") / tps(size, "scale-64-8", "naive"),
            "switch-32 / switch-32 naive": tps(size, "switch-32") / tps(size, "switch-32", "naive"),
            "topk-M sparse / dense": dense / tps(size, f"topk-{M}", "dense"),
        }
        targets = [
            {"target": "Scale (16,2) >= 3x dense TopK-M tokens/s", "measured": ratios["scale-16-2 / topk-M"], "threshold": 3.0},
            {"target": "Scale (16,2) >= 5x naive all-experts", "measured": ratios["scale-16-2 / scale-16-2 naive"], "threshold": 5.0},
        ]
        if device.type == "cuda" and size == "paper":
            targets += [
                {"target": "Scale (16,2) >= 5M tokens/s", "measured": scale, "threshold": 5e6},
                {"target": "dense TopK-24576 >= 3M tokens/s", "measured": dense, "threshold": 3e6},
            ]
        for t in targets:
            t["met"] = bool(t["measured"] >= t["threshold"])
        summary[size] = {"ratios": ratios, "targets": targets}
    return summary


def format_table(rows: list[dict]) -> str:
    head = f"{'size':8} {'case':14} {'impl':12} {'tokens/s':>11} {'ms/step':>9} {'peak MiB':>9} {'MAC/tok':>10} {'TFLOP/s':>8} {'%peak':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['size']:8} {r['name']:14} {r['implementation']:12} {r['tokens_per_s']:11.0f} "
            f"{1000 * r['seconds_per_step']:9.1f} {r['peak_memory_mb']:9.0f} {r['flops_per_token']:10.3g} "
            f"{r['achieved_tflops']:8.3f} {100 * r['fraction_of_peak']:6.2f}"
        )
    return "\n".join(lines)


def default_profile_params() -> dict[str, Any]:
    from moesae.profiles import resolve_profile

    return resolve_profile("default")


_READERS: dict[str, Any] = {}


def family_batches(args: argparse.Namespace, d_in: int):
    """``batch_at`` for the family benchmark: the real activation cache when ``--activations``
    names one (read as the train stage reads it), else seeded Gaussian activations."""
    from moesae.training import tensor_batches

    if args.activations:
        from moesae.activations import ActivationReader

        if args.activations not in _READERS:  # one reader, its shards checked once, before any timing
            reader = ActivationReader(args.activations)
            for shard in reader.manifest["shards"]:
                reader.slice(int(shard["first_row"]), int(shard["first_row"]) + 1)
            _READERS[args.activations] = reader
        reader = _READERS[args.activations]
        if reader.d_model != d_in:
            raise SystemExit(f"--activations: the cache has d={reader.d_model}, the default profile d={d_in}")
        return reader.batch_fn(args.batch_size, seed=0), f"activation cache {args.activations}"
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    data = (torch.randn(args.batch_size * 16, d_in, generator=g) @ mixing) * 3 + torch.randn(d_in, generator=g)
    return tensor_batches(data, args.batch_size, seed=0), "synthetic Gaussian (16 batches)"


def _family_runs(names: list[str], variants: dict[str, dict], args: argparse.Namespace, d_in: int) -> list:
    from moesae.grid import build_variant
    from moesae.training import TrainConfig, TrainingRun

    # the pipeline's dead-latent rule (a fraction of the training tokens), in the old code too,
    # so that AuxK runs in both and the comparison is of the same work
    dead = max(1, round(args.steps * args.batch_size * args.dead_tokens_fraction))
    runs = []
    for name in names:
        variant = {k: v for k, v in variants[name].items() if k != "train"}
        config = TrainConfig(steps=args.steps, log_every=max(1, args.steps // 4), checkpoint_every=0)
        runs.append(TrainingRun(name=name, sae=build_variant(variant, d_in, dead), config=config))
    return runs


def _cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (the forked workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_family(family: str, names: list[str], variants: dict[str, dict], args: argparse.Namespace, d_in: int) -> dict[str, Any]:
    """One family: each variant alone (one thread, in this process: its own cost per step, as CPU
    time and wall time), then all variants together as the train stage trains them (``--workers``,
    ``--threads``): wall time and CPU time per SAE-step."""
    import inspect

    from moesae.training import train_saes

    accepted = inspect.signature(train_saes).parameters
    new_trainer = "workers" in accepted
    if not new_trainer and args.workers != 1:
        raise SystemExit("--workers: this checkout's train_saes trains in one process only; use --workers 1")
    previous = torch.get_num_threads()
    rows = []
    try:
        if args.per_sae:
            torch.set_num_threads(1)
            for run in _family_runs(names, variants, args, d_in):
                batch_at, _ = family_batches(args, d_in)
                c0, t0 = time.thread_time(), time.perf_counter()
                train_saes([run], batch_at, progress=False)
                cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
                cfg = run.sae.cfg
                rows.append({
                    "family": family, "variant": run.name, "architecture": variants[run.name]["architecture"],
                    "k": cfg.k, "num_latents": cfg.num_latents, "steps": args.steps, "threads": 1,
                    "cpu_ms_per_step": 1000 * cpu / args.steps, "wall_ms_per_step": 1000 * wall / args.steps,
                    "tokens_per_cpu_s": run.tokens_seen / cpu, "tokens_per_s": run.tokens_seen / wall,
                    "final_mse": run.history[-1]["mse"],
                    "auxk_logged": max((h.get("auxk", 0.0) for h in run.history), default=0.0),
                })
        runs = _family_runs(names, variants, args, d_in)
        batch_at, _ = family_batches(args, d_in)
        kwargs = {"workers": args.workers, "threads": args.threads} if new_trainer else {}
        torch.set_num_threads(previous)
        if not new_trainer and args.threads is not None:
            torch.set_num_threads(args.threads)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        train_saes(runs, batch_at, progress=False, **kwargs)
        cpu, wall = _cpu_seconds() - c0, time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)
    sae_steps = args.steps * len(runs)
    return {
        "family": family, "variants": len(runs), "steps": args.steps, "wall_seconds": wall, "cpu_seconds": cpu,
        "ms_per_sae_step": 1000 * wall / sae_steps, "cpu_ms_per_sae_step": 1000 * cpu / sae_steps,
        "sae_steps_per_s": sae_steps / wall, "rows": rows,
    }


def run_families(args: argparse.Namespace) -> dict[str, Any]:
    from moesae.grid import study_variants

    import moesae.saes  # noqa: F401  (registers the architectures)

    params = default_profile_params()
    variants = study_variants(params)
    d_in = int(params["subject_model"]["d_model"])
    families: dict[str, list[str]] = {}
    for name, v in variants.items():
        families.setdefault(v["family"], []).append(name)
    wanted = list(families) if args.families == "all" else [f for f in args.families.split(",") if f]
    unknown = [f for f in wanted if f not in families]
    if unknown:
        raise SystemExit(f"--families: no family {unknown[0]!r} in the default profile (families: {', '.join(families)})")
    if args.batch_size != int(params["train"]["batch_size"]):
        print(f"note: --batch-size {args.batch_size} differs from the default profile's {params['train']['batch_size']}")
    if args.allocator == "keep":
        keep_freed_cpu_memory()
    load_at_start = os.getloadavg()
    results = []
    for family in wanted:
        result = time_family(family, sorted(families[family]), variants, args, d_in)
        results.append(result)
        print(f"{family:24} {result['variants']} SAEs together: {result['ms_per_sae_step']:6.2f} ms/SAE-step wall, "
              f"{result['cpu_ms_per_sae_step']:6.2f} CPU;  alone (1 thread, CPU ms/step): "
              + "  ".join(f"k{r['k']} {r['cpu_ms_per_step']:.2f}" for r in result["rows"]), flush=True)
    total_steps = sum(r["steps"] * r["variants"] for r in results)
    total_wall = sum(r["wall_seconds"] for r in results)
    total_cpu = sum(r["cpu_seconds"] for r in results)
    return {
        "mode": "families", "label": args.label, "device": platform.processor() or platform.machine(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_default_threads": torch.get_num_threads(),
        "workers": args.workers, "threads": args.threads, "batch_size": args.batch_size, "steps": args.steps,
        "d_in": d_in, "num_latents": int(params["grid"]["num_latents"]), "dead_tokens_fraction": args.dead_tokens_fraction,
        "data": family_batches(args, d_in)[1], "cpu_allocator": args.allocator,
        "load_average_at_end": os.getloadavg(), "load_average_at_start": load_at_start,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "families": results,
        "summary": {"sae_steps": total_steps, "wall_seconds": total_wall, "ms_per_sae_step": 1000 * total_wall / total_steps,
                    "cpu_seconds": total_cpu, "cpu_ms_per_sae_step": 1000 * total_cpu / total_steps},
    }


def _without_options(argv: list[str], names: dict[str, bool]) -> list[str]:
    """``argv`` without the options in ``names`` (name → takes a value)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            skip = names[name] and "=" not in arg
            continue
        out.append(arg)
    return out


def compare_families(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """``--compare-with OLD_SRC``: each family timed with the old code (``PYTHONPATH=OLD_SRC``,
    one process, ``--before-threads``) and then with this checkout's (``--workers``/``--threads``),
    alternately, family by family, so that a busy machine's load drifts into both alike. Writes
    ``<out>`` with both runs and the ratios."""
    import subprocess
    import tempfile

    base = _without_options(argv, {"--compare-with": True, "--before-threads": True, "--out": True, "--families": True,
                                   "--workers": True, "--threads": True, "--label": True})
    import moesae

    here = str(Path(moesae.__file__).resolve().parents[1])  # the src/ this process imports
    if args.families == "all":
        from moesae.grid import study_variants

        import moesae.saes  # noqa: F401

        wanted = list(dict.fromkeys(v["family"] for v in study_variants(default_profile_params()).values()))
    else:
        wanted = [f for f in args.families.split(",") if f]
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    headers: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in wanted:
            for label, src, extra in (
                ("before", args.compare_with, ["--workers", "1"] + (["--threads", str(args.before_threads)] if args.before_threads else [])),
                ("after", here, ["--workers", str(args.workers)] + (["--threads", str(args.threads)] if args.threads else [])),
            ):
                out = Path(tmp) / f"{label}.json"
                env = {**os.environ, "PYTHONPATH": src}
                subprocess.run([sys.executable, str(Path(__file__).resolve()), *base, "--families", family, *extra,
                                "--label", label, "--out", str(out)], env=env, check=True)
                result = json.loads(out.read_text())
                runs[label] += result["families"]
                headers[label] = {k: v for k, v in result.items() if k not in ("families", "summary")}
    summary = {}
    for label, families in runs.items():
        steps = sum(f["steps"] * f["variants"] for f in families)
        wall, cpu = sum(f["wall_seconds"] for f in families), sum(f["cpu_seconds"] for f in families)
        alone = [r for f in families for r in f["rows"]]
        summary[label] = {"sae_steps": steps, "wall_seconds": wall, "ms_per_sae_step": 1000 * wall / steps,
                          "cpu_ms_per_sae_step": 1000 * cpu / steps,
                          "alone_cpu_ms_per_sae_step": sum(r["cpu_ms_per_step"] for r in alone) / max(1, len(alone))}
    b, a = summary["before"], summary["after"]
    result = {
        "mode": "families-compare", "before_src": args.compare_with, "before": headers["before"], "after": headers["after"],
        "families": {"before": runs["before"], "after": runs["after"]}, "summary": summary,
        "speedup": {"family_wall": b["ms_per_sae_step"] / a["ms_per_sae_step"],
                    "family_cpu": b["cpu_ms_per_sae_step"] / a["cpu_ms_per_sae_step"],
                    "alone_cpu_one_thread": b["alone_cpu_ms_per_sae_step"] / a["alone_cpu_ms_per_sae_step"]},
    }
    print(f"before: {b['ms_per_sae_step']:.2f} ms/SAE-step wall ({b['cpu_ms_per_sae_step']:.2f} CPU; alone "
          f"{b['alone_cpu_ms_per_sae_step']:.2f} CPU, 1 thread)  after: {a['ms_per_sae_step']:.2f} wall "
          f"({a['cpu_ms_per_sae_step']:.2f} CPU; alone {a['alone_cpu_ms_per_sae_step']:.2f})  speedup "
          + ", ".join(f"{k} {v:.2f}x" for k, v in result["speedup"].items()))
    out = Path(args.out) if args.out else RESULTS_DIR / "families_compare.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def parse_size(text: str) -> Size:
    if text in SIZES:
        return SIZES[text]
    parts = text.split(":")
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return Size(parts[0], int(parts[1]), int(parts[2]))
    raise ValueError(f"--sizes: unknown size {text!r}; use paper, default or NAME:D_IN:NUM_LATENTS")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--sizes", default="paper,default", help="comma list: paper, default, NAME:D_IN:NUM_LATENTS")
    p.add_argument("--batch-size", type=int, default=None, help="default 8192 (the issue's batch) on CUDA and CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--autocast", default="auto", help="auto (bf16 on CUDA) | bf16 | off")
    p.add_argument("--compile", action="store_true", help="torch.compile the SAE forward")
    p.add_argument("--only", default="", help="comma list of case names to run (default: all)")
    p.add_argument("--out", default=None, help="JSON path (default results/benchmarks/<device>.json)")
    p.add_argument("--in-process", action="store_true", help="CPU: no forked process per case (no per-case memory)")
    p.add_argument(
        "--allocator", default="keep", choices=("keep", "default"),
        help="CPU: keep freed memory in the process as the train stage does (keep), or glibc's default",
    )
    p.add_argument("--families", default=None,
                   help="time the default profile's families instead of the cases: all, or a comma list of family names")
    p.add_argument("--workers", type=int, default=1, help="--families: training processes per family (train.workers)")
    p.add_argument("--threads", type=int, default=None, help="--families: torch threads per process (train.threads; default: torch's)")
    p.add_argument("--dead-tokens-fraction", type=float, default=0.122, help="--families: dead-latent window / training tokens")
    p.add_argument("--activations", default=None, help="--families: an activation cache split folder (default: synthetic data)")
    p.add_argument("--label", default="", help="--families: a label stored in the JSON (e.g. before / after)")
    p.add_argument("--no-per-sae", dest="per_sae", action="store_false",
                   help="--families: skip timing each variant alone (one thread)")
    p.add_argument("--compare-with", default=None, metavar="OLD_SRC",
                   help="--families: also time an older checkout's src/ (e.g. a `git worktree` of the commit before), "
                        "family by family, alternating with this one")
    p.add_argument("--before-threads", type=int, default=None,
                   help="--compare-with: torch threads of the old code's one process (default: torch's)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    on_gpu = args.device == "cuda"
    args.batch_size = args.batch_size or (1024 if args.families else 8192)
    args.steps = args.steps or (60 if args.families else 20 if on_gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    for name in ("batch_size", "steps", "k", "workers"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s]
        resolve_autocast(args.autocast, args.device)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.families:
        if args.device != "cpu":
            raise SystemExit("--families: the train stage trains on CPU; use --device cpu")
        if args.compare_with:
            return compare_families(args, argv or [])
        result = run_families(args)
        s = result["summary"]
        print(f"all: {s['sae_steps']} SAE-steps in {s['wall_seconds']:.1f} s = {s['ms_per_sae_step']:.2f} ms per SAE-step "
              f"(CPU {s['cpu_ms_per_sae_step']:.2f} ms); load average {result['load_average_at_start']} -> "
              f"{result['load_average_at_end']}")
        out = Path(args.out) if args.out else RESULTS_DIR / f"families_{args.label or 'cpu'}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
        return result
    device = torch.device(args.device)
    autocast_dtype = resolve_autocast(args.autocast, device)
    only = {s for s in args.only.split(",") if s}
    cases = [(size, c) for size in args.sizes for c in cases_for(size, args.k) if not only or c.name in only]
    if not cases:
        raise SystemExit(f"--only {args.only!r} matches no case")
    rows = []
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda it, **_: it  # noqa: E731
    for size, case in tqdm(cases, desc="benchmark", unit="case"):
        args._size_name = size.name
        rows.append(run_case(case, args, device))
    peak, peak_source = device_peak_flops(device, autocast_dtype)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "off",
        "compile": args.compile,
        "cpu_allocator": args.allocator if device.type == "cpu" else None,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "k": args.k,
        "peak_flops": peak,
        "peak_source": peak_source,
        "step": "normalize decoder, forward, backward, clip 1.0, project decoder grad, fused Adam, dead stats",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cases": rows,
    }
    result["summary"] = summarise(rows, device, peak)
    print(format_table(rows))
    for size, s in result["summary"].items():
        for t in s["targets"]:
            print(f"[{size}] {t['target']}: {t['measured']:.3g} -> {'met' if t['met'] else 'NOT met'}")
    out = Path(args.out) if args.out else RESULTS_DIR / f"{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
