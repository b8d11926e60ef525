"""`python -m benchmarks.request_cost`: server CPU per 1-row request on both gRPC APIs, with the profile's top.

Starts `genserve serve` on one model of a repository, drives it closed-loop with ``--clients`` concurrent requests
(grpc.aio channels in a separate process, one TCP connection unless ``--connections N``, the same serialised
request every time, answers kept as bytes), and reads the server's CPU time (all its threads, and every process
below it under ``--processes N``, /proc) at the edges of a window: CPU per request is the server's
CPU seconds over the requests answered in the window, so it holds even when other work shares the machine
(which only stretches the wall time). With ``--profile`` py-spy samples the server during a second window and
the top of its profile (self time by function, and the share under each of genserve's stations) is printed.

    python -m benchmarks.request_cost --repo quickstart/model_repository --model digits-realnvp \\
        --operation encode --clients 64 --seconds 8 --profile --out docs/benchmarks/request-cost.json

Run from the repository root (``benchmarks`` is a folder there, not an installed package).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import scrape
from benchmarks.loadgen import open_channels
from benchmarks.peers import treecpu
from benchmarks.procstat import loadavg, thread_cpu_s
from benchmarks.serverproc import ServerProcess, per_model_flags, repo_variant

OIP_INFER = "/inference.GRPCInferenceService/ModelInfer"
V1 = "/genserve.v1.GenerativeService/"
V1_METHODS = {"log_likelihood": "LogLikelihood", "encode": "Encode"}


def payloads(model: str, operation: str, x: np.ndarray) -> dict[str, tuple[str, bytes]]:
    """The two APIs' serialised requests for the same rows: {api: (method path, bytes)}."""
    from genserve.core.tensors import to_proto
    from genserve.oip import grpc_service_pb2 as oip
    from genserve.v1 import service_pb2 as v1

    x = np.ascontiguousarray(x, dtype="<f4")
    oip_request = oip.ModelInferRequest(model_name=f"{model}.{operation}")
    oip_request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    oip_request.raw_input_contents.append(x.tobytes())
    oip_request.parameters["seed"].int64_param = 1
    make = v1.LogLikelihoodRequest if operation == "log_likelihood" else v1.EncodeRequest
    v1_request = make(model=model, x=to_proto(x), seed=1)
    return {"oip": (OIP_INFER, oip_request.SerializeToString()),
            "v1": (V1 + V1_METHODS[operation], v1_request.SerializeToString())}


def _client(target: str, method: str, payload: bytes, clients: int, conn, connections: int = 1) -> None:
    """Load-generator process: ``clients`` closed loops dealt over ``connections`` TCP connections; answers
    'go' with a count of completions per 'mark'."""

    async def main() -> None:
        done = [0]
        latencies: list[float] = []
        stop = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(channel) for channel in open_channels(target, connections)]
            calls = [channel.unary_unary(method) for channel in channels]

            async def loop(call: Any) -> None:
                while not stop.is_set():
                    t = time.perf_counter()
                    await call(payload, timeout=60)
                    latencies.append(time.perf_counter() - t)
                    done[0] += 1

            for call in calls:
                await call(payload, timeout=60)  # the channels are connected and the path warm
            conn.send("ready")
            tasks = [asyncio.create_task(loop(calls[i % connections])) for i in range(clients)]
            loop_ = asyncio.get_running_loop()
            while True:
                message = await loop_.run_in_executor(None, conn.recv)
                if message == "mark":
                    conn.send((done[0], latencies[:]))
                    latencies.clear()
                else:
                    stop.set()
                    await asyncio.gather(*tasks)
                    conn.send(done[0])
                    return

    try:
        asyncio.run(main())
    except Exception as e:  # told to the parent, which would otherwise wait for an answer that never comes
        details = e.details() if callable(getattr(e, "details", None)) else None  # a gRPC error's message
        conn.send(("error", f"{type(e).__name__}: {details or e}"))


