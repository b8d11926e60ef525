"""The Python client against the real server: every method, streams against unary calls, errors, retries,
TLS and token, round-robin over two servers, and the asyncio twin.

The server's promises checked here (protos/genserve/v1/service.proto, server/servicer.py): the same seed gives
the same answer; SampleStream rows depend only on (n, seed) and a stream of n <= 256 rows equals Sample;
LogLikelihoodStream answers each chunk exactly as LogLikelihood answers it alone.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from genserve.clients.client import (
    UNARY_SAMPLE_MAX,
    AsyncClient,
    Client,
    GenserveError,
    chunk_seed,
)
from genserve.core.tensors import from_proto, to_proto
from genserve.v1 import service_pb2, service_pb2_grpc

DIGITS = "digits-ppca"  # discrete 8x8 images, dequantised lower bound: scores depend on the seed
MOONS = "moons-ppca"  # continuous 2-D rows, exact Gaussian likelihood: scores do not depend on the seed


def digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, size=(n, 8, 8)).astype(np.float32)


def moons(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.5, 0.7, size=(n, 2)).astype(np.float32)


# -- metadata ---------------------------------------------------------------------------------------------


def test_models_and_info_describe_the_repository(client: Client, repo_dir: Path) -> None:
    models = {m.name: m for m in client.models()}
    on_disk = sorted(p.name for p in repo_dir.iterdir() if p.is_dir())
    assert sorted(models) == on_disk
    ppca = models[DIGITS]
    assert ppca.state == "READY" and ppca.versions == (1,) and ppca.default_version == 1
    assert set(ppca.operations) == {"sample", "log_likelihood", "encode", "decode"}

    info = client.info(DIGITS)
    assert (info.name, info.version, info.model) == (DIGITS, 1, "ppca")
    assert info.spec.shape == (8, 8) and info.spec.levels == 17 and info.spec.discrete
    assert info.likelihood == "lower_bound"  # dequantisation bound on the integer image's log-probability
    assert info.parameters["latent_dim"] >= 1
    assert info.providers == ("CPUExecutionProvider",)
    assert info.to_dict()["manifest"]["name"] == DIGITS
    assert client.info(MOONS).likelihood == "exact" and client.info(MOONS).spec.shape == (2,)


def test_health_of_server_and_models(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health(DIGITS) == "SERVING"
    with pytest.raises(GenserveError) as e:
        client.health("no-such-model")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_health_without_grpcio_health_checking(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare client install has no grpc_health: health() writes the two tiny messages itself."""
    for name in ("grpc_health", "grpc_health.v1", "grpc_health.v1.health_pb2"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import grpc_health...` fail
    with Client(target) as bare:
        assert bare.health() == "SERVING"
        assert bare.health(MOONS) == "SERVING"


# -- sampling ---------------------------------------------------------------------------------------------


def test_sample_is_reproducible_and_in_the_data_domain(client: Client) -> None:
    a = client.sample(DIGITS, 40, seed=7)
    assert a.shape == (40, 8, 8) and a.dtype == np.float32
    assert np.array_equal(a, np.clip(np.round(a), 0, 16))  # integer grey levels 0..16
    assert np.array_equal(a, client.sample(DIGITS, 40, seed=7))
    assert not np.array_equal(a, client.sample(DIGITS, 40, seed=8))
    # temperature scales the Gaussian noise: colder samples spread less around the mean image
    hot = client.sample(MOONS, 2000, seed=1, temperature=1.0)
    cold = client.sample(MOONS, 2000, seed=1, temperature=0.3)
    assert cold.std(axis=0).sum() < 0.6 * hot.std(axis=0).sum()


def test_sample_with_latents(client: Client) -> None:
    x, z = client.sample(DIGITS, 12, seed=3, return_latents=True)
    latent_dim = int(client.info(DIGITS).parameters["latent_dim"])
    assert x.shape == (12, 8, 8) and z.shape == (12, latent_dim)
    x2, z2 = client.sample(DIGITS, 12, seed=3, return_latents=True)
    assert np.array_equal(x, x2) and np.array_equal(z, z2)


def test_small_sample_equals_a_stream_of_the_same_seed(client: Client) -> None:
    n = 200
    assert n <= UNARY_SAMPLE_MAX
    unary = client.sample(DIGITS, n, seed=11)
    chunks = list(client.sample_chunks(DIGITS, n, seed=11, chunk_size=64))
    assert [offset for offset, _, _ in chunks] == [0, 64, 128, 192]
    assert np.array_equal(np.concatenate([x for _, x, _ in chunks]), unary)


def test_large_sample_streams_and_does_not_depend_on_chunk_size(client: Client) -> None:
    n = 3 * UNARY_SAMPLE_MAX + 17
    x, z = client.sample(DIGITS, n, seed=5, return_latents=True)
    assert x.shape == (n, 8, 8) and len(z) == n
    again = np.concatenate([c for _, c, _ in client.sample_chunks(DIGITS, n, seed=5, chunk_size=100)])
    assert np.array_equal(x, again)
    # one stream, not n identical rows: blocks of the stream carry different noise
    assert not np.array_equal(x[:UNARY_SAMPLE_MAX], x[UNARY_SAMPLE_MAX:2 * UNARY_SAMPLE_MAX])


def test_sample_stream_can_be_abandoned(private_target: str) -> None:
    with Client(private_target, timeout=10) as client:
        chunks = client.sample_chunks(MOONS, 50_000, seed=1, chunk_size=1000)
        offset, x, _ = next(chunks)
        assert offset == 0 and x.shape == (1000, 2)
        chunks.close()  # cancels the call; the server stops sampling
        assert client.sample(MOONS, 3, seed=1).shape == (3, 2)


# -- scoring ----------------------------------------------------------------------------------------------


def raw_log_likelihood(target: str, model: str, x: np.ndarray,
                       seed: int) -> service_pb2.LogLikelihoodResponse:
    """The server's own answer through the generated stub, for comparison with the client's."""
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GenerativeServiceStub(channel)
        return stub.LogLikelihood(service_pb2.LogLikelihoodRequest(model=model, x=to_proto(x), seed=seed))


def test_log_likelihood_equals_the_servers_unary_numbers(client: Client, target: str) -> None:
    x = digits(50, seed=1)
    got = client.log_likelihood(DIGITS, x, seed=42)
    raw = raw_log_likelihood(target, DIGITS, x, 42)
    assert np.array_equal(got.log_prob, from_proto(raw.log_prob))
    assert got.log_prob.dtype == np.float64 and got.kind == "lower_bound"
    assert got.seed == 42 and got.version == 1
    # bits per dimension are -log p / (D ln 2), D = 64 pixels
    assert np.allclose(got.bits_per_dim, -got.log_prob / (64 * math.log(2)))
    # a log-probability of integer images is at most 0; noise images are far less likely than samples
    assert (got.log_prob < 0).all()
    samples = client.sample(DIGITS, 50, seed=1)
    assert client.log_likelihood(DIGITS, samples, seed=42).log_prob.mean() > got.log_prob.mean() + 50
    # the server draws and reports a seed when none is given; sending it back reproduces the answer
    drawn = client.log_likelihood(DIGITS, x)
    assert np.array_equal(client.log_likelihood(DIGITS, x, seed=drawn.seed).log_prob, drawn.log_prob)


def test_score_stream_of_a_10k_row_file_equals_unary_scoring(client: Client, tmp_path: Path) -> None:
    x = digits(10_000, seed=2)
    path = tmp_path / "digits.npy"
    np.save(path, x.reshape(len(x), 64))  # flattened rows are reshaped to the model's 8x8
    chunk = 1500
    streamed = client.score_stream(DIGITS, path, chunk_size=chunk, seed=9, progress=False, max_in_flight=3)
    assert len(streamed) == 10_000 and streamed.kind == "lower_bound"
    # chunk k is scored exactly as LogLikelihood scores it alone with the chunk's seed
    expected = np.concatenate([
        client.log_likelihood(DIGITS, x[start:start + chunk], seed=chunk_seed(9, start)).log_prob
        for start in range(0, len(x), chunk)
    ])
    assert np.array_equal(streamed.log_prob, expected)
    assert chunk_seed(9, 0) == 9  # a single chunk is the unary call itself


def test_score_stream_of_an_exact_model_matches_one_unary_call_for_every_format(
        client: Client, tmp_path: Path) -> None:
    x = moons(7000, seed=3)
    unary = client.log_likelihood(MOONS, x).log_prob
    np.save(tmp_path / "m.npy", x)
    np.savez(tmp_path / "m.npz", x=x, y=np.zeros(len(x)))
    np.savetxt(tmp_path / "m.csv", x, delimiter=",", header="a,b", comments="", fmt="%.9g")
    sources = [x, tmp_path / "m.npy", tmp_path / "m.npz", str(tmp_path / "m.csv")]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1]}), tmp_path / "m.parquet")
        sources.append(tmp_path / "m.parquet")
    except ModuleNotFoundError:
        pass
    for source, in_flight in zip(sources, [1, 2, 4, 8, 3], strict=False):
        scores = client.score_stream(MOONS, source, chunk_size=999, max_in_flight=in_flight, progress=False)
        assert np.array_equal(scores.log_prob, unary), source
        assert scores.kind == "exact"


def test_iter_scores_yields_row_order_and_stops_early(private_target: str) -> None:
    x = moons(5000, seed=4)
    offsets = []
    with Client(private_target) as c:  # its own server: see the next test
        for offset, part in c.iter_scores(MOONS, x, chunk_size=700, progress=False):
            offsets.append(offset)
            assert len(part) == min(700, 5000 - offset)
            if len(offsets) == 3:
                break
    assert offsets == [0, 700, 1400]


def test_the_server_serves_on_after_an_abandoned_stream(private_target: str) -> None:
    """Regression: cancelling a stream with chunks in flight once killed the model's batcher worker (rows still
    counted, queue empty) about every other time; ten rounds make a relapse all but certain to show."""
    x = moons(5000, seed=4)
    with Client(private_target, timeout=5) as c:
        for _ in range(10):
            chunks = c.iter_scores(MOONS, x, chunk_size=700, progress=False)
            next(chunks), next(chunks), next(chunks)
            chunks.close()  # cancels the call
            assert len(c.log_likelihood(MOONS, x[:5])) == 5


def test_score_stream_reports_a_bad_row_of_a_file(target: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("x,y\n" + "0.1,0.2\n" * 3000 + "0.3,oops\n" + "0.1,0.2\n" * 10)
    with Client(target) as c, pytest.raises(ValueError, match="bad.csv line 3002: .*oops"):
        c.score_stream(MOONS, path, chunk_size=1000, progress=False)


# -- latents ----------------------------------------------------------------------------------------------


def test_encode_and_decode_are_the_affine_maps_of_ppca(client: Client) -> None:
    """pPCA's posterior mean E[z|x] = M^-1 W^T (x - mu) and decoder mean W z + mu are affine maps."""
    x1, x2 = moons(64, seed=5), moons(64, seed=6)
    z1, z2 = client.encode(MOONS, x1), client.encode(MOONS, x2)
    assert z1.shape == (64, 1)
    mixed = client.encode(MOONS, 0.25 * x1 + 0.75 * x2)
    assert np.allclose(mixed, 0.25 * z1 + 0.75 * z2, atol=1e-4)
    d1, d2 = client.decode(MOONS, z1), client.decode(MOONS, z2)
    assert d1.shape == (64, 2)
    assert np.allclose(client.decode(MOONS, 0.25 * z1 + 0.75 * z2), 0.25 * d1 + 0.75 * d2, atol=1e-4)
    # encode(decode(z)) = M^-1 W^T W z with M = W^T W + s^2 I: for one latent dimension a shrinkage of every
    # code by the same factor w^2 / (w^2 + s^2), between 0 and 1
    ratio = client.encode(MOONS, d1)[:, 0] / z1[:, 0]
    assert 0 < ratio.mean() < 1 and np.allclose(ratio, ratio.mean(), rtol=1e-3)
    # decoding with sample=True draws from p(x|z) = N(Wz + mu, s^2 I): reproducible per seed, around the mean
    s1 = client.decode(MOONS, z1, seed=1, sample=True)
    assert np.array_equal(s1, client.decode(MOONS, z1, seed=1, sample=True))
    assert not np.array_equal(s1, client.decode(MOONS, z1, seed=2, sample=True))
    assert 0 < np.abs(s1 - d1).mean() < 3 * np.abs(d1).mean()
    # pPCA's encoder gives the posterior mean only: sample=True is refused, not ignored
    with pytest.raises(GenserveError) as e:
        client.encode(MOONS, x1, seed=1, sample=True)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "sample" in str(e.value)


def test_messages_above_grpcs_4_mib_default(client: Client) -> None:
    x = digits(30_000, seed=7)  # 7.3 MiB of float32 each way
    z = client.encode(DIGITS, x)
    assert len(z) == 30_000 and np.array_equal(z[:10], client.encode(DIGITS, x[:10]))


# -- errors -----------------------------------------------------------------------------------------------


def test_errors_carry_the_status_code_and_the_servers_message(client: Client, target: str) -> None:
    with pytest.raises(GenserveError) as e:
        client.sample("no-such-model", 3)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert DIGITS in e.value.message  # the server lists the models it has
    assert str(e.value).startswith("NOT_FOUND: ")

    with pytest.raises(GenserveError) as e:
        client.log_likelihood(DIGITS, np.zeros((3, 5, 5)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "8" in e.value.message

    with pytest.raises(GenserveError) as e:
        client.log_likelihood(DIGITS, np.full((2, 8, 8), 40.0))  # outside the 17 grey levels
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(GenserveError) as e:
        client.score_stream(DIGITS, np.full((5000, 8, 8), -1.0), chunk_size=1000, progress=False)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.method == "LogLikelihoodStream"

    no_likelihood = [m.name for m in client.models() if "log_likelihood" not in m.operations]
    for name in no_likelihood[:1]:  # a GAN, when its family exports
        with pytest.raises(GenserveError) as e:
            client.log_likelihood(name, digits(2))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "sample" in e.value.message

    x = digits(20_000)  # too much work for a few milliseconds
    with Client(target, timeout=0.005, stream_timeout=0.005) as hurried:
        with pytest.raises(GenserveError) as e:
            hurried.log_likelihood(DIGITS, x)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(GenserveError) as e:
            hurried.score_stream(DIGITS, x, progress=False)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    with pytest.raises(ValueError, match="n must be"):
        client.sample(DIGITS, 0)


# -- retries and connection failures ----------------------------------------------------------------------


class FlakyService(service_pb2_grpc.GenerativeServiceServicer):
    """ListModels fails ``failures`` times with ``code`` before it answers; records every attempt."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 token: str | None = None) -> None:
        self.failures, self.code, self.token = failures, code, token
        self.attempts: list[dict[str, str]] = []

    def ListModels(self, request, context):
        metadata = dict(context.invocation_metadata())
        self.attempts.append(metadata)
        if self.token is not None and metadata.get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if len(self.attempts) <= self.failures:
            context.abort(self.code, f"attempt {len(self.attempts)} fails")
        return service_pb2.ListModelsResponse(models=[service_pb2.ModelSummary(name="m", versions=[1])])


def start_fake(service: FlakyService,
               credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GenerativeServiceServicer_to_server(service, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    return server, port


def test_unavailable_is_retried_by_grpcs_retry_policy() -> None:
    service = FlakyService(failures=2)
    server, port = start_fake(service)
    try:
        with Client(f"127.0.0.1:{port}", backoff=(0.01, 0.05)) as c:
            assert [m.name for m in c.models()] == ["m"]
        # gRPC itself re-sent the call, and says so in the retries' metadata
        assert [a.get("grpc-previous-rpc-attempts") for a in service.attempts] == [None, "1", "2"]

        service.attempts.clear()
        with Client(f"127.0.0.1:{port}", retries=0) as c, pytest.raises(GenserveError) as e:
            c.models()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and len(service.attempts) == 1

        service.attempts.clear()
        service.failures = 10  # more failures than attempts: the last status comes back
        with Client(f"127.0.0.1:{port}", retries=2, backoff=(0.01, 0.05)) as c, pytest.raises(GenserveError):
            c.models()
        assert len(service.attempts) == 3
    finally:
        server.stop(0)


def test_other_failures_are_not_retried() -> None:
    service = FlakyService(failures=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    server, port = start_fake(service)
    try:
        with Client(f"127.0.0.1:{port}", backoff=(0.01, 0.05)) as c, pytest.raises(GenserveError) as e:
            c.models()
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(service.attempts) == 1
    finally:
        server.stop(0)


def test_connection_refused_fails_fast_without_retries(free_port) -> None:
    """With retries=0 a refused connection is UNAVAILABLE at once: not DEADLINE_EXCEEDED after waiting out a
    long deadline (no timing assertion: the status tells whether the call waited)."""
    port = free_port()  # nothing listens there
    with Client(f"127.0.0.1:{port}", retries=0, timeout=120) as c, pytest.raises(GenserveError) as e:
        c.models()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "cannot reach" in e.value.message


@pytest.mark.parametrize("wait_for_ready", [False, True])
def test_a_server_that_starts_after_the_client_was_refused_is_reached(small_repo: Path, wait_for_ready: bool,
                                                                      free_port, server_config) -> None:
    """Retries: a refused connection is UNAVAILABLE, which the retry policy retries with backoff (up to
    0.5+1+2+4 s with jitter) while the channel reconnects; wait_for_ready instead queues the call until the
    channel connects or the deadline passes. The server starts only once the client's channel has failed to
    connect (a condition, not a sleep), so the call is known to have met the absent server first."""
    from genserve.server.app import BackgroundServer

    port = free_port()
    servers: list[BackgroundServer] = []
    problems: list[BaseException] = []
    refused = threading.Event()

    def start_once_refused() -> None:
        try:
            if refused.wait(timeout=120):
                servers.append(BackgroundServer(server_config(small_repo, port)))
        except BaseException as e:  # reported by the test thread below
            problems.append(e)

    with Client(f"127.0.0.1:{port}", wait_for_ready=wait_for_ready, retries=0 if wait_for_ready else 4,
                timeout=60) as c:
        c._channel.subscribe(
            lambda state: state == grpc.ChannelConnectivity.TRANSIENT_FAILURE and refused.set(), try_to_connect=False
        )
        thread = threading.Thread(target=start_once_refused)
        thread.start()
        try:
            assert c.sample(MOONS, 4, seed=1).shape == (4, 2)
        finally:
            refused.set()  # let the thread finish even if the call failed before the channel reported it
            thread.join()
            for srv in servers:
                srv.stop(0.5)
    assert not problems, problems
    assert servers, "the server was never started"


# -- TLS and token -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate (openssl CLI)."""
    assert shutil.which("openssl"), "the TLS tests need the openssl command (a failure, not a skip: no silent gaps)"
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        extra = ["-extfile", "server.ext"] if name == "server" else []
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", *extra)
    return d


def tls_server(d: Path, service: FlakyService, mutual: bool) -> tuple[grpc.Server, int]:
    pair = ((d / "server.key").read_bytes(), (d / "server.pem").read_bytes())
    credentials = grpc.ssl_server_credentials([pair], root_certificates=(d / "ca.pem").read_bytes(),
                                              require_client_auth=mutual)
    return start_fake(service, credentials)


def test_tls_and_bearer_token(certificates: Path, tmp_path: Path) -> None:
    d = certificates
    service = FlakyService(failures=0, token="s3cret")
    server, port = tls_server(d, service, mutual=False)
    try:
        with Client(f"localhost:{port}", tls_ca=d / "ca.pem", token="s3cret") as c:
            assert [m.name for m in c.models()] == ["m"]
        assert service.attempts[-1]["authorization"] == "Bearer s3cret"
        (tmp_path / "token").write_text("s3cret\n")
        with Client(f"localhost:{port}", tls_ca=str(d / "ca.pem"), token_file=tmp_path / "token") as c:
            assert len(c.models()) == 1
        with Client(f"localhost:{port}", tls_ca=d / "ca.pem", token="wrong") as c:
            with pytest.raises(GenserveError) as e:
                c.models()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "token" in e.value.message
        # without the test CA the server's certificate is not trusted: the handshake fails
        with Client(f"localhost:{port}", tls=True, retries=0) as c, pytest.raises(GenserveError) as e:
            c.models()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        # a plaintext client cannot talk to a TLS server
        with Client(f"localhost:{port}", retries=0) as c, pytest.raises(GenserveError):
            c.models()
    finally:
        server.stop(0)


def test_mutual_tls(certificates: Path) -> None:
    d = certificates
    server, port = tls_server(d, FlakyService(failures=0), mutual=True)
    try:
        with Client(f"localhost:{port}", tls_ca=d / "ca.pem", tls_cert=d / "client.pem",
                    tls_key=d / "client.key") as c:
            assert len(c.models()) == 1
        with Client(f"localhost:{port}", tls_ca=d / "ca.pem", retries=0) as c:
            with pytest.raises(GenserveError) as e:
                c.models()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)
    with pytest.raises(ValueError, match="both"):
        Client("localhost:1", tls_ca=d / "ca.pem", tls_cert=d / "client.pem")
    with pytest.raises(ValueError, match="not both"):
        Client("localhost:1", token="a", token_file=d / "ca.pem")


def test_the_real_server_with_mutual_tls_and_a_token(certificates: Path, small_repo: Path, server_config,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import dataclasses

    from genserve.app.cli import main
    from genserve.server.app import BackgroundServer

    d, token = certificates, "tok-" + "7" * 28
    (tmp_path / "tokens").write_text(f"# one per line\n{token}\n")
    cfg = dataclasses.replace(server_config(small_repo), tls_cert=d / "server.pem", tls_key=d / "server.key",
                              tls_client_ca=d / "ca.pem", token_file=tmp_path / "tokens")
    tls = {"tls_ca": d / "ca.pem", "tls_cert": d / "client.pem", "tls_key": d / "client.key"}
    with BackgroundServer(cfg) as srv:
        target = f"localhost:{srv.port}"
        with Client(target, token=token, **tls) as c:
            assert c.sample(MOONS, 3, seed=1).shape == (3, 2) and c.health() == "SERVING"
        with Client(target, **tls) as c:
            with pytest.raises(GenserveError) as e:
                c.models()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.value.message
            assert c.health() == "SERVING"  # probes need no token
        (tmp_path / "token").write_text(token)
        code = main(["models", "--server", target, "--token-file", str(tmp_path / "token"), "--tls-ca",
                     str(d / "ca.pem"), "--tls-cert", str(d / "client.pem"), "--tls-key", str(d / "client.key")])
        assert code == 0 and MOONS in capsys.readouterr().out
        srv.stop(0.5)


# -- load balancing ---------------------------------------------------------------------------------------


class CountingEngine:
    """Delegates to a real Engine and counts the log_likelihood requests it served."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.calls = 0

    async def log_likelihood(self, *args, **kwargs):
        self.calls += 1
        return await self._engine.log_likelihood(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def test_round_robin_over_two_servers(small_repo: Path, server_config) -> None:
    from genserve.server.app import BackgroundServer
    from genserve.server.engine import Engine
    from genserve.server.metrics import Metrics

    engines, servers = [], []
    try:
        for _ in range(2):
            cfg = server_config(small_repo)
            engines.append(CountingEngine(Engine(cfg, Metrics())))
            servers.append(BackgroundServer(cfg, engines[-1]))
        x = moons(10)
        with Client([f"127.0.0.1:{s.port}" for s in servers], wait_for_ready=True) as c:
            answers = [c.log_likelihood(MOONS, x).log_prob for _ in range(40)]
        assert all(np.array_equal(a, answers[0]) for a in answers)  # both serve the same model
        calls = [e.calls for e in engines]
        assert sum(calls) == 40 and min(calls) >= 10, calls
    finally:
        for srv in servers:
            srv.stop(0.5)


def test_target_forms() -> None:
    from genserve.clients.channel import resolve_target

    assert resolve_target("localhost:8500") == ("localhost:8500", False, None)
    assert resolve_target(["127.0.0.1:1", "127.0.0.1:2"]) == ("ipv4:127.0.0.1:1,127.0.0.1:2", True, None)
    assert resolve_target("[::1]:1,[::1]:2")[0] == "ipv6:[::1]:1,[::1]:2"
    assert resolve_target("dns:///genserve.default.svc:8500")[1] is True
    target, several, authority = resolve_target(["localhost:1", "localhost:2"])
    assert several and target.startswith(("ipv4:", "ipv6:")) and authority == "localhost:1"
    for bad in ("localhost", "", "host:port"):
        with pytest.raises(ValueError):
            resolve_target(bad)
    with pytest.raises(ValueError, match="retries"):
        Client("localhost:1", retries=5)


# -- asyncio ----------------------------------------------------------------------------------------------


def test_async_client_matches_the_blocking_one(client: Client, target: str, tmp_path: Path) -> None:
    x = digits(3000, seed=8)
    np.save(tmp_path / "x.npy", x)

    async def main():
        async with AsyncClient(target) as ac:
            models = await ac.models()
            info = await ac.info(DIGITS)
            small, many = await asyncio.gather(ac.sample(DIGITS, 30, seed=2), ac.sample(DIGITS, 600, seed=2))
            chunks = [o async for o, _, _ in ac.sample_chunks(DIGITS, 600, seed=2, chunk_size=256)]
            ll = await ac.log_likelihood(DIGITS, x[:100], seed=4)
            streamed = await ac.score_stream(DIGITS, tmp_path / "x.npy", chunk_size=700, seed=4,
                                             progress=False)
            z = await ac.encode(DIGITS, x[:5])
            back = await ac.decode(DIGITS, z)
            health = await ac.health(DIGITS)
            try:
                await ac.sample("no-such-model", 1)
            except GenserveError as e:
                error = e
            return models, info, small, many, chunks, ll, streamed, z, back, health, error

    models, info, small, many, chunks, ll, streamed, z, back, health, error = asyncio.run(main())
    assert [m.name for m in models] == [m.name for m in client.models()]
    assert info.spec.shape == (8, 8)
    assert np.array_equal(small, client.sample(DIGITS, 30, seed=2))
    assert np.array_equal(many, client.sample(DIGITS, 600, seed=2))
    assert chunks == [0, 256, 512]
    assert np.array_equal(ll.log_prob, client.log_likelihood(DIGITS, x[:100], seed=4).log_prob)
    assert np.array_equal(streamed.log_prob,
                          client.score_stream(DIGITS, x, chunk_size=700, seed=4, progress=False).log_prob)
    assert np.array_equal(z, client.encode(DIGITS, x[:5])) and np.array_equal(back, client.decode(DIGITS, z))
    assert health == "SERVING" and error.code == grpc.StatusCode.NOT_FOUND
