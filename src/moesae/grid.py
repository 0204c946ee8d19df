"""The study's grid: families × L0 values × seeds → named variants.

The grid is defined once, under ``grid`` in ``params.yaml`` (``num_latents``, ``l0``, ``seeds``,
``families``). Every stage that needs the variants (train, evaluate, collect, auto-interp,
figures) derives them here with :func:`study_variants`; ``params.yaml`` holds no expanded copy.

A family is a mapping of SAE config fields plus ``architecture``, and optionally:
- ``width_fraction``: ``num_latents`` as a fraction of the grid's M (e.g. TopK at M/32);
- ``l0``: the L0 values this family runs at, instead of the grid's list;
- ``seeds``: the seeds this family runs at, instead of the grid's list (e.g. one seed for an
  extension the claims do not compare);
- ``train``: training-recipe overrides for this family (e.g. ``{steps: 2000}``).

A variant is named ``<family>_k<k>`` (plus ``_s<seed>`` for seeds other than 0). Cells where k
exceeds what the configuration can keep (``max_k``, an architecture fact: e.g. k = 128 on a
64-wide TopK) are skipped and listed; an L0 value no family can keep is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import ParamsError, section_to

MODELS_DIR = Path("models")
FAMILY_KEYS = ("width_fraction", "l0", "seeds", "train")
"""Family keys that are not SAE config fields."""


@dataclass
class GridSpec:
    num_latents: int
    """M, the dictionary width of the MoE SAEs (32·d in the paper)."""
    l0: list[int]
    """The L0 (k) values every family is trained at."""
    families: dict[str, dict[str, Any]]
    """Family name → SAE config (``architecture`` plus fields; see the module docstring)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds; a seed other than 0 adds ``_s<seed>`` to the variant name."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_latents, int) or self.num_latents <= 0:
            raise ValueError(f"'num_latents' must be a positive integer, got {self.num_latents!r}")
        if not self.l0 or any(not isinstance(k, int) or k <= 0 for k in self.l0):
            raise ValueError(f"'l0' must be a non-empty list of positive integers, got {self.l0!r}")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"'seeds' must be a non-empty list of non-negative integers, got {self.seeds!r}")
        if not isinstance(self.families, dict) or not self.families:
            raise ValueError("'families' must map at least one family name to its configuration")
        for name, fam in self.families.items():
            if not isinstance(fam, dict) or "architecture" not in fam:
                raise ValueError(f"family '{name}' has no 'architecture'")


def variant_name(family: str, k: int, seed: int) -> str:
    return f"{family}_k{k}" + (f"_s{seed}" if seed else "")


def sae_fields(variant: dict[str, Any]) -> dict[str, Any]:
    """The SAE config fields of a variant (without ``family``, ``architecture``, ``train``)."""
    return {k: v for k, v in variant.items() if k not in {"family", "architecture", "train"}}


def expand_grid(spec: GridSpec, skipped: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """All variants: name → {family, architecture, SAE config fields[, train]}.

    Cells whose k exceeds the configuration's ``max_k`` are left out and named in ``skipped``;
    every other invalid value raises ``ParamsError`` naming the family.
    """
    from .saes import describe

    variants: dict[str, dict[str, Any]] = {}
    kept_l0: set[int] = set()
    skipped = [] if skipped is None else skipped
    for family, fam in spec.families.items():
        fam = dict(fam)
        fraction = fam.pop("width_fraction", 1)
        family_l0 = fam.pop("l0", spec.l0)
        family_seeds = fam.pop("seeds", spec.seeds)
        train = fam.pop("train", None)
        if not family_seeds or any(not isinstance(s, int) or s < 0 for s in family_seeds):
            raise ParamsError(f"grid family '{family}': seeds must be a non-empty list of non-negative integers")
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ParamsError(f"grid family '{family}': width_fraction must be in (0, 1], got {fraction!r}")
        num_latents = int(round(spec.num_latents * float(fraction)))
        arch = fam.get("architecture")
        try:
            max_k = describe(arch, **{**_without(fam, "architecture"), "num_latents": num_latents}).max_k
        except ValueError as exc:
            raise ParamsError(f"grid family '{family}': {exc}") from exc
        for k in family_l0:
            if k > max_k:
                skipped.append(f"{family} at k={k} (its largest k is {max_k})")
                continue
            kept_l0.add(k)
            for seed in family_seeds:
                cfg = {"family": family, **fam, "num_latents": num_latents, "k": k, "seed": seed}
                try:  # validate now, so no stage ever sees a variant that cannot be built
                    describe(arch, **sae_fields(cfg))
                except ValueError as exc:
                    raise ParamsError(f"grid family '{family}' at k={k}: {exc}") from exc
                if train:
                    cfg["train"] = dict(train)
                variants[variant_name(family, k, seed)] = cfg
    dropped = sorted(set(spec.l0) - kept_l0)
    if dropped:
        raise ParamsError(
            f"params.yaml: grid.l0 value(s) {dropped} exceed what every family can keep; "
            "lower them or widen the SAEs (grid.num_latents)"
        )
    return variants


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def grid_spec(params: dict[str, Any]) -> GridSpec:
    if "grid" not in params:
        raise ParamsError("params.yaml has no 'grid' section; write one with `moesae profile default`")
    return section_to(GridSpec, params["grid"], "grid")


def study_variants(params: dict[str, Any], skipped: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The study's variants, derived from ``params['grid']`` (the one definition of the grid)."""
    return expand_grid(grid_spec(params), skipped)


def family_variants(params: dict[str, Any], family: str) -> list[str]:
    """The variant names of one family, sorted."""
    variants = study_variants(params)
    names = sorted(n for n, v in variants.items() if v["family"] == family)
    if not names:
        families = sorted(grid_spec(params).families)
        raise ParamsError(f"params.yaml: no variants of grid family '{family}' (families: {', '.join(families)})")
    return names


def model_dir(name: str, variant: dict[str, Any], root: str | Path = MODELS_DIR) -> Path:
    """Where a variant's SAE lives: ``models/<family>/<variant>/``."""
    return Path(root) / str(variant.get("family", name)) / name


def build_variant(variant: dict[str, Any], d_in: int, dead_tokens_threshold: int | None = None):
    """Build a variant's SAE for activations of width ``d_in``."""
    from .saes import build_sae

    fields = sae_fields(variant)
    if dead_tokens_threshold is not None:
        fields.setdefault("dead_tokens_threshold", dead_tokens_threshold)
    return build_sae(variant["architecture"], d_in=d_in, **fields)
