"""`python -m benchmarks.adaptive`: does the batcher still wait for company that is not coming? (issue 17, point 1)

Starts, side by side on private copies of one model: genserve with its default batching (``max_queue_delay_ms``
2) and the batcher's early sends on (``Batcher(early=True)``, forced in the server process until the server's
settings pass it); genserve that never waits (``max_queue_delay_ms`` 0: the no-batching reference on the same
graph and stack); and, with ``--before REF``, genserve with the batcher of git revision REF (same settings as
the default; the server process loads that ``server/batcher.py`` in place of the working tree's). Then measures each
(rows, clients) level on every server in turn, rotating the order each round, for ``--rounds`` rounds, so that
a machine shared with others loads all servers alike; per level it reports the median over rounds of
requests/s, p50, p99, rows per ONNX Runtime call and requests per CPU-second of the server process (less
sensitive to other processes' load than requests/s), and the median over rounds of each round's ratio to the
delay-0 server.

    python -m benchmarks.adaptive --repo /tmp/bench/model_repository --model digits-realnvp --operation encode \\
        --rows 1,64 --clients 1,8,64 --rounds 8 --before bb6c407 --out docs/benchmarks/issue17-adaptive.json

Run from the repository root. Targets: at 1 client, p50 of the default within 1.2x of delay 0; at 8 and 64
clients, requests/s of the default over delay 0 as before (the batching gain).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.loadgen import METHODS, LoadGenerator, LoadSpec, SweepSettings
from benchmarks.serverproc import ServerProcess, repo_variant

# Runs the server CLI after a prelude: REVISION loads the batcher module of another revision under the working
# tree's name; EARLY turns the batcher's early sends on where the server's settings do not pass ``early``.
BOOT = """import importlib.util, runpy, sys
import genserve.server.errors, genserve.server.metrics
{prelude}
runpy.run_module("genserve.server.cli", run_name="__main__", alter_sys=True)
"""
REVISION = """spec = importlib.util.spec_from_file_location("genserve.server.batcher", {path!r})
module = importlib.util.module_from_spec(spec)
sys.modules["genserve.server.batcher"] = module
spec.loader.exec_module(module)"""
EARLY = """import genserve.server.batcher as batcher
batcher.Batcher.__init__.__kwdefaults__["early"] = True"""


class PreludeServer(ServerProcess):
    """A genserve server whose process runs ``prelude`` (Python) before the server CLI."""

    def __init__(self, repo: Path, prelude: str, flags: dict[str, Any] | None = None) -> None:
        super().__init__(repo, flags)
        self.prelude = prelude

    def command(self) -> list[str]:
        cmd = super().command()
        assert cmd[1:3] == ["-m", "genserve.server.cli"]
        return [cmd[0], "-c", BOOT.format(prelude=self.prelude), *cmd[3:]]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.adaptive", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="model repository (copied; the copies get config.json)")
    p.add_argument("--model", default="digits-realnvp")
    p.add_argument("--operation", default="encode", choices=list(METHODS))
    p.add_argument("--rows", default="1,64", help="rows per request, comma-separated")
    p.add_argument("--clients", default="1,8,64", help="concurrency levels, comma-separated")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--delay-ms", type=float, default=2.0, help="max_queue_delay_ms of the default (2)")
    p.add_argument("--max-batch-size", type=int, help="max_batch_size of all (default: the server's, 512)")
    p.add_argument("--before", help="git revision whose server/batcher.py runs a third server")
    p.add_argument("--processes", type=int, default=2, help="load-generator processes per server and rows")
    p.add_argument("--warmup-s", type=float, default=0.5)
    p.add_argument("--window-s", type=float, default=0.7)
    p.add_argument("--windows", type=int, default=3, help="windows pooled per measurement")
    p.add_argument("--out", help="write the JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    settings = SweepSettings(concurrency=tuple(clients), warmup_s=args.warmup_s, window_s=args.window_s,
                             stable_windows=args.windows, max_windows=args.windows)
    base = {} if args.max_batch_size is None else {"max_batch_size": args.max_batch_size}
    configs = {"default": {**base, "max_queue_delay_ms": args.delay_ms},
               "delay0": {**base, "max_queue_delay_ms": 0.0}}
    if args.before:
        configs["before"] = dict(configs["default"])
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    samples: list[dict] = []
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="genserve-adaptive-") as tmp, ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for name, serving in configs.items():
            variant = repo_variant(args.repo, Path(tmp) / name, serving, models=[args.model])
            if name == "before":
                old = Path(tmp) / "batcher_before.py"
                old.write_text(subprocess.run(["git", "show", f"{args.before}:server/batcher.py"], check=True,
                                              capture_output=True, text=True).stdout)
                servers[name] = stack.enter_context(PreludeServer(variant, REVISION.format(path=str(old))))
            else:
                servers[name] = stack.enter_context(PreludeServer(variant, EARLY))
        gens = {(name, r): stack.enter_context(LoadGenerator(
                    LoadSpec(target=s.target, model=args.model, operation=args.operation, rows=r),
                    args.processes, s.pid))
                for name, s in servers.items() for r in rows}
        order = list(configs)
        started = time.time()
        for k in range(args.rounds):
            for r in rows:
                for c in clients:
                    for name in order:
                        res = gens[name, r].measure(c, settings, servers[name].metrics_url)
                        loads.append(res["loadavg"][0])
                        samples.append({"round": k, "config": name, "rows": r, "clients": c,
                                        "rps": res["throughput_rps"], "p50_ms": res["latency_ms"]["p50"],
                                        "p99_ms": res["latency_ms"]["p99"], "errors": len(res["errors"]),
                                        "rows_per_call": res["server"].get("rows_per_call"),
                                        "server_cores": res["cpu"]["processes_cores"].get("server"),
                                        "load1": res["loadavg"][0]})
                        log(f"round {k} rows {r} clients {c} {name}: {res['throughput_rps']:.0f} req/s, "
                            f"p50 {res['latency_ms']['p50']:.2f} ms, p99 {res['latency_ms']['p99']:.2f} ms, "
                            f"{samples[-1]['rows_per_call'] or 0:.1f} rows/call, load {res['loadavg'][0]:.1f}")
            order = order[1:] + order[:1]  # rotate: no configuration always measured first
    table = summarise(samples, configs, rows, clients)
    result = {"command": "python -m benchmarks.adaptive " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started_unix": started, "machine": procstat.machine_info(), "configs": configs,
              "load1_min_max": [min(loads), max(loads)], "table": table, "samples": samples}
    print(markdown(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def summarise(samples: list[dict], configs: dict, rows: list[int], clients: list[int]) -> list[dict]:
    """Per (rows, clients, config): medians over rounds, and the median of each round's ratio to delay 0."""
    out = []
    for r in rows:
        for c in clients:
            ref = {s["round"]: s for s in samples if (s["config"], s["rows"], s["clients"]) == ("delay0", r, c)}
            for name in configs:
                mine = [s for s in samples if (s["config"], s["rows"], s["clients"]) == (name, r, c)]
                med = lambda key, xs=mine: statistics.median(s[key] for s in xs)  # noqa: E731
                out.append({"rows": r, "clients": c, "config": name, "rps": med("rps"), "p50_ms": med("p50_ms"),
                            "p99_ms": med("p99_ms"),
                            "rows_per_call": statistics.median(s["rows_per_call"] or 0 for s in mine),
                            "req_per_cpu_s": statistics.median(s["rps"] / s["server_cores"] for s in mine
                                                               if s["server_cores"]),
                            "rps_vs_delay0": statistics.median(s["rps"] / ref[s["round"]]["rps"] for s in mine),
                            "p50_vs_delay0": statistics.median(s["p50_ms"] / ref[s["round"]]["p50_ms"]
                                                               for s in mine),
                            "p99_vs_delay0": statistics.median(s["p99_ms"] / ref[s["round"]]["p99_ms"]
                                                               for s in mine),
                            "rounds": len(mine), "errors": sum(s["errors"] for s in mine)})
    return out


def markdown(result: dict) -> str:
    lines = ["| rows | clients | server | req/s | p50 ms | p99 ms | rows/call | req per server CPU-s | "
             "req/s vs delay 0 | p50 vs delay 0 | p99 vs delay 0 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in result["table"]:
        lines.append(f"| {t['rows']} | {t['clients']} | {t['config']} | {t['rps']:.0f} | {t['p50_ms']:.2f} | "
                     f"{t['p99_ms']:.2f} | {t['rows_per_call']:.1f} | {t['req_per_cpu_s']:.0f} | "
                     f"{t['rps_vs_delay0']:.2f} | "
                     f"{t['p50_vs_delay0']:.2f} | {t['p99_vs_delay0']:.2f} |")
    lo, hi = result["load1_min_max"]
    lines.append(f"\n1-minute load average during the run: {lo:.1f} to {hi:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
