"""Every API error answers its status code with a message that says what to fix, and the server goes on.

Each case is sent to a real server through the generated stub; after every failure a valid request must be
answered, so no error leaves the server (or the batcher) in a bad state.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from supervised import serving

from genserve.core.manifest import OPERATION_NAME, read_manifest
from genserve.core.tensors import from_proto, to_proto
from genserve.server.app import BackgroundServer, grpc_options
from genserve.server.interface import SampleRequest, SampleResult
from genserve.v1 import manifest_pb2, service_pb2, service_pb2_grpc

pb = service_pb2


@pytest.fixture(scope="module", params=[1, 2], ids=["1 process", "2 processes"])
def server(repo_dir: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One process, and `genserve serve --processes 2` with the same settings (issue 17)."""
    from genserve.server.config import ServerConfig

    cfg = ServerConfig(repo=repo_dir, port=0, metrics_port=0, provider="cpu", max_queue_delay_ms=2.0,
                       workers=2, max_sample_n=1000, max_rows_per_request=500, max_langevin_steps=50,
                       max_importance_samples=20, max_message_mb=4)
    with serving(cfg, request.param, tmp_path_factory.mktemp("processes") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: BackgroundServer):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield service_pb2_grpc.GenerativeServiceStub(channel)


def models_that_cannot(repo_dir: Path, operation: str) -> list[str]:
    out = []
    for model in sorted(p for p in repo_dir.iterdir() if p.is_dir()):
        version = max((v for v in model.iterdir() if v.name.isdigit()), key=lambda v: int(v.name))
        ops = {OPERATION_NAME[op] for op in read_manifest(version / "manifest.json").operations}
        if operation not in ops:
            out.append(model.name)
    return out


def latent(repo_dir: Path, rows: int = 1) -> np.ndarray:
    manifest = read_manifest(repo_dir / "digits-ppca" / "1" / "manifest.json")
    return np.zeros((rows, int(manifest.parameters["latent_dim"])), np.float32)


def digits(rows: int = 2) -> np.ndarray:
    return np.tile(np.arange(64, dtype=np.float32) % 17, (rows, 1)).reshape(rows, 8, 8)


def expect(stub, method: str, request, code: grpc.StatusCode, *words: str) -> str:
    """Send a request that must fail with ``code`` and a message containing ``words``; then a valid one."""
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, method)(request, timeout=30)
    message = e.value.details() or ""
    assert e.value.code() == code, f"{method}: {e.value.code()} {message}"
    for word in words:
        assert word.lower() in message.lower(), f"{method}: {word!r} not in {message!r}"
    valid = pb.LogLikelihoodRequest(model="digits-ppca", x=to_proto(digits(1)), seed=1)
    ok = stub.LogLikelihood(valid, timeout=30)
    assert np.isfinite(from_proto(ok.log_prob)).all()
    return message


def test_unknown_model_or_version_is_not_found(stub) -> None:
    msg = expect(stub, "Sample", pb.SampleRequest(model="no-such-model", n=1), grpc.StatusCode.NOT_FOUND,
                 "no-such-model")
    assert "digits-ppca" in msg or "ListModels" in msg  # says what exists
    expect(stub, "Sample", pb.SampleRequest(model="digits-ppca", version=99, n=1), grpc.StatusCode.NOT_FOUND,
           "99")
    expect(stub, "GetModel", pb.GetModelRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "nope")
    expect(stub, "LogLikelihood", pb.LogLikelihoodRequest(model="nope", x=to_proto(digits())),
           grpc.StatusCode.NOT_FOUND)


def test_missing_name_and_negative_version_are_invalid(stub) -> None:
    expect(stub, "Sample", pb.SampleRequest(n=1), grpc.StatusCode.INVALID_ARGUMENT, "model")
    expect(stub, "GetModel", pb.GetModelRequest(), grpc.StatusCode.INVALID_ARGUMENT, "model")
    expect(stub, "Sample", pb.SampleRequest(model="digits-ppca", version=-1, n=1),
           grpc.StatusCode.INVALID_ARGUMENT, "version")


