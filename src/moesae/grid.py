"""The training grid: families × L0 values × seeds → named variants, and the ``train`` stage.

``params.yaml`` declares the grid compactly in ``grid`` (families, the L0 list, seeds) and the
expanded, named variants in ``variants`` (what ``dvc.yaml`` iterates over, one stage each, so that
changing one variant retrains only that variant). ``moesae profile NAME`` regenerates
``params.yaml`` from ``profiles/NAME.yaml`` with the variants expanded.

A family is a dict of SAE config fields plus ``architecture``; ``num_latents`` may be written as a
fraction of the grid's width (``width_fraction``), e.g. the FLOP-matched TopK at M/32.
"""
from __future__ import annotations

import argparse
import json
import sys
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
                    if "'d_in'" not in str(exc):
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
    tmp.write_text(header + text.rstrip() + "\n\n# ---- expanded grid (one DVC stage each) ----\n" + body)
    tmp.replace(out)
    return variants


# ---- the `train` stage ------------------------------------------------------------------------
def train_variants(names: list[str], params_path: str | Path = "params.yaml", progress: bool = True) -> None:
    """Train the named variants in one pass over the activation cache."""
    from .activations import ActivationReader
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
    batch_size = int(train_section.pop("batch_size", 4096))
    seed = int(train_section.pop("data_seed", 0))
    dead_threshold = train_section.pop("dead_tokens_threshold", None)
    overrides = {n: dict(variants[n].get("train", {})) for n in names}
    reader = ActivationReader(Path(params.get("paths", {}).get("activations", "data/activations")) / "train")
    runs = []
    for name in names:
        variant = {k: v for k, v in variants[name].items() if k != "train"}
        cfg = section_to(TrainConfig, {**train_section, **overrides[name]}, "train")
        sae = build_variant(variant, reader.d_model, dead_threshold)
        runs.append(TrainingRun(name=name, sae=sae, config=cfg, out_dir=MODELS_DIR / name))
    batch_at = reader.batch_fn(batch_size, seed=seed)
    start = time.time()
    train_saes(runs, batch_at, progress=progress)
    for run in runs:
        finish(run, {"variant": run.name, "family": variants[run.name].get("family"), "wall_seconds": time.time() - start})
        print(f"[train] {run.name}: saved to {run.out_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae train", description="Train grid variants from params.yaml")
    parser.add_argument("--variant", action="append", required=True, help="variant name (repeat to train several in one pass)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from .timing import record

    with record("train@" + "+".join(args.variant)):
        train_variants(args.variant, args.params, progress=not args.no_progress)
    return 0


def main_profile(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae profile", description="Write params.yaml from profiles/NAME.yaml")
    parser.add_argument("profile", help="profile name (default, paper, ...) or a path to a profile YAML")
    parser.add_argument("--out", default="params.yaml")
    args = parser.parse_args(argv)
    variants = write_params_from_profile(args.profile, args.out)
    print(f"wrote {args.out}: {len(variants)} variants")
    return 0


def main_list(argv: list[str] | None = None) -> int:  # pragma: no cover - convenience
    params = load_params()
    json.dump(sorted(params.get("variants", {})), sys.stdout, indent=1)
    return 0
