"""The limits that protect the server: rows per request, rows held server-wide, message size and the deadline
ceiling. Breaching one is a clear status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED naming the
setting), and a flood of refused requests does not grow the server's memory."""

from __future__ import annotations

import asyncio
import gc
import shutil
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from waiting import until

from genserve.core.tensors import to_proto
from genserve.oip import grpc_service_pb2 as oip_pb
from genserve.oip import grpc_service_pb2_grpc as oip_grpc
from genserve.server.app import BackgroundServer
from genserve.server.config import ServerConfig
from genserve.v1 import service_pb2 as pb
from genserve.v1 import service_pb2_grpc

MODEL = "digits-ppca"
LATENT = 16
BIG_CHANNEL = [("grpc.max_send_message_length", 256 * 2**20), ("grpc.max_receive_message_length", 256 * 2**20)]


@pytest.fixture
def repo(repo_dir: Path, tmp_path: Path) -> Path:
    """digits-ppca alone, in a copy the test may give a config.json."""
    shutil.copytree(repo_dir / MODEL, tmp_path / MODEL)
    return tmp_path


def config(repo: Path, **kw: object) -> ServerConfig:
    return ServerConfig(repo=repo, port=0, metrics_port=0, provider="cpu", workers=1, grace_s=2.0, **kw)


