"""Reading ``params.yaml``: one section per stage, validated before any work starts.

Every stage module calls :func:`load_section` with a dataclass describing its section; a missing
file, an unknown key or a bad value raises ``ParamsError`` naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

DEFAULT_PARAMS = Path("params.yaml")
T = TypeVar("T")

_ACCESSED: set[str] = set()


class Params(dict):
    """``params.yaml`` as a dict that remembers which top-level sections were read.

    :func:`accessed_sections` lets the ``dvc.yaml`` test check that every section a stage's
    command reads is declared under that stage's ``params``.
    """

    def __getitem__(self, key):
        _ACCESSED.add(str(key))
        return super().__getitem__(key)

    def get(self, key, default=None):
        _ACCESSED.add(str(key))
        return super().get(key, default)


def accessed_sections(reset: bool = False) -> set[str]:
    """The top-level sections read through :func:`load_params` since the last reset."""
    out = set(_ACCESSED)
    if reset:
        _ACCESSED.clear()
    return out


class ParamsError(ValueError):
    """A problem with params.yaml; the message names the key and the fix."""


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(
            f"{path} not found: run from the repository root, or write it from a profile "
            "(moesae profile default)"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return Params(data)


def section_to(cls: type[T], values: dict[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from a params section; errors name ``section.key``."""
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown key '{section}.{unknown[0]}' (known keys: {', '.join(sorted(fields))})"
        )
    try:
        return cls(**values)
    except ValueError as exc:
        raise ParamsError(f"params.yaml, section '{section}': {exc}") from exc
    except TypeError as exc:
        raise ParamsError(f"params.yaml, section '{section}': {exc}") from exc


def load_section(cls: type[T], section: str, path: str | Path = DEFAULT_PARAMS) -> T:
    params = load_params(path)
    if section not in params:
        raise ParamsError(f"params.yaml has no '{section}' section; see profiles/default.yaml for one")
    return section_to(cls, params[section], section)


def require(section: dict[str, Any], key: str, name: str) -> Any:
    """``section[key]``, or a ``ParamsError`` naming ``name.key`` when it is missing."""
    if key not in section:
        raise ParamsError(f"params.yaml: '{name}.{key}' is missing; see profiles/default.yaml for its default")
    return section[key]
