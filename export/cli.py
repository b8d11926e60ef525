"""`genserve export` and `genserve repo check`: the command-line face of the export station."""

from __future__ import annotations

import argparse

EXPORT_EPILOG = """examples:
  genserve export runs/vae.pt --repo models                 # models/digits-vae/<highest+1>/
  genserve export runs/vae.pt --repo models --name vae --version 3 --force
  genserve export runs/flow.pt --repo models --fp16 --metrics eval.json
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to checked ONNX graphs in a model repository",
                       epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint written by `genserve train`")
    p.add_argument("--repo", required=True, help="model repository folder (created if absent)")
    p.add_argument("--name", help="model name (default <dataset>-<model>, e.g. digits-vae)")
    p.add_argument("--version", type=int, help="whole-number version (default: highest existing + 1)")
    p.add_argument("--force", action="store_true", help="overwrite an existing version")
    p.add_argument("--fp16", action="store_true", help="also write float16 graphs (GPU serving)")
    p.add_argument("--metrics", help="JSON file of test metrics, e.g. from `genserve evaluate --json`")
    p.set_defaults(handler=run_export)

    r = sub.add_parser("repo", help="inspect a model repository")
    rsub = r.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    c = rsub.add_parser("check", help="validate every model: files, checksums, manifests, graph signatures")
    c.add_argument("repo", help="model repository folder")
    c.set_defaults(handler=run_check)


def run_export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from genserve.export.repository import export_checkpoint

    metrics = None
    if args.metrics:
        try:
            metrics = json.loads(Path(args.metrics).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--metrics {args.metrics}: not a readable JSON file ({e})") from None
        if not isinstance(metrics, dict):
            raise ValueError(f"--metrics {args.metrics}: expected a JSON object of metrics")
    export_checkpoint(args.checkpoint, args.repo, name=args.name, version=args.version, fp16=args.fp16,
                      force=args.force, metrics=metrics)
    return 0


def run_check(args: argparse.Namespace) -> int:
    from genserve.export.check import check_repository

    reports = check_repository(args.repo)
    for r in reports:
        print(r.line())
    return 0 if all(r.ok for r in reports) else 1
