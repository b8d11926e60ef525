"""Who may import whom, read from the source with ast (function-local imports included), and the namespace map.

The stations and their direction (DESIGN.md): training <- export (export runs the model code), server imports
neither and never torch, clients import no other station and nothing heavier than grpcio, protobuf and numpy,
core imports no station. The contract (protos/: the .proto files, their stubs genserve.v1 / genserve.oip and the
codegen) sits below everything and imports no station either. genserve.app, the application shell (the `genserve`
command's dispatch and the quickstart), is the one package that may import every station.

A rule broken by code that cannot be moved yet is listed in ALLOWED with its reason; an entry that no longer
matches an import fails the test, so the list only shrinks.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from source_map import PACKAGE_DIRS, PYPROJECT, ROOT, module_of, source_files

STATIONS = ("core", "training", "export", "server", "clients", "app", "protos")

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "core": ("genserve.training", "genserve.export", "genserve.server", "genserve.clients", "genserve.app",
             "genserve.protos", "torch", "onnxruntime", "onnx", "grpc"),
    "protos": ("genserve.core", "genserve.training", "genserve.export", "genserve.server", "genserve.clients",
               "genserve.app", "torch", "onnxruntime"),
    "training": ("genserve.server", "genserve.export", "genserve.clients", "genserve.app", "onnxruntime"),
    "export": ("genserve.clients", "genserve.app"),
    "server": ("torch", "genserve.training", "genserve.export", "genserve.clients", "genserve.app"),
    "clients": ("torch", "onnxruntime", "onnx", "genserve.training", "genserve.export", "genserve.server",
                "genserve.app"),
    "app": (),
}
"""Station -> module prefixes it must not import (a prefix matches the module and its submodules)."""

EXPORT_MAY_USE_SERVER = ("genserve.server.programs", "genserve.server.sessions")
"""Export checks parity against the server's own torch-free programs and graph runners, as served; nothing else
of the server."""

CLIENT_THIRD_PARTY = {"grpc", "google", "numpy", "tqdm"}
"""What a bare `pip install genserve` brings (grpcio, protobuf, numpy, tqdm)."""
CLIENT_OPTIONAL = {"pyarrow", "grpc_health", "matplotlib"}
"""Optional in a client install: imported inside the function that needs them, never at module level."""

ALLOWED: dict[tuple[str, str], str] = {}
"""(file, imported module) -> why this breach of FORBIDDEN is tolerated for now."""


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root, with / separators
    module: str  # absolute, e.g. genserve.server.programs.base
    line: int
    local: bool  # inside a function (or class) body rather than at module level


def station_of(module: str) -> str:
    """genserve.server.engine -> "server"; the stubs genserve.v1 / genserve.oip -> "protos"."""
    if module.startswith(("genserve.v1", "genserve.oip")):
        return "protos"
    return module.split(".")[1]


def imports_of(path: Path) -> list[Import]:
    """Absolute names of every module that ``path`` imports, at any depth (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    rel = path.relative_to(ROOT).as_posix()
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef)
            if isinstance(child, ast.Import):
                found.extend(Import(rel, alias.name, child.lineno, local) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    target = child.module or ""
                # `from genserve.server import programs` imports genserve.server.programs when that is a module
                names = [f"{target}.{alias.name}" for alias in child.names]
                found.append(Import(rel, target, child.lineno, local))
                found.extend(Import(rel, name, child.lineno, local) for name in names if _is_module(name))
            visit(child, inner)

    visit(tree, False)
    return found


def _is_module(name: str) -> bool:
    """Whether a dotted genserve name is a module or package in the source tree (not an attribute)."""
    if not name.startswith("genserve."):
        return False
    first = name.split(".")
    for package, folder in PACKAGE_DIRS.items():
        pparts = package.split(".")
        if first[: len(pparts)] == pparts:
            rest = first[len(pparts):]
            target = ROOT / folder / Path(*rest) if rest else ROOT / folder
            if target.with_suffix(".py").is_file() or (target / "__init__.py").is_file():
                return True
    return False


def matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def breaches(imp: Import) -> list[str]:
    """The rules that one import breaks (empty when it is fine)."""
    station = station_of(module_of(ROOT / imp.file))
    out = [f"{station} must not import {prefix}" for prefix in FORBIDDEN[station] if matches(imp.module, prefix)]
    if station == "export" and matches(imp.module, "genserve.server") and not any(
        matches(imp.module, allowed) for allowed in EXPORT_MAY_USE_SERVER
    ):
        out.append(f"export may use only {', '.join(EXPORT_MAY_USE_SERVER)} of the server")
    top = imp.module.split(".")[0]
    if top in STATIONS and top != "genserve":
        out.append(f"import the station as genserve.{top}, not as a top-level {top!r}")
    if station == "clients" and top not in sys.stdlib_module_names and top != "genserve":
        if top in CLIENT_OPTIONAL:
            if not imp.local:
                out.append(f"clients import the optional {top} inside the function that needs it")
        elif top not in CLIENT_THIRD_PARTY:
            out.append(f"clients use only {sorted(CLIENT_THIRD_PARTY)} (and optional {sorted(CLIENT_OPTIONAL)})")
    return out


ALL_IMPORTS = [imp for path in source_files() for imp in imports_of(path)]


def test_the_scan_sees_every_station_and_local_imports() -> None:
    """Guard against a scan that silently reads nothing: every station has files, and a known local import."""
    stations = {station_of(module_of(ROOT / imp.file)) for imp in ALL_IMPORTS}
    assert stations == set(STATIONS)
    # app/quickstart.py imports training inside a function, which a module-level scan would miss
    assert any(imp.file == "app/quickstart.py" and imp.local and matches(imp.module, "genserve.training")
               for imp in ALL_IMPORTS)


def test_file_names_map_to_module_names() -> None:
    source = ROOT / "server" / "programs" / "base.py"
    assert module_of(source) == "genserve.server.programs.base"
    assert module_of(ROOT / "protos" / "genserve" / "v1" / "service_pb2.py") == "genserve.v1.service_pb2"
    assert module_of(ROOT / "protos" / "codegen.py") == "genserve.protos.codegen"
    assert station_of("genserve.oip.grpc_service_pb2") == "protos"


@pytest.mark.parametrize("station", STATIONS)
def test_station_imports_follow_the_layering(station: str) -> None:
    broken = []
    for imp in ALL_IMPORTS:
        if station_of(module_of(ROOT / imp.file)) != station or (imp.file, imp.module) in ALLOWED:
            continue
        broken += [f"{imp.file}:{imp.line} imports {imp.module}: {why}" for why in breaches(imp)]
    assert not broken, "layering broken (DESIGN.md, 'Dependency direction'):\n" + "\n".join(broken)


def test_allowed_breaches_are_still_needed() -> None:
    """Each ALLOWED entry names an import that exists and breaks a rule; delete entries once fixed."""
    present = {(imp.file, imp.module) for imp in ALL_IMPORTS if breaches(imp)}
    stale = [f"{file} -> {module}" for file, module in ALLOWED if (file, module) not in present]
    assert not stale, "these ALLOWED entries no longer match a breaking import; delete them:\n" + "\n".join(stale)


def test_every_source_folder_is_a_listed_package() -> None:
    """A subpackage missing from pyproject's `packages` is left out of the wheel (and the serving image)."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    needed = {module_of(path).rpartition(".")[0] if path.name != "__init__.py" else module_of(path)
              for path in source_files()}
    # protos/genserve/ holds v1 and oip, listed under their own names; protos/genserve itself is no package
    needed -= {"genserve.protos.genserve"}
    assert needed - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(needed - listed)}"
    assert listed - needed == set(), f"listed but without sources: {sorted(listed - needed)}"


def test_genserve_folder_mirrors_the_package_map() -> None:
    """genserve/ holds one relative symlink per mapped package, so editors and static tools (pyright, jedi)
    resolve genserve.* from a checkout exactly as the installed mapping does."""
    top = {name: folder for name, folder in PACKAGE_DIRS.items() if name.count(".") == 1}
    links = {p.name: p for p in (ROOT / "genserve").iterdir()}
    assert sorted(links) == sorted(name.split(".")[1] for name in top)
    for name, folder in top.items():
        link = links[name.split(".")[1]]
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), f"{link} must be a relative symlink"
        assert link.resolve() == (ROOT / folder).resolve(), f"{link} -> {os.readlink(link)}, pyproject says {folder}"


def test_a_breach_is_reported() -> None:
    """The rules fire on the imports they are about (so an empty report means something)."""
    def fake(file: str, module: str, local: bool = False) -> list[str]:
        return breaches(Import(file, module, 1, local))

    assert fake("server/engine.py", "torch.nn")
    assert fake("server/engine.py", "genserve.training.base")
    assert fake("core/spec.py", "genserve.server.config")
    assert fake("clients/client.py", "genserve.export.repository")
    assert fake("clients/client.py", "onnxruntime")
    assert fake("clients/datafiles.py", "pyarrow") and not fake("clients/datafiles.py", "pyarrow", local=True)
    assert fake("training/base.py", "genserve.server.programs")
    assert fake("export/repository.py", "genserve.server.engine")
    assert not fake("export/repository.py", "genserve.server.programs.base")
    assert fake("server/engine.py", "core.spec")
    assert not fake("app/cli.py", "genserve.server.cli")


@pytest.mark.parametrize(("module", "absent"), [
    # (server -> clients is checked by the AST test, which knows the ALLOWED breach of servicer.py)
    ("genserve.server.app", ("torch", "genserve.training", "genserve.export", "genserve.app")),
    ("genserve.clients.client", ("torch", "onnxruntime", "genserve.server", "genserve.training")),
    ("genserve.core.manifest", ("torch", "onnxruntime", "grpc", "genserve.server", "genserve.clients")),
])
def test_importing_a_station_loads_none_of_the_forbidden(module: str, absent: tuple[str, ...]) -> None:
    """The same rules at run time, in a fresh interpreter: what importing the station actually loads."""
    import subprocess

    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({absent!r})))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]", f"importing {module} loaded {run.stdout.strip()}"
