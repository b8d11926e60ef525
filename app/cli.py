"""The `genserve` command: one entry point whose subcommands live with their stations.

This is the application shell: it may import every station (genserve.app is the one place that does).

Station modules that register subcommands import only argparse at the top, so `genserve --help` works in a
client-only install; a subcommand whose station is not installed says which extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from genserve.core.cli_errors import guarded

# Modules with add_parser(subparsers); the extra each needs is genserve.core.cli_errors.EXTRAS of its station.
STATIONS = [
    "genserve.training.cli",
    "genserve.training.evaluate",
    "genserve.export.cli",
    "genserve.export.mixture_cli",
    "genserve.server.cli",
    "genserve.clients.commands",
    "genserve.app.quickstart",
]


ALTERNATE_HANDLERS = {("score", "engine", "ray"): "genserve.app.ray_score:run_score"}
"""(subcommand, option, value) -> "module:function" that runs it instead of the station's handler: work that
needs a station the subcommand's own must not import (the client's `score --engine ray` runs the server's
engine in Ray actors)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genserve",
        description="Train, export and serve deep generative models: sample, score, encode and decode over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"genserve {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in STATIONS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("genserve"):
                continue  # a station not built yet
            raise
        mod.add_parser(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genserve")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default sys.argv[1:]) and run the subcommand under the error guard; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    handler = args.handler
    for (command, option, value), target in ALTERNATE_HANDLERS.items():
        if args.command == command and getattr(args, option, None) == value:
            module, name = target.split(":")
            handler = getattr(importlib.import_module(module), name)
    return guarded(handler, args)


if __name__ == "__main__":
    sys.exit(main())