def _receive(conn, proc, timeout_s: float = 300.0) -> Any:
    """The load generator's next message; a RuntimeError when it failed, died or said nothing within
    ``timeout_s`` (generous: a window is seconds long, and a busy machine only stretches it)."""
    def gone() -> RuntimeError:
        return RuntimeError(f"the load generator exited (code {proc.exitcode}) without an answer")

    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.5):
        if not proc.is_alive() and not conn.poll(0):
            raise gone()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the load generator said nothing for {timeout_s:.0f} s")
    try:
        message = conn.recv()
    except EOFError:  # its end closed: it exited without a word
        raise gone() from None
    if isinstance(message, tuple) and message and message[0] == "error":
        raise RuntimeError(f"the load generator failed: {message[1]}")
    return message


def server_cpu(pid: int) -> tuple[dict[int, float], dict[str, float]]:
    """CPU seconds so far of the server and the processes below it (``--processes N``'s workers), by pid, and of
    their threads, keyed ``"<name>/<tid>/<pid>"`` (every process's own thread is named ``main``)."""
    per_pid = treecpu.tree_cpu_s(pid)
    threads = {f"{key}/{p}": value for p in per_pid for key, value in thread_cpu_s(p).items()}
    return per_pid, threads


def measure(server: ServerProcess, method: str, payload: bytes, clients: int, seconds: float,
            profile_s: float = 0.0, native: bool = False, connections: int = 1) -> dict[str, Any]:
    """Warm 2 s, then one window of ``seconds``: requests/s and server CPU per request (µs, by thread), over
    the server's whole process tree."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_client, args=(server.target, method, payload, clients, there, connections),
                       daemon=True)
    proc.start()
    if _receive(here, proc) != "ready":
        raise RuntimeError("the load generator did not start")
    time.sleep(2.0)  # a benchmark's warm-up window, not synchronisation
    here.send("mark")
    (n0, _), (cpu0, threads0), t0 = _receive(here, proc), server_cpu(server.pid), time.monotonic()
    calls0 = scrape.fetch(server.metrics_url)
    time.sleep(seconds)
    here.send("mark")
    (n1, latencies), (cpu1, threads1), t1 = _receive(here, proc), server_cpu(server.pid), time.monotonic()
    calls1 = scrape.fetch(server.metrics_url)
    calls, rows = (scrape.total(calls1, name) - scrape.total(calls0, name)  # graph calls and their rows
                   for name in ("genserve_batch_size_rows_count", "genserve_batch_size_rows_sum"))
    top = py_spy_top(server.pid, profile_s, native=native) if profile_s > 0 else None
    here.send("stop")
    _receive(here, proc)
    proc.join(30)
    requests = n1 - n0
    by_thread = collections.Counter()
    for key, value in threads1.items():
        if key in threads0:  # threads (and processes) alive at both readings, as for the total
            by_thread[key.split("/")[0]] += value - threads0[key]
    alive = cpu0.keys() & cpu1.keys()
    cpu = sum(cpu1[p] - cpu0[p] for p in alive)  # CPU seconds over the window
    result = {"requests": requests, "seconds": t1 - t0, "requests_per_s": requests / (t1 - t0),
              "server_cpu_us_per_request": 1e6 * cpu / max(requests, 1),
              "by_thread_us_per_request": {k: round(1e6 * v / max(requests, 1), 1)
                                            for k, v in by_thread.most_common() if v > 0},
              "server_cores": cpu / (t1 - t0), "server_processes": len(alive),
              "loadavg": loadavg()[0],
              "rows_per_call": rows / calls if calls else None,  # graph rows per ONNX Runtime call (its /metrics)
              "p50_ms": 1e3 * float(np.percentile(latencies, 50)) if latencies else None,
              "p99_ms": 1e3 * float(np.percentile(latencies, 99)) if latencies else None}
    if top is not None:
        result["profile"] = top
    return result


def py_spy_top(pid: int, seconds: float, rows: int = 25, native: bool = False) -> dict[str, Any]:
    """py-spy samples of the server's main thread (the event loop) for ``seconds``: self time by function and
    the share of samples under each genserve module (inclusive), most first."""
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))  # a venv's
    if exe is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "raw.txt"
        subprocess.run([exe, "record", "--pid", str(pid), "--duration", str(int(max(1, seconds))), "--rate", "500",
                        "--format", "raw", "--threads", "--full-filenames", "--output", str(out),
                        *(["--native"] if native else ["--nonblocking"])], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = out.read_text().splitlines()
    own, modules, total = collections.Counter(), collections.Counter(), 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].startswith(f"thread ({pid})"):
            continue  # only the main thread (the event loop): the ORT worker threads run the graphs
        n = int(count)
        total += n
        own[_function(frames[-1])] += n
        seen = set()
        for frame in frames[1:]:
            path = frame[frame.find("(") + 1:frame.rfind(":")]
            if "/genserve/" in path or "/work/" in path and "site-packages" not in path:
                key = "/".join(path.rsplit("/", 2)[-2:])
                if key not in seen:
                    seen.add(key)
                    modules[key] += n
    return {"samples": total,
            "self": [(name, round(100 * n / max(total, 1), 1)) for name, n in own.most_common(rows)],
            "genserve_inclusive": [(name, round(100 * n / max(total, 1), 1)) for name, n in modules.most_common(rows)]}


def _function(frame: str) -> str:
    """``name (path:line)`` -> ``name (folder/file)``: one entry per function, whatever line was sampled."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.rsplit('/', 2)[-2:])})"


