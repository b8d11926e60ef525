"""Soak test: many concurrent clients call every operation of every model for a fixed count of requests.

It starts ``genserve serve`` on a free loopback port (or uses ``--server`` with ``--pid``), warms up, then runs
``--requests`` calls from ``--clients`` concurrent clients spread over ``--processes`` processes, cycling over
every (model, RPC) pair the repository offers: Sample, SampleStream, LogLikelihood, LogLikelihoodStream,
Encode, Decode. It reports errors by status (target 0), latency percentiles overall and per RPC, and the
server's resident memory (VmRSS from /proc/PID/status) after warm-up and at the end (target: growth < 10%).
The exit code is 0 when both targets are met, 1 otherwise. Not part of CI's default run; it takes minutes:

    python scripts/soak.py --repo model_repository --requests 20000
    python scripts/soak.py --repo model_repository --requests 2000 --clients 16 --json soak.json

Traffic goes to loopback only, and the run is bounded by the request count (and ``--max-seconds``).

The server inherits this environment: with glibc, ``MALLOC_ARENA_MAX=2 python scripts/soak.py ...`` caps the
per-thread malloc arenas, whose growth under 64 clients is retained memory, not a leak (the peak is the same
with and without it; see the README's reliability section).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

RPCS = ("Sample", "SampleStream", "LogLikelihood", "LogLikelihoodStream", "Encode", "Decode")
NEEDS = {"Sample": "sample", "SampleStream": "sample", "LogLikelihood": "log_likelihood",
         "LogLikelihoodStream": "log_likelihood", "Encode": "encode", "Decode": "decode"}
ROWS = 8
"""Rows per scored / encoded / decoded request and per stream chunk; samples per Sample request: 4."""
CALL_TIMEOUT = 120.0


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(repo: Path, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "genserve.server.cli", "--repo", str(repo), "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("genserve: serving"):
            port = re.search(r" port=(\d+)", line).group(1)
            return proc, f"127.0.0.1:{port}"
    proc.kill()
    raise SystemExit(f"the server did not start; its log:\n{log.read_text()[-3000:]}")


def discover(target: str) -> dict[str, dict[str, Any]]:
    """Per READY model: its RPCs, valid data rows (drawn from the model itself) and a latent batch."""
    import grpc

    from genserve.core.manifest import OPERATION_NAME
    from genserve.core.tensors import from_proto
    from genserve.v1 import service_pb2 as pb
    from genserve.v1 import service_pb2_grpc

    out = {}
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GenerativeServiceStub(channel)
        for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models:
            if m.state != pb.MODEL_STATE_READY:
                print(f"soak: skipping {m.name} ({pb.ModelState.Name(m.state)}: {m.message})", file=sys.stderr)
                continue
            info = stub.GetModel(pb.GetModelRequest(model=m.name), timeout=30)
            ops = {OPERATION_NAME[o] for o in info.manifest.operations}
            shape = tuple(info.manifest.data.shape)
            latent = int(info.manifest.parameters.get("latent_dim", 0)) or int(np.prod(shape))
            x = from_proto(stub.Sample(pb.SampleRequest(model=m.name, n=ROWS, seed=0), timeout=120).samples)
            rpcs = [r for r in RPCS if NEEDS[r] in ops]
            out[m.name] = {"rpcs": rpcs, "x": x.astype(np.float32),
                           "z": np.random.default_rng(0).standard_normal((ROWS, latent)).astype(np.float32)}
    return out


async def _call(stub: Any, rpc: str, model: str, spec: dict[str, Any], i: int) -> None:
    from genserve.core.tensors import to_proto
    from genserve.v1 import service_pb2 as pb

    if rpc == "Sample":
        r = await stub.Sample(pb.SampleRequest(model=model, n=4, seed=i), timeout=CALL_TIMEOUT)
        assert r.samples.shape[0] == 4
    elif rpc == "SampleStream":
        request = pb.SampleStreamRequest(sample=pb.SampleRequest(model=model, n=32, seed=i), chunk_size=8)
        rows = 0
        async for r in stub.SampleStream(request, timeout=CALL_TIMEOUT):
            rows += r.samples.shape[0]
        assert rows == 32
    elif rpc == "LogLikelihood":
        r = await stub.LogLikelihood(pb.LogLikelihoodRequest(model=model, x=to_proto(spec["x"]), seed=i),
                                     timeout=CALL_TIMEOUT)
        assert r.log_prob.shape[0] == ROWS
    elif rpc == "LogLikelihoodStream":
        chunks = [pb.LogLikelihoodRequest(model=model, x=to_proto(spec["x"]), seed=i, chunk_id=k) for k in range(3)]
        got = [r.chunk_id async for r in stub.LogLikelihoodStream(iter(chunks), timeout=CALL_TIMEOUT)]
        assert got == [0, 1, 2], got
    elif rpc == "Encode":
        r = await stub.Encode(pb.EncodeRequest(model=model, x=to_proto(spec["x"]), seed=i), timeout=CALL_TIMEOUT)
        assert r.z.shape[0] == ROWS
    else:
        r = await stub.Decode(pb.DecodeRequest(model=model, z=to_proto(spec["z"]), seed=i), timeout=CALL_TIMEOUT)
        assert r.x.shape[0] == ROWS


async def _worker(target: str, models: dict[str, dict[str, Any]], indices: list[int], concurrency: int,
                  stop_at: float) -> dict[str, Any]:
    import grpc

    from genserve.v1 import service_pb2_grpc

    jobs = [(name, rpc) for name in sorted(models) for rpc in models[name]["rpcs"]]
    latencies: dict[str, list[float]] = defaultdict(list)
    by_pair: dict[str, list[float]] = defaultdict(list)
    errors: Counter[str] = Counter()
    examples: list[str] = []
    todo = iter(indices)
    options = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = service_pb2_grpc.GenerativeServiceStub(channel)

        async def client() -> None:
            for i in todo:
                if time.time() > stop_at:
                    return
                name, rpc = jobs[i % len(jobs)]
                t = time.perf_counter()
                try:
                    await _call(stub, rpc, name, models[name], i)
                    latencies[rpc].append(time.perf_counter() - t)
                    by_pair[f"{name} {rpc}"].append(latencies[rpc][-1])
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] += 1
                    if len(examples) < 5:
                        examples.append(f"{name} {rpc}: {e.code().name} {e.details()}")
                except AssertionError as e:
                    errors["WRONG_ANSWER"] += 1
                    if len(examples) < 5:
                        examples.append(f"{name} {rpc}: wrong answer {e}")

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"latencies": dict(latencies), "by_pair": dict(by_pair), "errors": dict(errors), "examples": examples}


def _process(target: str, models: dict[str, Any], indices: list[int], concurrency: int, stop_at: float,
             results: Any) -> None:
    results.put(asyncio.run(_worker(target, models, indices, concurrency, stop_at)))


def run_phase(target: str, models: dict[str, Any], count: int, offset: int, clients: int, processes: int,
              max_seconds: float) -> dict[str, Any]:
    """``count`` requests (indices offset..offset+count) from ``clients`` concurrent clients in ``processes``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    stop_at = time.time() + max_seconds
    per = [clients // processes + (k < clients % processes) for k in range(processes)]
    workers = [ctx.Process(target=_process, args=(target, models, list(range(offset + k, offset + count, processes)),
                                                  per[k], stop_at, results)) for k in range(processes) if per[k]]
    started = time.perf_counter()
    for w in workers:
        w.start()
    parts = [results.get() for _ in workers]
    for w in workers:
        w.join()
    merged: dict[str, Any] = {"latencies": defaultdict(list), "by_pair": defaultdict(list), "errors": Counter(),
                              "examples": [],
                              "seconds": time.perf_counter() - started}
    for p in parts:
        for rpc, values in p["latencies"].items():
            merged["latencies"][rpc] += values
        for pair, values in p["by_pair"].items():
            merged["by_pair"][pair] += values
        merged["errors"].update(p["errors"])
        merged["examples"] += p["examples"]
    return merged


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, help="model repository to serve (starts genserve serve)")
    p.add_argument("--server", help="HOST:PORT of a running loopback server instead of --repo (with --pid)")
    p.add_argument("--pid", type=int, help="process id of that server, for its resident memory")
    p.add_argument("--requests", type=int, default=20000, help="requests after warm-up (default 20000)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up requests (default: a tenth, at least 1000)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--processes", type=int, default=4, help="client processes (default 4)")
    p.add_argument("--max-seconds", type=float, default=1800, help="stop a phase after this long (default 1800)")
    p.add_argument("--serve-args", default="--provider cpu --workers 2",
                   help="extra `genserve serve` flags (default: --provider cpu --workers 2)")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = p.parse_args(argv)
    if (args.repo is None) == (args.server is None):
        p.error("give --repo DIR (start a server) or --server HOST:PORT --pid PID")
    if args.server and not args.server.startswith(("127.", "localhost", "[::1]")):
        p.error("the soak test only targets loopback servers")

    proc = None
    if args.repo is not None:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"genserve-soak-{os.getpid()}.log"
        proc, target = start_server(args.repo, args.serve_args.split(), log)
        pid = proc.pid
        print(f"soak: server pid {pid} on {target}, log {log}", flush=True)
    else:
        target, pid = args.server, args.pid
    try:
        models = discover(target)
        pairs = sum(len(m["rpcs"]) for m in models.values())
        print(f"soak: {len(models)} models, {pairs} (model, RPC) pairs: "
              + ", ".join(f"{n}[{'/'.join(m['rpcs'])}]" for n, m in sorted(models.items())), flush=True)
        warm = args.warmup or max(1000, args.requests // 10)
        w = run_phase(target, models, warm, 0, args.clients, args.processes, args.max_seconds)
        print(f"soak: warm-up {warm} requests in {w['seconds']:.1f} s, errors {dict(w['errors'])}", flush=True)
        rss_start = rss_kib(pid) if pid else 0
        samples: list[int] = []
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.5):
                if pid:
                    samples.append(rss_kib(pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        load_before = os.getloadavg()[0]
        r = run_phase(target, models, args.requests, warm, args.clients, args.processes, args.max_seconds)
        done.set()
        rss_end = rss_kib(pid) if pid else 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    every = [v for values in r["latencies"].values() for v in values]
    errors = sum(r["errors"].values())
    sent = len(every) + errors
    growth = (rss_end - rss_start) / rss_start if rss_start else 0.0
    report = {
        "requests": sent, "ok": len(every), "errors": errors, "errors_by_status": dict(r["errors"]),
        "error_examples": r["examples"], "clients": args.clients, "processes": args.processes,
        "seconds": r["seconds"], "requests_per_s": sent / r["seconds"],
        "latency": percentiles(every), "latency_by_rpc": {k: percentiles(v) for k, v in sorted(r["latencies"].items())},
        "latency_by_model_rpc": {k: percentiles(v) for k, v in sorted(r["by_pair"].items())},
        "rss_start_mib": rss_start / 1024, "rss_end_mib": rss_end / 1024,
        "rss_peak_mib": max(samples, default=rss_end) / 1024, "rss_growth": growth,
        "loadavg_1min": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count(),
    }
    lat = report["latency"]
    print(f"\nsoak: {sent} requests in {r['seconds']:.1f} s ({report['requests_per_s']:.0f}/s) from {args.clients}"
          f" clients in {args.processes} processes; 1-min load {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"  errors: {errors} {dict(r['errors']) or ''}")
    for line in r["examples"]:
        print(f"    {line}")
    print(f"  latency ms: p50 {lat.get('p50_ms', 0):.1f}  p90 {lat.get('p90_ms', 0):.1f}  "
          f"p99 {lat.get('p99_ms', 0):.1f}  max {lat.get('max_ms', 0):.1f}")
    for rpc, q in report["latency_by_rpc"].items():
        print(f"    {rpc:<20} n={len(r['latencies'][rpc]):<6} p50 {q['p50_ms']:8.1f}  p99 {q['p99_ms']:8.1f}")
    slowest = sorted(report["latency_by_model_rpc"].items(), key=lambda kv: -kv[1]["p99_ms"])[:5]
    print("  slowest (model, RPC) by p99: " + "; ".join(f"{k} {q['p99_ms']:.0f} ms" for k, q in slowest))
    print(f"  server RSS: {report['rss_start_mib']:.1f} MiB after warm-up -> {report['rss_end_mib']:.1f} MiB at the "
          f"end ({100 * growth:+.1f}%, peak {report['rss_peak_mib']:.1f} MiB)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    ok = errors == 0 and growth < 0.10
    print(f"  targets (0 errors, RSS growth < 10%): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
