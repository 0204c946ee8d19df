"""The training grid: families × L0 values × seeds → named variants, and the ``train`` stage.

``params.yaml`` declares the grid compactly in ``grid`` (families, the L0 list, seeds) and the
expanded, named variants in ``variants``. ``dvc.yaml`` has one train stage per family; inside it a
variant is retrained only when its fingerprint changed: its config, the training recipe, or the
source code it trains with (its architecture's module and the package modules that imports, and
the trainer). ``moesae profile NAME`` regenerates ``params.yaml`` from ``profiles/NAME.yaml`` with
the variants expanded.

A family is a dict of SAE config fields plus ``architecture``; ``num_latents`` may be written as a
fraction of the grid's width (``width_fraction``), e.g. the FLOP-matched TopK at M/32.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .params import ParamsError, load_params, section_to

MODELS_DIR = Path("models")


@dataclass
class GridSpec:
    num_latents: int
    """M, the dictionary width of the MoE SAEs (32·d in the paper)."""
    l0: list[int]
    """The L0 (k) values every family is trained at."""
    families: dict[str, dict[str, Any]]
    """Family name → SAE config (``architecture`` plus fields; ``width_fraction`` scales M)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds; a seed other than 0 adds ``_s<seed>`` to the variant name."""

    def __post_init__(self) -> None:
        if not self.l0 or any(not isinstance(k, int) or k <= 0 for k in self.l0):
            raise ValueError(f"'l0' must be a non-empty list of positive integers, got {self.l0!r}")
        if not self.seeds:
            raise ValueError("'seeds' must list at least one seed")
        for name, fam in self.families.items():
            if "architecture" not in fam:
                raise ValueError(f"family '{name}' has no 'architecture'")


def variant_name(family: str, k: int, seed: int) -> str:
    return f"{family}_k{k}" + (f"_s{seed}" if seed else "")


def expand_grid(spec: GridSpec) -> dict[str, dict[str, Any]]:
    """All variants: name → {architecture, family, SAE config fields}. Invalid cells are skipped
    only when k exceeds what the family can keep (e.g. k=128 on a 64-wide TopK), never silently
    otherwise."""
    from .saes import build_sae

    variants: dict[str, dict[str, Any]] = {}
    for family, fam in spec.families.items():
        fam = dict(fam)
        fraction = fam.pop("width_fraction", 1)
        family_l0 = fam.pop("l0", spec.l0)  # a family may run at fewer L0 values (e.g. extensions)
        num_latents = int(round(spec.num_latents * float(fraction)))
        for k in family_l0:
            for seed in spec.seeds:
                cfg = {"family": family, **fam, "num_latents": num_latents, "k": k, "seed": seed}
                if k > _max_k(cfg):
                    continue
                arch = cfg["architecture"]
                try:  # validate now, so params.yaml never names a variant that cannot be built
                    build_sae(arch, d_in=1, **_sae_fields(cfg))
                except ValueError as exc:
                    raise ParamsError(f"grid family '{family}' at k={k}: {exc}") from exc
                variants[variant_name(family, k, seed)] = cfg
    return variants


def _max_k(cfg: dict[str, Any]) -> int:
    """The largest k a family can keep: the width of the candidates its global TopK sees."""
    M = cfg["num_latents"]
    shared = int(bool(cfg.get("shared_expert", False)))
    if cfg["architecture"] in {"switch"}:
        return M // cfg["num_experts"] * (1 + shared)
    if cfg["architecture"] in {"scale", "authors_switch"}:
        default_e = 1 if cfg["architecture"] == "authors_switch" else 2
        return M // cfg["num_experts"] * (cfg.get("active_experts", default_e) + shared)
    return M


def _sae_fields(variant: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in variant.items() if k not in {"family", "architecture"}}


def build_variant(variant: dict[str, Any], d_in: int, dead_tokens_threshold: int | None = None):
    from .saes import build_sae

    fields = _sae_fields(variant)
    if dead_tokens_threshold is not None:
        fields.setdefault("dead_tokens_threshold", dead_tokens_threshold)
    return build_sae(variant["architecture"], d_in=d_in, **fields)


def write_params_from_profile(profile: str | Path, out: str | Path = "params.yaml") -> dict[str, Any]:
    """``params.yaml`` = the profile + its expanded ``variants`` (written atomically)."""
    profile_path = Path(profile)
    if not profile_path.suffix:
        profile_path = Path("profiles") / f"{profile}.yaml"
    if not profile_path.is_file():
        raise ParamsError(f"no profile {profile_path}; profiles are {sorted(p.stem for p in Path('profiles').glob('*.yaml'))}")
    text = profile_path.read_text()
    params = yaml.safe_load(text)
    spec = section_to(GridSpec, params.get("grid"), "grid")
    variants = expand_grid(spec)
    header = (
        f"# GENERATED by `moesae profile {profile_path.stem}` from {profile_path.as_posix()}: edit the profile and\n"
        "# regenerate, or edit a single variant below (dvc repro then retrains only that variant).\n"
    )
    body = yaml.safe_dump({"variants": variants}, sort_keys=False, default_flow_style=None, width=120)
    out = Path(out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(header + text.rstrip() + "\n\n# ---- expanded grid: the named variants (trained per family, one DVC stage each) ----\n" + body)
    tmp.replace(out)
    return variants


# ---- the `train` stage ------------------------------------------------------------------------
def model_dir(name: str, variant: dict[str, Any], root: str | Path = MODELS_DIR) -> Path:
    """Where a variant's SAE lives: ``models/<family>/<variant>/``."""
    return Path(root) / str(variant.get("family", name)) / name


