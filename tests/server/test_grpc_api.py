"""The gRPC API end to end: a real server on loopback, the generated stubs, the export reference numbers.

Every operation of every model in the test repository must give the numbers of the family's program run
straight on ONNX Runtime (``DirectRunner``) with the same seed; concurrent requests must be merged by the
batcher (the batch-size histogram sees batches > 1) and still answer exactly what they answer alone.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from supervised import Supervised

from genserve.core.manifest import OPERATION_NAME, read_manifest, spec_from_proto
from genserve.core.noise import Noise
from genserve.core.tensors import from_proto, to_proto
from genserve.server.app import BackgroundServer, grpc_options
from genserve.server.programs import program_from_manifest
from genserve.server.programs.base import run_sync
from genserve.server.servicer import STREAM_BLOCK_ROWS, block_seed
from genserve.server.sessions import DirectRunner, SessionOptions
from genserve.v1 import manifest_pb2, service_pb2, service_pb2_grpc

SEED = 1234


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[1, 2], ids=["1 process", "2 processes"])
def server(repo_dir: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The same server in one process, and as `genserve serve --processes 2` (issue 17: every API test runs
    against both; a channel's calls all reach one of the two workers)."""
    from genserve.server.config import ServerConfig

    if request.param == 2:
        log = tmp_path_factory.mktemp("processes") / "server.log"
        with Supervised(repo_dir, log, "--max-batch-size", "64", "--max-queue-delay-ms", "2") as srv:
            yield srv
        return
    cfg = ServerConfig(repo=repo_dir, port=0, metrics_port=free_port(), provider="cpu", max_batch_size=64,
                       max_queue_delay_ms=2.0, workers=2, grace_s=5.0)
    with BackgroundServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: BackgroundServer):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=grpc_options(64))
    yield service_pb2_grpc.GenerativeServiceStub(channel)
    channel.close()


class Reference:
    """One model version run the export station's way: its program over ONNX Runtime, no batching."""

    def __init__(self, version_dir: Path) -> None:
        self.manifest = read_manifest(version_dir / "manifest.json")
        self.spec = spec_from_proto(self.manifest.data)
        self.program = program_from_manifest(self.manifest)
        self.runner = DirectRunner.from_files({g.name: version_dir / g.file for g in self.manifest.graphs},
                                              SessionOptions(provider="cpu"))
        self.operations = {OPERATION_NAME[op] for op in self.manifest.operations}

    def sample(self, n: int, seed: int):
        temperature = float(self.manifest.parameters.get("temperature", 1.0))
        return run_sync(self.program.sample(self.runner, n, Noise(seed), temperature=temperature))

    def log_likelihood(self, x: np.ndarray, seed: int) -> np.ndarray:
        return run_sync(self.program.log_likelihood(self.runner, x, Noise(seed)))

    def encode(self, x: np.ndarray, seed: int) -> np.ndarray:
        return run_sync(self.program.encode(self.runner, x, Noise(seed)))

    def decode(self, z: np.ndarray, seed: int) -> np.ndarray:
        return run_sync(self.program.decode(self.runner, z, Noise(seed)))


