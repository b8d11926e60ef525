"""`genserve score --engine ray`: a file scored by Ray Data actors that run the model in-process, no server.

The subcommand and its options are the client's (genserve.clients.commands); this handler lives in the
application shell because it needs the server station (genserve.server.ray_data runs the engine in the
actors), which a client must not import. genserve.app.cli picks it for ``--engine ray``. It writes the table
(CSV or Parquet, by the --out suffix) with the gRPC path's writer and the same scores for the same --seed and
--chunk-size. Score kinds, percentiles and explanations are the server's (it holds the calibration and the
reference models): asked for here, they are refused with what to use instead.
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

    from genserve.clients.commands import check_score_args
    from genserve.clients.score_tables import TableWriter, table_format

    check_score_args(args)
    server_only = [name for name, given in (("--score-kind", args.score_kind),
                                            ("--below-percentile", args.below_percentile is not None),
                                            ("--explain", args.explain)) if given]
    if server_only:
        raise ValueError(f"{', '.join(server_only)} need a server (--engine grpc): score kinds, calibrated "
                         "percentiles and per-dimension terms are computed by genserve serve; with --engine ray, "
                         "flag by log p with --threshold NATS or --quantile Q")
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
    seed = secrets.randbits(63) if args.seed is None else args.seed
    started = time.perf_counter()
    own = not ray.is_initialized()
    if own:
        ray.init(address=args.address, include_dashboard=False, logging_level="warning")
    ray.data.DataContext.get_current().enable_progress_bars = not args.quiet
    if args.quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset progress lines
    try:
        scored = ray_data.score_dataset(
            ray_data.read_dataset(source, key=args.key), repo, args.model, seed=seed, chunk_size=args.chunk_size,
            importance_samples=args.importance_samples, version=args.version,
            concurrency=args.concurrency or ray_data.cpus())
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
    cut = args.threshold if args.quantile is None else float(np.quantile(log_prob, args.quantile))
    n = len(log_prob)
    columns = {"row": np.arange(n, dtype=np.int64), "log_prob_nats": np.asarray(log_prob, dtype=np.float64),
               "bits_per_dim": np.full(n, np.nan) if scores.bits_per_dim is None else scores.bits_per_dim}
    line = f"mean log p {log_prob.mean():.4g} nats"
    if scores.bits_per_dim is not None:
        line += f", {scores.bits_per_dim.mean():.4g} bits/dim"
    if cut is not None:
        columns["outlier"] = log_prob < cut
        rule = f"{args.quantile:g} quantile {cut:.4g}" if args.quantile is not None else f"threshold {cut:g}"
        line += f"; {int(columns['outlier'].sum())} outliers below the {rule} nats"
    with TableWriter(out) as table:
        for start in range(0, n, 65536):
            table.write({k: v[start:start + 65536] for k, v in columns.items()})
    print(f"scored {n} rows of {args.input} with {args.model} v{scores.version} ({scores.kind}, seed {seed}) in "
          f"{seconds:.1f} s: {line}; wrote {'stdout' if out == '-' else out} (Ray Data, {repo})",
          file=sys.stderr if out == "-" else sys.stdout)
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
