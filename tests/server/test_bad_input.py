"""Bad input against the real server: every RPC and field, every family. Each bad request gets its status code
and a message that names the field at fault, and the server answers a valid request of the same RPC right after.

Cases are built from the repository's manifests, so a family that lands later (GAN, EBM) is covered by the
same checks: its unsupported operations, its Langevin settings, its latent size. One server for the module.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from genserve.clients.tensors import from_proto, to_proto
from genserve.core.manifest import OPERATION_NAME, read_manifest
from genserve.server.app import BackgroundServer
from genserve.v1 import manifest_pb2, service_pb2_grpc
from genserve.v1 import service_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNSUPPORTED = grpc.StatusCode.FAILED_PRECONDITION
LIMITS = {"max_sample_n": 1000, "max_rows_per_request": 500, "max_langevin_steps": 50,
          "max_importance_samples": 20, "max_message_mb": 4}
RPC_OF = {"sample": ("Sample", "SampleStream"), "log_likelihood": ("LogLikelihood", "LogLikelihoodStream"),
          "encode": ("Encode",), "decode": ("Decode",)}
FIELD_OF = {"LogLikelihood": "x", "LogLikelihoodStream": "x", "Encode": "x", "Decode": "z"}


@dataclass(frozen=True)
class Model:
    """What the cases need to know of one model, from its manifest."""

    name: str
    family: str
    operations: frozenset[str]
    shape: tuple[int, ...]
    discrete: bool
    levels: int
    latent: tuple[int, ...]

    def x(self, rows: int = 2) -> np.ndarray:
        if self.discrete:
            return (np.arange(rows * math.prod(self.shape)) % self.levels).astype(np.float32).reshape(
                rows, *self.shape)
        return np.zeros((rows, *self.shape), np.float32)

    def z(self, rows: int = 2) -> np.ndarray:
        return np.zeros((rows, *self.latent), np.float32)


def load_models(repo: Path) -> dict[str, Model]:
    out = {}
    for folder in sorted(p for p in repo.iterdir() if p.is_dir()):
        version = max((v for v in folder.iterdir() if v.name.isdigit()), key=lambda v: int(v.name))
        m = read_manifest(version / "manifest.json")
        latent = m.parameters.get("latent_dim")
        shape = tuple(m.data.shape)
        out[folder.name] = Model(folder.name, m.family, frozenset(OPERATION_NAME[o] for o in m.operations), shape,
                                 m.data.kind == manifest_pb2.DOMAIN_DISCRETE, int(m.data.levels),
                                 (int(latent),) if latent else shape)
    return out


@dataclass
class Case:
    """One bad request: the RPC, its message (a list of chunks for LogLikelihoodStream), the expected status
    and the words the message must hold (the first is the field)."""

    rpc: str
    request: object
    code: grpc.StatusCode
    words: tuple[str, ...]


# -- the server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(repo_dir: Path):
    from genserve.server.config import ServerConfig

    cfg = ServerConfig(repo=repo_dir, port=0, metrics_port=0, provider="cpu", workers=2, **LIMITS)
    with BackgroundServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: BackgroundServer) -> Iterator[service_pb2_grpc.GenerativeServiceStub]:
    options = [("grpc.max_send_message_length", 64 * 2**20)]  # let oversized requests reach the server
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
        yield service_pb2_grpc.GenerativeServiceStub(channel)


@pytest.fixture(scope="module")
def models(repo_dir: Path) -> dict[str, Model]:
    return load_models(repo_dir)


def call(stub, rpc: str, request: object, timeout: float = 30) -> list:
    """Send one request of any RPC; the responses as a list."""
    if rpc == "SampleStream":
        return list(stub.SampleStream(request, timeout=timeout))
    if rpc == "LogLikelihoodStream":
        return list(stub.LogLikelihoodStream(iter(request), timeout=timeout))
    return [getattr(stub, rpc)(request, timeout=timeout)]


def valid(rpc: str, m: Model) -> object:
    """A valid request of ``rpc`` on ``m`` (which must support it)."""
    return {
        "GetModel": lambda: pb.GetModelRequest(model=m.name),
        "Sample": lambda: pb.SampleRequest(model=m.name, n=2, seed=1),
        "SampleStream": lambda: pb.SampleStreamRequest(sample=pb.SampleRequest(model=m.name, n=3, seed=1)),
        "LogLikelihood": lambda: pb.LogLikelihoodRequest(model=m.name, x=to_proto(m.x()), seed=1),
        "LogLikelihoodStream": lambda: [pb.LogLikelihoodRequest(model=m.name, x=to_proto(m.x()), seed=1)],
        "Encode": lambda: pb.EncodeRequest(model=m.name, x=to_proto(m.x()), seed=1),
        "Decode": lambda: pb.DecodeRequest(model=m.name, z=to_proto(m.z()), seed=1),
    }[rpc]()


def check(stub, case: Case, models: dict[str, Model]) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call(stub, case.rpc, case.request)
    message = e.value.details() or ""
    assert e.value.code() == case.code, f"{case.rpc} {case.words}: {e.value.code()} {message!r}"
    for word in case.words:
        assert word.lower() in message.lower(), f"{case.rpc}: {word!r} not named in {message!r}"
    # the server answers a valid request of the same RPC right after
    reference = models["digits-ppca"]
    answer = call(stub, case.rpc, valid(case.rpc, reference))
    assert answer, case.rpc


@pytest.fixture(autouse=True)
def no_error_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Bad input is the client's problem: nothing may be logged at ERROR (no traceback of an unhandled case)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


# -- request builders ---------------------------------------------------------------------------------------


def with_target(rpc: str, model: str, version: int = 0) -> object:
    """A request of ``rpc`` naming ``model``/``version`` with otherwise valid-looking fields."""
    x = to_proto(np.zeros((1, 8, 8), np.float32))
    return {
        "GetModel": lambda: pb.GetModelRequest(model=model, version=version),
        "Sample": lambda: pb.SampleRequest(model=model, version=version, n=1),
        "SampleStream": lambda: pb.SampleStreamRequest(sample=pb.SampleRequest(model=model, version=version,
                                                                               n=1)),
        "LogLikelihood": lambda: pb.LogLikelihoodRequest(model=model, version=version, x=x),
        "LogLikelihoodStream": lambda: [pb.LogLikelihoodRequest(model=model, version=version, x=x)],
        "Encode": lambda: pb.EncodeRequest(model=model, version=version, x=x),
        "Decode": lambda: pb.DecodeRequest(model=model, version=version, z=to_proto(np.zeros((1, 16), np.float32))),
    }[rpc]()


def with_tensor(rpc: str, model: str, tensor: pb.Tensor | None) -> object:
    """A request of a data-taking ``rpc`` whose x (or z) is ``tensor`` (None: the field left out)."""
    field = FIELD_OF[rpc]
    kw = {} if tensor is None else {field: tensor}
    if rpc == "LogLikelihoodStream":
        return [pb.LogLikelihoodRequest(model=model, **kw)]
    return {"LogLikelihood": pb.LogLikelihoodRequest, "Encode": pb.EncodeRequest,
            "Decode": pb.DecodeRequest}[rpc](model=model, **kw)


def raw(shape: list[int], dtype: str = "float32", data: bytes | None = None) -> pb.Tensor:
    if data is None:
        data = b"\0" * (math.prod(shape) * 4)
    return pb.Tensor(shape=shape, dtype=dtype, data=data)


def data_rpcs(m: Model) -> list[str]:
    return [rpc for op, rpcs in RPC_OF.items() if op in m.operations and op != "sample" for rpc in rpcs]


def sample_cases(models: dict[str, Model], make: Callable[[Model, bool], list[Case]]) -> list[Case]:
    """``make(model, stream)`` for every model that samples, over Sample and SampleStream."""
    return [c for m in models.values() if "sample" in m.operations for stream in (False, True)
            for c in make(m, stream)]


def sampling(m: Model, stream: bool, code: grpc.StatusCode, words: tuple[str, ...], **fields: object) -> Case:
    request = pb.SampleRequest(model=m.name, **{"n": 1, "seed": 1, **fields})
    if stream:
        return Case("SampleStream", pb.SampleStreamRequest(sample=request), code, words)
    return Case("Sample", request, code, words)


# -- the cases ----------------------------------------------------------------------------------------------

TARGET_RPCS = ("GetModel", "Sample", "SampleStream", "LogLikelihood", "LogLikelihoodStream", "Encode", "Decode")


def _targets(models: dict[str, Model]) -> list[Case]:
    out = []
    for rpc in TARGET_RPCS:
        prefix = "sample." if rpc == "SampleStream" else ""
        out += [Case(rpc, with_target(rpc, "no-such-model"), NOT_FOUND, ("no-such-model", "digits-ppca")),
                Case(rpc, with_target(rpc, "digits-ppca", 99), NOT_FOUND, ("version 99", "loaded versions")),
                Case(rpc, with_target(rpc, ""), INVALID, (prefix + "model:",)),
                Case(rpc, with_target(rpc, "digits-ppca", -1), INVALID, (prefix + "version:",)),
                Case(rpc, with_target(rpc, "../../etc/passwd"), NOT_FOUND, ("no model named",))]
    return out


def _unsupported(models: dict[str, Model]) -> list[Case]:
    """Each operation a family lacks, by every RPC that runs it: FAILED_PRECONDITION naming what it can do."""
    out = []
    for m in models.values():
        for op, rpcs in RPC_OF.items():
            if op in m.operations:
                continue
            for rpc in rpcs:
                if op == "sample":
                    request = with_target(rpc, m.name)
                elif FIELD_OF[rpc] == "z":
                    request = with_tensor(rpc, m.name, to_proto(m.z()))
                else:
                    request = with_tensor(rpc, m.name, to_proto(m.x()))
                out.append(Case(rpc, request, UNSUPPORTED, (op.replace("_", "-"), m.name, "supports")))
    return out


def _tensor_cases(models: dict[str, Model], tensors: Callable[[Model, str], list[tuple[pb.Tensor | None,
                                                                                           tuple[str, ...]]]]
                  ) -> list[Case]:
    """``tensors(model, field)`` -> [(tensor, words)] for every data-taking RPC of every model."""
    out = []
    for m in models.values():
        for rpc in data_rpcs(m):
            field = FIELD_OF[rpc]
            for tensor, words in tensors(m, field):
                out.append(Case(rpc, with_tensor(rpc, m.name, tensor), INVALID, (field, *words)))
    return out


def _rows_shape(m: Model, field: str) -> tuple[int, ...]:
    return m.latent if field == "z" else m.shape


def _missing(models):
    return _tensor_cases(models, lambda m, f: [(None, ("missing",))])


def _dtypes(models):
    def make(m: Model, f: str):
        shape = [2, *_rows_shape(m, f)]
        return [(raw(shape, "complex64"), ("dtype",)), (raw(shape, "str"), ("dtype",)),
                (raw(shape, ""), ("dtype",)), (raw(shape, "FLOAT32"), ("dtype",)),
                (to_proto(np.zeros(shape, bool)), ("dtype",))]
    return _tensor_cases(models, make)


def _shapes(models):
    def make(m: Model, f: str):
        s = _rows_shape(m, f)
        wrong = (*s[:-1], s[-1] + 1)
        return [(to_proto(np.zeros((2, *wrong), np.float32)), ("shape",)),
                (to_proto(np.zeros(s, np.float32)), ("batch axis",)),
                (to_proto(np.zeros((2, *s, 1), np.float32)), ("shape",)),
                (to_proto(np.zeros((2, math.prod(s) + 3), np.float32)), ("shape",)),
                (raw([]), ("scalar",)),
                (raw([2] + [1] * 70, data=b"\0" * 8), ("",)),  # more axes than numpy allows
                (raw([1, -8, 8], data=b""), ("negative",))]
    return _tensor_cases(models, make)


def _ragged(models):
    """Byte buffers whose length disagrees with the shape: short, long, not a whole number of rows, and a huge
    shape with a tiny buffer (refused before any allocation)."""
    def make(m: Model, f: str):
        shape = [2, *_rows_shape(m, f)]
        size = math.prod(shape) * 4
        return [(raw(shape, data=b"\0" * (size - 4)), ("bytes",)),
                (raw(shape, data=b"\0" * (size + 4)), ("bytes",)),
                (raw(shape, data=b"\0" * (size // 2 + 2)), ("bytes",)),
                (raw([2**40, *shape[1:]], data=b"\0" * size), ("bytes",)),
                (raw([2**31, 2**31, 2**31], data=b""), ("bytes",))]
    return _tensor_cases(models, make)


def _empty(models):
    def make(m: Model, f: str):
        s = _rows_shape(m, f)
        return [(to_proto(np.zeros((0, *s), np.float32)), ("empty",)), (raw([0]), ("shape",))]
    return _tensor_cases(models, make)


def _non_finite(models):
    def make(m: Model, f: str):
        out = []
        for value in (np.nan, np.inf, -np.inf):
            a = (m.x() if f == "x" else m.z()).copy()
            a.reshape(2, -1)[1, -1] = value
            out.append((to_proto(a), ("row 1", "nan or infinite")))
        half = m.x().astype(np.float16) if f == "x" else m.z().astype(np.float16)
        half.reshape(2, -1)[0, 0] = np.inf
        out.append((to_proto(half), ("row 0",)))
        return out
    return _tensor_cases(models, make)


def _domain(models):
    def make(m: Model, f: str):
        if f != "x" or not m.discrete:
            return []
        out = []
        for value, words in ((m.levels, (str(m.levels),)), (-1, ("-1",)), (2.5, ("2.5",)), (1e30, ("1e+30",))):
            a = m.x().copy()
            a.reshape(2, -1)[0, 3] = value
            out.append((to_proto(a), ("row 0", *words, f"0..{m.levels - 1}")))
        ints = m.x().astype(np.int64)
        ints.reshape(2, -1)[1, 0] = 2**40
        out.append((to_proto(ints), ("row 1",)))
        return out
    return _tensor_cases(models, make)


def _too_many_rows(models):
    def make(m: Model, f: str):
        rows = LIMITS["max_rows_per_request"] + 1
        return [(to_proto(np.zeros((rows, *_rows_shape(m, f)), np.float32)), (str(rows), "500"))]
    return _tensor_cases(models, make)


def _n(models):
    def make(m: Model, stream: bool):
        field = "sample.n" if stream else "n:"
        return [sampling(m, stream, INVALID, (field, "at least 1"), n=0),
                sampling(m, stream, INVALID, (field, "at least 1"), n=-1),
                sampling(m, stream, INVALID, (field, "at least 1"), n=-2**63),
                sampling(m, stream, INVALID, (field, "1001", "1000"), n=1001),
                sampling(m, stream, INVALID, (field, "limit"), n=2**63 - 1)]
    return sample_cases(models, make)


def _temperature(models):
    def make(m: Model, stream: bool):
        return [sampling(m, stream, INVALID, ("temperature",), temperature=t)
                for t in (0.0, -1.0, -0.0, math.nan, math.inf, -math.inf, 1e9, 100.5)]
    return sample_cases(models, make)


def _langevin(models):
    """On an EBM the values are out of range; on any other family the fields do not apply; both name them."""
    def make(m: Model, stream: bool):
        return ([sampling(m, stream, INVALID, ("langevin_steps",), langevin_steps=s)
                 for s in (0, -5, LIMITS["max_langevin_steps"] + 1, 2**31 - 1)]
                + [sampling(m, stream, INVALID, ("langevin_step_size",), langevin_step_size=s)
                   for s in (0.0, -1.0, math.nan, math.inf, 1e300)])
    return sample_cases(models, make)


def _seed(models):
    m = models["digits-ppca"]
    return [sampling(m, stream, INVALID, ("seed", "2**63"), seed=2**64 - 1) for stream in (False, True)] + [
        Case("LogLikelihood", pb.LogLikelihoodRequest(model=m.name, x=to_proto(m.x()), seed=2**63), INVALID,
             ("seed",)),
        Case("Encode", pb.EncodeRequest(model=m.name, x=to_proto(m.x()), seed=2**64 - 1), INVALID, ("seed",)),
        Case("Decode", pb.DecodeRequest(model=m.name, z=to_proto(m.z()), seed=2**64 - 1), INVALID, ("seed",))]


def _chunk_size(models):
    m = models["digits-ppca"]
    stream = lambda size: pb.SampleStreamRequest(sample=pb.SampleRequest(model=m.name, n=4),  # noqa: E731
                                                 chunk_size=size)
    return [Case("SampleStream", stream(-1), INVALID, ("chunk_size", "negative")),
            Case("SampleStream", stream(-2**63), INVALID, ("chunk_size",)),
            Case("SampleStream", stream(10**7), INVALID, ("chunk_size", "message limit")),
            Case("SampleStream", stream(2**63 - 1), INVALID, ("chunk_size",))]


def _importance_samples(models):
    out = []
    for m in models.values():
        if "log_likelihood" not in m.operations:
            continue
        values = (0, -1, LIMITS["max_importance_samples"] + 1, 2**31 - 1)
        for k in values:
            request = pb.LogLikelihoodRequest(model=m.name, x=to_proto(m.x()), importance_samples=k)
            out.append(Case("LogLikelihood", request, INVALID, ("importance_samples",)))
            out.append(Case("LogLikelihoodStream", [request], INVALID, ("importance_samples",)))
    return out


def _stream_chunk_after_good_ones(models):
    """A bad chunk after good ones ends the stream with the bad chunk's status and field."""
    m = models["digits-ppca"]
    good = pb.LogLikelihoodRequest(model=m.name, x=to_proto(m.x()), seed=1)
    bad = pb.LogLikelihoodRequest(model=m.name, x=raw([2, 8, 8], data=b"\0" * 12))
    return [Case("LogLikelihoodStream", [good, good, bad, good], INVALID, ("x:", "bytes"))]


