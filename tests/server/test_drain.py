"""Drain without surprises (issue 13 point 5): after SIGTERM every request is answered or refused with
UNAVAILABLE (which clients retry), never CANCELLED, and a rolling restart of two servers behind one round-robin
client loses no request (real `genserve serve` processes, closed-loop client threads); in process, the door
holds then refuses every kind of RPC while health checks pass, and a refused call is answered by the other
server."""

from __future__ import annotations

import collections
import math
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_lifecycle import ServeProcess, latent
from waiting import wait_for

from genserve.clients.client import Client, GenserveError
from genserve.oip import grpc_service_pb2 as oip_pb
from genserve.oip import grpc_service_pb2_grpc as oip_grpc
from genserve.server.app import SHUTTING_DOWN, BackgroundServer
from genserve.server.config import ServerConfig
from genserve.v1 import service_pb2 as pb
from genserve.v1 import service_pb2_grpc

MODEL = "digits-ppca"
GRACE_S = "4"  # lame duck at most 1 s, holding at most 1 s more: the drains stay short
THREADS = 8


@pytest.fixture
def repo(repo_dir: Path, tmp_path: Path) -> Path:
    """Only the cheapest model: each server process starts in a few seconds."""
    shutil.copytree(repo_dir / MODEL, tmp_path / "repo" / MODEL)
    return tmp_path / "repo"


async def on_loop(f: Callable[[], None]) -> None:
    """For BackgroundServer.call: run ``f`` on the server's event loop."""
    f()


