"""`python -m benchmarks.peers`: genserve against MLServer, KServe and Triton (PyTriton) on the same graph.

Serves one operation's ONNX graph from a genserve model repository with genserve (OIP gRPC) and with each peer
in its own pinned virtualenv (made on first use under ~/.cache/genserve-bench/venvs), all with ONNX Runtime
1.32, 1 intra-op and 1 inter-op thread, sequential execution, no spinning, and the same batching limits
(``--max-batch-size`` rows per graph call, ``--delay-ms`` queue delay; KServe's Python server has no batcher).
Checks that every server answers the same numbers as the graph run in-process, then drives each with the same
closed-loop OIP gRPC client (benchmarks/peers/oipload.py, in ``--processes`` worker processes) at each
(rows, clients) cell, every server in turn, rotating the order each round; reports per cell the medians over
rounds of requests/s, p50/p99 and the CPU of each server's process tree, and genserve / best peer.

    python -m benchmarks.peers --repo /tmp/bench/model_repository --model digits-realnvp --operation encode \\
        --rows 1,64 --clients 1,8,64 --rounds 3 --out docs/benchmarks/peers.json

``--genserve-variant NAME="FLAGS"`` (repeatable) serves the graph with more genserve servers, started with
other ``genserve serve`` flags (e.g. ``2p="--processes 2"``) and measured in the same rotation as
``genserve-NAME``; each gets its own ratio to the best peer, so a setting is judged against the peers and against
the default in one run. A variant's per-model flags (``--instances``, ``--max-queue-delay-ms`` ...) are taken out
of its copy's config.json, which would otherwise outrank them (``variant_serving``).

``--load perf_analyzer`` drives the servers with Triton's own C++ load generator instead (benchmarks/peers/
perfanalyzer.py: about half the client CPU per request). It reads Triton's ModelConfig first, which MLServer and
KServe lack: they are started with a handler that answers it (runtimes/triton_config.py), ModelInfer their own.

``--floor`` also measures the grpc.aio floor (runtimes/grpc_floor.py), a reference and never the best peer: a
grpc.aio server in genserve's environment that answers a request it has seen before from a table keyed by the
request's bytes, parsing and running nothing. Per cell the table gives floor / best peer: the most any server
written on Python's grpc.aio could reach there against that peer (below a target, the target is out of reach
for such a server on this machine).

Run from the repository root. A peer that cannot be installed, started or answer correctly is named in the
table with the reason, never left out silently.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from benchmarks import procstat
from benchmarks.peers import perfanalyzer, summary, treecpu
from benchmarks.peers.graph import PeerGraph, peer_graph
from benchmarks.peers.launch import FLOOR, ORT, PINS, PeerServer, PeerUnavailable, installed_versions, venv
from benchmarks.peers.oipload import OipLoad, infer_once, infer_request
from benchmarks.serverproc import ServerProcess, per_model_flags, repo_variant

GENSERVE = summary.GENSERVE


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="genserve model repository (read; genserve serves a copy)")
    p.add_argument("--model", default="digits-realnvp")
    p.add_argument("--operation", default="encode")
    p.add_argument("--peers", default=",".join(PINS), help=f"comma-separated, of {', '.join(PINS)}")
    p.add_argument("--rows", default="1,64", help="rows per request, comma-separated")
    p.add_argument("--clients", default="1,8,64", help="closed-loop clients, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-batch-size", type=int, default=512, help="rows per graph call at most (genserve's default)")
    p.add_argument("--delay-ms", type=float, default=2.0, help="queue delay (genserve's default max_queue_delay_ms)")
    p.add_argument("--genserve-variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help='also measure genserve-NAME, served with these `genserve serve` flags, e.g. '
                        '2p="--processes 2" (repeatable)')
    p.add_argument("--mlserver-workers", type=int, default=1, help="MLServer parallel_workers (its default: 1)")
    p.add_argument("--pytriton-instances", type=int, default=1,
                   help="PyTriton model instances, each with its own session (its default: 1)")
    p.add_argument("--processes", type=int, default=2, help="load-generator processes")
    p.add_argument("--connections", type=int, default=1,
                   help="TCP connections per load-generator process, its clients dealt over them (several: "
                        "a genserve of --processes N gets connections to spread over its processes)")
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--window-s", type=float, default=3.0)
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |difference| from the in-process graph")
    p.add_argument("--work", help="folder for the graph copy, configs and server logs (default: a temporary one)")
    p.add_argument("--load", choices=("oip", "perf_analyzer"), default="oip",
                   help="load generator: the Python OIP client or Triton's perf_analyzer (benchmarks/peers/"
                        "perfanalyzer.py; --processes, --connections and --warmup-s do not apply to it)")
    p.add_argument("--floor", action="store_true",
                   help="also measure the grpc.aio floor (a server that answers from a table of seen requests): "
                        "the most a Python grpc.aio server reaches in each cell")
    p.add_argument("--out", help="write the JSON here")
    return p


def variant_flags(spec: str) -> tuple[str, dict[str, str | None]]:
    """``NAME=FLAGS`` of ``--genserve-variant`` as (``genserve-NAME``, ServerProcess flags)."""
    name, sep, text = spec.partition("=")
    if not sep or not re.fullmatch(r"[a-z0-9][a-z0-9_.]*", name):
        raise SystemExit(f"--genserve-variant wants NAME=\"FLAGS\" with a lower-case NAME, got {spec!r}")
    flags: dict[str, str | None] = {}
    last = None  # the flag still without a value
    for token in shlex.split(text):
        if token.startswith("--"):
            flags[token] = None
            last = token
        elif last is not None:
            flags[last], last = token, None
        else:
            raise SystemExit(f"--genserve-variant {name}: {token!r} follows no flag")
    if not flags:
        raise SystemExit(f"--genserve-variant {name}: no flags (it would be genserve itself)")
    return f"{GENSERVE}-{name}", flags


def variant_serving(serving: dict[str, float],
                    flags: dict[str, str | None]) -> tuple[dict[str, float], tuple[str, ...]]:
    """A variant's model settings: ``serving`` without the per-model settings its flags set, and those settings'
    names, to be removed from its copy's config.json as well (which outranks the flags: a variant's
    ``--instances 2`` over a config.json holding ``"instances": 1`` would be ignored without a word)."""
    drop = per_model_flags(flags)
    return {k: v for k, v in serving.items() if k not in drop}, drop


def reference(graph: PeerGraph, work: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's outputs in this process, run exactly as the peers run it (runtimes/ort_graph.py)."""
    spec = importlib.util.spec_from_file_location("peer_ort_graph", Path(__file__).parent / "runtimes" / "ort_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Graph(graph.write(work / "graph.json"))(x)


def check_answer(target: str, name: str, graph: PeerGraph, x: np.ndarray, want: dict[str, np.ndarray],
                 tolerance: float) -> str | None:
    """None when the server answers ``want`` for ``x`` within ``tolerance``; else what went wrong."""
    try:
        got = infer_once(target, infer_request(name, graph.input, x))
    except Exception as e:  # noqa: BLE001 - any failure is the reason the server is left out
        details = e.details() if callable(getattr(e, "details", None)) else str(e)
        return f"{type(e).__name__}: {details}"[:300]
    for k, v in want.items():
        if k not in got:
            return f"answer lacks output {k!r} (has {', '.join(got) or 'none'})"
        diff = float(np.max(np.abs(got[k].reshape(v.shape).astype(np.float64) - v)))
        if not diff <= tolerance:
            return f"output {k!r} differs from the graph run in-process by up to {diff:.3g}"
    return None


def input_rows(target: str, model: str, operation: str, rows: int) -> np.ndarray:
    """``rows`` real inputs: samples of the model from genserve (data for encode, latents for decode)."""
    from genserve.clients.client import Client

    with Client(target, timeout=120.0) as client:
        x, z = client.sample(model, rows, seed=1, return_latents=True)
    return np.asarray(z if operation == "decode" else x, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in PINS]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; choose from {', '.join(PINS)}")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    variants = dict(variant_flags(v) for v in args.genserve_variant)
    servers = [GENSERVE, *variants, *peers, *([FLOOR] if args.floor else [])]
    status: dict[str, str] = {}
    versions: dict[str, dict] = {GENSERVE: _own_versions()}
    if versions[GENSERVE].get("onnxruntime") != ORT.split("==")[1]:
        log(f"warning: this environment has onnxruntime {versions[GENSERVE].get('onnxruntime')}, the peers {ORT}")
    samples: list[dict] = []
    started, load_at_start = time.time(), procstat.loadavg()
    log(f"load average at start: {load_at_start[0]:.2f} {load_at_start[1]:.2f} {load_at_start[2]:.2f}")
    with ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="genserve-peers-")))
        graph = peer_graph(args.repo, args.model, args.operation, work / "graph")
        serving = {"max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.delay_ms}
        genserve = stack.enter_context(ServerProcess(repo_variant(args.repo, work / "genserve", serving,
                                                                  [args.model])))
        x_all = input_rows(genserve.target, args.model, args.operation, max(rows))
        handles: dict[str, tuple[str, int, callable]] = {
            GENSERVE: (genserve.target, genserve.pid, lambda r: graph.oip_name)}
        for name, flags in variants.items():
            own_serving, drop = variant_serving(serving, flags)
            own = stack.enter_context(ServerProcess(repo_variant(args.repo, work / name, own_serving, [args.model],
                                                                 drop=drop), flags))
            handles[name] = (own.target, own.pid, lambda r: graph.oip_name)
            versions[name] = {**versions[GENSERVE], "flags": flags}
        for peer in peers:
            try:
                venv(peer, log)
                versions[peer] = installed_versions(peer)
                log(f"{peer}: starting ({versions[peer]})")
                server = stack.enter_context(PeerServer(peer, graph, work / peer, args.max_batch_size, args.delay_ms,
                                                        rows, mlserver_workers=args.mlserver_workers,
                                                        pytriton_instances=args.pytriton_instances))
                handles[peer] = (server.target, server.pid, server.model_name)
                triton = re.search(r"server_version\s*\|\s*([\d.]+)", (work / peer / "server.log").read_text())
                if triton:
                    versions[peer]["tritonserver"] = triton.group(1)
            except PeerUnavailable as e:
                status[peer] = str(e)
                log(f"{peer}: NOT RUN: {e}")
        if args.floor:  # genserve's own interpreter: no virtualenv to make
            try:
                floor = stack.enter_context(PeerServer(FLOOR, graph, work / FLOOR, args.max_batch_size,
                                                       args.delay_ms, rows))
                handles[FLOOR] = (floor.target, floor.pid, floor.model_name)
                versions[FLOOR] = {"grpcio": versions[GENSERVE].get("grpcio")}
            except PeerUnavailable as e:
                status[FLOOR] = str(e)
                log(f"{FLOOR}: NOT RUN: {e}")
        for name, (target, _, model_name) in list(handles.items()):
            for r in rows:
                want = reference(graph, work, x_all[:r])
                problem = check_answer(target, model_name(r), graph, x_all[:r], want, args.tolerance)
                if problem:
                    status[name] = f"wrong or no answer at {r} rows: {problem}"
                    log(f"{name}: NOT MEASURED: {status[name]}")
                    del handles[name]
                    break
        payloads = {(name, r): infer_request(h[2](r), graph.input, x_all[:r]) for name, h in handles.items()
                    for r in rows}
        idle = _idle_cores({name: h[1] for name, h in handles.items()})
        log("idle CPU of each server, cores: " + ", ".join(f"{k} {v:.3f}" for k, v in idle.items()))
        order = [s for s in servers if s in handles]
        if args.load == "perf_analyzer":
            try:
                load = perfanalyzer.PerfAnalyzerLoad(log)
            except PeerUnavailable as e:
                raise SystemExit(f"--load perf_analyzer: {e}") from None
        else:
            load = stack.enter_context(OipLoad(args.processes, args.connections))
        for k in range(args.rounds):
            for r in rows:
                for c in clients:
                    for name in order:
                        samples.append(_measure(load, name, handles[name], payloads[name, r], k, r, c, args))
                        s = samples[-1]
                        log(f"round {k} rows {r} clients {c} {name}: {s['rps']:.0f} req/s, p50 {s['p50_ms']:.2f} "
                            f"ms, p99 {s['p99_ms']:.2f} ms, server {s['server_cores']:.2f} cores, load generator "
                            f"{s['loadgen_cores']:.2f}, machine {s['machine_busy_cores']:.2f}, errors {s['errors']}, "
                            f"load {s['load1']:.1f}")
            order = order[1:] + order[:1]  # rotate: no server always measured first
    table = summary.summarise(samples, servers, rows, clients)
    loads = [s["load1"] for s in samples] or [procstat.loadavg()[0]]
    result = {"command": "python -m benchmarks.peers " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started_unix": started, "machine": procstat.machine_info(), "graph": graph.__dict__,
              "settings": {"max_batch_size_rows": args.max_batch_size, "delay_ms": args.delay_ms,
                           "mlserver_workers": args.mlserver_workers,
                           "pytriton_instances": args.pytriton_instances, "processes": args.processes,
                           "connections": args.connections, "load": args.load,
                           "warmup_s": args.warmup_s, "window_s": args.window_s, "rounds": args.rounds},
              "variants": variants, "pins": PINS, "versions": versions, "status": status, "idle_server_cores": idle,
              "load_at_start": load_at_start, "load1_min_max": [min(loads), max(loads)],
              "table": table, "samples": samples}
    print(summary.markdown(table, servers, status))
    print(f"\n1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


def _measure(load: OipLoad | perfanalyzer.PerfAnalyzerLoad, name: str, handle: tuple, payload: bytes, k: int,
             r: int, c: int, args: argparse.Namespace) -> dict:
    """One cell on one server: requests/s, latency and the CPU of the server's process tree."""
    target, pid, _ = handle
    cpu: list[tuple] = []
    m = load.measure(target, payload, c, args.warmup_s, args.window_s, timeout_s=30.0,
                     at_edges=lambda edge: cpu.append((time.monotonic(), treecpu.tree_cpu_s(pid),
                                                       procstat.thread_cpu_s(pid),
                                                       sum(procstat.process_cpu_s(p) or 0.0 for p in load.pids()),
                                                       procstat.machine_cpu_s())))
    wall = cpu[1][0] - cpu[0][0]
    cores = treecpu.cores_between(cpu[0][1], cpu[1][1], wall)
    (busy0, total0), (busy1, total1) = cpu[0][4], cpu[1][4]
    machine = (busy1 - busy0) / max(total1 - total0, 1e-9) * (os.cpu_count() or 1)
    # the busiest thread of the server's first process (genserve's: 'main', its asyncio event loop)
    threads = {k: (v - cpu[0][2][k]) / wall for k, v in cpu[1][2].items() if k in cpu[0][2]}
    top = max(threads, key=threads.get, default="?/0")
    return {"round": k, "server": name, "rows": r, "clients": c, "rps": m.rps, "p50_ms": m.percentile_ms(50),
            "p99_ms": m.percentile_ms(99), "errors": {**m.errors, **({"EMPTY": m.empty_answers}
                                                                     if m.empty_answers else {})},
            "requests": m.requests, "server_cores": cores,
            "top_thread": top.split("/")[0], "top_thread_cores": threads.get(top, 0.0),
            "loadgen_cores": (cpu[1][3] - cpu[0][3] if m.loadgen_cpu_s is None else m.loadgen_cpu_s) / wall,
            "machine_busy_cores": machine, "load1": procstat.loadavg()[0]}


def _idle_cores(pids: dict[str, int], wall_s: float = 2.0) -> dict[str, float]:
    """Cores each server's process tree uses with no load (the others' background work while one is measured)."""
    t0, before = time.monotonic(), {k: treecpu.tree_cpu_s(p) for k, p in pids.items()}
    time.sleep(wall_s)  # an interval of idleness, not a wait for an event
    t1, after = time.monotonic(), {k: treecpu.tree_cpu_s(p) for k, p in pids.items()}
    return {k: treecpu.cores_between(before[k], after[k], t1 - t0) for k in pids}


def _own_versions() -> dict[str, object]:
    out: dict[str, object] = {}
    for d in ("onnxruntime", "grpcio", "numpy"):
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = "missing"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out["genserve_revision"] = rev.stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "diff", "--name-only", "HEAD", "--", "server", "core"], capture_output=True,
                           text=True)
    out["uncommitted_server_files"] = dirty.stdout.split()  # the working tree the server ran from
    return out


if __name__ == "__main__":
    sys.exit(main())
