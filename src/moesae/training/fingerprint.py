"""Fingerprints: a hash of everything that determines a trained SAE, so that a stage retrains
exactly the variants a change can affect and keeps the others.

The code part hashes the source an architecture trains with: its module, the package modules that
module imports (transitively, relative imports), and the trainer with its imports. Editing
``saes/switch.py`` retrains the Switch variants only; a new architecture's file retrains nothing
else. :func:`package_imports` is also what the ``dvc.yaml`` test uses to check that every stage
declares the modules its command imports.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent.parent


def _module_file(base: Path, dotted: str) -> Path | None:
    target = base.joinpath(*dotted.split("."))
    for candidate in (target.with_suffix(".py"), target / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def package_imports(files: list[Path], with_package_inits: bool = True) -> list[Path]:
    """``files`` plus every module of this package they import, transitively.

    Follows relative imports (``from .x import y``, ``from . import x``, ``from ..x import y``)
    and absolute ``moesae.*`` imports, at any nesting level (imports inside functions count).
    With ``with_package_inits``, a subpackage's ``__init__.py`` counts as imported with any of its
    modules, as Python runs it (``saes/__init__.py`` registers every architecture). The root
    ``moesae/__init__.py`` is lazy (it imports nothing until an attribute is used), so its own
    imports are not followed.
    """
    seen: set[Path] = set()
    todo = [Path(f).resolve() for f in files]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path == PACKAGE / "__init__.py":
            continue
        init = path.parent / "__init__.py"
        if with_package_inits and path != init and init.is_file() and path.parent != PACKAGE:
            todo.append(init)
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[tuple[Path, str]] = []
            if isinstance(node, ast.ImportFrom):
                if node.level >= 1:
                    base = path.parent
                    for _ in range(node.level - 1):
                        base = base.parent
                elif node.module and node.module.split(".")[0] == PACKAGE.name:
                    base = PACKAGE.parent
                else:
                    continue
                if node.module:
                    targets.append((base, node.module))
                    prefix = node.module + "."
                else:
                    prefix = ""
                targets += [(base, prefix + alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [(PACKAGE.parent, a.name) for a in node.names if a.name.split(".")[0] == PACKAGE.name]
            for base, dotted in targets:
                dep = _module_file(base, dotted)
                if dep is not None and dep.resolve().is_relative_to(PACKAGE):
                    todo.append(dep.resolve())
    return sorted(seen)


def source_digest(files: list[Path]) -> str:
    """Hash of the files' package-relative names and contents."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


TRAINER_FILES = [PACKAGE / "training" / "trainer.py"]


def _own_files(path: Path) -> list[Path]:
    """The module and what it imports explicitly. Package ``__init__`` files, which only re-export
    and register, are left out: adding a new architecture to ``saes/__init__.py`` retrains nothing."""
    return [p for p in package_imports([path], with_package_inits=False) if p.name != "__init__.py"]


def code_fingerprint(architecture: str) -> str:
    """Hash of the source that determines how ``architecture`` trains."""
    from ..params import ParamsError
    from ..saes.registry import architecture_class

    try:
        cls = architecture_class(architecture)
    except ValueError as exc:
        raise ParamsError(f"params.yaml: {exc}") from exc
    files = set(_own_files(Path(inspect.getfile(cls)).resolve()))
    for trainer in TRAINER_FILES:
        files |= set(_own_files(trainer))
    return source_digest(sorted(files))


def training_fingerprint(variant: dict[str, Any], train_section: dict[str, Any]) -> str:
    """Hash of everything that determines a variant's trained weights: config, recipe and code."""
    import moesae.saes  # noqa: F401  (registers the architectures)

    code = code_fingerprint(str(variant.get("architecture")))
    blob = json.dumps({"variant": variant, "train": train_section, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
