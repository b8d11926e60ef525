"""`genserve export` and `genserve repo check`: the command-line face of the export station."""

from __future__ import annotations

import argparse

EXPORT_EPILOG = """examples:
  genserve export runs/vae.pt --repo models                 # models/digits-vae/<highest+1>/
  genserve export runs/vae.pt --repo models --name vae --version 3 --force
  genserve export runs/flow.pt --repo models --fp16 --metrics eval.json

  your own module (any nn.Module that meets its family contract, docs/contract.md):
  genserve export --factory mypkg.flows:build --family flow --data moons --weights flow.pt --repo models
  genserve export --factory mypkg.vae:ConvVAE --family latent_variable --spec spec.json --data test.npy \\
      --weights vae.pt --repo models --name images-vae
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to checked ONNX graphs in a model repository",
                       epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="checkpoint written by `genserve train` (or use --factory)")
    own = p.add_argument_group("your own module (instead of a checkpoint)")
    own.add_argument("--factory", metavar="MODULE:CALLABLE",
                     help="a function or class that returns the nn.Module, called with the data spec if it takes it")
    own.add_argument("--family", help="its family contract: autoregressive, flow, latent_variable, "
                     "linear_gaussian, implicit or energy")
    own.add_argument("--spec", help="JSON data spec of one example (default: taken from --data)")
    own.add_argument("--data", help="rows for the checks: a built-in dataset (test split) or a .npy/.npz/.csv file")
    own.add_argument("--weights", help="state_dict saved with torch.save(model.state_dict(), path); weights only")
    own.add_argument("--model-name", help="architecture name recorded in the manifest (default: the class name)")
    p.add_argument("--repo", required=True, help="model repository folder (created if absent)")
    p.add_argument("--name", help="model name (default <dataset>-<model>, e.g. digits-vae)")
    p.add_argument("--version", type=int, help="whole-number version (default: highest existing + 1)")
    p.add_argument("--force", action="store_true", help="overwrite an existing version")
    p.add_argument("--fp16", action="store_true", help="also write float16 graphs (GPU serving)")
    p.add_argument("--metrics", help="JSON file of test metrics, e.g. from `genserve evaluate --json`")
    p.add_argument("--calibration", metavar="FILE",
                   help="held-out in-distribution rows (.npy/.npz/.csv/.parquet) to calibrate score percentiles "
                   "on (half of them fit the score kinds); default: the validation split of the data set")
    p.add_argument("--no-calibration", action="store_true",
                   help="store no score calibration (the model then serves no score kinds or percentiles)")
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
    if args.factory:
        if args.checkpoint:
            raise ValueError("give either a checkpoint or --factory, not both")
        _export_factory(args, metrics)
        return 0
    if not args.checkpoint:
        raise ValueError("nothing to export: give a checkpoint written by `genserve train`, or --factory "
                         "MODULE:CALLABLE with --family and --spec or --data")
    stray = [f"--{k.replace('_', '-')}" for k in ("family", "spec", "data", "weights", "model_name")
             if getattr(args, k)]
    if stray:
        raise ValueError(f"{', '.join(stray)} go with --factory; a checkpoint carries its own family and data spec")
    export_checkpoint(args.checkpoint, args.repo, name=args.name, version=args.version, fp16=args.fp16,
                      force=args.force, metrics=metrics, calibration=_calibration_arg(args))
    return 0


def _calibration_arg(args: argparse.Namespace) -> str | bool | None:
    """--calibration FILE, --no-calibration (False) or neither (None: the data set's validation split)."""
    if args.calibration and args.no_calibration:
        raise ValueError("give --calibration FILE or --no-calibration, not both")
    return False if args.no_calibration else args.calibration


def _export_factory(args: argparse.Namespace, metrics: dict | None) -> None:
    """Build the user's module, load its weights and export it through its family contract."""
    from genserve.export.contract import family
    from genserve.export.factory import build_module, load_factory, load_weights, read_spec
    from genserve.export.repository import export_model

    if not args.family:
        raise ValueError("--factory needs --family: one of autoregressive, flow, latent_variable, linear_gaussian, "
                         "implicit, energy (docs/contract.md)")
    family(args.family)  # an unknown family is refused before anything is imported or built
    from genserve.export.calibration import file_data, split_data

    rows = data = None
    spec = read_spec(args.spec) if args.spec else None
    if args.data:
        from genserve.training.data import load_dataset

        data = load_dataset(args.data, levels=spec.levels if spec is not None else 0)
        rows = data.test
        if spec is None:
            spec = data.spec
    if spec is None:
        raise ValueError("--factory needs the data spec: --spec spec.json, or --data naming the data it was "
                         "trained on")
    choice, calibration = _calibration_arg(args), None
    if isinstance(choice, str):
        calibration = file_data(choice, spec)
    elif choice is None and data is not None:
        calibration = split_data(data.train, data.val, f"{args.data} validation split (score kinds fitted on its "
                                 "training split)")
    elif choice is None:
        print("  no calibration: give in-distribution rows with --calibration FILE (or --data) for percentiles")
    module = build_module(load_factory(args.factory), spec, args.factory)
    if args.weights:
        load_weights(module, args.weights)
    export_model(module.eval(), args.family, spec, args.repo, name=args.name, version=args.version, data=rows,
                 model_name=args.model_name, fp16=args.fp16, force=args.force, metrics=metrics,
                 source=args.factory, calibration=calibration)


def run_check(args: argparse.Namespace) -> int:
    from genserve.export.check import check_repository

    reports = check_repository(args.repo)
    for r in reports:
        print(r.line())
    return 0 if all(r.ok for r in reports) else 1
