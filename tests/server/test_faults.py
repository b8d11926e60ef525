"""Faults, each proved on a real server: a client cancels mid-stream, an ONNX Runtime call raises, a model
file is corrupted before a reload, and reloads under steady load from many clients lose nothing.

Faults proved elsewhere (not repeated here):
* deadlines expiring while queued: tests/server/test_grpc_errors.py::test_full_queue_is_resource_exhausted_and_
  deadlines_drop_rows, and tests/server/test_limits.py::test_deadline_ceiling (their rows never run);
* SIGTERM under load (readiness NOT_SERVING first, every accepted request answered, exit 0):
  tests/server/test_lifecycle.py::test_sigterm_under_load_finishes_every_accepted_request.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from waiting import wait_for

from genserve.core.manifest import OPERATION_NAME, read_manifest, write_manifest
from genserve.core.tensors import from_proto, to_proto
from genserve.server.app import BackgroundServer
from genserve.server.config import ServerConfig
from genserve.v1 import service_pb2 as pb
from genserve.v1 import service_pb2_grpc

MODEL = "digits-ppca"
LATENT = 16


def config(repo: Path, **kw: object) -> ServerConfig:
    return ServerConfig(repo=repo, port=0, metrics_port=0, provider="cpu", workers=2, grace_s=2.0, **kw)


@pytest.fixture
def repo(repo_dir: Path, tmp_path: Path) -> Path:
    """digits-ppca alone, in a copy the test may change."""
    shutil.copytree(repo_dir / MODEL, tmp_path / MODEL)
    return tmp_path


def digits(rows: int) -> np.ndarray:
    return (np.arange(rows * 64) % 17).astype(np.float32).reshape(rows, 8, 8)


def value(srv: BackgroundServer, name: str, **labels: str) -> float:
    return srv.server.metrics.value(name, labels) or 0.0


def settled(srv: BackgroundServer, model: str = MODEL, timeout: float = 120.0) -> None:
    """Wait until nothing is in flight, no row is held and no batch queue holds rows."""
    deadline = time.monotonic() + timeout
    while True:
        inflight = sum(s.value for fam in srv.server.metrics.registry.collect() for s in fam.samples
                       if s.name in ("genserve_inflight_requests", "genserve_queue_depth_rows"))
        if inflight == 0 and srv.server.servicer.rows.held == 0:
            return
        assert time.monotonic() < deadline, f"still busy: gauges {inflight}, rows {srv.server.servicer.rows.held}"
        time.sleep(0.02)


# -- a client cancels mid-stream ----------------------------------------------------------------------------


def test_cancelling_a_sample_stream_stops_its_work(repo: Path) -> None:
    n = 100_000
    with BackgroundServer(config(repo)) as srv:
        async def scenario() -> int:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
                stub = service_pb2_grpc.GenerativeServiceStub(channel)
                call = stub.SampleStream(pb.SampleStreamRequest(sample=pb.SampleRequest(model=MODEL, n=n, seed=1),
                                                                chunk_size=64))
                got = 0
                async for response in call:
                    got += response.samples.shape[0]
                    if got >= 256:
                        break
                call.cancel()
                return got

        asyncio.run(scenario())
        cancelled = lambda: value(srv, "genserve_requests_total", model=MODEL,  # noqa: E731
                                  method="SampleStream", code="CANCELLED")
        wait_for(lambda: cancelled() >= 1, "the server accounts the stream as CANCELLED")  # it sees the cancel late
        settled(srv)  # nothing in flight, queued or held: no work goes on after the cancel
        made = value(srv, "genserve_samples_generated_total", model=MODEL)
        assert made < n / 4, f"{made} of {n} samples were made for a stream cancelled after 256"
        assert cancelled() == 1
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = service_pb2_grpc.GenerativeServiceStub(channel)
            rows = sum(r.samples.shape[0] for r in stub.SampleStream(
                pb.SampleStreamRequest(sample=pb.SampleRequest(model=MODEL, n=600, seed=1)), timeout=30))
            assert rows == 600


def test_cancelling_a_score_stream_stops_reading_and_scoring(repo: Path) -> None:
    with BackgroundServer(config(repo)) as srv:
        pulled = [0]

        async def scenario() -> tuple[int, int]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
                stub = service_pb2_grpc.GenerativeServiceStub(channel)

                async def endless():
                    chunk = to_proto(digits(200))
                    while True:
                        pulled[0] += 1
                        yield pb.LogLikelihoodRequest(model=MODEL, x=chunk, chunk_id=pulled[0], seed=1)
                        await asyncio.sleep(0.002)

                call = stub.LogLikelihoodStream(endless())
                answered = 0
                async for _ in call:
                    answered += 1
                    if answered == 3:
                        break
                call.cancel()
                deadline = time.monotonic() + 120
                while not call.done():  # the cancel has reached the call; then no request may be pulled
                    assert time.monotonic() < deadline, "the cancelled call never finished"
                    await asyncio.sleep(0.01)
                at_cancel = pulled[0]
                await asyncio.sleep(0.3)  # an observation window for pulls that must not happen, not a wait
                return answered, pulled[0] - at_cancel

        answered, pulled_after = asyncio.run(scenario())
        assert answered == 3 and pulled_after == 0
        # The client's call is done at once; the server's handler notices the cancel a moment later (its gauges
        # count engine operations, which are none between two chunks, so wait for the stream's own account).
        # The account is CANCELLED, or OK in one race that gRPC decides: the cancel reaches the handler as the end
        # of the request stream, every chunk read is answered, and the handler returns before grpc.aio reports
        # the cancel; then context.cancelled() is False even in a done callback (about 1 run in 100 under two CPU
        # hogs). Either way the stream is accounted once, and nothing else.
        accounts = lambda: {s.labels["code"]: s.value  # noqa: E731
                            for m in srv.server.metrics.registry.collect() for s in m.samples
                            if s.name == "genserve_requests_total" and s.labels.get("method") == "LogLikelihoodStream"}
        wait_for(lambda: sum(accounts().values()) >= 1, "the server accounts the stream")
        settled(srv)  # nothing in flight, queued or held: no scoring goes on after the cancel
        assert sum(accounts().values()) == 1 and set(accounts()) <= {"CANCELLED", "OK"}, accounts()
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = service_pb2_grpc.GenerativeServiceStub(channel)
            out = list(stub.LogLikelihoodStream(iter([pb.LogLikelihoodRequest(model=MODEL, x=to_proto(digits(5)))]),
                                                timeout=30))
            assert len(out) == 1 and out[0].log_prob.shape == [5]


def test_the_server_serves_on_after_streams_abandoned_with_chunks_in_flight(repo: Path) -> None:
    """Regression: a cancelled submission's future is done a loop iteration before its rows leave the batcher's
    count; a worker that looked in between found rows counted but an empty queue and died (IndexError), and the
    graph answered nothing more. Ten abandoned streams, each followed by a unary call that must be answered."""
    x = digits(5000)
    with BackgroundServer(config(repo)) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = service_pb2_grpc.GenerativeServiceStub(channel)
        for k in range(10):
            chunks = (pb.LogLikelihoodRequest(model=MODEL, x=to_proto(x[i:i + 700]), chunk_id=i)
                      for i in range(0, len(x), 700))
            call = stub.LogLikelihoodStream(chunks, timeout=30)
            next(call), next(call), next(call)
            call.cancel()
            answer = stub.LogLikelihood(pb.LogLikelihoodRequest(model=MODEL, x=to_proto(x[:5])), timeout=10)
            assert answer.log_prob.shape == [5], k
        settled(srv)


# -- an ONNX Runtime call raises ----------------------------------------------------------------------------


POISON = 12345.0


def test_an_onnx_runtime_failure_fails_its_batch_with_internal_and_the_server_goes_on(
        repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A row carrying POISON makes the session call raise. Four requests merged into that call (a 200 ms
    batching window gathers them) all answer INTERNAL naming the graph; the next calls are served."""
    from genserve.server import repository

    real = repository.run_session

    def flaky(session, feeds, *cached):
        if any(np.any(v == POISON) for v in feeds.values()):
            raise RuntimeError("injected ONNX Runtime failure")
        return real(session, feeds, *cached)

    monkeypatch.setattr(repository, "run_session", flaky)
    (repo / MODEL / "config.json").write_text('{"max_queue_delay_ms": 200, "adaptive_batching": false}')
    caplog.set_level(logging.ERROR)
    with BackgroundServer(config(repo)) as srv:
        def z(poisoned: bool) -> pb.Tensor:
            a = np.zeros((2, LATENT), np.float32)
            a[1, 3] = POISON if poisoned else 0.5
            return to_proto(a)

        async def burst(poisoned: list[bool]) -> list:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
                stub = service_pb2_grpc.GenerativeServiceStub(channel)
                calls = [stub.Decode(pb.DecodeRequest(model=MODEL, z=z(p)), timeout=30) for p in poisoned]
                return await asyncio.gather(*calls, return_exceptions=True)

        failed = asyncio.run(burst([False, True, False, False]))
        for r in failed:
            assert isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.INTERNAL, r
            assert "generator" in r.details() and "injected ONNX Runtime failure" in r.details(), r.details()
            assert "from 4 requests" in r.details(), r.details()
        assert value(srv, "genserve_batch_failures_total", model=MODEL, graph="generator") == 1
        assert any("injected" in rec.getMessage() for rec in caplog.records), "the failure must be logged"
        served = asyncio.run(burst([False] * 4))
        assert all(from_proto(r.x).shape == (2, 8, 8) for r in served), served
        # other graphs of the model were never affected
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = service_pb2_grpc.GenerativeServiceStub(channel)
            assert stub.LogLikelihood(pb.LogLikelihoodRequest(model=MODEL, x=to_proto(digits(2)))).log_prob.shape
        settled(srv)