def served(server: ServeProcess) -> float:
    """Requests the server has answered, from its Prometheus counter (0 while it cannot be read)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("genserve_requests_total{"))


class Load:
    """Closed-loop Decode calls from ``threads`` threads, each through ``client_for(i)``, until stop()."""

    def __init__(self, client_for: Callable[[int], Client], z: object, threads: int = THREADS) -> None:
        self.done: list[tuple[float, str, str]] = []  # (monotonic end, status code name, message)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(client_for(i), z), daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def _loop(self, client: Client, z: object) -> None:
        while not self._stop.is_set():
            try:
                client.decode(MODEL, z, seed=1)
                code, message = "OK", ""
            except GenserveError as e:
                code, message = e.code.name, e.message
                self._stop.wait(0.01)  # pace a client that gets refusals (a closed port refuses at once)
            with self._lock:
                self.done.append((time.monotonic(), code, message))

    def count(self, code: str = "OK", after: float = -1.0) -> int:
        with self._lock:
            return sum(c == code and t > after for t, c, _ in self.done)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"


def test_sigterm_under_load_answers_or_refuses_every_request_never_cancelled(repo: Path, tmp_path: Path) -> None:
    server = ServeProcess(repo, "--grace-s", GRACE_S, log=tmp_path / "server.log")
    clients = [Client(server.address, retries=0, timeout=60) for _ in range(THREADS)]  # every attempt seen
    load = Load(clients.__getitem__, latent(repo, 4))
    try:
        wait_for(lambda: load.count() >= 10 * THREADS, "the load runs")
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        server.proc.wait(timeout=120)  # a hang guard only
        load.stop()
    finally:
        load.stop()
        for c in clients:
            c.close()
        server.close()
    log = (tmp_path / "server.log").read_text()
    assert server.proc.returncode == 0, log[-2000:]
    codes = collections.Counter(code for _, code, _ in load.done)
    late = collections.Counter((code, message == SHUTTING_DOWN) for t, code, message in load.done if t > sent)
    assert set(codes) <= {"OK", "UNAVAILABLE"}, f"{codes}; after SIGTERM (code, the door's refusal): {late}"
    assert load.count("OK", after=sent) > 0, f"nothing was answered after SIGTERM: the test is void ({late})"
    assert load.count("UNAVAILABLE", after=sent) > 0, f"nothing was refused: the test is void ({late})"


def test_rolling_restart_behind_a_round_robin_client_loses_no_request(repo: Path, tmp_path: Path) -> None:
    a = ServeProcess(repo, "--grace-s", GRACE_S, log=tmp_path / "a.log")
    b = ServeProcess(repo, "--grace-s", GRACE_S, log=tmp_path / "b.log")
    servers = {"a": a, "b": b}
    client = Client([a.address, b.address], timeout=60)  # round robin, gRPC's retries on UNAVAILABLE
    load = Load(lambda i: client, latent(repo, 4))
    try:
        wait_for(lambda: served(a) > 0 and served(b) > 0, "both servers answer")
        for name in ("a", "b"):
            old = servers[name]
            old.proc.send_signal(signal.SIGTERM)
            assert old.proc.wait(timeout=120) == 0, (tmp_path / f"{name}.log").read_text()[-2000:]
            new = ServeProcess(repo, "--grace-s", GRACE_S, log=tmp_path / f"{name}2.log", port=old.port)
            servers[name] = new
            # Ready for the client: it has reconnected and the new process answers its requests.
            wait_for(lambda new=new: served(new) > 0, f"the client reaches the restarted server {name}")
        load.stop()
    finally:
        load.stop()
        client.close()
        for s in servers.values():
            s.close()
        a.close()
        b.close()
    failed = [(code, message) for _, code, message in load.done if code != "OK"]
    assert not failed, f"{len(failed)} of {len(load.done)} requests failed: {collections.Counter(failed)}"
    assert load.count() > 0


def test_the_door_holds_then_refuses_every_kind_of_rpc_and_lets_health_checks_through(repo: Path) -> None:
    cfg = ServerConfig(repo=repo, port=0, metrics_port=0, provider="cpu", workers=1)
    with BackgroundServer(cfg) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        drain = srv.server.drain
        srv.call(on_loop(drain.hold))
        stub = service_pb2_grpc.GenerativeServiceStub(channel)
        calls = {  # each kind the services have (unary, response stream, both ways); the door reads no request
            "Decode": stub.Decode.future(pb.DecodeRequest(model=MODEL)),
            "SampleStream": stub.SampleStream(pb.SampleStreamRequest()),
            "LogLikelihoodStream": stub.LogLikelihoodStream(iter([pb.LogLikelihoodRequest(model=MODEL)])),
            "ServerReflectionInfo": reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])),
            "ModelInfer": oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(
                oip_pb.ModelInferRequest(model_name=f"{MODEL}.decode")),
        }
        wait_for(lambda: drain.held == len(calls), "every call waits at the door")
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes pass the door
        assert not any(c.done() for c in calls.values())
        srv.call(on_loop(drain.refuse))
        for name, call in calls.items():
            assert (call.code(), call.details()) == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN), name


def test_a_call_refused_at_the_door_is_answered_by_the_other_server(repo: Path) -> None:
    cfg = ServerConfig(repo=repo, port=0, metrics_port=0, provider="cpu", workers=1)
    a, b = BackgroundServer(cfg), BackgroundServer(cfg)
    z = latent(repo, 2)
    try:
        with Client([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], timeout=60) as client:
            def both_reached() -> bool:
                client.decode(MODEL, z)
                return a.server.drain.last > -math.inf and b.server.drain.last > -math.inf

            wait_for(both_reached, "round robin reaches both servers")
            a.call(on_loop(a.server.drain.hold))
            with ThreadPoolExecutor(4) as pool:
                calls = [pool.submit(client.decode, MODEL, z) for _ in range(4)]
                wait_for(lambda: a.server.drain.held >= 1, "round robin sends a call to the held server")
                a.stop()  # GOAWAY first, then the held calls are refused: gRPC retries them, on b
                answers = [c.result(timeout=120) for c in calls]
        assert a.server.drain.refused >= 1
        assert all(x.shape == answers[0].shape for x in answers)
    finally:
        a.stop()
        b.stop()
