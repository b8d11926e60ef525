"""`python -m benchmarks.run`: a perf_analyzer-style concurrency sweep against a genserve server (JSON + PNG).

Start a server on a private copy of a repository with the given batching settings, sweep, stop it:

    python -m benchmarks.run --repo /tmp/bench/repo --model digits-realnvp --operation log_likelihood \
        --rows 1 --concurrency 1,2,4,8,16,32,64 --processes 2 --max-batch-size 64 \
        --out docs/benchmarks/sweep-realnvp.json --plot docs/benchmarks/sweep-realnvp.png

or measure a server that is already running (give its pid for its CPU figures):

    python -m benchmarks.run --target 127.0.0.1:8500 --metrics-url http://127.0.0.1:8502/metrics \
        --server-pid 1234 --model digits-vae --concurrency 1,8,64

Run from the repository root (``benchmarks`` is a folder there, not an installed package). Every figure of a
level comes from the windows in which its throughput was stable; see benchmarks/loadgen.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.loadgen import METHODS, LoadGenerator, LoadSpec, SweepSettings

SERVING_FLAGS = {"max_batch_size": int, "max_queue_delay_ms": float, "instances": int}
"""Per-model settings: written into config.json of the private repository copy (they outrank server flags)."""
SERVER_FLAGS = {"threads": "--threads", "workers": "--workers", "inter_op_threads": "--inter-op-threads",
                "provider": "--provider", "switch_interval_ms": "--switch-interval-ms"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", help="start `genserve serve` on a private copy of this repository")
    where.add_argument("--target", help="host:port of a server that is already running")
    p.add_argument("--metrics-url", help="its /metrics URL (with --target); the server split needs it")
    p.add_argument("--server-pid", type=int, help="its pid (with --target); server CPU figures need it")
    p.add_argument("--model", required=True, help="model name, e.g. digits-realnvp")
    p.add_argument("--operation", default="log_likelihood", choices=list(METHODS))
    p.add_argument("--rows", type=int, default=1, help="rows per request (n for sample); default 1")
    p.add_argument("--importance-samples", type=int, help="K for latent-variable LogLikelihood")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="comma-separated levels")
    p.add_argument("--processes", type=int, default=2, help="load-generator processes (default 2)")
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--window-s", type=float, default=2.0)
    p.add_argument("--stability", type=float, default=0.10, help="throughput agreement of the windows (0.10)")
    p.add_argument("--stable-windows", type=int, default=3)
    p.add_argument("--max-windows", type=int, default=10)
    p.add_argument("--timeout-s", type=float, default=60.0, help="deadline of each request")
    for name, kind in SERVING_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help="per-model setting (with --repo)")
    p.add_argument("--threads", type=int, default=1, help="server ONNX Runtime intra-op threads (with --repo)")
    p.add_argument("--workers", type=int, help="server threads running ONNX Runtime calls (with --repo)")
    p.add_argument("--inter-op-threads", type=int, help="server ONNX Runtime inter-op threads (with --repo)")
    p.add_argument("--provider", choices=["cpu", "cuda", "auto"], help="server ONNX Runtime provider (default cpu)")
    p.add_argument("--switch-interval-ms", type=float, help="server GIL switch interval, ms (default 0.2)")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--plot", help="write the sweep PNG here")
    p.add_argument("--quiet", action="store_true")
    return p


def server_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json settings, `genserve serve` flags) from the parsed arguments."""
    serving = {k: getattr(args, k) for k in SERVING_FLAGS if getattr(args, k) is not None}
    flags = {flag: getattr(args, k) for k, flag in SERVER_FLAGS.items() if getattr(args, k) is not None}
    return serving, flags


def run_sweep(spec_kwargs: dict[str, Any], settings: SweepSettings, processes: int, *, repo: str | None = None,
              serving: dict[str, Any] | None = None, flags: dict[str, Any] | None = None,
              target: str | None = None, metrics_url: str | None = None, server_pid: int | None = None,
              log: Any = None) -> dict:
    """One sweep; with ``repo``, against a fresh server on a private copy of it (stopped afterwards)."""
    from benchmarks.serverproc import ServerProcess, repo_variant

    if repo is None:
        spec = LoadSpec(target=target, **spec_kwargs)
        with LoadGenerator(spec, processes, server_pid) as gen:
            result = gen.sweep(settings, metrics_url, log)
        result["server"] = {"target": target, "external": True}
        return result
    with tempfile.TemporaryDirectory(prefix="genserve-bench-") as tmp:
        variant = repo_variant(repo, Path(tmp) / "repo", serving, models=[spec_kwargs["model"]])
        with ServerProcess(variant, flags) as server:
            spec = LoadSpec(target=server.target, **spec_kwargs)
            with LoadGenerator(spec, processes, server.pid) as gen:
                result = gen.sweep(settings, server.metrics_url, log)
            result["server"] = {"command": server.command()[1:], "serving": serving or {}, "flags": flags or {},
                                "repo": str(repo)}
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = SweepSettings(concurrency=tuple(int(c) for c in args.concurrency.split(",")),
                             warmup_s=args.warmup_s, window_s=args.window_s, stability=args.stability,
                             stable_windows=args.stable_windows, max_windows=args.max_windows)
    spec_kwargs = {"model": args.model, "operation": args.operation, "rows": args.rows,
                   "importance_samples": args.importance_samples, "timeout_s": args.timeout_s}
    serving, flags = server_settings(args)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = run_sweep(spec_kwargs, settings, args.processes, repo=args.repo, serving=serving, flags=flags,
                       target=args.target, metrics_url=args.metrics_url, server_pid=args.server_pid, log=log)
    result["command"] = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(result, indent=1, default=float)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    if args.plot:
        from benchmarks import plots

        plots.sweep(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
