"""Deprecated location of the `genserve` command (now genserve.app.cli) and its error guard (genserve.core).

Kept so that older callers keep working: ``from genserve.clients.cli import guarded`` and
``python -m genserve.clients.cli``. New code imports genserve.core.cli_errors.guarded, and the command is
genserve.app.cli:main. The import of genserve.app below is the one exception to the clients' layering rule,
listed in tests/test_layering.py.
"""

from __future__ import annotations

import sys

from genserve.core.cli_errors import guarded

__all__ = ["guarded", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the `genserve` command (genserve.app.cli.main)."""
    from genserve.app.cli import main as app_main

    return app_main(argv)


if __name__ == "__main__":
    sys.exit(main())