CASES = {f.__name__[1:]: f for f in (_targets, _unsupported, _missing, _dtypes, _shapes, _ragged, _empty,
                                      _non_finite, _domain, _too_many_rows, _n, _temperature, _langevin, _seed,
                                      _chunk_size, _importance_samples, _stream_chunk_after_good_ones)}


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_gets_its_status_and_names_the_field(stub, models: dict[str, Model], kind: str) -> None:
    cases = CASES[kind](models)
    if not cases:
        pytest.skip(f"no model in the test repository has a {kind} case")
    for case in cases:
        check(stub, case, models)


def test_every_family_and_rpc_is_covered(models: dict[str, Model]) -> None:
    """The matrix reaches every model and every RPC that takes a model."""
    cases = [c for make in CASES.values() for c in make(models)]
    rpcs = {c.rpc for c in cases}
    assert rpcs == set(TARGET_RPCS), rpcs
    named = {getattr(c.request, "model", "") or getattr(getattr(c.request, "sample", None), "model", "")
             for c in cases if not isinstance(c.request, list)}
    named |= {c.request[0].model for c in cases if isinstance(c.request, list)}
    assert set(models) <= named, set(models) - named


def test_return_latents_on_a_family_without_latents_is_answered(stub, models: dict[str, Model]) -> None:
    for m in models.values():
        if "sample" not in m.operations:
            continue
        response = stub.Sample(pb.SampleRequest(model=m.name, n=2, seed=1, return_latents=True), timeout=30)
        assert from_proto(response.samples).shape == (2, *m.shape)