def latest(repo: Path, name: str) -> Path:
    return max((p for p in (repo / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def data_rows(stub, name: str, n: int, seed: int = 7) -> np.ndarray:
    """In-domain examples: the model's own samples (every family here can sample)."""
    return from_proto(stub.Sample(service_pb2.SampleRequest(model=name, n=n, seed=seed)).samples)


def metric_samples(port: int) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


# ----------------------------------------------------------------------------------------------------------
# metadata


def test_list_and_get_model_describe_the_repository(stub, repo_dir: Path, repo_models: list[str]) -> None:
    listed = stub.ListModels(service_pb2.ListModelsRequest()).models
    assert [m.name for m in listed] == repo_models
    for summary in listed:
        manifest = read_manifest(latest(repo_dir, summary.name) / "manifest.json")
        assert summary.state == service_pb2.MODEL_STATE_READY, summary.message
        assert summary.default_version == manifest.version and manifest.version in summary.versions
        assert (summary.family, summary.model) == (manifest.family, manifest.model)
        assert list(summary.operations) == list(manifest.operations)
        info = stub.GetModel(service_pb2.GetModelRequest(model=summary.name))
        assert info.version == info.default_version == manifest.version
        assert info.manifest == manifest  # the manifest travels unchanged
        assert info.providers == ["CPUExecutionProvider"]
        assert info.serving.max_batch_size >= 1 and info.serving.HasField("max_queue_delay_ms")
        named = stub.GetModel(service_pb2.GetModelRequest(model=summary.name, version=manifest.version))
        assert named.manifest == manifest


def test_health_overall_and_per_model(server: BackgroundServer, repo_models: list[str]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "genserve.v1.GenerativeService", *repo_models]:
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(server: BackgroundServer) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"genserve.v1.GenerativeService", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)
        service = pool.FindServiceByName("genserve.v1.GenerativeService")
        methods = {m.name: m for m in service.methods}
        assert methods["Sample"].output_type.full_name == "genserve.v1.SampleResponse"
        stream = methods["LogLikelihoodStream"]
        assert stream.client_streaming and stream.server_streaming
        assert pool.FindMessageTypeByName("genserve.v1.ModelManifest").fields_by_name["operations"]


# ----------------------------------------------------------------------------------------------------------
# every operation of every model: the export reference numbers


def test_every_operation_gives_the_reference_numbers(stub, repo_dir: Path, repo_models: list[str]) -> None:
    checked = []
    for name in repo_models:
        ref = Reference(latest(repo_dir, name))
        n = 5
        if "sample" in ref.operations:
            got = stub.Sample(service_pb2.SampleRequest(model=name, n=n, seed=SEED, return_latents=True))
            want = ref.sample(n, SEED)
            assert got.seed == SEED and got.model_version == ref.manifest.version
            np.testing.assert_array_equal(from_proto(got.samples), want.x, err_msg=f"{name} samples")
            assert from_proto(got.samples).shape == (n, *ref.spec.shape)
            if want.latents is not None:
                np.testing.assert_array_equal(from_proto(got.latents), want.latents,
                                              err_msg=f"{name} latents")
            checked.append((name, "sample"))
        x = data_rows(stub, name, 6) if "sample" in ref.operations else None
        if "log_likelihood" in ref.operations:
            got = stub.LogLikelihood(service_pb2.LogLikelihoodRequest(model=name, x=to_proto(x), seed=SEED))
            want = ref.log_likelihood(x, SEED)
            lp = from_proto(got.log_prob)
            assert lp.dtype == np.float64 and lp.shape == (len(x),)
            np.testing.assert_allclose(lp, want, rtol=1e-6, atol=1e-5, err_msg=f"{name} log_prob")
            assert got.kind == ref.manifest.capabilities.likelihood
            if got.kind == manifest_pb2.LIKELIHOOD_KIND_UNNORMALIZED:
                assert not got.HasField("bits_per_dim")
            else:
                np.testing.assert_allclose(from_proto(got.bits_per_dim), -lp / (ref.spec.dim * math.log(2)),
                                           rtol=1e-9, err_msg=f"{name} bits/dim")
            checked.append((name, "log_likelihood"))
        if "encode" in ref.operations:
            got = stub.Encode(service_pb2.EncodeRequest(model=name, x=to_proto(x), seed=SEED))
            np.testing.assert_allclose(from_proto(got.z), ref.encode(x, SEED), rtol=1e-6, atol=1e-6,
                                       err_msg=f"{name} encode")
            checked.append((name, "encode"))
        if "decode" in ref.operations:
            latent = ref.manifest.parameters.get("latent_dim")
            z = Noise(3).normal(4, *((int(latent),) if latent else ref.spec.shape))
            got = stub.Decode(service_pb2.DecodeRequest(model=name, z=to_proto(z), seed=SEED))
            np.testing.assert_allclose(from_proto(got.x), ref.decode(z, SEED), rtol=1e-6, atol=1e-5,
                                       err_msg=f"{name} decode")
            checked.append((name, "decode"))
    assert ("digits-ppca", "log_likelihood") in checked and ("digits-ppca", "decode") in checked


def test_unset_seed_is_drawn_and_returned_so_the_answer_reproduces(stub) -> None:
    first = stub.Sample(service_pb2.SampleRequest(model="digits-ppca", n=4))
    again = stub.Sample(service_pb2.SampleRequest(model="digits-ppca", n=4, seed=first.seed))
    other = stub.Sample(service_pb2.SampleRequest(model="digits-ppca", n=4))
    assert first.seed != other.seed
    np.testing.assert_array_equal(from_proto(first.samples), from_proto(again.samples))
    x = from_proto(first.samples)
    a = stub.LogLikelihood(service_pb2.LogLikelihoodRequest(model="digits-ppca", x=to_proto(x)))
    b = stub.LogLikelihood(service_pb2.LogLikelihoodRequest(model="digits-ppca", x=to_proto(x), seed=a.seed))
    np.testing.assert_array_equal(from_proto(a.log_prob), from_proto(b.log_prob))


def test_integer_data_is_accepted_and_scored_like_float(stub) -> None:
    x = data_rows(stub, "digits-ppca", 3)
    as_float = stub.LogLikelihood(service_pb2.LogLikelihoodRequest(model="digits-ppca", x=to_proto(x),
                                                                    seed=1))
    as_int = stub.LogLikelihood(service_pb2.LogLikelihoodRequest(model="digits-ppca",
                                                                  x=to_proto(x.astype(np.int64)), seed=1))
    np.testing.assert_array_equal(from_proto(as_float.log_prob), from_proto(as_int.log_prob))


# ----------------------------------------------------------------------------------------------------------
# streams


def test_sample_stream_rows_depend_on_seed_not_chunk_size(stub) -> None:
    n = 2 * STREAM_BLOCK_ROWS + 37

    def stream(chunk: int) -> tuple[np.ndarray, np.ndarray, list]:
        req = service_pb2.SampleStreamRequest(
            sample=service_pb2.SampleRequest(model="digits-ppca", n=n, seed=SEED, return_latents=True),
            chunk_size=chunk)
        parts = list(stub.SampleStream(req))
        assert [p.offset for p in parts] == list(np.cumsum([0] + [p.samples.shape[0] for p in parts[:-1]]))
        assert all(p.seed == SEED for p in parts)
        return (np.concatenate([from_proto(p.samples) for p in parts]),
                np.concatenate([from_proto(p.latents) for p in parts]), parts)

    x100, z100, parts = stream(100)
    assert [p.samples.shape[0] for p in parts] == [100] * 5 + [n - 500]
    x_default, z_default, _ = stream(0)
    x_big, _, big = stream(n + 5)
    assert len(big) == 1
    np.testing.assert_array_equal(x100, x_default)
    np.testing.assert_array_equal(x100, x_big)
    np.testing.assert_array_equal(z100, z_default)
    # Block k is exactly a unary Sample of that block's rows with block_seed(seed, k).
    for k, rows in enumerate([STREAM_BLOCK_ROWS, STREAM_BLOCK_ROWS, 37]):
        unary = stub.Sample(service_pb2.SampleRequest(model="digits-ppca", n=rows, seed=block_seed(SEED, k)))
        np.testing.assert_array_equal(from_proto(unary.samples), x100[k * STREAM_BLOCK_ROWS:][:rows])
    assert block_seed(SEED, 0) == SEED and len({block_seed(SEED, k) for k in range(50)}) == 50


def test_log_likelihood_stream_answers_each_chunk_in_order(server: BackgroundServer, stub) -> None:
    x = data_rows(stub, "digits-ppca", 40)
    chunks = [(cid, x[i:i + 7]) for cid, i in zip(range(100, 200), range(0, 40, 7), strict=False)]
    want = [from_proto(stub.LogLikelihood(service_pb2.LogLikelihoodRequest(
        model="digits-ppca", x=to_proto(c), seed=cid)).log_prob) for cid, c in chunks]

    async def run() -> list:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            aio = service_pb2_grpc.GenerativeServiceStub(channel)
            call = aio.LogLikelihoodStream()
            got = []
            # Pipelined: all chunks are written before the first answer is read.
            for cid, c in chunks:
                await call.write(service_pb2.LogLikelihoodRequest(model="digits-ppca", x=to_proto(c),
                                                                  seed=cid, chunk_id=cid))
            await call.done_writing()
            async for response in call:
                got.append(response)
            return got

    got = asyncio.run(run())
    assert [r.chunk_id for r in got] == [cid for cid, _ in chunks]
    for r, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(from_proto(r.log_prob), w)


# ----------------------------------------------------------------------------------------------------------
# batching


def batch_size_histogram(port: int) -> tuple[float, float]:
    """(number of graph calls, number of calls with one row) summed over models and graphs."""
    samples = [s for s in metric_samples(port) if s.name.startswith("genserve_batch_size_rows")]
    count = sum(s.value for s in samples if s.name == "genserve_batch_size_rows_count")
    ones = sum(s.value for s in samples
               if s.name == "genserve_batch_size_rows_bucket" and float(s.labels["le"]) == 1.0)
    return count, ones


def test_64_concurrent_requests_are_merged_and_equal_their_unbatched_twins(server: BackgroundServer,
                                                                           stub) -> None:
    """64 LogLikelihood and 64 Sample requests sent at once answer exactly what each answers alone, and some of
    them share graph calls. On a starved machine the server may read a burst one request at a time (each then
    runs alone, by design), so bursts are sent until one merges, within a generous deadline; every burst's
    answers are checked."""
    x = data_rows(stub, "digits-ppca", 64)
    alone = [from_proto(stub.LogLikelihood(service_pb2.LogLikelihoodRequest(
        model="digits-ppca", x=to_proto(x[i:i + 1]), seed=i)).log_prob) for i in range(64)]
    alone_samples = [from_proto(stub.Sample(service_pb2.SampleRequest(
        model="digits-ppca", n=1, seed=i)).samples) for i in range(64)]

    async def run() -> tuple[list, list]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            aio = service_pb2_grpc.GenerativeServiceStub(channel)
            scored = asyncio.gather(*[aio.LogLikelihood(service_pb2.LogLikelihoodRequest(
                model="digits-ppca", x=to_proto(x[i:i + 1]), seed=i)) for i in range(64)])
            sampled = asyncio.gather(*[aio.Sample(service_pb2.SampleRequest(model="digits-ppca", n=1, seed=i))
                                       for i in range(64)])
            return await scored, await sampled

    deadline = time.monotonic() + 120.0
    while True:
        calls_before, ones_before = batch_size_histogram(server.metrics_port)
        scored, sampled = asyncio.run(run())
        for i in range(64):
            np.testing.assert_array_equal(from_proto(scored[i].log_prob), alone[i])
            np.testing.assert_array_equal(from_proto(sampled[i].samples), alone_samples[i])
        calls_after, ones_after = batch_size_histogram(server.metrics_port)
        calls, ones = calls_after - calls_before, ones_after - ones_before
        if calls < 128 or time.monotonic() > deadline:
            break
    assert calls > ones, f"{calls} graph calls for 128 concurrent one-row requests, all of one row"
    assert calls < 128, f"{calls} graph calls for 128 concurrent one-row requests: nothing merged"


def test_request_metrics_carry_model_method_and_code(server: BackgroundServer, stub) -> None:
    with pytest.raises(grpc.RpcError):
        stub.Sample(service_pb2.SampleRequest(model="digits-ppca", n=0))
    stub.Sample(service_pb2.SampleRequest(model="digits-ppca", n=1))
    requests = {(s.labels.get("model"), s.labels.get("method"), s.labels.get("code")): s.value
                for s in metric_samples(server.metrics_port) if s.name == "genserve_requests_total"}
    assert requests.get(("digits-ppca", "Sample", "OK"), 0) >= 1
    assert requests.get(("digits-ppca", "Sample", "INVALID_ARGUMENT"), 0) >= 1
