"""A closed-loop Open Inference Protocol (KServe v2 gRPC) load generator for any server, in processes of its own.

Each worker process (multiprocessing, spawn) runs its share of the virtual clients as asyncio tasks on one
grpc.aio channel per server, each sending the same serialised ``ModelInferRequest`` (raw FP32 input) and
reading the answer as bytes, so that every server is driven by the same client at the same cost. A measurement
is one command to every worker: start ``clients`` loops, keep the completions whose answer arrived in
[t0, t1) (CLOCK_MONOTONIC, shared by all processes of the machine, so the caller can read CPU counters at the
same edges), then let the requests in flight finish and stop (no cancellations). Answers are parsed once per
server and request size by ``infer_once`` to check the numbers, never in the loop.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.loadgen import open_channels

INFER = "/inference.GRPCInferenceService/ModelInfer"
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def infer_request(model: str, name: str, x: np.ndarray) -> bytes:
    """A serialised ModelInferRequest for ``model`` with one FP32 input ``name`` = ``x`` as raw contents."""
    from genserve.oip import grpc_service_pb2 as pb

    x = np.ascontiguousarray(x, dtype="<f4")
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def decode_response(data: bytes) -> dict[str, np.ndarray]:
    """Outputs of a serialised ModelInferResponse by name, as float arrays (raw or typed contents)."""
    from genserve.oip import grpc_service_pb2 as pb

    response = pb.ModelInferResponse.FromString(data)
    out = {}
    for i, meta in enumerate(response.outputs):
        shape = tuple(meta.shape)
        if i < len(response.raw_output_contents):
            dtype = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8"}[meta.datatype]
            out[meta.name] = np.frombuffer(response.raw_output_contents[i], dtype=dtype).reshape(shape)
        else:
            c = meta.contents
            values = c.fp32_contents or c.fp64_contents or c.int64_contents
            out[meta.name] = np.asarray(values, dtype=np.float64).reshape(shape)
    return out


def infer_once(target: str, payload: bytes, timeout_s: float = 60.0) -> dict[str, np.ndarray]:
    """Send one request and decode the answer (a gRPC error raises grpc.RpcError)."""
    import grpc

    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        return decode_response(channel.unary_unary(INFER)(payload, timeout=timeout_s))


def ready(target: str, model: str, timeout_s: float = 2.0) -> bool:
    """ServerReady and ModelReady(model) both true (False on any error: not up yet)."""
    import grpc

    from genserve.oip import grpc_service_pb2 as pb

    try:
        with grpc.insecure_channel(target) as channel:
            server = channel.unary_unary("/inference.GRPCInferenceService/ServerReady",
                                         response_deserializer=pb.ServerReadyResponse.FromString)
            model_ready = channel.unary_unary("/inference.GRPCInferenceService/ModelReady",
                                              response_deserializer=pb.ModelReadyResponse.FromString)
            return (server(pb.ServerReadyRequest().SerializeToString(), timeout=timeout_s).ready
                    and model_ready(pb.ModelReadyRequest(name=model).SerializeToString(), timeout=timeout_s).ready)
    except grpc.RpcError:
        return False


# ---- worker process ------------------------------------------------------------------------------------------
def _worker(conn: Any, connections: int = 1) -> None:
    asyncio.run(_worker_main(conn, connections))


async def _worker_main(conn: Any, connections: int = 1) -> None:
    import grpc

    channels: dict[str, list[Any]] = {}
    loop = asyncio.get_running_loop()

    async def measure(target: str, payload: bytes, clients: int, t0: float, t1: float, timeout_s: float
                      ) -> tuple[np.ndarray, dict[str, int], int]:
        if target not in channels:
            channels[target] = open_channels(target, connections, OPTIONS)
        calls = [channel.unary_unary(INFER) for channel in channels[target]]  # no (de)serialisers: bytes
        lats = array("d")
        errors: dict[str, int] = {}
        empty = [0]

        async def client(call: Any) -> None:
            while time.monotonic() < t1:
                start = time.monotonic()
                try:
                    answer = await call(payload, timeout=timeout_s)
                except grpc.aio.AioRpcError as e:
                    end = time.monotonic()
                    if t0 <= end < t1:
                        errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    await asyncio.sleep(0.005)  # a server that refuses at once must not become a busy loop
                    continue
                end = time.monotonic()
                if t0 <= end < t1:
                    if answer:
                        lats.append(end - start)
                    else:
                        empty[0] += 1

        tasks = [asyncio.ensure_future(client(calls[i % len(calls)])) for i in range(clients)]
        # After t1 each client lets its request in flight finish (cancelling would exercise the servers'
        # cancellation paths between measurements), then stops.
        _, late = await asyncio.wait(tasks, timeout=max(t1 - time.monotonic(), 0.0) + timeout_s)
        for t in late:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return np.frombuffer(lats, dtype=np.float64).copy() if len(lats) else np.zeros(0), errors, empty[0]

    conn.send(("ready",))
    try:
        while True:
            command, *args = await loop.run_in_executor(None, conn.recv)
            if command == "measure":
                conn.send(("measured", *await measure(*args)))
            elif command == "exit":
                break
    finally:
        for group in channels.values():
            for channel in group:
                await channel.close()


@dataclass
class Measurement:
    """Completions of one measurement window, all workers pooled."""

    t0: float
    t1: float
    latencies_s: np.ndarray
    errors: dict[str, int]
    empty_answers: int
    loadgen_cpu_s: float | None = None
    """The load generator's CPU over the window when the load knows it (perf_analyzer's rusage); None: read from
    its processes (``OipLoad.pids``)."""

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / (self.t1 - self.t0)

    def percentile_ms(self, p: float) -> float:
        return float(np.percentile(self.latencies_s, p)) * 1e3 if len(self.latencies_s) else float("nan")


class OipLoad:
    """``processes`` spawned worker processes; ``measure()`` drives one server with C closed-loop clients.

    Each worker opens ``connections`` TCP connections to a server and deals its clients round-robin over them:
    a server of several processes on one port (SO_REUSEPORT) gets its connections spread by the kernel's hash,
    connections rather than requests, so with one per worker two workers often land on one process.
    """

    def __init__(self, processes: int = 2, connections: int = 1) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if connections < 1:
            raise ValueError(f"connections must be >= 1, got {connections}")
        ctx = mp.get_context("spawn")  # a fresh interpreter: no gRPC state inherited from this process
        self.workers: list[tuple[Any, Any]] = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, connections), daemon=True)
            p.start()
            self.workers.append((p, parent))
        for _, conn in self.workers:  # started and imported: a measurement's window edges are then reachable
            if conn.recv() != ("ready",):
                raise RuntimeError("a load worker did not start")

    def pids(self) -> list[int]:
        return [p.pid for p, _ in self.workers]

    def measure(self, target: str, payload: bytes, clients: int, warmup_s: float, window_s: float,
                timeout_s: float = 60.0, at_edges: Any = None) -> Measurement:
        """Clients dealt round-robin over the workers; completions in [now + warmup_s, + window_s).

        ``at_edges(edge)`` is called at t0 (edge 0) and t1 (edge 1), e.g. to read CPU counters.
        """
        if clients < 1 or window_s <= 0 or warmup_s < 0:
            raise ValueError(f"need clients >= 1, window_s > 0, warmup_s >= 0; got {clients}, {window_s}, {warmup_s}")
        n = len(self.workers)
        shares = [clients // n + (i < clients % n) for i in range(n)]
        t0 = time.monotonic() + 0.05 + warmup_s
        t1 = t0 + window_s
        busy = [(p, conn) for (p, conn), share in zip(self.workers, shares, strict=True) if share]
        for (_, conn), share in zip(busy, [s for s in shares if s], strict=True):
            conn.send(("measure", target, payload, share, t0, t1, timeout_s))
        for edge, t in enumerate((t0, t1)):
            time.sleep(max(t - time.monotonic(), 0.0))  # the window's edges: times, not events
            if at_edges is not None:
                at_edges(edge)
        lats, errors, empty = [], {}, 0
        for _, conn in busy:
            answer = conn.recv()
            if answer[0] != "measured":
                raise RuntimeError(f"load worker answered {answer[0]!r}")
            lats.append(answer[1])
            for code, count in answer[2].items():
                errors[code] = errors.get(code, 0) + count
            empty += answer[3]
        return Measurement(t0, t1, np.concatenate(lats), errors, empty)

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

    def __enter__(self) -> OipLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
