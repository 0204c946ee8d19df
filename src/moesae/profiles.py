"""Profiles: ``profiles/default.yaml`` is the complete study definition; every other profile is an
overlay that states only what differs from it. ``moesae profile NAME`` deep-merges the overlay
onto the default and writes the result to ``params.yaml`` (atomically), which the stages read.

Merge rules: mappings merge key by key (recursively); any other value (a list, a scalar, null)
replaces the default's. A key set to the string ``__delete__`` removes the default's key (e.g. a
grid family the overlay does not run).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

from .io import atomic_write_text
from .params import ParamsError

PROFILES_DIR = Path("profiles")
BASE_PROFILE = "default"
DELETE = "__delete__"


def deep_merge(base: dict[str, Any], overlay: dict[str, Any], path: str = "") -> dict[str, Any]:
    """``overlay`` on top of ``base`` (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        where = f"{path}.{key}" if path else str(key)
        if value == DELETE:
            if key not in out:
                raise ParamsError(f"profile overlay deletes '{where}', which the default profile does not have")
            del out[key]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def profile_path(profile: str | Path) -> Path:
    path = Path(profile)
    if not path.suffix:
        path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ParamsError(f"no profile {path}; profiles are {known}")
    return path


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of sections")
    return data


def resolve_profile(profile: str | Path) -> dict[str, Any]:
    """The full parameters of a profile: the default profile with the overlay merged on top."""
    path = profile_path(profile)
    base_path = profile_path(BASE_PROFILE)
    base = _read(base_path)
    if path.resolve() == base_path.resolve():
        return base
    return deep_merge(base, _read(path))


def write_params(profile: str | Path, out: str | Path = "params.yaml") -> dict[str, Any]:
    """Write ``params.yaml`` for ``profile``; returns the parameters written."""
    from .grid import study_variants

    params = resolve_profile(profile)
    skipped: list[str] = []
    variants = study_variants(params, skipped)  # validate the grid before writing anything
    path = profile_path(profile)
    header = (
        f"# Written by `moesae profile {path.stem}`: profiles/{BASE_PROFILE}.yaml"
        + ("" if path.stem == BASE_PROFILE else f" with {path.as_posix()} merged on top")
        + ".\n# Edit values here for a one-off run (dvc repro reruns exactly what they affect), or edit the\n"
        "# profile and rerun `moesae profile`. The grid's variants are derived from `grid` by every stage.\n"
    )
    if path.stem == BASE_PROFILE:  # the default profile itself, comments and all
        body = path.read_text()
    else:
        body = yaml.safe_dump(params, sort_keys=False, width=110, allow_unicode=True)
    atomic_write_text(out, header + body)
    params["_variants"] = len(variants)
    params["_skipped"] = skipped
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moesae profile",
        description="Write params.yaml from profiles/NAME.yaml (merged onto profiles/default.yaml)",
    )
    parser.add_argument("profile", help="profile name (default, paper, ...) or a path to a profile YAML")
    parser.add_argument("--out", default="params.yaml")
    args = parser.parse_args(argv)
    params = write_params(args.profile, args.out)
    print(f"wrote {args.out} (profile {params.get('profile')}): {params['_variants']} variants in "
          f"{len(params['grid']['families'])} families")
    for cell in params["_skipped"]:
        print(f"  skipped {cell}")
    return 0
