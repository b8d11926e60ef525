"""Closed-loop load generator in the manner of Triton's perf_analyzer, in processes of its own.

For each concurrency level C, C virtual clients each keep exactly one request in flight (send, wait for the
answer, send again). The clients are spread over ``processes`` worker processes (multiprocessing, spawn), each
running its share as asyncio tasks on one grpc.aio channel, sending a request serialised once in advance and
reading the answer as raw bytes, so that a client costs as little CPU as gRPC allows. After a warm-up, the
level is measured in consecutive windows until the throughput of the last ``stable_windows`` windows agrees
within ``stability`` (10%: (max - min) / mean), or ``max_windows`` windows have passed; the result pools those
last windows:

* throughput in requests/s and rows/s, latency p50/p90/p95/p99 as the client saw it;
* the server's own split of a request into queue time, compute time (ONNX Runtime calls) and the rest, from
  its Prometheus /metrics scraped at every window boundary (benchmarks/scrape.py);
* CPU used, in cores, by the server process (and its busiest threads), each load-generator process, and the
  whole machine, from /proc (benchmarks/procstat.py), with a verdict naming the resource that saturates.

Times are CLOCK_MONOTONIC, which all processes of the machine share, so client completions are cut into the
same windows as the server's counters: a window edge is the middle of the scrape that read the counters, and
half the scrape's duration is that edge's uncertainty (``edge_uncertainty_s`` in the result; on a busy machine
a scrape takes tens of milliseconds, and cutting the clients' completions at another instant than the server's
read made the two counts disagree by hundreds of requests per second times that gap).

Example:
    >>> with LoadGenerator(LoadSpec("127.0.0.1:8500", "digits-vae"), processes=2) as gen:  # doctest: +SKIP
    ...     result = gen.sweep(SweepSettings(concurrency=(1, 8, 64)), metrics_url="http://127.0.0.1:8502/metrics")
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from benchmarks import procstat, scrape

METHODS = {"log_likelihood": "LogLikelihood", "sample": "Sample", "encode": "Encode", "decode": "Decode"}
"""Operation -> RPC of genserve.v1.GenerativeService (also the ``method`` label of the server's metrics)."""
SERVICE = "/genserve.v1.GenerativeService/"
PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class LoadSpec:
    """What every virtual client sends."""

    target: str
    """Server address, ``host:port``."""
    model: str
    """Model name in the server's repository."""
    operation: str = "log_likelihood"
    """``log_likelihood``, ``sample``, ``encode`` or ``decode``."""
    rows: int = 1
    """Rows per request (examples to score / encode, latents to decode, ``n`` to sample)."""
    importance_samples: int | None = None
    """LogLikelihood of latent-variable models: K; None = the model's default."""
    timeout_s: float = 60.0
    """Deadline of each request."""

    def __post_init__(self) -> None:
        if self.operation not in METHODS:
            raise ValueError(f"operation must be one of {', '.join(METHODS)}, got {self.operation!r}")
        if self.rows < 1:
            raise ValueError(f"rows must be >= 1, got {self.rows}")


@dataclass(frozen=True)
class SweepSettings:
    """How each concurrency level is measured."""

    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    """Levels: virtual clients, each with one request in flight."""
    warmup_s: float = 2.0
    """Seconds of load before the first window of each level (batch queues and thread pools settle)."""
    window_s: float = 2.0
    """Length of one measurement window."""
    stability: float = 0.10
    """The last ``stable_windows`` windows agree when (max - min) / mean of their throughput is at most this."""
    stable_windows: int = 3
    """Windows that must agree (1: the first window is taken)."""
    max_windows: int = 10
    """Give up waiting for stability after this many windows (the result then says ``stable: false``)."""

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.window_s <= 0 or self.warmup_s < 0 or not 0 < self.stability < 1:
            raise ValueError(f"need window_s > 0, warmup_s >= 0, 0 < stability < 1, got {self.window_s}, "
                             f"{self.warmup_s}, {self.stability}")
        if not 1 <= self.stable_windows <= self.max_windows:
            raise ValueError(f"need 1 <= stable_windows <= max_windows, got {self.stable_windows}, "
                             f"{self.max_windows}")


# ---- requests ------------------------------------------------------------------------------------------------
def build_request(spec: LoadSpec) -> bytes:
    """The serialised request every client sends: real data drawn from the model itself where it can sample.

    LogLikelihood and Encode send ``rows`` samples of the model (valid data of its domain); Decode sends the
    latents of ``rows`` samples; Sample asks for ``n = rows`` with a fixed seed.
    """
    from genserve.clients import messages as msg
    from genserve.clients.client import Client

    if spec.operation == "sample":
        return msg.sample_request(spec.model, spec.rows, 1, None, None, None, False, 0).SerializeToString()
    with Client(spec.target, timeout=max(spec.timeout_s, 120.0)) as client:
        x, z = client.sample(spec.model, spec.rows, seed=1, return_latents=True)
    if spec.operation == "log_likelihood":
        return msg.log_likelihood_request(spec.model, x, 2, spec.importance_samples, 0).SerializeToString()
    if spec.operation == "encode":
        return msg.encode_request(spec.model, x, 2, False, 0).SerializeToString()
    if z is None:
        raise ValueError(f"{spec.model} returns no latents, so there is nothing to decode")
    return msg.decode_request(spec.model, z, 2, False, 0).SerializeToString()


# ---- worker process ------------------------------------------------------------------------------------------
def _worker(conn: Any, target: str, method: str, payload: bytes, timeout_s: float, connections: int = 1) -> None:
    """Entry point of a load-generator process: serves commands from ``conn`` until ``exit``."""
    asyncio.run(_worker_main(conn, target, method, payload, timeout_s, connections))


def open_channels(target: str, connections: int, options: list[tuple[str, Any]] | None = None) -> list[Any]:
    """``connections`` grpc.aio channels to ``target``, each its own TCP connection (gRPC shares one between
    channels with the same arguments otherwise): a server of ``--processes N`` gets connections to spread."""
    import grpc

    options = [*(options or []), *([("grpc.use_local_subchannel_pool", 1)] if connections > 1 else [])]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]


