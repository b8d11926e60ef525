"""`genserve quickstart`: train all seven families on digits, export, serve, and call every operation.

A second run reuses the checkpoints, evaluations and exports of the first (delete the work folder or pass
--retrain to start over). ``--serve`` leaves the server running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

EPILOG = """examples:
  genserve quickstart                       # about 5-7 minutes on a 2-core CPU; writes ./quickstart/
  genserve quickstart --serve --port 8500   # then, in another shell: genserve models
  genserve quickstart --models vae,realnvp --workdir /tmp/qs
"""
ALL = ("arcnn", "arrnn", "realnvp", "ppca", "vae", "gan", "ebm")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="train, export and serve every family on digits, then call them",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="quickstart", help="where checkpoints, repository and pictures go")
    p.add_argument("--models", default=",".join(ALL), help="comma-separated subset of " + ",".join(ALL))
    p.add_argument("--profile", default="quick", choices=["quick", "full"], help="training profile")
    p.add_argument("--retrain", action="store_true", help="ignore what an earlier run trained")
    p.add_argument("--serve", action="store_true", help="leave the server running (Ctrl-C stops it)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port (default: a free one; 8500 with --serve)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (default: a free one)")
    p.set_defaults(handler=run)


def say(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def train_all(models: list[str], work: Path, profile: str, retrain: bool) -> dict[str, dict[str, Any]]:
    """Train (or reuse) and evaluate each model; returns per-model records with checkpoint and metrics."""
    from genserve.training.checkpoint import read_checkpoint
    from genserve.training.config import build_config
    from genserve.training.evaluate import evaluate_checkpoint
    from genserve.training.trainer import train

    records: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(models, 1):
        ckpt = work / "checkpoints" / f"{name}.pt"
        cfg = build_config(name, "digits", profile)
        t0 = time.perf_counter()
        reused = False
        if ckpt.exists() and not retrain:
            try:
                old = read_checkpoint(ckpt)
                finished = "stopped" in old["metrics"] or old["metrics"].get("epochs") == 0  # pPCA: closed form
                reused = old["config"] == cfg.to_dict() and finished
            except ValueError:
                reused = False
        if reused:
            say(f"({i}/{len(models)}) {name}: reusing {ckpt}")
        else:
            say(f"({i}/{len(models)}) training {name} ({profile} profile) ...")
            train(cfg, ckpt)
        train_s = float(read_checkpoint(ckpt)["metrics"].get("train_seconds", time.perf_counter() - t0))
        eval_file = ckpt.with_suffix(".eval.json")
        metrics = None
        if eval_file.exists() and not retrain:
            cached = json.loads(eval_file.read_text())
            # an evaluation from before the Frechet spread and floor were reported is done again
            if cached.get("checkpoint_sha") == _digest(ckpt) and "frechet_distance_floor" in cached:
                metrics = cached
        if metrics is None:
            say(f"({i}/{len(models)}) evaluating {name} on the digits test split ...")
            metrics = evaluate_checkpoint(ckpt, n_samples=1000, out_dir=work / "evaluation")
            metrics["checkpoint_sha"] = _digest(ckpt)
            eval_file.write_text(json.dumps(metrics, indent=2))
        records[name] = {"checkpoint": ckpt, "metrics": metrics, "train_seconds": train_s}
    return records


def export_all(records: dict[str, dict[str, Any]], repo: Path) -> None:
    """Export each checkpoint as version 1 of digits-<model>, unless that export is of the same checkpoint."""
    from genserve.core.manifest import MANIFEST
    from genserve.export.repository import export_checkpoint

    for name, rec in records.items():
        target = repo / f"digits-{name}" / "1"
        sha = rec["metrics"]["checkpoint_sha"]
        stamp = rec["checkpoint"].with_suffix(".export.json")  # which checkpoint the export came from
        if (target / MANIFEST).exists() and stamp.exists() and json.loads(stamp.read_text()).get("sha") == sha:
            say(f"{name}: reusing the export in {target}")
            continue
        say(f"exporting {name} to {target} (ONNX, parity-checked) ...")
        metrics = {k: v for k, v in rec["metrics"].items() if isinstance(v, int | float) and not isinstance(v, bool)}
        export_checkpoint(rec["checkpoint"], repo, name=f"digits-{name}", version=1, force=True, metrics=metrics,
                          log=lambda line: say("  " + line))
        stamp.write_text(json.dumps({"sha": sha, "export": str(target)}))


def exercise(client: Any, records: dict[str, dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    """Call every operation of every model through the client; write a PNG grid of samples per model."""
    import numpy as np

    from genserve.clients.channel import GenserveError
    from genserve.clients.images import write_grid
    from genserve.training.data import load_dataset

    test = load_dataset("digits").test
    (work / "samples").mkdir(parents=True, exist_ok=True)
    rows, grids = [], {}
    for name, rec in records.items():
        model = f"digits-{name}"
        info = client.info(model)
        ops = list(info.operations)
        row: dict[str, Any] = {"model": name, "family": info.family, "operations": ops}
        t0 = time.perf_counter()
        x = client.sample(model, 64, seed=0)
        row["sample_ms"] = 1000 * (time.perf_counter() - t0)
        png = write_grid(work / "samples" / f"{name}.png", x, 0, 16)
        grids[name] = x[:16]
        row["samples_png"] = str(png)
        if "log_likelihood" in ops:
            t0 = time.perf_counter()
            ll = client.log_likelihood(model, test[:64], seed=0)
            row["score_ms"] = 1000 * (time.perf_counter() - t0)
            row["served_nll_64"] = float(-np.mean(ll.log_prob))
        else:
            try:
                client.log_likelihood(model, test[:1])
                raise RuntimeError(f"{model} scored data although it has no likelihood")
            except GenserveError as e:
                row["score_error"] = e.code
        if "encode" in ops:
            t0 = time.perf_counter()
            z = client.encode(model, test[:8])
            row["encode_ms"] = 1000 * (time.perf_counter() - t0)
            if "decode" in ops:
                t0 = time.perf_counter()
                client.decode(model, z)
                row["decode_ms"] = 1000 * (time.perf_counter() - t0)
        elif "decode" in ops:
            q = int(info.manifest.parameters["latent_dim"])
            t0 = time.perf_counter()
            client.decode(model, np.random.default_rng(0).standard_normal((8, q)).astype(np.float32))
            row["decode_ms"] = 1000 * (time.perf_counter() - t0)
        m = rec["metrics"]
        row.update(nll_nats=m.get("nll_nats"), bits_per_dim=m.get("bits_per_dim"), kind=m.get("likelihood_kind"),
                   mean_energy=m.get("mean_energy"), frechet_distance=m.get("frechet_distance"),
                   frechet_distance_sd=m.get("frechet_distance_sd"), fd_seeds=len(m.get("fd_seeds") or []),
                   frechet_distance_floor=m.get("frechet_distance_floor"), frechet_floor_n=m.get("frechet_floor_n"),
                   train_seconds=rec["train_seconds"])
        rows.append(row)
    if grids:  # one picture of every family: a labelled row of 16 samples each, all drawn with seed 0
        from genserve.training.plots import family_rows

        family_rows(grids, 17, work / "samples" / "all.png", "samples from every family (seed 0)")
    return rows


def _free_port(host: str) -> int:
    """A free TCP port (the server's metrics_port 0 means no metrics, so pick one)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, d: int = 1) -> str:
        return "—" if v is None else f"{v:.{d}f}"

    def fd(r: dict[str, Any]) -> str:
        sd = r.get("frechet_distance_sd")
        return f(r["frechet_distance"], 2) + (f" ± {sd:.2f}" if sd is not None else "")

    head = ("| model | family | operations | test NLL (nats) | bits/dim | kind | Fréchet dist. (mean ± sd) | train s "
            "| sample 64 (ms) | score 64 (ms) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        nll = r["nll_nats"] if r["kind"] in ("exact", "lower_bound") else None
        kind = r["kind"]
        if r.get("mean_energy") is not None:  # an energy is no NLL: shown beside the kind, not in the NLL column
            kind += f" (mean energy {r['mean_energy']:.1f})"
        lines.append(f"| {r['model']} | {r['family']} | {', '.join(r['operations'])} | {f(nll)} "
                     f"| {f(r['bits_per_dim'] if nll is not None else None, 3)} | {kind} "
                     f"| {fd(r)} | {f(r['train_seconds'], 0)} | {f(r['sample_ms'])} "
                     f"| {f(r.get('score_ms'))} |")
    floor = next((r for r in rows if r.get("frechet_distance_floor") is not None), None)
    if floor is not None:
        lines.append(f"\nFréchet distances over {floor.get('fd_seeds') or 1} sample seeds; the floor, "
                     f"{floor['frechet_floor_n']} real training images against the test split, is "
                     f"{floor['frechet_distance_floor']:.2f}.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from genserve.clients.client import Client
    from genserve.server.app import BackgroundServer
    from genserve.server.config import ServerConfig

    start = time.perf_counter()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(ALL))
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {', '.join(ALL)}")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    records = train_all(models, work, args.profile, args.retrain)
    repo = work / "model_repository"
    export_all(records, repo)
    port = args.port or (8500 if args.serve else 0)
    metrics_port = args.metrics_port or (8502 if args.serve else _free_port(args.host))
    cfg = ServerConfig(repo=repo, host=args.host, port=port, metrics_port=metrics_port)
    say("starting the server ...")
    server = BackgroundServer(cfg)
    try:
        target = f"{args.host}:{server.port}"
        say(f"serving on {target}, metrics on http://{args.host}:{server.metrics_port}/metrics")
        with Client(target, timeout=120) as client:
            rows = exercise(client, records, work)
        summary = table(rows)
        (work / "summary.md").write_text(summary + "\n")
        (work / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
        print(summary)
        say(f"pictures: {work / 'samples'}; table: {work / 'summary.md'}; "
            f"total {time.perf_counter() - start:.0f} s")
        if args.serve:
            say(f"server left running on {target} (Ctrl-C to stop); try: genserve models --server {target}")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        server.stop()
        say("server stopped cleanly")
    return 0