@contextlib.contextmanager
def _server(repo: Path, flags: dict[str, Any], tree: str | None) -> Iterator[ServerProcess]:
    """`genserve serve` from this checkout, or (``tree``) from another checkout of genserve's source."""
    server = ServerProcess(repo, flags, tree=tree).start()
    try:
        yield server
    finally:
        server.stop()


def _print(cell: dict[str, Any]) -> None:
    threads = ", ".join(f"{k} {v:.0f}" for k, v in list(cell["by_thread_us_per_request"].items())[:3])
    print(f"{cell['server']:>8} {cell['api']:>3} {cell['clients']:>3} clients: {cell['requests_per_s']:7.0f} req/s, "
          f"p50 {cell['p50_ms']:.2f} ms, p99 {cell['p99_ms']:.2f} ms, "
          f"server CPU {cell['server_cpu_us_per_request']:6.0f} us/request ({threads}), "
          f"{cell['rows_per_call'] or 0:.1f} rows/call, load {cell['loadavg']:.1f}",
          flush=True)
    if "profile" in cell and "self" in cell["profile"]:
        print("   self time on the event loop thread (% of its samples):")
        for name, share in cell["profile"]["self"][:15]:
            print(f"   {share:5.1f}  {name}")
        print("   inclusive, by genserve module:")
        for name, share in cell["profile"]["genserve_inclusive"][:10]:
            print(f"   {share:5.1f}  {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.request_cost", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="model repository (a private copy of the one model is served)")
    p.add_argument("--model", default="digits-realnvp")
    p.add_argument("--operation", default="encode", choices=list(V1_METHODS))
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--clients", default="1,64", help="comma-separated concurrency levels")
    p.add_argument("--apis", default="oip,v1")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--profile", action="store_true", help="also sample the server with py-spy (top printed)")
    p.add_argument("--native", action="store_true", help="profile native frames too (py-spy --native)")
    p.add_argument("--serve-flag", action="append", default=[], metavar="FLAG[=VALUE]",
                   help="extra `genserve serve` flag, e.g. --serve-flag=--no-warmup (repeatable)")
    p.add_argument("--baseline", metavar="DIR", help="also serve from this checkout of genserve (e.g. a `git "
                   "worktree` of an older commit), interleaved with the current one, and print the ratios")
    p.add_argument("--tree", metavar="DIR", help="serve the current side from this checkout instead of this one")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=--FLAG:VALUE,...",
                   help="also serve the current tree with these `genserve serve` flags (repeatable), e.g. "
                   "'w1=--workers:1,--switch-interval-ms:5'")
    p.add_argument("--connections", type=int, default=1,
                   help="TCP connections of the load generator, its clients dealt over them (several: a server of "
                        "--processes N gets connections to spread over its processes)")
    p.add_argument("--rounds", type=int, default=1, help="measurements of every cell (with --baseline: "
                   "alternating the two servers)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.connections < 1:
        p.error(f"--connections must be >= 1, got {args.connections}")

    x = np.zeros((args.rows, 8, 8), dtype=np.float32)
    x[:, 2:6, 3:5] = 12.0
    requests = payloads(args.model, args.operation, x)
    flags: dict[str, Any] = {"--threads": 1}
    for flag in args.serve_flag:
        name, _, value = flag.partition("=")
        flags[name] = value or None
    trees = {"current": args.tree} if not args.baseline else {"baseline": args.baseline, "current": args.tree}
    variants = {name: (tree, flags) for name, tree in trees.items()}
    for spec in args.variant:  # NAME=--flag:value,--flag:value: the current tree with other serve flags
        name, _, rest = spec.partition("=")
        extra = dict(item.partition(":")[::2] for item in rest.split(",") if item)
        variants[name] = (args.tree, {**flags, **{k: v or None for k, v in extra.items()}})
    results: dict[str, Any] = {"model": args.model, "operation": args.operation, "rows": args.rows,
                               "baseline": args.baseline, "cells": []}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = {}
        for name, (tree, f) in variants.items():  # each its own copy, without the config.json keys its flags set
            repo = repo_variant(args.repo, Path(tmp) / name, models=[args.model], drop=per_model_flags(f))
            servers[name] = stack.enter_context(_server(repo, f, tree))
        for round_ in range(args.rounds):
            for api in args.apis.split(","):
                method, payload = requests[api]
                for clients in (int(c) for c in args.clients.split(",")):
                    order = list(servers.items())
                    for name, server in order if round_ % 2 == 0 else order[::-1]:  # alternate who goes first
                        cell = measure(server, method, payload, clients, args.seconds,
                                       profile_s=args.seconds if args.profile else 0.0, native=args.native,
                                       connections=args.connections)
                        cell.update(api=api, clients=clients, server=name, round=round_)
                        results["cells"].append(cell)
                        _print(cell)
    if len(servers) > 1:
        first = next(iter(servers))
        print(f"\nserver CPU per request and p50, median over rounds, against {first}:")
        for api in args.apis.split(","):
            for clients in (int(c) for c in args.clients.split(",")):
                row = {}
                for name in servers:
                    cells = [c for c in results["cells"]
                             if c["api"] == api and c["clients"] == clients and c["server"] == name]
                    row[name] = {k: float(np.median([c[k] or 0.0 for c in cells]))
                                 for k in ("server_cpu_us_per_request", "p50_ms", "p99_ms", "requests_per_s",
                                           "rows_per_call")}
                results.setdefault("summary", []).append({"api": api, "clients": clients, **row})
                base = row[first]["server_cpu_us_per_request"]
                print(f"{api:>3} {clients:>3} clients: " + "; ".join(
                    f"{name} {r['server_cpu_us_per_request']:.0f} us ({r['server_cpu_us_per_request'] / base:.2f}x), "
                    f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, {r['requests_per_s']:.0f} req/s "
                    f"({r['requests_per_s'] / row[first]['requests_per_s']:.2f}x), {r['rows_per_call']:.1f} rows/call"
                    for name, r in row.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