def rss_mib() -> float:
    """Resident memory of this process (the in-process server lives here), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def digits(rows: int) -> np.ndarray:
    return (np.arange(rows * 64) % 17).astype(np.float32).reshape(rows, 8, 8)


def refused(send: Callable[[], object], code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as e:
        send()
    assert e.value.code() == code, (e.value.code(), e.value.details())
    for word in words:
        assert word in (e.value.details() or ""), (word, e.value.details())
    return e.value.details() or ""


def no_growth(send: Callable[[], object], code: grpc.StatusCode, times: int = 150, payload_mib: float = 1.0
              ) -> None:
    """``times`` refused requests of ``payload_mib`` each leave resident memory within a fifth of their sum.

    A warm-up of as many requests first: gRPC's buffers and the allocator's per-thread arenas grow to a plateau
    (measured: about 40 MiB over the first 200 refusals of 1 MiB, then flat), which is not a leak. On a busy
    machine the plateau came later (57.7 MiB over the second 150 beside a test run and two CPU hogs), so up to
    three windows are measured: a leak grows in every one of them, a plateau stops."""
    for _ in range(times):
        refused(send, code)
    bound, grown = max(16.0, times * payload_mib / 5), []
    for _ in range(3):
        before = rss_mib()
        for _ in range(times):
            refused(send, code)
        grown.append(rss_mib() - before)
        if grown[-1] < bound:
            return
    raise AssertionError(f"resident memory grew {', '.join(f'{g:.1f}' for g in grown)} MiB in each of 3 windows "
                         f"of {times} refusals (bound {bound:.0f} MiB)")


def oip_decode(rows: int) -> oip_pb.ModelInferRequest:
    """Open Inference Protocol: decode ``rows`` latent rows of zeros through ``<model>.decode``."""
    request = oip_pb.ModelInferRequest(model_name=f"{MODEL}.decode")
    request.inputs.add(name="z", datatype="FP32", shape=[rows, LATENT])
    request.raw_input_contents.append(np.zeros((rows, LATENT), np.float32).tobytes())
    return request


def total(srv: BackgroundServer, name: str) -> float:
    return sum(s.value for fam in srv.server.metrics.registry.collect() for s in fam.samples if s.name == name)


def test_rows_per_request(repo: Path) -> None:
    with BackgroundServer(config(repo, max_rows_per_request=1000, max_sample_n=1000)) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=BIG_CHANNEL) as channel:
        stub = service_pb2_grpc.GenerativeServiceStub(channel)
        x = to_proto(digits(4000))  # 1 MiB
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        ll = lambda: stub.LogLikelihood(pb.LogLikelihoodRequest(model=MODEL, x=x), timeout=10)  # noqa: E731
        refused(ll, invalid, "x:", "4000 rows", "limit of 1000", "LogLikelihoodStream")
        refused(lambda: stub.Encode(pb.EncodeRequest(model=MODEL, x=x), timeout=10), invalid, "x:", "4000")
        z = to_proto(np.zeros((1001, LATENT), np.float32))
        refused(lambda: stub.Decode(pb.DecodeRequest(model=MODEL, z=z), timeout=10), invalid, "z:", "1001")
        refused(lambda: stub.Sample(pb.SampleRequest(model=MODEL, n=1001), timeout=10), invalid, "n:", "1000")
        chunks = iter([pb.LogLikelihoodRequest(model=MODEL, x=x)])
        refused(lambda: list(stub.LogLikelihoodStream(chunks, timeout=10)), invalid, "x:", "4000")
        no_growth(ll, invalid)
        ok = stub.LogLikelihood(pb.LogLikelihoodRequest(model=MODEL, x=to_proto(digits(1000))), timeout=30)
        assert len(ok.log_prob.data) == 1000 * 8


def test_rows_held_server_wide(repo: Path) -> None:
    """Two 500-row requests wait in a long batching window and hold the whole budget of 1000 rows: any further
    request is RESOURCE_EXHAUSTED naming max_queued_rows; once they are answered the budget is free again,
    also after a client gave up on its request."""
    (repo / MODEL / "config.json").write_text('{"max_queue_delay_ms": 600, "max_batch_size": 4096, '
                                                 '"adaptive_batching": false}')
    cfg = config(repo, max_queued_rows=1000, max_rows_per_request=500, max_sample_n=500)
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    with BackgroundServer(cfg) as srv:
        budget = srv.server.servicer.rows

        async def scenario() -> tuple:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
                stub = service_pb2_grpc.GenerativeServiceStub(channel)
                a = stub.Decode(pb.DecodeRequest(model=MODEL, z=to_proto(np.zeros((500, LATENT), np.float32))))
                b = stub.LogLikelihood(pb.LogLikelihoodRequest(model=MODEL, x=to_proto(digits(500))))
                await until(lambda: budget.held == 1000)  # both wait in the batching window
                held = budget.held
                extra = []
                for call in (stub.Sample(pb.SampleRequest(model=MODEL, n=1), timeout=10),
                             stub.Encode(pb.EncodeRequest(model=MODEL, x=to_proto(digits(1))), timeout=10)):
                    try:
                        await call
                        extra.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as e:
                        extra.append((e.code(), e.details()))
                stream = stub.SampleStream(pb.SampleStreamRequest(sample=pb.SampleRequest(model=MODEL, n=5)))
                try:
                    [r async for r in stream]
                    extra.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as e:
                    extra.append((e.code(), e.details()))
                try:  # the Open Inference Protocol draws on the same server-wide budget
                    await oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(oip_decode(1), timeout=10)
                    extra.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as e:
                    extra.append((e.code(), e.details()))
                answers = await asyncio.gather(a, b)
                after = budget.held
                # a client that gives up: its rows are released when its deadline cancels the work
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Decode(pb.DecodeRequest(model=MODEL, z=to_proto(np.zeros((500, LATENT),
                                                                                        np.float32))),
                                      timeout=0.1)
                await until(lambda: budget.held == 0)
                return held, extra, answers, after, budget.held

        held, extra, answers, after, released = asyncio.run(scenario())
        assert held == 1000 and len(extra) == 4
        for got in extra:
            assert got != grpc.StatusCode.OK and got[0] == exhausted, got
            assert "max_queued_rows" in got[1] and "1000" in got[1] and "retry" in got[1], got
        assert len(answers) == 2 and after == 0 and released == 0
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = service_pb2_grpc.GenerativeServiceStub(channel)
            assert stub.Sample(pb.SampleRequest(model=MODEL, n=3, seed=1), timeout=10).samples.shape == [3, 8, 8]
        with pytest.raises(ValueError, match="max_queued_rows"):
            config(repo, max_queued_rows=100, max_rows_per_request=500, max_sample_n=500)


def test_message_size(repo: Path) -> None:
    """1 MiB messages: a larger request is refused by gRPC (RESOURCE_EXHAUSTED) without growing memory; an
    answer that would not fit is refused up front, pointing to SampleStream."""
    with BackgroundServer(config(repo, max_message_mb=1)) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=BIG_CHANNEL) as channel:
        stub = service_pb2_grpc.GenerativeServiceStub(channel)
        x = to_proto(digits(8192))  # 2 MiB
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        ll = lambda: stub.LogLikelihood(pb.LogLikelihoodRequest(model=MODEL, x=x), timeout=10)  # noqa: E731
        refused(ll, exhausted)
        chunks = lambda: iter([pb.LogLikelihoodRequest(model=MODEL, x=x)])  # noqa: E731
        refused(lambda: list(stub.LogLikelihoodStream(chunks(), timeout=10)), exhausted)
        refused(lambda: stub.Sample(pb.SampleRequest(model=MODEL, n=5000), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT, "n:", "MiB", "SampleStream")
        refused(lambda: list(stub.SampleStream(pb.SampleStreamRequest(sample=pb.SampleRequest(model=MODEL, n=10),
                                                                       chunk_size=5000), timeout=10)),
                grpc.StatusCode.INVALID_ARGUMENT, "chunk_size")
        no_growth(ll, exhausted, payload_mib=2.0)
        rows = sum(len(r.samples.data) // 256 for r in stub.SampleStream(
            pb.SampleStreamRequest(sample=pb.SampleRequest(model=MODEL, n=5000, seed=1)), timeout=60))
        assert rows == 5000  # the same answer in chunks fits


async def _batchers(srv: BackgroundServer) -> list:
    """Every batcher of MODEL's served versions (read on the server's loop)."""
    return list(srv.server.engine.get_model(MODEL).batchers.values())


def test_deadline_ceiling(repo: Path) -> None:
    """max_deadline_s = 0.3 and a batching window of 2 s: a request without a deadline, or with a longer one,
    ends after the ceiling with DEADLINE_EXCEEDED naming it, and its rows never run."""
    (repo / MODEL / "config.json").write_text('{"max_queue_delay_ms": 2000, "adaptive_batching": false}')
    with BackgroundServer(config(repo, max_deadline_s=0.3)) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = service_pb2_grpc.GenerativeServiceStub(channel)
        z = to_proto(np.zeros((3, LATENT), np.float32))
        ran = total(srv, "genserve_batch_size_rows_sum")
        for timeout in (None, 30.0):
            started = time.monotonic()
            message = refused(lambda t=timeout: stub.Decode(pb.DecodeRequest(model=MODEL, z=z), timeout=t),
                              grpc.StatusCode.DEADLINE_EXCEEDED, "max_deadline_s", "0.3 s")
            assert time.monotonic() - started > 0.25, message  # the ceiling, not the 2 s batching window
        stream = pb.SampleStreamRequest(sample=pb.SampleRequest(model=MODEL, n=10))
        refused(lambda: list(stub.SampleStream(stream)), grpc.StatusCode.DEADLINE_EXCEEDED, "max_deadline_s")
        refused(lambda: stub.Decode(pb.DecodeRequest(model=MODEL, z=z), timeout=0.1),
                grpc.StatusCode.DEADLINE_EXCEEDED)
        oip = oip_grpc.GRPCInferenceServiceStub(channel)
        started = time.monotonic()
        refused(lambda: oip.ModelInfer(oip_decode(3)), grpc.StatusCode.DEADLINE_EXCEEDED, "max_deadline_s", "0.3 s")
        assert time.monotonic() - started > 0.25
        # Expired requests left nothing queued (the 2 s window has not passed: had they stayed, they would wait)
        batchers = srv.call(_batchers(srv))
        assert all(b.queued_rows == 0 for b in batchers), "rows of expired requests stayed queued"
        assert total(srv, "genserve_batch_size_rows_sum") == ran, "rows of expired requests ran"
        assert srv.server.servicer.rows.held == 0
    with pytest.raises(ValueError, match="max_deadline_s"):
        config(repo, max_deadline_s=0)


def test_concurrent_rpcs(repo: Path) -> None:
    """max_concurrent_rpcs = 2: while two requests wait in a long batching window, a third is refused at once
    with RESOURCE_EXHAUSTED; once they are answered, requests are served again."""
    (repo / MODEL / "config.json").write_text('{"max_queue_delay_ms": 600, "max_batch_size": 4096, '
                                                 '"adaptive_batching": false}')
    with BackgroundServer(config(repo, max_concurrent_rpcs=2)) as srv:
        async def scenario() -> tuple:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
                stub = service_pb2_grpc.GenerativeServiceStub(channel)
                z = to_proto(np.zeros((1, LATENT), np.float32))
                held = [stub.Decode(pb.DecodeRequest(model=MODEL, z=z), timeout=10) for _ in range(2)]
                rows = srv.server.servicer.rows
                await until(lambda: rows.held == 2)  # both wait in the batching window
                try:
                    await stub.Decode(pb.DecodeRequest(model=MODEL, z=z), timeout=10)
                    third = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as e:
                    third = (e.code(), e.details())
                refused_while_held = not any(h.done() for h in held)
                answers = await asyncio.gather(*held)
                # gRPC frees a slot when it has finished with a call, a moment after the client has its answer
                deadline = time.monotonic() + 120
                while True:
                    try:
                        after = await stub.Decode(pb.DecodeRequest(model=MODEL, z=z), timeout=60)
                        break
                    except grpc.aio.AioRpcError as e:
                        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.05)
                return third, refused_while_held, answers, after

        third, refused_while_held, answers, after = asyncio.run(scenario())
    assert third[0] == grpc.StatusCode.RESOURCE_EXHAUSTED, third
    assert refused_while_held  # refused on arrival, not after waiting in the batching window
    assert all(a.x.shape == [1, 8, 8] for a in answers) and after.x.shape == [1, 8, 8]
    with pytest.raises(ValueError, match="max_concurrent_rpcs"):
        config(repo, max_concurrent_rpcs=0)


def test_work_under_the_ceiling_shares_one_timer_and_expires_in_order() -> None:
    """Work whose deadline is the server's ceiling (no client deadline, or a longer one) shares one timer per
    loop and ceiling: a unit that ends in time returns its result; units that run past the ceiling are cancelled
    with Expired (capped), each at its own deadline or later, in the order they began; a cancel from elsewhere
    stays a CancelledError; the task's cancel count is back to 0 after an expiry; and a thousand finished units
    behind one long unit leave the queue short. A client deadline shorter than the ceiling expires as not capped.
    A finished loop is not kept alive by its timers."""
    from genserve.server.limits import Ceiling, Expired, within

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert await within(asyncio.sleep(0, "done"), None, 0.2) == "done"
        assert await within(asyncio.sleep(0, "done"), 30.0, 0.2) == "done"  # a longer client deadline: capped

        expired: list[tuple[int, float]] = []

        async def runs_too_long(i: int) -> None:
            started = loop.time()
            with pytest.raises(Expired) as e:
                await within(asyncio.sleep(60), None, 0.2)
            assert e.value.capped
            assert asyncio.current_task().cancelling() == 0
            expired.append((i, loop.time() - started))

        first = asyncio.ensure_future(runs_too_long(0))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(runs_too_long(1))
        assert await within(asyncio.sleep(0.01, "in time"), None, 0.2) == "in time"  # between the two
        await asyncio.gather(first, second)
        assert [i for i, _ in expired] == [0, 1] and all(waited >= 0.19 for _, waited in expired)

        cancelled = asyncio.ensure_future(within(asyncio.sleep(60), None, 60.0))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled

        held = asyncio.Event()
        long = asyncio.ensure_future(within(held.wait(), None, 60.0))
        await asyncio.sleep(0)
        for _ in range(1000):
            await within(asyncio.sleep(0), None, 60.0)
        ceiling = Ceiling.of(60.0)
        assert ceiling.running == 1 and len(ceiling.entries) <= 2 * ceiling.running + 65
        held.set()
        assert await long is True
        assert ceiling.running == 0

        with pytest.raises(Expired) as client:
            await within(asyncio.sleep(60), 0.05, 60.0)
        assert not client.value.capped

    loops = []

    async def on_a_loop() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        await main()

    asyncio.run(on_a_loop())
    asyncio.run(on_a_loop())  # a second loop gets its own timers
    gc.collect()
    assert loops[0]() is None, "the shared timers kept a finished event loop alive"
