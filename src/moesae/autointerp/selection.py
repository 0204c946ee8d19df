"""Which grid variants the stage scores: the Fig 3d series (the listed families, plus the non-MoE
baselines of the grid), each at the L0 nearest ``target_l0``."""
from __future__ import annotations

from typing import Any

from .config import AutointerpConfig


def is_baseline(variant: dict[str, Any]) -> bool:
    """True when the variant's architecture is not a mixture of experts (an architecture fact)."""
    from ..grid import sae_fields
    from ..saes import describe

    return not describe(variant["architecture"], **sae_fields(variant)).is_moe


def scored_families(variants: dict[str, dict[str, Any]], cfg: AutointerpConfig) -> list[str]:
    """The listed ``families`` in their order, then (``extra_families: all_baselines``) every other
    family of the grid whose architecture is not MoE, in grid order."""
    families = list(cfg.families)
    if cfg.extra_families == "all_baselines":
        for v in variants.values():
            fam = v.get("family")
            if fam and fam not in families and is_baseline(v):
                families.append(fam)
    return families


def select_variants(variants: dict[str, dict[str, Any]], cfg: AutointerpConfig) -> dict[str, str]:
    """Variant name → family for the Fig 3d series: per family, the lowest seed and the k nearest
    ``target_l0`` (ties: the smaller k). Listed families absent from the grid are skipped."""
    chosen: dict[str, str] = {}
    for fam in scored_families(variants, cfg):
        cands = [(n, v) for n, v in variants.items() if v.get("family") == fam]
        if not cands:
            continue
        seed = min(int(v.get("seed", 0)) for _, v in cands)
        cands = [(n, v) for n, v in cands if int(v.get("seed", 0)) == seed]
        name, _ = min(cands, key=lambda nv: (abs(int(nv[1]["k"]) - cfg.target_l0), int(nv[1]["k"])))
        chosen[name] = fam
    return chosen
