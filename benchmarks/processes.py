"""`genserve serve --processes N` against one process: requests/s at 64 clients, interleaved rounds.

    python -m benchmarks.processes --repo quickstart/model_repository --model digits-realnvp --operation encode

Two servers run side by side (``--processes 1`` and ``--processes N``, the same repository and settings); one
closed-loop load generator per server and row count (benchmarks/loadgen.py) with several TCP connections per
load-generator process, so the kernel spreads them over the N processes (SO_REUSEPORT hashes connections, not
requests). Rounds alternate which server goes first; the table gives medians over rounds and the median of each
round's ratio, and the CPU the server processes used (the supervisor and its workers summed, from /proc,
warm-up included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks.loadgen import LoadGenerator, LoadSpec, SweepSettings
from benchmarks.serverproc import ServerProcess


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its living children (the workers of a supervisor)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.processes", description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, type=Path)
    p.add_argument("--model", default="digits-realnvp")
    p.add_argument("--operation", default="encode")
    p.add_argument("--processes", type=int, default=2, help="server processes of the second server (default 2)")
    p.add_argument("--rows", default="1,64")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loadgen", type=int, default=2, help="load-generator processes per server (default 2)")
    p.add_argument("--connections", type=int, default=8, help="TCP connections per load-generator process")
    p.add_argument("--window-s", type=float, default=2.0)
    args = p.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    settings = SweepSettings(concurrency=(args.clients,), warmup_s=1.0, window_s=args.window_s, stable_windows=2,
                             max_windows=2)
    counts = [1, args.processes]
    results: dict[tuple[int, int], list[tuple[float, float, float, float]]] = {}
    with ExitStack() as stack:
        servers = {n: stack.enter_context(ServerProcess(args.repo, flags={"--processes": n})) for n in counts}
        gens = {(n, r): stack.enter_context(LoadGenerator(LoadSpec(servers[n].target, args.model, args.operation,
                                                                   rows=r), args.loadgen, None, args.connections))
                for n in counts for r in rows}
        order = list(counts)
        for k in range(args.rounds):
            for r in rows:
                for n in order:
                    before, start = tree_cpu_s(servers[n].pid), time.monotonic()
                    res = gens[n, r].measure(args.clients, settings, None)
                    cores = (tree_cpu_s(servers[n].pid) - before) / (time.monotonic() - start)
                    results.setdefault((n, r), []).append((res["throughput_rps"], res["latency_ms"]["p50"],
                                                           res["latency_ms"]["p99"], cores))
                    print(f"round {k} rows {r} processes {n}: {res['throughput_rps']:.0f} req/s, p99 "
                          f"{res['latency_ms']['p99']:.1f} ms, load {res['loadavg'][0]:.1f}", file=sys.stderr,
                          flush=True)
            order.reverse()
    print("| rows | clients | processes | req/s | p50 ms | p99 ms | server cores | ratio to 1 process |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        for n in counts:
            runs = results[n, r]
            ratios = [a[0] / b[0] for a, b in zip(runs, results[1, r], strict=True)]
            print(f"| {r} | {args.clients} | {n} | {statistics.median(x[0] for x in runs):.0f} | "
                  f"{statistics.median(x[1] for x in runs):.2f} | {statistics.median(x[2] for x in runs):.2f} | "
                  f"{statistics.median(x[3] for x in runs):.2f} | {statistics.median(ratios):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
