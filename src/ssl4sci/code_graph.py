"""Which library files a stage runs: the import graph of its entry module, read from the source.

Snakemake re-runs a job when its rule text changes, not when library code it imports does, so every rule carries a
hash of the files its stage runs as a param. A hand-kept list of those files drifts from the imports (fine-tuning
imported ``ssl/crops.py`` through ``ssl/augment.py`` without it being listed); this module follows every
``import``/``from ... import`` of the package, at module level and inside functions, so the list cannot drift.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "ssl4sci"
PACKAGE_DIR = Path(__file__).resolve().parent


def module_file(module: str, root: Path = PACKAGE_DIR) -> Path | None:
    """``ssl4sci.ssl.augment`` -> ``<root>/ssl/augment.py`` (a package -> its ``__init__.py``); None outside."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(module: str, path: Path) -> list[str]:
    return module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]


def imported_modules(module: str, root: Path = PACKAGE_DIR) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source (relative imports resolved)."""
    path = module_file(module, root)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(module, path)
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from ssl4sci.ssl import augment` imports a module; `from ssl4sci.io import write_json` a name
            found.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}", root))
    return {m for m in found if module_file(m, root)}


def _with_parents(module: str) -> list[str]:
    """Importing ``ssl4sci.ssl.augment`` runs ``ssl4sci/__init__.py`` and ``ssl4sci/ssl/__init__.py`` first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@lru_cache(maxsize=None)  # per process: one DAG build asks for each stage several times
def _closure(entries: tuple[str, ...], root: Path) -> tuple[str, ...]:
    seen: set[str] = set()
    todo = [m for entry in entries for m in _with_parents(entry)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for imported in imported_modules(module, root):
            todo.extend(m for m in _with_parents(imported) if m not in seen)
    return tuple(sorted(seen))


def stage_files(entries: list[str] | tuple[str, ...], root: Path = PACKAGE_DIR) -> list[Path]:
    """Every package file that running the entry modules (``ssl4sci.prepare``, ...) can execute, sorted."""
    return [module_file(m, root) for m in _closure(tuple(entries), root)]


def code_version(entries: list[str] | tuple[str, ...], root: Path = PACKAGE_DIR) -> str:
    """A short hash of those files' paths and contents: a rule param that changes when any of them does."""
    digest = hashlib.sha256()
    for path in stage_files(entries, root):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
