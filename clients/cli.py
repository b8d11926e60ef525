"""The `genserve` command: one entry point whose subcommands live with their stations.

Station modules that register subcommands import only argparse at the top, so `genserve --help` works in a
client-only install; a subcommand whose station is not installed says which extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# (module, extra needed to run it); each module has add_parser(subparsers).
STATIONS = [
    ("genserve.training.cli", "train"),
    ("genserve.training.evaluate", "train"),
    ("genserve.export.cli", "export"),
    ("genserve.server.cli", "serve"),
    ("genserve.clients.commands", ""),
    ("genserve.clients.quickstart", "dev"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genserve",
        description="Train, export and serve deep generative models: sample, score, encode and decode over gRPC.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, _ in STATIONS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("genserve"):
                continue  # a station not built yet
            raise
        mod.add_parser(sub)
    return parser


def guarded(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; expected failures end in one line on stderr, not a traceback.

    Exit codes: 2 for bad input or settings, 1 when a server answered with an error (GenserveError).
    """
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("genserve: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        extra = next((x for m, x in STATIONS if args.command and m.split(".")[1] in handler.__module__), "dev")
        print(f"genserve: error: {e.name} is not installed; pip install 'genserve[{extra or 'dev'}]'",
              file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"genserve: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # A failed call to a server: its status and message in one line. Imported here, on the error path,
        # so that `genserve --help` does not load grpc.
        from genserve.clients.channel import GenserveError

        if not isinstance(e, GenserveError):
            raise
        print(f"genserve: error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return guarded(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
