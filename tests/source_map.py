"""Where the sources of each genserve module live: pyproject's package-dir map, read once (for tests/ only)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
"""genserve.<package> -> folder, as pyproject.toml maps them."""


def module_of(path: Path) -> str:
    """The dotted module name of a source file under the package-dir map (the longest mapped folder wins).

    Examples:
        >>> module_of(ROOT / "server" / "programs" / "base.py")
        'genserve.server.programs.base'
        >>> module_of(ROOT / "protos" / "genserve" / "v1" / "service_pb2.py")
        'genserve.v1.service_pb2'
    """
    rel = path.relative_to(ROOT).with_suffix("")
    best = max((folder for folder in PACKAGE_DIRS.values() if rel.is_relative_to(folder)), key=len)
    package = next(name for name, folder in PACKAGE_DIRS.items() if folder == best)
    return ".".join((package, *rel.relative_to(best).parts)).removesuffix(".__init__")


def source_files() -> list[Path]:
    """Every .py file under the mapped folders (generated stubs included), sorted."""
    files = set()
    for folder in PACKAGE_DIRS.values():
        files |= {p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    return sorted(files)