def family_variants(params: dict[str, Any], family: str) -> list[str]:
    names = sorted(n for n, v in (params.get("variants") or {}).items() if v.get("family") == family)
    if not names:
        families = sorted({v.get("family") for v in (params.get("variants") or {}).values()})
        raise ParamsError(f"params.yaml: no variants of family '{family}' (families: {', '.join(map(str, families))})")
    return names


def _package_imports(files: list[Path]) -> list[Path]:
    """``files`` plus every module of this package they import (relative imports), transitively."""
    seen: set[Path] = set()
    todo = list(files)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module:
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                dep = base.joinpath(*node.module.split(".")).with_suffix(".py")
                if dep.is_file():
                    todo.append(dep)
    return sorted(seen)


def code_fingerprint(architecture: str) -> str:
    """Hash of the source that determines how ``architecture`` trains.

    Its module, the package modules it imports (transitively), and the trainer with its imports —
    so a code change retrains exactly the architectures it can affect, and a new architecture's
    file retrains nothing else.
    """
    from .saes.registry import PRESETS, REGISTRY

    name = PRESETS[architecture][0] if architecture in PRESETS else architecture
    if name not in REGISTRY:
        raise ParamsError(f"params.yaml: unknown architecture '{architecture}' (choose one of {sorted(REGISTRY)})")
    package = Path(__file__).resolve().parent
    files = _package_imports([Path(inspect.getfile(REGISTRY[name])).resolve(), package / "train.py"])
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def training_fingerprint(variant: dict[str, Any], train_section: dict[str, Any]) -> str:
    """Hash of everything that determines a variant's trained weights: its config, the recipe and the code."""
    import moesae.saes  # noqa: F401  (registers the architectures)

    code = code_fingerprint(str(variant.get("architecture")))
    blob = json.dumps({"variant": variant, "train": train_section, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_trained(path: Path, fingerprint: str) -> bool:
    from .train import LOG_FILE, read_train_log

    if not (path / "cfg.json").is_file() or not (path / "sae_weights.safetensors").is_file() or not (path / LOG_FILE).is_file():
        return False
    try:
        return read_train_log(path)[1].get("fingerprint") == fingerprint
    except (ValueError, OSError):
        return False


def train_variants(names: list[str], params_path: str | Path = "params.yaml", progress: bool = True,
                   force: bool = False) -> list[str]:
    """Train the named variants in one pass over the activation cache; returns those trained.

    A variant whose folder already holds a finished SAE trained with the same configuration and
    recipe (same fingerprint) is skipped, so rerunning a family's stage after one variant changed
    retrains only that variant.
    """
    from .activations import ActivationReader
    from .precision import keep_freed_cpu_memory
    from .train import TrainConfig, TrainingRun, finish, train_saes

    params = load_params(params_path)
    variants = params.get("variants") or {}
    missing = [n for n in names if n not in variants]
    if missing:
        raise ParamsError(
            f"params.yaml: no variant named '{missing[0]}' under 'variants' "
            f"(regenerate with `moesae profile <name>` after editing the grid)"
        )
    train_section = dict(params.get("train") or {})
    recipe = dict(train_section)
    batch_size = int(train_section.pop("batch_size", 4096))
    seed = int(train_section.pop("data_seed", 0))
    dead_threshold = train_section.pop("dead_tokens_threshold", None)
    todo = []
    for name in names:
        fingerprint = training_fingerprint(variants[name], recipe)
        if not force and is_trained(model_dir(name, variants[name]), fingerprint):
            print(f"[train] {name}: up to date, skipped")
            continue
        todo.append((name, fingerprint))
    if not todo:
        return []
    reader = ActivationReader(Path(params.get("paths", {}).get("activations", "data/activations")) / "train")
    runs, fingerprints = [], {}
    for name, fingerprint in todo:
        variant = {k: v for k, v in variants[name].items() if k != "train"}
        cfg = section_to(TrainConfig, {**train_section, **dict(variants[name].get("train", {}))}, "train")
        try:
            sae = build_variant(variant, reader.d_model, dead_threshold)
        except ValueError as exc:
            raise ParamsError(f"variant '{name}': {exc}") from exc
        runs.append(TrainingRun(name=name, sae=sae, config=cfg, out_dir=model_dir(name, variant)))
        fingerprints[name] = fingerprint
    batch_at = reader.batch_fn(batch_size, seed=seed)
    keep_freed_cpu_memory()  # this process only trains: reuse freed gradient-sized blocks
    start = time.time()
    train_saes(runs, batch_at, progress=progress)
    for run in runs:
        extra = {"variant": run.name, "family": variants[run.name].get("family"),
                 "fingerprint": fingerprints[run.name], "wall_seconds": time.time() - start}
        finish(run, extra)
        print(f"[train] {run.name}: saved to {run.out_dir}")
    return [r.name for r in runs]


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
    from .timing import record

    params = load_params(args.params)
    names = family_variants(params, args.family) if args.family else args.variant
    with record("train@" + (args.family or "+".join(names))):
        if args.family:
            remove_stale(args.family, params)
        train_variants(names, args.params, progress=not args.no_progress, force=args.force)
    return 0


def main_profile(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae profile", description="Write params.yaml from profiles/NAME.yaml")
    parser.add_argument("profile", help="profile name (default, paper, ...) or a path to a profile YAML")
    parser.add_argument("--out", default="params.yaml")
    args = parser.parse_args(argv)
    variants = write_params_from_profile(args.profile, args.out)
    print(f"wrote {args.out}: {len(variants)} variants")
    return 0