async def _worker_main(conn: Any, target: str, method: str, payload: bytes, timeout_s: float,
                       connections: int = 1) -> None:
    import grpc

    channels = open_channels(target, connections, [("grpc.max_send_message_length", 64 << 20),
                                                   ("grpc.max_receive_message_length", 64 << 20)])
    # No (de)serialisers: the request goes out as the prepared bytes and the answer stays bytes.
    calls = [channel.unary_unary(SERVICE + method) for channel in channels]
    ends, lats = array("d"), array("d")
    errors: list[tuple[float, str]] = []
    tasks: list[asyncio.Task] = []

    async def client(call: Any) -> None:
        while True:
            t0 = time.monotonic()
            try:
                answer = await call(payload, timeout=timeout_s)
                if not answer:
                    raise RuntimeError("empty answer")
            except grpc.aio.AioRpcError as e:
                errors.append((time.monotonic(), e.code().name))
                await asyncio.sleep(0.005)  # a server that refuses at once must not become a busy loop
                continue
            t1 = time.monotonic()
            ends.append(t1)
            lats.append(t1 - t0)

    loop = asyncio.get_running_loop()
    try:
        while True:
            command, *args = await loop.run_in_executor(None, conn.recv)
            if command == "start":
                tasks = [asyncio.ensure_future(client(calls[i % connections])) for i in range(args[0])]
                conn.send(("started", len(tasks)))
            elif command == "collect":  # completions in [t0, t1); older records are dropped
                t0, t1 = args
                e = np.frombuffer(ends, dtype=np.float64) if len(ends) else np.zeros(0)
                lat = np.frombuffer(lats, dtype=np.float64) if len(lats) else np.zeros(0)
                keep = (e >= t0) & (e < t1)
                window_lats = lat[keep].copy()
                later = e >= t1
                rest_e, rest_l = e[later].copy(), lat[later].copy()
                del e, lat  # the buffers must not be exported while the arrays change size
                ends, lats = array("d", rest_e.tobytes()), array("d", rest_l.tobytes())
                errs = [code for t, code in errors if t0 <= t < t1]
                errors[:] = [(t, c) for t, c in errors if t >= t1]
                conn.send(("collected", window_lats, errs))
            elif command == "stop":
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                tasks = []
                ends, lats = array("d"), array("d")
                errors.clear()
                conn.send(("stopped",))
            elif command == "exit":
                break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()


