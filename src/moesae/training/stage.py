"""The ``train`` stage: ``moesae train --family F`` (one DVC stage per grid family) or
``--variant NAME`` (repeatable), several SAEs in one pass over the activation cache.

The variants come from ``params['grid']`` (:func:`moesae.grid.study_variants`). A variant whose
folder already holds an SAE trained with the same fingerprint (config, recipe, code; see
:mod:`.fingerprint`) is skipped, so rerunning a family's stage after one value changed retrains
only the variants that value affects.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..grid import MODELS_DIR, build_variant, family_variants, model_dir, study_variants
from ..params import ParamsError, load_params, require, section_to
from ..devices import DEVICE_CHOICES, check_device, resolve_device
from . import distributed
from .fingerprint import training_fingerprint
from .launchers import pop_launch_settings, submit_variants
from .trainer import LOG_FILE, TrainConfig, TrainingRun, finish, read_train_log, train_saes

RECIPE_ONLY_KEYS = ("batch_size", "data_seed", "dead_tokens_threshold", "dead_tokens_fraction", "threads", "workers",
                    "device")
"""``train`` keys the stage resolves itself (the rest go to :class:`TrainConfig`)."""

STAGE_DEFAULTS: dict[str, Any] = {"dead_tokens_threshold": None, "dead_tokens_fraction": 0.122, "threads": 1, "workers": 2,
                                  "device": "cpu"}
"""Values of the stage's own keys when params.yaml does not set them (``batch_size`` and
``data_seed`` are required). ``dead_tokens_fraction`` = the paper's 10M of 82M training tokens."""

NOT_IN_FINGERPRINT = ("workers",)
"""``train`` keys that cannot change a trained SAE: the variants are split among ``workers``
processes, each running ``threads`` torch threads, and every SAE's arithmetic depends only on its
own state, its batches and the thread count (tested bit for bit), not on which worker trains it."""


def stage_settings(train_section: dict[str, Any]) -> dict[str, Any]:
    """The stage's own ``train`` keys, validated (errors name ``train.<key>``), defaults filled in."""
    values = {**STAGE_DEFAULTS, **{k: train_section[k] for k in RECIPE_ONLY_KEYS if k in train_section}}
    for key in ("batch_size", "data_seed"):
        values[key] = require(train_section, key, "train")

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    checks = [
        ("batch_size", positive_int(values["batch_size"]), "must be a positive integer"),
        ("data_seed", isinstance(values["data_seed"], int) and not isinstance(values["data_seed"], bool)
         and values["data_seed"] >= 0, "must be a non-negative integer"),
        ("dead_tokens_threshold", values["dead_tokens_threshold"] is None or positive_int(values["dead_tokens_threshold"]),
         "must be a positive token count, or null to use train.dead_tokens_fraction of each SAE's training tokens"),
        ("dead_tokens_fraction", isinstance(values["dead_tokens_fraction"], (int, float))
         and not isinstance(values["dead_tokens_fraction"], bool) and 0 < values["dead_tokens_fraction"] <= 1,
         "must be a number in (0, 1]: the share of an SAE's training tokens (steps x batch_size) a latent may "
         "go without firing before it counts as dead (paper: 10M of 82M = 0.122)"),
        ("threads", values["threads"] is None or positive_int(values["threads"]),
         "must be a positive integer (torch threads per training process), or null for torch's default"),
        ("workers", positive_int(values["workers"]), "must be a positive integer (training processes per family)"),
        ("device", _valid_device(values["device"]), f"must be one of {DEVICE_CHOICES}"),
    ]
    for key, ok, message in checks:
        if not ok:
            raise ParamsError(f"params.yaml: 'train.{key}' {message}; got {values[key]!r}")
    return values


def _valid_device(value: Any) -> bool:
    try:
        check_device(value)
    except ValueError:
        return False
    return True


def resolve_dead_tokens_threshold(settings: dict[str, Any], steps: int) -> int:
    """The dead-latent window of one SAE in tokens: ``train.dead_tokens_threshold`` if set, else
    ``train.dead_tokens_fraction`` x its training tokens (steps x batch_size), at least 1."""
    if settings["dead_tokens_threshold"] is not None:
        return int(settings["dead_tokens_threshold"])
    return max(1, round(steps * settings["batch_size"] * settings["dead_tokens_fraction"]))


def fingerprint_recipe(train_section: dict[str, Any]) -> dict[str, Any]:
    """The ``train`` section as it enters the fingerprints (without :data:`NOT_IN_FINGERPRINT`).

    ``device`` enters as the device *type* it resolves to on this machine (``auto`` trains on CUDA
    where there is a GPU): an SAE trained on a GPU is not bit-identical to one trained on a CPU."""
    recipe = {k: v for k, v in train_section.items() if k not in NOT_IN_FINGERPRINT}
    if "device" in recipe:
        recipe["device"] = resolve_device(recipe["device"], "train.device").type
    return recipe


def is_trained(path: Path, fingerprint: str) -> bool:
    if not all((path / f).is_file() for f in ("cfg.json", "sae_weights.safetensors", LOG_FILE)):
        return False
    try:
        return read_train_log(path)[1].get("fingerprint") == fingerprint
    except (ValueError, OSError):
        return False


