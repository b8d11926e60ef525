"""`genserve score --engine ray`: a file scored by Ray Data actors that run the model in-process, no server.

The subcommand and its options are the client's (genserve.clients.commands); this handler lives in the
application shell because it needs the server station (genserve.server.ray_data runs the engine in the
actors), which a client must not import. genserve.app.cli picks it for ``--engine ray``. It writes the table
(CSV or Parquet, by the --out suffix) with the gRPC path's writer and columns (score kinds, percentiles, flags),
the same scores for the same --seed and --chunk-size. --explain needs a server (Ray Data jobs return no
per-dimension terms), and per-batch score kinds are refused (a job's chunks are not the user's batches).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys


def run_score(args: argparse.Namespace) -> int:
    import secrets
    import time
    from pathlib import Path

    import numpy as np

    from genserve.clients.commands import check_score_args, score_line
    from genserve.clients.score_columns import ScoreColumns
    from genserve.clients.score_tables import TableWriter, table_format

    check_score_args(args)
    if args.explain:
        raise ValueError("--explain needs a server (--engine grpc): Ray Data jobs return no per-dimension terms")
    if not args.repo:
        raise ValueError("--engine ray reads the model repository itself: give --repo DIR (at that path on every "
                         "Ray worker)")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    repo = Path(args.repo).expanduser().resolve()  # workers need not share this process's working folder
    source = Path(args.input).expanduser().resolve()
    if not source.exists():
        raise FileNotFoundError(f"no such input file: {source}")
    if args.columns or args.id_column:
        raise ValueError("--columns and --id-column work with a server (--engine grpc); with --engine ray, give the "
                         "example columns only")
    out = "-" if args.out in (None, "-") else args.out
    table_format(out)
    try:
        import ray

        from genserve.server import ray_data
        from genserve.server.errors import EngineError
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in ("ray", "pandas"):
            raise ValueError("--engine ray needs Ray Data: pip install 'genserve[ray]'") from None
        raise
    plan = ScoreColumns.plan(args, args.model, args.version, _manifest(repo, args.model, args.version))
    seed = secrets.randbits(63) if args.seed is None else args.seed
    started = time.perf_counter()
    own = not ray.is_initialized()
    if own:
        ray.init(address=args.address, include_dashboard=False, logging_level="warning")
    ray.data.DataContext.get_current().enable_progress_bars = not args.quiet and sys.stderr.isatty()
    if args.quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset progress lines
    try:
        scored = ray_data.score_dataset(
            ray_data.read_dataset(source, key=args.key), repo, args.model, seed=seed, chunk_size=args.chunk_size,
            importance_samples=args.importance_samples, version=args.version,
            concurrency=args.concurrency or ray_data.cpus(), **plan.request())
        scores = ray_data.collect_scores(scored)
    except ray.exceptions.RayError as e:
        message = _engine_error(e, EngineError)
        if message is None:
            raise
        raise ValueError(f"{args.model}: {message}") from None
    finally:
        if own:
            ray.shutdown()
    seconds = time.perf_counter() - started
    log_prob = scores.log_prob
    if not len(log_prob):
        raise ValueError(f"{args.input} has no rows to score")
    cut = None if args.quantile is None else float(np.quantile(log_prob, args.quantile))
    with TableWriter(out) as table:
        for start in range(0, len(log_prob), 65536):
            part = _slice(scores, start, start + 65536)
            columns = plan.columns(start, part, {})
            if cut is not None:
                columns["outlier"] = columns["log_prob_nats"] < cut
                plan.flagged += int(columns["outlier"].sum())
            table.write(columns)
    line = score_line(args, args.model, scores.version, scores.kind, seed, seconds, plan, cut, out)
    print(f"{line} (Ray Data, {repo})", file=sys.stderr if out == "-" else sys.stdout)
    return 0


def _engine_error(error: BaseException, kind: type) -> str | None:
    """The message of the engine's error (a bad row, an unknown model) that an actor raised, found in what Ray
    raised: the exception itself where Ray kept it, else its line in the remote traceback (Ray Data wraps a
    failing actor's exception in a UserCodeException, and its cause arrives only as traceback text)."""
    seen: set[int] = set()
    at: BaseException | None = error
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        cause = getattr(at, "cause", None)  # a RayTaskError's original exception
        if isinstance(cause, kind):
            return str(cause)
        at = cause if isinstance(cause, BaseException) else at.__cause__
    found = re.findall(rf"^{re.escape(kind.__module__)}\.\w+: (.+)$", str(error), re.MULTILINE)
    return found[-1] if found else None


def _manifest(repo, model: str, version: int):  # -> genserve.v1.ModelManifest
    """The manifest of the model version the job will score (0: the highest), for the options' checks."""
    from genserve.core.manifest import MANIFEST, read_manifest
    from genserve.server.repository import scan

    found = scan(repo).get(model)
    if not found:
        raise ValueError(f"--repo {repo} has no model {model!r}; it has: {', '.join(sorted(scan(repo))) or 'none'}")
    if version and version not in found:
        raise ValueError(f"{model} has no version {version} in {repo}; it has: {', '.join(map(str, found))}")
    return read_manifest(repo / model / str(version or max(found)) / MANIFEST)


def _slice(scores, start: int, stop: int):  # -> a Likelihood-like view of rows start..stop
    from types import SimpleNamespace

    return SimpleNamespace(
        log_prob=scores.log_prob[start:stop],
        bits_per_dim=None if scores.bits_per_dim is None else scores.bits_per_dim[start:stop],
        scores={k: v[start:stop] for k, v in scores.scores.items()},
        percentiles={k: v[start:stop] for k, v in scores.percentiles.items()})