# ---- measurement ---------------------------------------------------------------------------------------------
@dataclass
class Window:
    """One measurement window of one concurrency level."""

    t0: float
    t1: float
    latencies: np.ndarray
    errors: list[str]
    cpu: dict
    server: dict
    metrics_before: Any = field(repr=False, default=None)
    metrics_after: Any = field(repr=False, default=None)
    edge_uncertainty_s: tuple[float, float] = (0.0, 0.0)
    """Half the duration of the scrapes at t0 and t1: the server's counters were read within that of each edge."""

    @property
    def throughput(self) -> float:
        return len(self.latencies) / (self.t1 - self.t0)


def stable(windows: list[Window], k: int, tolerance: float) -> bool:
    """True when the last ``k`` windows' throughputs satisfy (max - min) / mean <= tolerance."""
    if len(windows) < k:
        return False
    rates = [w.throughput for w in windows[-k:]]
    mean = sum(rates) / k
    return mean > 0 and (max(rates) - min(rates)) / mean <= tolerance


def verdict(cpu: dict, server: dict, processes: int) -> str:
    """Which resource limits this level: the first of client CPU, machine CPU, one server thread, ORT compute."""
    cores = cpu["cores"]
    procs = cpu["processes_cores"]
    client = [v for k, v in procs.items() if k.startswith("loadgen") and v is not None]
    server_cores = procs.get("server") or 0.0
    threads = cpu["top_threads_cores"].get("server", {})
    top_name, top = next(iter(threads.items()), ("?", 0.0))
    if client and max(client) >= 0.9:
        return (f"load generator: a client process uses {max(client):.2f} cores (one core is its limit); "
                f"run more processes than {processes}")
    if cpu["machine_busy_cores"] >= 0.9 * cores:
        others = max(cpu["machine_busy_cores"] - server_cores - sum(client), 0.0)
        return (f"machine CPU: {cpu['machine_busy_cores']:.2f} of {cores} cores busy (server {server_cores:.2f}, "
                f"load generator {sum(client):.2f}, other processes {others:.2f})")
    if top >= 0.9:
        return f"server thread {top_name.split('/')[0]!r} at {top:.2f} cores (one thread: the GIL / event loop)"
    if server.get("ort_busy", 0.0) >= 0.9:
        return f"ONNX Runtime compute: graph calls run {server['ort_busy']:.0%} of the time"
    if server_cores >= 0.95:
        # More than a core in the process yet no thread and no core saturated: its threads' Python work (the
        # event loop's, and each ORT worker's around its call) takes turns on one interpreter lock.
        return (f"the server's GIL: {server_cores:.2f} cores in the process, the busiest thread "
                f"{top_name.split('/')[0]!r} at {top:.2f}, ONNX Runtime calls running "
                f"{server.get('ort_busy', 0.0):.0%} of the time, while the machine has idle CPU")
    return ("no CPU resource saturated: latency-bound (each client waits for its answer; batching delay and "
            "round trips set the rate)")