# -- a model file is corrupted before a reload --------------------------------------------------------------


@pytest.mark.parametrize("damage", ["graph", "manifest", "graph-missing"])
def test_a_corrupted_model_file_keeps_the_old_version_serving_and_reports_the_error(repo: Path, damage: str) -> None:
    folder = repo / MODEL / "1"
    manifest = read_manifest(folder / "manifest.json")
    graph = folder / manifest.graphs[0].file
    saved = {p: p.read_bytes() for p in (graph, folder / "manifest.json")}
    with BackgroundServer(config(repo)) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = service_pb2_grpc.GenerativeServiceStub(channel)
        z = to_proto(np.linspace(-1, 1, 3 * LATENT, dtype=np.float32).reshape(3, LATENT))
        before = stub.Decode(pb.DecodeRequest(model=MODEL, z=z, seed=1))
        if damage == "graph":
            data = bytearray(saved[graph])
            data[len(data) // 2] ^= 0xFF
            graph.write_bytes(bytes(data))
        elif damage == "manifest":
            (folder / "manifest.json").write_text(saved[folder / "manifest.json"].decode()[:100])
        else:
            graph.unlink()
        reply = stub.ReloadRepository(pb.ReloadRequest(), timeout=60)
        errors = [(e.model, e.version, e.message) for e in reply.errors]
        assert len(errors) == 1 and errors[0][:2] == (MODEL, 1), errors
        assert {"graph": "sha256", "manifest": "manifest", "graph-missing": "missing"}[damage] in errors[0][2]
        status = next(m for m in reply.models if m.name == MODEL)
        assert status.state == pb.MODEL_STATE_READY and list(status.versions) == [1]
        assert "version 1 failed to load" in status.message
        after = stub.Decode(pb.DecodeRequest(model=MODEL, z=z, seed=1))
        assert after.model_version == 1
        np.testing.assert_array_equal(from_proto(after.x), from_proto(before.x))
        assert value(srv, "genserve_model_loaded", model=MODEL, version="1") == 1  # the old one still serves
        for path, data in saved.items():  # repaired: the next reload loads it again and the error clears
            path.write_bytes(data)
        reply = stub.ReloadRepository(pb.ReloadRequest(), timeout=60)
        assert not reply.errors and not next(m for m in reply.models if m.name == MODEL).message


# -- reloads under load -------------------------------------------------------------------------------------


def add_version(repo: Path, name: str, version: int, source: int = 1) -> None:
    src, tmp = repo / name / str(source), repo / name / f".{version}.tmp"
    shutil.copytree(src, tmp)
    manifest = read_manifest(tmp / "manifest.json")
    manifest.version = version
    write_manifest(manifest, tmp / "manifest.json")
    tmp.rename(repo / name / str(version))


def test_reloads_under_load_fail_no_request(repo_dir: Path, tmp_path: Path) -> None:
    """Eight clients call every operation of every model without pause while the repository changes under
    them five times (a new version, new serving settings, the old version removed, a broken new version, a
    model added): every request is answered OK."""
    repo = tmp_path / "repo"
    shutil.copytree(repo_dir, repo, ignore=shutil.ignore_patterns("FAILED.txt"))
    names = sorted(p.name for p in repo.iterdir() if p.is_dir())
    ops = {}
    for name in names:
        m = read_manifest(repo / name / "1" / "manifest.json")
        ops[name] = (m, [OPERATION_NAME[o] for o in m.operations])
    stop = threading.Event()
    failures: list[str] = []
    answered = [0]

    def request(stub, name: str, op: str, i: int) -> None:
        m = ops[name][0]
        shape = tuple(m.data.shape)
        x = np.zeros((2, *shape), np.float32)
        if op == "sample":
            r = stub.Sample(pb.SampleRequest(model=name, n=2, seed=i), timeout=30)
            assert from_proto(r.samples).shape == (2, *shape)
        elif op == "log_likelihood":
            r = stub.LogLikelihood(pb.LogLikelihoodRequest(model=name, x=to_proto(x), seed=i), timeout=30)
            assert np.isfinite(from_proto(r.log_prob)).all()
        elif op == "encode":
            stub.Encode(pb.EncodeRequest(model=name, x=to_proto(x), seed=i), timeout=30)
        else:
            latent = int(m.parameters.get("latent_dim", 0)) or int(np.prod(shape))
            r = stub.Decode(pb.DecodeRequest(model=name, z=to_proto(np.zeros((2, latent), np.float32))), timeout=30)
            assert from_proto(r.x).shape == (2, *shape)

    def client(k: int, port: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GenerativeServiceStub(channel)
            i = k
            while not stop.is_set():
                name = names[i % len(names)]
                op = ops[name][1][(i // len(names)) % len(ops[name][1])]
                try:
                    request(stub, name, op, i)
                    answered[0] += 1
                except Exception as e:  # noqa: BLE001 - every failure is a finding
                    failures.append(f"{name} {op}: {e.details() if isinstance(e, grpc.RpcError) else e!r}")
                i += 8

    with BackgroundServer(config(repo)) as srv:
        threads = [threading.Thread(target=client, args=(k, srv.port)) for k in range(8)]
        for t in threads:
            t.start()
        try:
            def progress(more: int) -> None:
                """Wait until the clients have had ``more`` further answers (or one failed)."""
                target = answered[0] + more
                deadline = time.monotonic() + 120
                while answered[0] < target and not failures:
                    assert time.monotonic() < deadline, "the clients made no progress"
                    time.sleep(0.01)

            def reload():
                progress(16)  # requests of every client are in flight at each reload
                return srv.call(srv.server.reload(), timeout=120)

            progress(32)
            add_version(repo, MODEL, 2)
            assert not reload().errors
            (repo / MODEL / "config.json").write_text('{"max_queue_delay_ms": 5, "max_batch_size": 32}')
            assert not reload().errors
            shutil.rmtree(repo / MODEL / "1")
            assert not reload().errors
            add_version(repo, MODEL, 3, source=2)
            (repo / MODEL / "3" / "manifest.json").write_text("{broken")
            result = reload()
            assert [(e.model, e.version) for e in result.errors] == [(MODEL, 3)]
            shutil.copytree(repo / MODEL / "2", repo / "late-model" / "2")
            m = read_manifest(repo / "late-model" / "2" / "manifest.json")
            m.name = "late-model"
            write_manifest(m, repo / "late-model" / "2" / "manifest.json")
            reload()
            progress(32)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not failures, f"{len(failures)} of {answered[0] + len(failures)} requests failed: {failures[:3]}"
        assert answered[0] > 20, answered  # requests were in flight across the reloads
        info = srv.server.engine.get_model(MODEL)
        assert info.version == 2 and srv.server.engine.ready("late-model")
