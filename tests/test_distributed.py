"""Data-parallel training of one SAE (moesae.training.distributed), on CPU with gloo.

Two processes (torch.multiprocessing spawn, or a real ``torchrun``) split every batch; the
gradients are averaged and the dead-latent statistics reduced, so after a few steps the SAE
matches one process on the full batch within float tolerance, two DDP runs are identical, every
rank holds the same weights, and a checkpoint written under DDP resumes bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from moesae.saes import build_sae
from moesae.training import distributed
from moesae.training.trainer import TrainConfig, TrainingRun, read_train_log, tensor_batches, train_saes

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, D = 8, 128, 16


def _data(n: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(48, D, generator=g)
    codes = torch.rand(n, 48, generator=g) * (torch.rand(n, 48, generator=g) < 0.08)
    return codes @ dictionary + 0.05 * torch.randn(n, D, generator=g)


def _runs(out: Path | None = None, steps: int = STEPS) -> list[TrainingRun]:
    cfg = TrainConfig(steps=steps, log_every=2, checkpoint_every=0, lr=3e-3)
    saes = {
        "topk": build_sae("topk", d_in=D, num_latents=64, k=4, dead_tokens_threshold=600),
        "scale": build_sae("scale", d_in=D, num_latents=64, k=4, num_experts=4, active_experts=2,
                           feature_scaling="mean", dead_tokens_threshold=600),
        "relu": build_sae("relu", d_in=D, num_latents=64, k=4, calibration_steps=6),
    }
    return [TrainingRun(name=n, sae=s, config=cfg, out_dir=None if out is None else out / n) for n, s in saes.items()]


def _states(runs) -> dict[str, dict[str, torch.Tensor]]:
    return {r.name: {k: v.detach().clone() for k, v in r.sae.state_dict().items()} for r in runs}


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dist = distributed.DataParallel(rank=rank, world_size=world)
    out_dir = Path(out)
    data = _data()
    results = {}
    for label in ("a", "b"):  # two identical DDP runs
        runs = train_saes(_runs(), tensor_batches(data, BATCH, seed=1), progress=False, dist=dist)
        results[label] = {"state": _states(runs), "history": {r.name: r.history for r in runs},
                          "tokens": {r.name: r.tokens_seen for r in runs}}
    # interrupted after 3 steps (rank 0 writes the checkpoints), then resumed under DDP
    ckpt = out_dir / "ckpt"
    train_saes(_runs(ckpt), tensor_batches(data, BATCH, seed=1), progress=False, dist=dist, stop_after=3)
    tdist.barrier()
    written = sorted(p.parent.name for p in ckpt.glob("*/checkpoint.pt"))
    resumed = train_saes(_runs(ckpt), tensor_batches(data, BATCH, seed=1), progress=False, dist=dist)
    results["resumed"] = {"state": _states(resumed), "written": written}
    torch.save(results, out_dir / f"rank{rank}.pt")
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    t0 = time.perf_counter()
    mp.spawn(_ddp_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    print(f"2-process gloo DDP runs: {time.perf_counter() - t0:.1f}s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_shard_bounds_split_every_batch_disjointly():
    for n in (1, 7, 128, 1000):
        for world in (1, 2, 3, 8):
            bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_world_size_enters_the_fingerprint_only_beyond_one_process():
    recipe = {"steps": 10, "batch_size": 64}
    assert distributed.fingerprint_recipe(recipe, 1) == recipe
    two = distributed.fingerprint_recipe(recipe, 2)
    assert two["world_size"] == 2 and two != distributed.fingerprint_recipe(recipe, 4)


def test_one_process_has_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.from_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.from_environment() is None


def test_ddp_matches_one_process_on_the_full_batch(ddp_results):
    single = train_saes(_runs(), tensor_batches(_data(), BATCH, seed=1), progress=False)
    ddp = ddp_results[0]["a"]
    for run in single:
        assert ddp["tokens"][run.name] == run.tokens_seen == STEPS * BATCH
        if run.name != "topk":
            continue  # batch-level parts (routing aux terms, calibration) make the others close, not equal
        for key, value in run.sae.state_dict().items():
            other = ddp["state"]["topk"][key]
            if value.is_floating_point():
                torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=f"topk {key}")
            else:  # dead-latent counters: a latent that fired on either rank fired in the batch
                assert torch.equal(other, value), key
        for mine, theirs in zip(ddp["history"]["topk"], run.history):
            assert mine["step"] == theirs["step"] and mine["tokens"] == theirs["tokens"]
            assert mine["mse"] == pytest.approx(theirs["mse"], rel=1e-4)
            assert mine["l0"] == pytest.approx(theirs["l0"], rel=1e-6)


def test_two_ddp_runs_are_identical_and_every_rank_holds_the_same_sae(ddp_results):
    for label in ("a", "b"):
        for name, state in ddp_results[0][label]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, ddp_results[1][label]["state"][name][key]), (label, name, key)
    for name, state in ddp_results[0]["a"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ddp_results[0]["b"]["state"][name][key]), (name, key)
    assert ddp_results[0]["a"]["history"] == ddp_results[0]["b"]["history"]


def test_a_checkpoint_written_under_ddp_resumes_bit_for_bit(ddp_results):
    assert ddp_results[0]["resumed"]["written"] == ["relu", "scale", "topk"]
    for rank in (0, 1):
        for name, state in ddp_results[rank]["resumed"]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, ddp_results[0]["a"]["state"][name][key]), (rank, name, key)


# ---- the stage under torchrun ---------------------------------------------------------------------
def write_cache(split_dir: Path, data: np.ndarray, shard_rows: int = 1024) -> None:
    """A minimal activation cache in the reader's format (manifest + float32 shards)."""
    from moesae.activations import FORMAT, MANIFEST, shard_name

    split_dir.mkdir(parents=True, exist_ok=True)
    shards, n = [], data.shape[0]
    for i, start in enumerate(range(0, n, shard_rows)):
        path = split_dir / shard_name(i)
        np.save(path, np.ascontiguousarray(data[start:start + shard_rows], dtype=np.float32))
        shards.append({"file": path.name, "first_row": start, "rows": int(min(shard_rows, n - start)),
                       "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = {"format": FORMAT, "d_model": int(data.shape[1]), "num_tokens": int(n), "dtype": "float32",
                "shape": [int(n), int(data.shape[1])], "shards": shards}
    (split_dir / MANIFEST).write_text(json.dumps(manifest))


def stage_workdir(root: Path, families: dict, train: dict | None = None) -> Path:
    """``root`` laid out like the repository for the train stage: params.yaml + a cache."""
    from moesae.testing import micro_params

    params = micro_params({
        "grid": {"num_latents": 64, "l0": [4], "seeds": [0], "families": families},
        "train": {"steps": 12, "batch_size": 128, "checkpoint_every": 0, "log_every": 4,
                  "dead_tokens_threshold": 100_000, "data_seed": 0, **(train or {})},
    })
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_cache(root / params["paths"]["activations"] / "train", _data(3000, seed=2).numpy())
    return root


@pytest.mark.slow
def test_torchrun_trains_one_sae_data_parallel_from_the_cli(tmp_path, monkeypatch):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    from safetensors.torch import load_file

    from moesae.grid import study_variants
    from moesae.training.stage import train_variants

    work = stage_workdir(tmp_path / "work", {"topk": {"architecture": "topk"}})
    (name,) = study_variants(yaml.safe_load((work / "params.yaml").read_text()))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "moesae.cli", "train",
                           "--variant", name, "--params", "params.yaml", "--no-progress"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=240)
    print(f"torchrun, 2 ranks: {time.perf_counter() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = work / "models" / "topk" / name
    rows, summary = read_train_log(out)
    assert summary["world_size"] == 2 and summary["tokens_seen"] == 12 * 128 and rows[-1]["step"] == 11
    assert proc.stdout.count("saved to") == 1  # rank 0 alone wrote the outputs
    ddp = load_file(out / "sae_weights.safetensors")
    # The world size is in the fingerprint: one process retrains it, to weights close to DDP's.
    monkeypatch.chdir(work)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_variants([name], "params.yaml", progress=False) == [name]
    _, single_summary = read_train_log(out)
    assert single_summary["fingerprint"] != summary["fingerprint"] and "world_size" not in single_summary
    single = load_file(out / "sae_weights.safetensors")
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-3, atol=1e-4, msg=key)
    assert train_variants([name], "params.yaml", progress=False) == []  # and now up to date