def test_a_message_that_is_not_protobuf_is_refused(server: BackgroundServer, stub, models) -> None:
    """Garbage bytes where a request message belongs, for unary and streaming RPCs: INVALID_ARGUMENT naming
    the message, no traceback in the log, and the server goes on."""
    garbage = (b"\xff" * 7, struct.pack("<Q", 2**64 - 1), b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05abc")
    ident = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method in ("GetModel", "Sample", "LogLikelihood", "Encode", "Decode", "SampleStream",
                       "LogLikelihoodStream"):
            path = f"/genserve.v1.GenerativeService/{method}"
            for bad in garbage:
                with pytest.raises(grpc.RpcError) as e:
                    if method == "SampleStream":
                        list(channel.unary_stream(path, **ident)(bad, timeout=10))
                    elif method == "LogLikelihoodStream":
                        good = pb.LogLikelihoodRequest(model="digits-ppca", x=to_proto(models["digits-ppca"].x()))
                        list(channel.stream_stream(path, **ident)(iter([good.SerializeToString(), bad]),
                                                                  timeout=10))
                    else:
                        channel.unary_unary(path, **ident)(bad, timeout=10)
                assert e.value.code() == INVALID, e.value
                assert "request message" in e.value.details() and "protobuf" in e.value.details()
    assert call(stub, "Sample", valid("Sample", models["digits-ppca"]))
