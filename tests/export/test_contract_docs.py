"""docs/contract.md stays in step with export.contract.FAMILIES: every family, method, operation and parameter.

The page is the contract users read; FAMILIES is the one export enforces. A family, a method or a program
parameter added to FAMILIES without a line on the page fails here, naming what the page lacks.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from genserve.export.contract import FAMILIES

PAGE = Path(__file__).resolve().parents[2] / "docs" / "contract.md"


def sections() -> dict[str, str]:
    """The page's level-2 sections by the family name in their heading (``## `flow` ``)."""
    text = PAGE.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    out = {}
    for part in parts:
        heading, _, body = part.partition("\n")
        m = re.fullmatch(r"`(\w+)`", heading.strip())
        if m:
            out[m.group(1)] = body
    return out


def test_every_family_has_its_section() -> None:
    found = sections()
    assert sorted(found) == sorted(FAMILIES), (
        f"docs/contract.md has family sections {sorted(found)}, export.contract.FAMILIES has {sorted(FAMILIES)}")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_section_names_every_method_operation_and_parameter(name: str) -> None:
    fam, body = FAMILIES[name], sections().get(name, "")
    for method in fam.methods:
        row = re.search(rf"^\| `{method.name}` \| (yes|no|[^|]+) \|", body, flags=re.MULTILINE)
        assert row, f"docs/contract.md: the {name} table has no row for {method.name!r} ({method.call})"
        said_required = row.group(1).strip() == "yes"
        assert said_required == method.required, (
            f"docs/contract.md: {name}.{method.name} is {'required' if method.required else 'optional'} in "
            f"FAMILIES but the page's table says {row.group(1).strip()!r}")
    for op in fam.operations:
        assert f"*{op}*" in body, f"docs/contract.md: the {name} section does not describe the {op} operation"
    for key, default in fam.parameters.items():
        assert re.search(rf"`{key}` = {default:g}\b", body), (
            f"docs/contract.md: the {name} section does not give the parameter {key!r} with its default {default:g}")


def test_summary_table_lists_every_family_with_its_operations() -> None:
    text = PAGE.read_text(encoding="utf-8")
    for name, fam in FAMILIES.items():
        row = re.search(rf"^\| \[`{name}`\]\(#{name}\) \|[^|]*\| ([^|]*) \|", text, flags=re.MULTILINE)
        assert row, f"docs/contract.md: the summary table has no row for {name}"
        listed = [op.strip() for op in row.group(1).split(",")]
        assert listed == list(fam.operations), f"docs/contract.md lists {listed} for {name}, FAMILIES {fam.operations}"


def test_readme_flow_meets_the_flow_contract() -> None:
    """The module of the README's "Serve your own model" section, as printed there, passes bind's flow checks."""
    import zuko

    from genserve.core.spec import DataSpec
    from genserve.export.contract import bind

    readme = (PAGE.parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Serve your own model")
    section = readme[start:readme.index("\n## ", start + 1)]
    assert "docs/contract.md" in section
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    definitions = code[:code.index("\ndata = ")]  # imports and the class; the training and export run elsewhere
    namespace: dict = {"__name__": "readme_flow"}
    exec(compile(definitions, "README.md", "exec"), namespace)
    module = namespace["ZukoMAF"](zuko.flows.MAF(2, transforms=2, hidden_features=(16, 16)))
    bound = bind(module, "flow", DataSpec("moons", (2,), "continuous"))
    assert sorted(bound.graphs) == ["forward", "inverse_pass_0", "inverse_pass_1"]