def test_operation_the_family_lacks_is_failed_precondition_naming_what_it_can_do(stub, repo_dir: Path
                                                                                 ) -> None:
    cases = [(name, "LogLikelihood", pb.LogLikelihoodRequest(model=name, x=to_proto(digits())))
             for name in models_that_cannot(repo_dir, "log_likelihood")]
    cases += [(name, "Encode", pb.EncodeRequest(model=name, x=to_proto(digits())))
              for name in models_that_cannot(repo_dir, "encode")]
    assert cases, "the test repository lost its GAN and EBM: no model lacks an operation"
    for name, method, request in cases:
        message = expect(stub, method, request, grpc.StatusCode.FAILED_PRECONDITION)
        assert "sample" in message, f"{name} {method}: name what the model can do: {message}"


@pytest.mark.parametrize("x, words", [
    (np.zeros((2, 8, 7), np.float32), ["shape", "8"]),
    (np.zeros((8, 8), np.float32), ["batch"]),
    (np.zeros((2, 64), np.float32), ["shape"]),
    (np.zeros((2, 8, 8), bool), ["dtype"]),
    (np.where(np.eye(8, dtype=bool), np.nan, 1.0).astype(np.float32)[None], ["nan"]),
    (np.full((1, 8, 8), np.inf, np.float32), ["infinite"]),
    (np.full((1, 8, 8), 17.0, np.float32), ["17", "0..16"]),
    (np.full((1, 8, 8), -1.0, np.float32), ["-1"]),
    (np.full((1, 8, 8), 2.5, np.float32), ["2.5"]),
    (np.zeros((0, 8, 8), np.float32), ["empty"]),
], ids=["shape", "no-batch", "flat", "bool", "nan", "inf", "above", "below", "non-integer", "empty"])
def test_bad_data_is_invalid_argument(stub, x: np.ndarray, words: list[str]) -> None:
    request = pb.LogLikelihoodRequest(model="digits-ppca", x=to_proto(x))
    message = expect(stub, "LogLikelihood", request, grpc.StatusCode.INVALID_ARGUMENT, *words)
    assert message.startswith("x") or " x " in message or "x has" in message, message
    expect(stub, "Encode", pb.EncodeRequest(model="digits-ppca", x=to_proto(x)),
           grpc.StatusCode.INVALID_ARGUMENT)


def test_malformed_tensors_name_the_field(stub) -> None:
    bad = [
        (pb.Tensor(shape=[1, 8, 8], dtype="float32", data=b"\0" * 10), "bytes"),
        (pb.Tensor(shape=[1, 8, 8], dtype="complex64", data=b""), "dtype"),
        (pb.Tensor(shape=[1, -8, 8], dtype="float32", data=b""), "negative"),
        (pb.Tensor(shape=[], dtype="float32", data=b"\0" * 4), "scalar"),
    ]
    for tensor, word in bad:
        msg = expect(stub, "LogLikelihood", pb.LogLikelihoodRequest(model="digits-ppca", x=tensor),
                     grpc.StatusCode.INVALID_ARGUMENT, word)
        assert msg.startswith("x: "), msg
    msg = expect(stub, "LogLikelihood", pb.LogLikelihoodRequest(model="digits-ppca"),
                 grpc.StatusCode.INVALID_ARGUMENT, "missing")
    assert msg.startswith("x: ")
    msg = expect(stub, "Decode", pb.DecodeRequest(model="digits-ppca", z=pb.Tensor(shape=[2], dtype="f4")),
                 grpc.StatusCode.INVALID_ARGUMENT, "dtype")
    assert msg.startswith("z: ")
    expect(stub, "Decode", pb.DecodeRequest(model="digits-ppca", z=to_proto(np.zeros((2, 999), np.float32))),
           grpc.StatusCode.INVALID_ARGUMENT, "z")