def summarise(windows: list[Window], concurrency: int, rows: int, model: str, method: str,
              processes: int, is_stable: bool, metrics_ok: bool) -> dict:
    """The level's result, pooled over the given (last, agreeing) windows."""
    wall = sum(w.t1 - w.t0 for w in windows)
    lats = np.concatenate([w.latencies for w in windows]) if windows else np.zeros(0)
    errors: dict[str, int] = {}
    for w in windows:
        for code in w.errors:
            errors[code] = errors.get(code, 0) + 1
    cpu = _pool_cpu([w.cpu for w in windows])
    server = (scrape.split(windows[0].metrics_before, windows[-1].metrics_after, model, method, wall)
              if metrics_ok else {"available": False})
    if metrics_ok and windows:
        server["edge_uncertainty_s"] = windows[0].edge_uncertainty_s[0] + windows[-1].edge_uncertainty_s[1]
    lat_ms = {f"p{p}": float(np.percentile(lats, p)) * 1e3 if len(lats) else math.nan for p in PERCENTILES}
    lat_ms["mean"] = float(lats.mean()) * 1e3 if len(lats) else math.nan
    client_ms = lat_ms["mean"]
    if server.get("requests"):
        server["client_overhead_s"] = max(client_ms / 1e3 - server["server_request_s"], 0.0)
    return {
        "concurrency": concurrency,
        "windows_measured": len(windows),
        "stable": is_stable,
        "window_throughputs": [w.throughput for w in windows],
        "requests": int(len(lats)),
        "errors": errors,
        "seconds": wall,
        "throughput_rps": len(lats) / wall if wall else 0.0,
        "throughput_rows_s": len(lats) * rows / wall if wall else 0.0,
        "latency_ms": lat_ms,
        "server": server,
        "cpu": cpu,
        "loadavg": procstat.loadavg(),
        "limited_by": verdict(cpu, server, processes),
    }


def _pool_cpu(cpus: list[dict]) -> dict:
    """Wall-time-weighted mean of per-window CPU figures."""
    if not cpus:
        return {}
    wall = sum(c["wall_s"] for c in cpus)

    def mean(get: Any) -> float | None:
        vals = [(get(c), c["wall_s"]) for c in cpus]
        if any(v is None for v, _ in vals):
            return None
        return sum(v * w for v, w in vals) / wall

    keys = cpus[-1]["processes_cores"].keys()
    threads: dict[str, dict[str, float]] = {}
    for owner, per in cpus[-1]["top_threads_cores"].items():
        threads[owner] = {name: mean(lambda c, o=owner, n=name: c["top_threads_cores"].get(o, {}).get(n, 0.0))
                          for name in per}
    return {"wall_s": wall, "cores": cpus[-1]["cores"],
            "machine_busy_cores": mean(lambda c: c["machine_busy_cores"]),
            "processes_cores": {k: mean(lambda c, k=k: c["processes_cores"].get(k)) for k in keys},
            "top_threads_cores": threads}