def train_variants(names: list[str], params_path: str | Path = "params.yaml", progress: bool = True,
                   force: bool = False, *, launcher: str | None = None, should_stop=None) -> list[str]:
    """Train the named variants in one pass over the activation cache; returns those trained.

    ``launcher`` overrides ``train.launcher`` (a submitit job trains ``local``ly); ``should_stop``
    is polled after every step (see :func:`~.trainer.train_saes`'s ``stop_after``). Under
    ``torchrun`` each SAE trains data-parallel across the ranks (:mod:`.distributed`)."""
    from ..activations import ActivationReader
    from ..precision import keep_freed_cpu_memory

    params = load_params(params_path)
    variants = study_variants(params)
    missing = [n for n in names if n not in variants]
    if missing:
        raise ParamsError(
            f"no variant named '{missing[0]}' in params.yaml's grid (variants are <family>_k<k>[_s<seed>]; "
            f"e.g. {next(iter(variants))})"
        )
    train_section = dict(params.get("train") or {})
    launch = pop_launch_settings(train_section)  # where an SAE trains is not part of what it is
    dist = distributed.from_environment()  # None unless torchrun started several ranks
    recipe = fingerprint_recipe(train_section)
    if dist is not None:
        recipe = distributed.fingerprint_recipe(recipe, dist.world_size)
    settings = stage_settings(train_section)
    for key in RECIPE_ONLY_KEYS:
        train_section.pop(key, None)
    todo = []
    for name in names:
        fingerprint = training_fingerprint(variants[name], recipe)
        if not force and is_trained(model_dir(name, variants[name]), fingerprint):
            print(f"[train] {name}: up to date, skipped")
            continue
        todo.append((name, fingerprint))
    if dist is not None:
        dist.check_same([n for n, _ in todo])
    if not todo:
        return []
    if (launcher or launch.launcher) == "submitit" and dist is None:
        expected = dict(todo)
        return submit_variants(list(expected), params_path, launch.submitit, force=force,
                               is_trained=lambda n: is_trained(model_dir(n, variants[n]), expected[n]),
                               label="train-" + "+".join(sorted({str(variants[n]["family"]) for n in expected})),
                               family_of=lambda n: str(variants[n]["family"]))
    reader = ActivationReader(Path(require(params.get("paths") or {}, "activations", "paths")) / "train")
    device = resolve_device(settings["device"], "train.device")
    if device.type != "cpu" and settings["workers"] > 1:
        print(f"[train] train.device={settings['device']} ({device}): one training process (train.workers applies to CPU training)")
        settings["workers"] = 1
    runs, fingerprints = [], {}
    for name, fingerprint in todo:
        variant = {k: v for k, v in variants[name].items() if k != "train"}
        cfg = section_to(TrainConfig, {**train_section, **dict(variants[name].get("train", {}))}, "train")
        try:
            sae = build_variant(variant, reader.d_model, resolve_dead_tokens_threshold(settings, cfg.steps))
        except ValueError as exc:
            raise ParamsError(f"variant '{name}': {exc}") from exc
        runs.append(TrainingRun(name=name, sae=sae.to(device), config=cfg, out_dir=model_dir(name, variant)))
        fingerprints[name] = fingerprint
    batch_at = reader.batch_fn(int(settings["batch_size"]), seed=int(settings["data_seed"]))
    if device.type != "cpu":  # the cache is read on the CPU; each batch moves to the training device
        batch_at = _on_device(batch_at, device)
    if dist is not None:  # each rank reads only its slice of every batch
        batch_at = distributed.ShardedBatches(reader, int(settings["batch_size"]), int(settings["data_seed"]))
        dist.prepare(runs)
    if settings["workers"] > 1:  # check every shard once here, not once in every worker
        for shard in reader.manifest["shards"]:
            reader.slice(int(shard["first_row"]), int(shard["first_row"]) + 1)
    keep_freed_cpu_memory()  # this process only trains: reuse freed gradient-sized blocks
    start = time.time()
    train_saes(runs, batch_at, progress=progress, workers=settings["workers"], threads=settings["threads"],
               stop_after=should_stop, dist=dist)
    for run in runs:
        if dist is not None and not dist.is_writer:
            continue  # rank 0 writes the outputs
        extra = {"variant": run.name, "family": variants[run.name]["family"],
                 "fingerprint": fingerprints[run.name], "wall_seconds": time.time() - start,
                 "batch_size": settings["batch_size"], "dead_tokens_fraction":
                 None if settings["dead_tokens_threshold"] is not None else settings["dead_tokens_fraction"],
                 "cached_tokens": reader.num_tokens, "epochs": run.tokens_seen / reader.num_tokens,
                 "threads": settings["threads"], "workers": settings["workers"]}
        if dist is not None:
            extra["world_size"] = dist.world_size
        finish(run, extra)
        print(f"[train] {run.name}: saved to {run.out_dir}")
    if dist is not None:
        dist.barrier()  # every rank returns once rank 0 has written
    return [r.name for r in runs]


def _on_device(batch_at, device):
    def batch(step: int):
        return batch_at(step).to(device, non_blocking=True)

    return batch


def remove_stale(family: str, params: dict[str, Any], root: str | Path = MODELS_DIR) -> None:
    """Delete variant folders of ``family`` that the grid no longer declares."""
    keep = set(family_variants(params, family))
    folder = Path(root) / family
    if folder.is_dir():
        for child in folder.iterdir():
            if child.is_dir() and child.name not in keep:
                shutil.rmtree(child)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moesae train",
        description="Train grid variants from params.yaml, several SAEs per pass over the activation cache",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--family", help="train every variant of this grid family (one DVC stage per family)")
    group.add_argument("--variant", action="append", help="variant name (repeat to train several in one pass)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--force", action="store_true", help="retrain even if an up-to-date SAE exists")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from ..timing import record

    params = load_params(args.params)
    names = family_variants(params, args.family) if args.family else args.variant
    with record("train@" + (args.family or "+".join(names))):
        if args.family and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone
            remove_stale(args.family, params)
        train_variants(names, args.params, progress=not args.no_progress, force=args.force)
    return 0