def test_n_and_row_limits_are_invalid_argument(stub) -> None:
    for n in (0, -5):
        expect(stub, "Sample", pb.SampleRequest(model="digits-ppca", n=n), grpc.StatusCode.INVALID_ARGUMENT,
               "n:", "at least 1")
    expect(stub, "Sample", pb.SampleRequest(model="digits-ppca", n=1001), grpc.StatusCode.INVALID_ARGUMENT,
           "1001", "1000")
    stream = pb.SampleStreamRequest(sample=pb.SampleRequest(model="digits-ppca", n=0))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.SampleStream(stream))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sample.n" in e.value.details()
    expect(stub, "LogLikelihood", pb.LogLikelihoodRequest(model="digits-ppca", x=to_proto(digits(501))),
           grpc.StatusCode.INVALID_ARGUMENT, "501", "500", "LogLikelihoodStream")
    expect(stub, "Sample", pb.SampleRequest(model="digits-ppca", n=1, seed=2**64 - 1),
           grpc.StatusCode.INVALID_ARGUMENT, "seed")


def test_bad_options_are_invalid_argument(stub) -> None:
    for t in (0.0, -1.0, float("nan"), float("inf"), 1e9):
        expect(stub, "Sample", pb.SampleRequest(model="digits-ppca", n=1, temperature=t),
               grpc.StatusCode.INVALID_ARGUMENT, "temperature")


