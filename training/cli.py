"""`genserve train`: the command-line face of the trainer (torch is imported only when it runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  genserve train vae --dataset digits --out runs/vae.pt
  genserve train realnvp --dataset moons --profile full --out runs/moons-flow.pt
  genserve train arcnn --config my.toml --set lr=3e-4 --set arch.hidden=96 --out runs/arcnn.pt
  genserve train gan --dataset images.npy --levels 256 --out runs/gan.pt
  torchrun --standalone --nproc_per_node=2 -m genserve.training.cli vae --out runs/vae.pt

your own architecture (a genserve.training.base.GenerativeModel subclass that meets its family contract):
  genserve train tinyflow --dataset moons --out runs/tiny.pt      # a plugin: entry point in group genserve.models
  genserve train --factory mypkg.model:TinyFlow --dataset moons --out runs/tiny.pt
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model family on a data set", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(handler=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="arcnn, arrnn, realnvp, ppca, vae, gan, ebm, or an installed plugin's "
                   "name (entry point group genserve.models)")
    p.add_argument("--factory", metavar="MODULE:CLASS",
                   help="train your own GenerativeModel subclass, or a function returning it, instead of a named "
                   "model; it must be importable (installed or on PYTHONPATH)")
    p.add_argument("--dataset", default="digits", help="digits, moons, gmm, or a .npy/.npz/.csv file (default digits)")
    p.add_argument("--levels", type=int, default=0, help="integer levels of a user file's values (0: continuous)")
    p.add_argument("--out", required=True, help="checkpoint path to write, e.g. runs/vae.pt")
    p.add_argument("--profile", default="quick", choices=["quick", "full"], help="settings preset (default quick)")
    p.add_argument("--config", help="a .toml or .json file of settings (same keys as --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set epochs=50 --set arch.hidden=128 (repeatable)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run stored at --out")
    p.add_argument("--force", action="store_true", help="overwrite the checkpoint at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


CHOSEN_ELSEWHERE = {"model": "the first argument (genserve train MODEL) or --factory",
                    "profile": "chosen with --profile quick|full", "dataset": "chosen with --dataset"}
"""Keys that --set may not change: a config built from one and overridden by another would be a mix."""


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. --set lr=3e-4")
        key = key.strip()
        if key in CHOSEN_ELSEWHERE:
            raise ValueError(f"--set {item!r}: the {key} is {CHOSEN_ELSEWHERE[key]}, not a setting to override")
        out[key] = value.strip()
    return out


def run(args: argparse.Namespace) -> int:
    import os

    from genserve.training.config import build_config
    from genserve.training.registry import refused
    from genserve.training.trainer import train

    main_rank = int(os.environ.get("RANK", "0")) == 0
    if args.model and args.factory:
        raise ValueError(f"give a model name or --factory, not both (got {args.model!r} and --factory "
                         f"{args.factory!r})")
    if main_rank:
        for message in refused():
            print(f"genserve: warning: {message}", file=sys.stderr)
    out = Path(args.out)
    if out.exists() and not (args.resume or args.force):
        raise ValueError(f"{out} exists; pass --force to overwrite it, --resume to continue its run, or another "
                         "--out")
    overrides = parse_overrides(args.set)
    if args.seed is not None:
        overrides["seed"] = str(args.seed)
    cfg = build_config(args.model, args.dataset, args.profile, args.levels, args.config, overrides,
                       factory=args.factory)
    metrics = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if main_rank:
        print(json.dumps({"checkpoint": str(args.out), **metrics}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m genserve.training.cli`` (used by torchrun)."""
    from genserve.core.cli_errors import guarded

    p = argparse.ArgumentParser(prog="genserve train")
    _arguments(p)
    return guarded(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