class LoadGenerator:
    """Worker processes sending ``spec`` to a server; ``sweep()`` measures a list of concurrency levels.

    Args:
        spec: what each virtual client sends.
        processes: load-generator processes; a level's clients are dealt round-robin over them.
        server_pid: the server's pid on this machine, for its CPU figures (None: not reported).
        connections: TCP connections per process, its clients dealt round-robin over them (several: a server of
            ``--processes N`` gets connections to spread over its processes).
    """

    def __init__(self, spec: LoadSpec, processes: int = 2, server_pid: int | None = None,
                 connections: int = 1) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.spec = spec
        self.processes = processes
        self.server_pid = server_pid
        self.payload = build_request(spec)
        ctx = mp.get_context("spawn")  # a fresh interpreter: no gRPC state inherited from this process
        self.workers: list[tuple[Any, Any]] = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, spec.target, METHODS[spec.operation], self.payload,
                                                  spec.timeout_s, connections), daemon=True)
            p.start()
            self.workers.append((p, parent))

    def pids(self) -> dict[str, int]:
        out = {f"loadgen{i}": p.pid for i, (p, _) in enumerate(self.workers)}
        out["loadgen-main"] = os.getpid()
        if self.server_pid:
            out["server"] = self.server_pid
        return out

    def _all(self, message: tuple, expect: str) -> list[tuple]:
        for _, conn in self.workers:
            conn.send(message)
        answers = [conn.recv() for _, conn in self.workers]
        for a in answers:
            if a[0] != expect:
                raise RuntimeError(f"load generator worker answered {a[0]!r} to {message[0]!r}")
        return answers

    def measure(self, concurrency: int, settings: SweepSettings, metrics_url: str | None = None,
                log: Any = None) -> dict:
        """One concurrency level: warm up, then windows until stable (or ``max_windows``); the pooled result."""
        shares = [concurrency // self.processes + (i < concurrency % self.processes) for i in range(self.processes)]
        for (_, conn), share in zip(self.workers, shares, strict=True):
            conn.send(("start", share))
        for _, conn in self.workers:
            conn.recv()
        time.sleep(settings.warmup_s)
        pids = self.pids()
        threads = ("server",) if self.server_pid else ()

        def snapshot() -> tuple[procstat.CpuSnapshot, scrape.Series, float, float]:
            """CPU counters, the server's metrics, the window edge (the middle of the scrape) and its uncertainty."""
            cpu = procstat.CpuSnapshot.take(pids, threads)
            if not metrics_url:
                return cpu, {}, cpu.t, 0.0
            before = time.monotonic()
            metrics = scrape.fetch(metrics_url)
            after = time.monotonic()
            return cpu, metrics, (before + after) / 2, (after - before) / 2

        windows: list[Window] = []
        cpu0, m0, t0, u0 = snapshot()
        while len(windows) < settings.max_windows:
            time.sleep(settings.window_s)  # the measurement window itself, not a wait for something to happen
            cpu1, m1, t1, u1 = snapshot()
            answers = self._all(("collect", t0, t1), "collected")
            lats = np.concatenate([a[1] for a in answers])
            errs = [code for a in answers for code in a[2]]
            server = scrape.split(m0, m1, self.spec.model, METHODS[self.spec.operation], t1 - t0)
            windows.append(Window(t0, t1, lats, errs, procstat.utilisation(cpu0, cpu1), server, m0, m1, (u0, u1)))
            if log:
                log(f"  c={concurrency} window {len(windows)}: {windows[-1].throughput:.1f} req/s")
            cpu0, m0, t0, u0 = cpu1, m1, t1, u1
            if stable(windows, settings.stable_windows, settings.stability):
                break
        self._all(("stop",), "stopped")
        is_stable = stable(windows, settings.stable_windows, settings.stability)
        last = windows[-settings.stable_windows:]
        return summarise(last, concurrency, self.spec.rows, self.spec.model, METHODS[self.spec.operation],
                         self.processes, is_stable, bool(metrics_url and m0))

    def sweep(self, settings: SweepSettings, metrics_url: str | None = None, log: Any = None) -> dict:
        """Every level of ``settings.concurrency``, in order; JSON-ready."""
        started = time.time()
        levels = []
        for c in settings.concurrency:
            levels.append(self.measure(c, settings, metrics_url, log))
            if log:
                r = levels[-1]
                log(f"c={c}: {r['throughput_rps']:.1f} req/s, {r['throughput_rows_s']:.1f} rows/s, "
                    f"p50 {r['latency_ms']['p50']:.2f} ms, p99 {r['latency_ms']['p99']:.2f} ms, "
                    f"{'stable' if r['stable'] else 'NOT stable'}; limited by: {r['limited_by']}")
        return {"spec": asdict(self.spec), "settings": asdict(settings), "processes": self.processes,
                "started_unix": started, "machine": procstat.machine_info(), "levels": levels}

    def close(self) -> None:
        for _, conn in self.workers:
            try:
                conn.send(("exit",))
            except (OSError, BrokenPipeError):
                pass
        for p, _ in self.workers:
            p.join(10)
            if p.is_alive():
                p.terminate()
        self.workers = []

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
