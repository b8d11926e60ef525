"""`genserve mixture`: member checkpoints on the same data into one served mixture model (export/mixture.py)."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  genserve mixture runs/arrnn-s0.pt runs/arrnn-s1.pt runs/arcnn.pt --repo models --name digits-mix
  genserve mixture runs/arrnn.pt runs/realnvp.pt --repo models --json report.json

The weights are fitted on the validation split (EM); the served LogLikelihood is log sum_k w_k p_k(x), whose
kind is the weakest member's; Sample picks a member per row by its weight with the request's seed.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mixture", help="combine checkpoints on the same data into one served mixture model",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="member checkpoints written by `genserve train` (exact or lower-bound likelihoods)")
    p.add_argument("--repo", required=True, help="model repository folder (created if absent)")
    p.add_argument("--name", help="model name (default <dataset>-mixture)")
    p.add_argument("--version", type=int, help="whole-number version (default: highest existing + 1)")
    p.add_argument("--force", action="store_true", help="overwrite an existing version")
    p.add_argument("--seed", type=int, default=0, help="seed of the scoring noise (weight fit and test NLL)")
    p.add_argument("--min-weight", type=float, default=1e-3,
                   help="members whose fitted weight is below this are left out (default 0.001)")
    p.add_argument("--json", metavar="FILE", help="write the weights and the validation/test NLLs here")
    p.set_defaults(handler=run_mixture)


def run_mixture(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from genserve.export.mixture import build_mixture

    report: dict = {}
    build_mixture(args.checkpoints, args.repo, name=args.name, version=args.version, force=args.force,
                  seed=args.seed, min_weight=args.min_weight, report=report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