def test_message_limit_points_to_streaming(stub, server: BackgroundServer) -> None:
    # This server's messages are limited to 4 MiB; 20000 images are 5 MiB.
    big = pb.LogLikelihoodRequest(model="digits-ppca", x=pb.Tensor(shape=[20000, 8, 8], dtype="float32",
                                                                     data=b"\0" * (20000 * 64 * 4)))
    with pytest.raises(grpc.RpcError) as e:
        stub.LogLikelihood(big, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # refused by gRPC's receive limit
    with pytest.raises(grpc.RpcError) as e:
        list(stub.SampleStream(pb.SampleStreamRequest(sample=pb.SampleRequest(model="digits-ppca", n=10),
                                                      chunk_size=10**6)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk_size" in e.value.details()


def test_a_failing_stream_chunk_ends_the_stream_with_its_status(stub) -> None:
    def chunks():
        yield pb.LogLikelihoodRequest(model="digits-ppca", x=to_proto(digits(2)), chunk_id=1)
        yield pb.LogLikelihoodRequest(model="digits-ppca", x=to_proto(digits(2)[:, :7]), chunk_id=2)
        yield pb.LogLikelihoodRequest(model="digits-ppca", x=to_proto(digits(2)), chunk_id=3)

    got = []
    with pytest.raises(grpc.RpcError) as e:
        for response in stub.LogLikelihoodStream(chunks()):
            got.append(response.chunk_id)
    assert got == [1]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape" in e.value.details()


class ExplodingEngine:
    """A stand-in engine (genserve.server.interface.EngineInterface) whose operations hit a bug: the transport
    must answer INTERNAL and keep serving."""

    metrics = None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def list_models(self) -> list:
        return []

    def ready(self, name: str | None = None) -> bool:
        return True

    def get_model(self, name: str, version: int = 0) -> SimpleNamespace:
        return SimpleNamespace(name=name, version=1,
                               manifest=manifest_pb2.ModelManifest(data=manifest_pb2.DataSpec(shape=[2])))

    def resolve(self, name: str, version: int, operation: str) -> SimpleNamespace:
        return self.get_model(name, version)

    def admit(self, request: SampleRequest) -> None: ...

    async def sample(self, request: SampleRequest) -> SampleResult:
        if request.model.name == "bug":
            raise ZeroDivisionError("a bug deep inside")
        return SampleResult(np.zeros((request.n, 2), np.float32), None, 1)


# One process only: it serves a fake in-process engine and reads the server's log records through caplog.
def test_an_unexpected_exception_is_internal_with_a_short_message(caplog: pytest.LogCaptureFixture) -> None:
    from genserve.server.config import ServerConfig

    cfg = ServerConfig(repo=Path("."), port=0, metrics_port=0)
    with BackgroundServer(cfg, engine=ExplodingEngine()) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = service_pb2_grpc.GenerativeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Sample(pb.SampleRequest(model="bug", n=1, seed=1))
        assert e.value.code() == grpc.StatusCode.INTERNAL
        details = e.value.details()
        assert "ZeroDivisionError" in details and "a bug deep inside" not in details and len(details) < 200
        rid = details.split("request id ")[1].split()[0]
        logged = [r for r in caplog.records if rid in r.getMessage()]
        assert logged and logged[0].exc_info is not None, "the traceback must be in the server log"
        assert from_proto(stub.Sample(pb.SampleRequest(model="ok", n=3, seed=1)).samples).shape == (3, 2)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


async def _batchers(srv: BackgroundServer, name: str) -> list:
    """The batchers of the model's default version (read on the server's loop)."""
    return list(srv.server.engine.get_model(name).batchers.values())


# One process only: it waits on the batcher's queued_rows, an in-process counter a subprocess cannot show.
def test_full_queue_is_resource_exhausted_and_deadlines_drop_rows(repo_copy: Path) -> None:
    """While one large graph call runs, a tiny queue (the model's config.json: at most 4 waiting requests)
    overflows into RESOURCE_EXHAUSTED, and a request whose deadline passes in the queue never runs."""
    from genserve.server.config import ServerConfig

    name = "digits-realnvp"  # the slowest decoder in the test repository: ~0.1 ms per row on one thread
    assert (repo_copy / name).is_dir(), f"{name} is missing from the test repository"
    (repo_copy / name / "config.json").write_text('{"max_queue_size": 4, "max_batch_size": 8192}')
    dim = int(read_manifest(repo_copy / name / "1" / "manifest.json").parameters["latent_dim"])
    # 20000 rows: a call that runs for a second or more even on a fast, quiet machine (4000 rows once finished
    # before the late request arrived)
    big, small = np.zeros((20000, dim), np.float32), np.zeros((1, dim), np.float32)
    cfg = ServerConfig(repo=repo_copy, port=0, metrics_port=free_port(), provider="cpu", workers=1)
    with BackgroundServer(cfg) as srv:
        rows_run = lambda: metric(srv.metrics_port, "genserve_batch_size_rows_sum")  # noqa: E731

        async def scenario() -> tuple:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}", options=grpc_options(64)) as channel:
                aio = service_pb2_grpc.GenerativeServiceStub(channel)
                slow = aio.Decode(pb.DecodeRequest(model=name, z=to_proto(big)))
                # The first 8192-row call of it is running once the rest of its rows wait in the queue.
                batchers = srv.call(_batchers(srv, name))
                while not any(0 < b.queued_rows < len(big) for b in batchers):
                    await asyncio.sleep(0.001)
                late = aio.Decode(pb.DecodeRequest(model=name, z=to_proto(small)), timeout=0.05)
                flood = [aio.Decode(pb.DecodeRequest(model=name, z=to_proto(small))) for _ in range(12)]
                return await asyncio.gather(slow, late, *flood, return_exceptions=True)

        before = rows_run()
        slow, late, *flood = asyncio.run(scenario())
        assert not isinstance(slow, BaseException), slow
        assert isinstance(late, grpc.aio.AioRpcError), late
        assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED, late
        codes = [r.code() if isinstance(r, grpc.RpcError) else grpc.StatusCode.OK for r in flood]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        refused = next(r for r in flood if isinstance(r, grpc.RpcError))
        details = refused.details().lower()
        assert "queue" in details and "retry" in details, details
        # One more request through the same queue: answered after every call queued before it (one instance,
        # first in first out; a call's metrics are recorded before its answers go out).
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            ok = service_pb2_grpc.GenerativeServiceStub(channel).Decode(pb.DecodeRequest(model=name,
                                                                                          z=to_proto(small)))
            assert from_proto(ok.x).shape == (1, 8, 8)
        # Every row that ran belongs to an answered request: the expired request's row was dropped.
        assert rows_run() - before == len(big) + codes.count(grpc.StatusCode.OK) + 1
