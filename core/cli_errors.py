"""The command-line error guard shared by every station's subcommands: expected failures end in one line.

It lives in core so that training, export, server and clients can all use it without importing one another;
the dispatcher that knows every station is genserve.app.cli.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EXTRAS = {"training": "train", "export": "export", "server": "serve", "clients": "", "app": "dev"}
"""Station (second part of a module name, genserve.<station>.x) -> the pip extra that installs what it needs."""


class RemoteError(Exception):
    """An error a server answered with (e.g. a failed gRPC call); the guard prints it in one line, exit code 1.

    The clients' GenserveError derives from it, so the guard recognises it without importing grpc.
    """


def extra_for(module: str) -> str:
    """The pip extra that installs what the station of ``module`` needs ("dev" when unknown).

    Examples:
        >>> extra_for("genserve.server.cli")
        'serve'
        >>> extra_for("genserve.clients.commands")
        'dev'
    """
    parts = module.split(".")
    return (EXTRAS.get(parts[1], "") if len(parts) > 1 and parts[0] == "genserve" else "") or "dev"


def guarded(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; expected failures end in one line on stderr, not a traceback.

    Exit codes: 2 for bad input or settings (ValueError, FileNotFoundError, NotImplementedError, a missing
    optional dependency), 1 when a server answered with an error (RemoteError), 130 on Ctrl-C.

    Examples:
        >>> import argparse
        >>> def bad(args):
        ...     raise ValueError("--n must be positive, got -1")
        >>> guarded(bad, argparse.Namespace())  # prints "genserve: error: --n must be positive, got -1" on stderr
        2
    """
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("genserve: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        print(f"genserve: error: {e.name} is not installed; pip install 'genserve[{extra_for(handler.__module__)}]'",
              file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"genserve: error: {e}", file=sys.stderr)
        return 2
    except RemoteError as e:
        print(f"genserve: error: {e}", file=sys.stderr)
        return 1
