"""`python -m benchmarks.report [--plot] SWEEP.json ...`: a sweep's levels as a Markdown table (BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def sweep_table(result: dict) -> str:
    """One row per concurrency level: rates, latency percentiles, the server's split, CPU, the verdict (drawn
    again from the level's CPU and server figures, so that a file from an older tool gets today's rules)."""
    from benchmarks.loadgen import verdict

    lines = ["| clients | req/s | rows/s | p50 ms | p90 ms | p95 ms | p99 ms | queue ms | compute ms | other ms "
             "| rows/call | server cores | req per server CPU-s | loadgen cores | machine cores | load 1m | stable "
             "| limited by |",
             "|" + "---|" * 18]
    for lv in result["levels"]:
        s, lat, cpu = lv["server"], lv["latency_ms"], lv["cpu"]
        procs = cpu["processes_cores"]
        loadgen = sum(v or 0.0 for k, v in procs.items() if k.startswith("loadgen"))
        server = procs.get("server")
        cores = "-" if server is None else f"{server:.2f}"
        per_cpu = "-" if not server else f"{lv['throughput_rps'] / server:.0f}"  # contention-independent rate
        lines.append(
            f"| {lv['concurrency']} | {lv['throughput_rps']:.1f} | {lv['throughput_rows_s']:.1f} | {lat['p50']:.2f} "
            f"| {lat['p90']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} | {s.get('queue_s', 0) * 1e3:.2f} "
            f"| {s.get('compute_s', 0) * 1e3:.2f} | {s.get('other_s', 0) * 1e3:.2f} | {s.get('rows_per_call', 0):.1f} "
            f"| {cores} | {per_cpu} | {loadgen:.2f} | {cpu['machine_busy_cores']:.2f} "
            f"| {lv['loadavg'][0]:.1f} | {'yes' if lv['stable'] else 'no'} "
            f"| {verdict(lv['cpu'], lv['server'], result.get('processes', 2))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print each sweep's table; with ``--plot`` first, also redraw its PNG beside the JSON."""
    args = list(argv if argv is not None else sys.argv[1:])
    plot = "--plot" in args
    for path in (a for a in args if a != "--plot"):
        result = json.loads(Path(path).read_text())
        if plot:
            from benchmarks import plots

            plots.sweep(result, Path(path).with_suffix(".png"))
        print(f"{path}: `{result.get('command', '')}`\n")
        print(sweep_table(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
