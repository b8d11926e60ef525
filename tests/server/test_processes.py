"""`genserve serve --processes 2`: two worker processes on one port, one /metrics for both, reload, load and
unload reaching both, a worker that dies replaced, SIGTERM under load answered without a lost request."""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from supervised import Supervised

from genserve.clients.channel import GenserveError
from genserve.clients.client import Client
from genserve.core.tensors import from_proto, to_proto
from genserve.oip import grpc_service_pb2 as oip_pb
from genserve.oip import grpc_service_pb2_grpc as oip_grpc
from genserve.v1 import service_pb2 as pb
from genserve.v1 import service_pb2_grpc

MODEL = "digits-ppca"
X = np.full((2, 8, 8), 3.0, np.float32)


def connection(target: str) -> grpc.Channel:
    """A channel with a TCP connection of its own (gRPC shares one between channels to the same target)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def score(channel: grpc.Channel) -> np.ndarray:
    stub = service_pb2_grpc.GenerativeServiceStub(channel)
    return from_proto(stub.LogLikelihood(pb.LogLikelihoodRequest(model=MODEL, x=to_proto(X), seed=1),
                                         timeout=30).log_prob)


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


@pytest.fixture
def supervised(repo_copy: Path, tmp_path: Path):
    server = Supervised(repo_copy, tmp_path / "server.log")
    yield server
    server.stop()


def test_two_processes_share_the_port_and_one_metrics_endpoint(supervised: Supervised) -> None:
    assert "processes=2" in supervised.ready and f"metrics_port={supervised.metrics_port}" in supervised.ready
    workers = supervised.workers()
    assert len(workers) == 2
    channels = [connection(supervised.target) for _ in range(16)]  # 16 connections: the kernel spreads them
    try:
        scores = [score(channel) for channel in channels]
        held = {pid: supervised.connections(pid) for pid in workers}
    finally:
        for channel in channels:
            channel.close()
    assert all(np.array_equal(s, scores[0]) for s in scores)  # both engines give the same numbers
    assert all(n >= 1 for n in held.values()), held  # each worker holds some of the connections
    text = supervised.metrics()
    served = sum(float(m) for m in re.findall(
        r'genserve_requests_total\{code="OK",method="LogLikelihood",model="digits-ppca"\} (\S+)', text))
    assert served == 16  # one endpoint counts what both workers answered
    assert 'genserve_model_loaded{model="digits-ppca",version="1"} 1.0' in text


def test_reload_by_rpc_reaches_every_process(supervised: Supervised, repo_copy: Path) -> None:
    shutil.copytree(repo_copy / MODEL / "1", repo_copy / MODEL / "2")
    with Client(supervised.target) as client:
        client.reload()  # answered by one worker; the supervisor passes it to the other

    def everywhere() -> bool:
        channels = [connection(supervised.target) for _ in range(8)]
        try:
            stubs = [service_pb2_grpc.GenerativeServiceStub(c) for c in channels]
            return all(stub.GetModel(pb.GetModelRequest(model=MODEL), timeout=30).version == 2 for stub in stubs)
        finally:
            for c in channels:
                c.close()

    wait_until(everywhere)
    # Version 1 leaves the repository: its genserve_model_loaded series leaves the one /metrics (the workers
    # cannot remove it from prometheus_client's multiprocess files; they mark it, the supervisor leaves it out).
    shutil.rmtree(repo_copy / MODEL / "1")
    with Client(supervised.target) as client:
        client.reload()
    old, new = (f'genserve_model_loaded{{model="{MODEL}",version="{v}"}}' for v in (1, 2))
    wait_until(lambda: old not in supervised.metrics())
    assert f"{new} 1.0" in supervised.metrics()


def readiness(target: str) -> tuple[bool, bool, bool] | None:
    """(OIP ServerReady, OIP ModelReady of MODEL, gRPC health of the server) over a connection of its own,
    which reaches whichever worker the kernel gives it; None when the connection was refused or reset (one
    queued on a worker as it was killed), as a probe that would simply try again."""
    channel = connection(target)
    try:
        oip = oip_grpc.GRPCInferenceServiceStub(channel)
        server = oip.ServerReady(oip_pb.ServerReadyRequest(), timeout=30).ready
        model = oip.ModelReady(oip_pb.ModelReadyRequest(name=f"{MODEL}.sample"), timeout=30).ready
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        return server, model, health.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None
    finally:
        channel.close()


def test_a_worker_that_dies_is_replaced_and_serving_goes_on(supervised: Supervised) -> None:
    """The other worker goes on serving, but every probe answers "not ready" until the replacement is ready
    (readiness reflects all workers), then "ready" again. gRPC health follows the other workers' flags within
    a poll (0.2 s), so the first look waits for it too."""
    wait_until(lambda: readiness(supervised.target) == (True, True, True))
    first = supervised.workers()
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: readiness(supervised.target) == (False, False, False))
    with Client(supervised.target, timeout=60) as client:
        for _ in range(20):
            assert client.log_likelihood(MODEL, X, seed=1).log_prob.shape == (2,)
    wait_until(lambda: (lambda now: len(now) == 2 and first[0] not in now)(supervised.workers()))
    wait_until(lambda: all(readiness(supervised.target) == (True, True, True) for _ in range(8)))


def oip_statistics(target: str, name: str) -> oip_pb.ModelStatistics:
    with connection(target) as channel:
        entries = oip_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            oip_pb.ModelStatisticsRequest(name=name), timeout=60).model_stats
    assert [e.name for e in entries] == [name]
    return entries[0]


def test_a_replaced_worker_goes_on_from_the_statistics_of_the_one_that_died(supervised: Supervised) -> None:
    """OIP statistics add up every worker's requests; a worker killed outright takes none of the figures a
    statistics answer has shown with it: its replacement starts from what it kept (Server.keep_statistics)."""
    name = f"{MODEL}.log_likelihood"
    request = oip_pb.ModelInferRequest(model_name=name, inputs=[oip_pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=list(X.shape))], raw_input_contents=[X.tobytes()])
    wait_until(lambda: readiness(supervised.target) == (True, True, True))
    workers = supervised.workers()
    channels = [connection(supervised.target) for _ in range(16)]  # 16 connections: the kernel spreads them
    try:
        for channel in channels:
            oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
        held = {pid: supervised.connections(pid) for pid in workers}
    finally:
        for channel in channels:
            channel.close()
    assert all(n >= 1 for n in held.values()), held  # the worker to be killed answered some of them
    before = oip_statistics(supervised.target, name)
    assert before.inference_stats.success.count == 16 and before.inference_count == 32
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: (lambda now: len(now) == 2 and workers[0] not in now)(supervised.workers()))
    wait_until(lambda: all(readiness(supervised.target) == (True, True, True) for _ in range(8)))
    after = oip_statistics(supervised.target, name)
    assert (after.inference_stats.success.count, after.inference_stats.success.ns, after.inference_count,
            after.execution_count) == (16, before.inference_stats.success.ns, 32, before.execution_count)


def test_sigterm_under_load_answers_every_request(supervised: Supervised) -> None:
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load() -> None:
        with Client(supervised.target, timeout=60) as client:
            while not stop.is_set():
                try:
                    client.log_likelihood(MODEL, X, seed=1)
                    answered[0] += 1
                except GenserveError as e:
                    if e.code.name != "UNAVAILABLE":  # the server is gone: the only allowed refusal
                        failures.append(str(e))
                    return

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: answered[0] >= 50)
    code = supervised.stop()
    stop.set()
    for t in threads:
        t.join(60)
    assert failures == [] and code == 0


def test_explicit_load_reaches_every_process(repo_copy: Path, tmp_path: Path) -> None:
    server = Supervised(repo_copy, tmp_path / "server.log", "--model-control-mode", "explicit",
                        "--load-model", MODEL)
    try:
        with Client(server.target) as client:
            assert client.load_model("digits-vae").state == "READY"

        def everywhere() -> bool:
            channels = [connection(server.target) for _ in range(8)]
            try:
                stubs = [service_pb2_grpc.GenerativeServiceStub(c) for c in channels]
                return all(stub.GetModel(pb.GetModelRequest(model="digits-vae"), timeout=30).state
                           == pb.MODEL_STATE_READY for stub in stubs)
            except grpc.RpcError:
                return False  # a worker that has not loaded it yet answers NOT_FOUND
            finally:
                for c in channels:
                    c.close()

        wait_until(everywhere)
    finally:
        server.stop()


def test_a_replaced_worker_serves_the_models_loaded_since_start(repo_copy: Path, tmp_path: Path) -> None:
    """Explicit model control: a worker started in place of a dead one loads what LoadModel/UnloadModel made of
    the start's set (here: ppca unloaded, vae loaded), not the start's set itself."""
    server = Supervised(repo_copy, tmp_path / "server.log", "--model-control-mode", "explicit",
                        "--load-model", MODEL)
    try:
        with Client(server.target) as client:
            assert client.load_model("digits-vae").state == "READY"
            client.unload_model(MODEL)
        first = server.workers()
        os.kill(first[0], signal.SIGKILL)
        started: list[int] = []

        def replaced() -> bool:  # one listing per look: the dead worker leaves it before the new one enters
            started[:] = sorted(set(server.workers()) - set(first))
            return bool(started)

        wait_until(replaced)
        new = started[0]

        def states(model: str) -> tuple[set[int], int]:
            """The model's states over 8 new connections, and how many of them the new worker holds (0: it
            does not listen yet, or the kernel gave them all to the other)."""
            channels = [connection(server.target) for _ in range(8)]
            try:
                stubs = [service_pb2_grpc.GenerativeServiceStub(c) for c in channels]
                found = set()
                for stub in stubs:
                    try:
                        found.add(stub.GetModel(pb.GetModelRequest(model=model), timeout=30).state)
                    except grpc.RpcError as e:
                        found.add(-1 if e.code() == grpc.StatusCode.NOT_FOUND else -2)
                return found, server.connections(new)
            finally:
                for c in channels:
                    c.close()

        def vae_on_both() -> bool:
            found, held = states("digits-vae")
            return held >= 1 and found == {pb.MODEL_STATE_READY}

        def ppca_on_neither() -> bool:
            found, held = states(MODEL)
            return held >= 1 and pb.MODEL_STATE_READY not in found

        wait_until(vae_on_both)  # fails (after 120 s) if the new worker loaded only the start's set
        wait_until(ppca_on_neither)
    finally:
        server.stop()
