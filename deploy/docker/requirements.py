"""Print the third-party requirements of genserve extras, read from pyproject.toml, one per line.

The images install these in a layer of their own, before the project's code is copied, so that a code change
rebuilds only the last, small layer (the genserve wheel, installed with --no-deps) and not ONNX Runtime or torch.
Self-references such as ``genserve[train]`` are expanded; the base dependencies always come first.

    python deploy/docker/requirements.py pyproject.toml serve > /tmp/requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib

SELF = re.compile(r"^genserve\[(?P<extras>[^\]]+)\]$")


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """The project's dependencies plus those of ``extras``, self-references expanded, duplicates dropped."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()

    def add(items: list[str]) -> None:
        for item in items:
            match = SELF.match(item.replace(" ", ""))
            if match:
                for extra in match["extras"].split(","):
                    expand(extra)
            elif item not in out:
                out.append(item)

    def expand(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            raise SystemExit(f"no extra {extra!r} in pyproject.toml (there are: {', '.join(sorted(optional))})")
        seen.add(extra)
        add(optional[extra])

    add(project.get("dependencies", []))
    for extra in extras:
        expand(extra)
    return out


def main(argv: list[str]) -> None:
    if len(argv) < 1:
        raise SystemExit("usage: requirements.py PYPROJECT [EXTRA ...]")
    with open(argv[0], "rb") as f:
        pyproject = tomllib.load(f)
    print("\n".join(requirements(pyproject, argv[1:])))


if __name__ == "__main__":
    main(sys.argv[1:])
