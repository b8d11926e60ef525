"""Every `>>>` example in a docstring of the genserve package runs and shows what it says (as zuko's CI does).

Modules are imported under their genserve.* names (not by file path, which would load a second copy of each
module), and each docstring with examples is one test. A module that has examples but fails to import, or
yields none, fails here rather than being skipped.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
from source_map import module_of, source_files

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
MODULES = sorted(module_of(path) for path in source_files() if ">>>" in path.read_text())


def _doctests(module: str) -> list[doctest.DocTest]:
    found = doctest.DocTestFinder(exclude_empty=True).find(importlib.import_module(module), module)
    return sorted((t for t in found if t.examples), key=lambda t: t.name)


def test_examples_are_found_where_docstrings_have_them() -> None:
    assert {"genserve.core.noise", "genserve.server.batcher", "genserve.training.ppca"} <= set(MODULES)
    empty = [m for m in MODULES if not _doctests(m)]
    assert not empty, f"these modules contain '>>>' but no docstring example was collected: {empty}"


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module: str) -> None:
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in _doctests(module):
        runner.run(test, out=out.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module}:\n" + "".join(out)
