"""Bad input against the real server: one table of cases, run through both APIs (genserve.v1 and the Open
Inference Protocol), every family. Each bad request gets its status code and a message that names what is at
fault and says how to fix it, and the server answers a valid request of the same kind right after.

A case is written once, in terms of the engine's operations (sample, log_likelihood, encode, decode): the model,
the tensor as it travels (shape, dtype, bytes), the options, or raw bytes instead of a message. Each transport
turns it into its own requests, unary and streaming: genserve.v1's Sample/SampleStream, LogLikelihood/
LogLikelihoodStream, Encode, Decode; OIP's ModelInfer and ModelStreamInfer (whose per-request failures are an
``error_message``, without a code). Cases are built from the repository's manifests, so a family that lands
later is covered by the same checks. One server for the module.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from supervised import Supervised, serving

from genserve.core.manifest import OPERATION_NAME, read_manifest
from genserve.core.tensors import from_proto
from genserve.oip import grpc_service_pb2 as oip_pb
from genserve.oip import grpc_service_pb2_grpc as oip_grpc
from genserve.v1 import manifest_pb2, service_pb2_grpc
from genserve.v1 import service_pb2 as pb

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNSUPPORTED = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
LIMITS = {"max_sample_n": 1000, "max_rows_per_request": 500, "max_langevin_steps": 50,
          "max_importance_samples": 20, "max_message_mb": 4}
FIELD = {"log_likelihood": "x", "encode": "x", "decode": "z"}
BAD_SEED = object()
"""A seed outside 0..2**63-1, as each API can send one (genserve.v1: 2**64-1, a uint64; OIP: -1, an int64)."""
FIX = ("use", "send", "ask", "give", "leave", "split", "allow", "retry", "name", "add", "put", "one of",
       "lists", "supports", "loaded versions", "has:", "its models are", "its inputs are", "takes", "needs")
"""Every refusal says how to fix the request: one of these (an instruction, or what the server does have)."""


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

    def rows(self, field_name: str) -> tuple[int, ...]:
        return self.latent if field_name == "z" else self.shape


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


@dataclass(frozen=True)
class Wire:
    """A tensor as it travels: shape, numpy dtype name, little-endian row-major bytes."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes

    @classmethod
    def of(cls, array: np.ndarray) -> Wire:
        a = np.asarray(array)
        return cls(a.shape, a.dtype.name, np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"))).tobytes())


def zeros(shape: list[int] | tuple[int, ...], dtype: str = "float32", data: bytes | None = None) -> Wire:
    return Wire(tuple(shape), dtype, b"\0" * (math.prod(shape) * 4) if data is None else data)


@dataclass
class Case:
    """One bad request: the operation and model, its tensor (None: left out), its options, or raw bytes; the
    status it gets (a pair: genserve.v1's, OIP's) and the words its message holds (lower-cased compare)."""

    op: str
    model: str
    code: grpc.StatusCode | tuple[grpc.StatusCode, grpc.StatusCode]
    words: tuple[str, ...]
    tensor: Wire | None = None
    options: dict[str, object] = field(default_factory=dict)
    version: int = 0
    garbage: bytes | None = None

    def code_for(self, api: str) -> grpc.StatusCode:
        return self.code if isinstance(self.code, grpc.StatusCode) else self.code[api == "oip"]


Outcome = tuple[grpc.StatusCode | None, str]
"""(status code, message); code None: an OIP stream's per-request ``error_message``, which has no code."""


def attempt(send: Callable[[], object]) -> Outcome:
    try:
        send()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return OK, ""


# -- the two transports -------------------------------------------------------------------------------------


class GenserveV1:
    """genserve.v1.GenerativeService: each case as a unary call and through the operation's stream."""

    name = "v1"
    RPCS = {"sample": ("Sample", "SampleStream"), "log_likelihood": ("LogLikelihood", "LogLikelihoodStream"),
            "encode": ("Encode",), "decode": ("Decode",)}

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = service_pb2_grpc.GenerativeServiceStub(channel)

    def request(self, case: Case) -> object:
        o = dict(case.options)
        if o.get("seed") is BAD_SEED:
            o["seed"] = 2**64 - 1
        common = {"model": case.model, "version": case.version}
        if case.op == "sample":
            return pb.SampleRequest(**common, **{"n": 1, "seed": 1, **o})
        kw = {} if case.tensor is None else {FIELD[case.op]: pb.Tensor(shape=list(case.tensor.shape),
                                                                        dtype=case.tensor.dtype,
                                                                        data=case.tensor.data)}
        kind = {"log_likelihood": pb.LogLikelihoodRequest, "encode": pb.EncodeRequest, "decode": pb.DecodeRequest}
        return kind[case.op](**common, **kw, **o)

    def outcomes(self, case: Case) -> list[Outcome]:
        if case.garbage is not None:
            return self._garbage(case)
        request = self.request(case)
        out = []
        for rpc in self.RPCS[case.op]:
            if rpc == "SampleStream":
                out.append(attempt(lambda: list(self.stub.SampleStream(pb.SampleStreamRequest(sample=request),
                                                                       timeout=30))))
            elif rpc == "LogLikelihoodStream":
                out.append(attempt(lambda: list(self.stub.LogLikelihoodStream(iter([request]), timeout=30))))
            else:
                out.append(attempt(lambda rpc=rpc: getattr(self.stub, rpc)(request, timeout=30)))
        return out

    def _garbage(self, case: Case) -> list[Outcome]:
        ident = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
        path = "/genserve.v1.GenerativeService/"
        good = self.request(valid_case(case)).SerializeToString()
        out = []
        for rpc in self.RPCS[case.op]:
            if rpc == "SampleStream":
                call = self.channel.unary_stream(path + rpc, **ident)
                out.append(attempt(lambda c=call: list(c(case.garbage, timeout=30))))
            elif rpc == "LogLikelihoodStream":
                call = self.channel.stream_stream(path + rpc, **ident)
                out.append(attempt(lambda c=call: list(c(iter([good, case.garbage]), timeout=30))))
            else:
                call = self.channel.unary_unary(path + rpc, **ident)
                out.append(attempt(lambda c=call: c(case.garbage, timeout=30)))
        return out


class OpenInference:
    """inference.GRPCInferenceService: each case as ModelInfer and inside a ModelStreamInfer stream."""

    name = "oip"
    DATATYPE = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int32": "INT32", "int64": "INT64",
                "float16": "FP16", "float32": "FP32", "float64": "FP64"}

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = oip_grpc.GRPCInferenceServiceStub(channel)

    def request(self, case: Case) -> oip_pb.ModelInferRequest:
        r = oip_pb.ModelInferRequest(model_name=f"{case.model}.{case.op}" if case.model else "",
                                     model_version=str(case.version) if case.version else "")
        options = {"seed": 1, **({"n": 1} if case.op == "sample" else {}), **case.options}
        for key, value in options.items():
            p = r.parameters[key]
            if value is BAD_SEED:
                p.int64_param = -1
            elif isinstance(value, bool):
                p.bool_param = value
            elif isinstance(value, int):
                p.int64_param = value
            else:
                p.double_param = float(value)
        if case.tensor is not None:
            t = case.tensor
            r.inputs.add(name=FIELD[case.op], datatype=self.DATATYPE.get(t.dtype, t.dtype.upper()), shape=t.shape)
            r.raw_input_contents.append(t.data)
        return r

    def outcomes(self, case: Case) -> list[Outcome]:
        ident = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
        path = "/inference.GRPCInferenceService/"
        if case.garbage is not None:
            good = self.request(valid_case(case)).SerializeToString()
            unary = self.channel.unary_unary(path + "ModelInfer", **ident)
            stream = self.channel.stream_stream(path + "ModelStreamInfer", **ident)
            return [attempt(lambda: unary(case.garbage, timeout=30)),
                    attempt(lambda: list(stream(iter([good, case.garbage]), timeout=30)))]
        request = self.request(case)
        out = [attempt(lambda: self.stub.ModelInfer(request, timeout=30))]
        answers: list[oip_pb.ModelStreamInferResponse] = []
        streamed = attempt(lambda: answers.extend(self.stub.ModelStreamInfer(iter([request]), timeout=30)))
        if streamed[0] != OK:  # the stream itself ended with a status (e.g. an over-size message)
            out.append(streamed)
        else:
            assert len(answers) == 1, answers
            out.append((None if answers[0].error_message else OK, answers[0].error_message))
        return out


def valid_case(case: Case, models: dict[str, Model] | None = None) -> Case:
    """A valid request of the case's operation on digits-ppca, which has every operation."""
    m = MODELS["digits-ppca"]
    tensor = None if case.op == "sample" else Wire.of(m.z() if case.op == "decode" else m.x())
    return Case(case.op, m.name, OK, (), tensor, {"seed": 1})


MODELS: dict[str, Model] = {}


# -- the server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 2], ids=["1 process", "2 processes"])
def server(repo_dir: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One process, and `genserve serve --processes 2` with the same settings (issue 17)."""
    from genserve.server.config import ServerConfig

    MODELS.update(load_models(repo_dir))
    cfg = ServerConfig(repo=repo_dir, port=0, metrics_port=0, provider="cpu", workers=2, **LIMITS)
    with serving(cfg, request.param, tmp_path_factory.mktemp("processes") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 64 * 2**20)]  # let over-size requests reach the server
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch:
        yield ch


@pytest.fixture(scope="module", params=[GenserveV1, OpenInference], ids=["genserve.v1", "oip"])
def api(request: pytest.FixtureRequest, channel: grpc.Channel) -> GenserveV1 | OpenInference:
    return request.param(channel)


@pytest.fixture(scope="module")
def models(server) -> dict[str, Model]:
    return MODELS


@pytest.fixture(autouse=True)
def no_error_logged(caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest) -> Iterator[None]:
    """Bad input is the client's problem: nothing may be logged at ERROR (no traceback of an unhandled case),
    here or, with 2 processes, in the workers' log."""
    caplog.set_level(logging.WARNING)
    server = request.getfixturevalue("server") if "server" in request.fixturenames else None
    since = server.log_size() if isinstance(server, Supervised) else 0
    yield
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    if isinstance(server, Supervised):
        errors += server.errors_logged(since)
    assert not errors, errors


def check(api: GenserveV1 | OpenInference, case: Case) -> None:
    want = case.code_for(api.name)
    for code, message in api.outcomes(case):
        where = f"{api.name} {case.op} {case.model} {case.words}: {code} {message!r}"
        assert code in (want, None), where
        assert message, where
        low = message.lower()
        for word in case.words:
            assert word.lower() in low, f"{word!r} not named; {where}"
        assert any(w in low for w in FIX), f"the message does not say how to fix the request; {where}"
    # the server answers a valid request of the same kind right after, by every call of the transport
    assert all(code == OK for code, _ in api.outcomes(valid_case(case))), case.op


# -- the cases ----------------------------------------------------------------------------------------------


def data_ops(m: Model) -> list[str]:
    return [op for op in ("log_likelihood", "encode", "decode") if op in m.operations]


def tensor_cases(models: dict[str, Model],
                 make: Callable[[Model, str], list[tuple[Wire | None, tuple[str, ...]]]]) -> list[Case]:
    """``make(model, field)`` -> [(tensor, words)] for every data-taking operation of every model; the field's
    name is among the words."""
    return [Case(op, m.name, INVALID, (FIELD[op], *words), tensor)
            for m in models.values() for op in data_ops(m) for tensor, words in make(m, FIELD[op])]


def sampling(models: dict[str, Model], make: Callable[[Model], list[tuple[dict, tuple[str, ...]]]]) -> list[Case]:
    return [Case("sample", m.name, INVALID, words, options=options)
            for m in models.values() if "sample" in m.operations for options, words in make(m)]


def _targets(models):
    out = []
    for op in ("sample", "log_likelihood", "encode", "decode"):
        tensor = valid_case(Case(op, "", OK, ())).tensor

        def target(name: str, version: int = 0, op: str = op, tensor: Wire | None = tensor) -> Case:
            return Case(op, name, OK, (), tensor, version=version)

        for case, code, words in ((target("no-such-model"), NOT_FOUND, ("no-such-model", "digits-ppca")),
                                  (target("digits-ppca", 99), NOT_FOUND, ("version 99", "loaded versions")),
                                  (target("../../etc/passwd"), NOT_FOUND, ("no model named",)),
                                  (target(""), INVALID, ("model",)),
                                  (target("digits-ppca", -1), INVALID, ("version", "-1"))):
            case.code, case.words = code, words
            out.append(case)
    return out


def _unsupported(models):
    """Each operation a family lacks: genserve.v1 FAILED_PRECONDITION naming what the model supports; OIP
    NOT_FOUND (the operation is a model of its own there), naming the models it has."""
    out = []
    for m in models.values():
        for op in ("sample", "log_likelihood", "encode", "decode"):
            if op not in m.operations:
                tensor = None if op == "sample" else Wire.of(m.z() if op == "decode" else m.x())
                out.append(Case(op, m.name, (UNSUPPORTED, NOT_FOUND), (m.name, m.family), tensor))
    return out


def _missing(models):
    return tensor_cases(models, lambda m, f: [(None, ())])


def _dtypes(models):
    def make(m: Model, f: str):
        shape = [2, *m.rows(f)]
        return [(zeros(shape, "complex64"), ("type",)), (zeros(shape, "str"), ("type",)),
                (zeros(shape, "FLOAT32"), ("type",)), (Wire.of(np.zeros(shape, bool)), ("dtype",))]
    return tensor_cases(models, make)


def _shapes(models):
    def make(m: Model, f: str):
        s = m.rows(f)
        wrong = (*s[:-1], s[-1] + 1)
        return [(Wire.of(np.zeros((2, *wrong), np.float32)), ("shape",)),
                (Wire.of(np.zeros(s, np.float32)), ("batch axis",)),
                (Wire.of(np.zeros((2, *s, 1), np.float32)), ("shape",)),
                (Wire.of(np.zeros((2, math.prod(s) + 3), np.float32)), ("shape",)),
                (zeros([2] + [1] * 70, data=b"\0" * 8), ("71 axes", "more than the 64", "send the rows")),
                (zeros([2] + [1] * 63, data=b"\0" * 8), ("shape",)),  # 64 axes: an array, of the wrong shape
                (zeros([1, -8, 8], data=b""), ("negative dimension -8", "must be >= 0"))]
    return tensor_cases(models, make)


def _ragged(models):
    """Byte buffers whose length disagrees with the shape: short, long, not a whole number of rows, and a huge
    shape with a tiny buffer (refused before any allocation)."""
    def make(m: Model, f: str):
        shape = [2, *m.rows(f)]
        size = math.prod(shape) * 4
        return [(zeros(shape, data=b"\0" * (size - 4)), ("bytes",)),
                (zeros(shape, data=b"\0" * (size + 4)), ("bytes",)),
                (zeros(shape, data=b"\0" * (size // 2 + 2)), ("bytes",)),
                (zeros([2**40, *shape[1:]], data=b"\0" * size), ("bytes",)),
                (zeros([2**31, 2**31, 2**31], data=b""), ("bytes",))]
    return tensor_cases(models, make)


def _empty(models):
    return tensor_cases(models, lambda m, f: [(Wire.of(np.zeros((0, *m.rows(f)), np.float32)), ("empty",)),
                                              (zeros([0]), ("shape",))])


def _non_finite(models):
    def make(m: Model, f: str):
        out = []
        for value in (np.nan, np.inf, -np.inf):
            a = (m.x() if f == "x" else m.z()).copy()
            a.reshape(2, -1)[1, -1] = value
            out.append((Wire.of(a), ("row 1", "nan or infinite")))
        half = (m.x() if f == "x" else m.z()).astype(np.float16)
        half.reshape(2, -1)[0, 0] = np.inf
        out.append((Wire.of(half), ("row 0",)))
        return out
    return tensor_cases(models, make)


def _domain(models):
    def make(m: Model, f: str):
        if f != "x" or not m.discrete:
            return []
        out = []
        for value, words in ((m.levels, (str(m.levels),)), (-1, ("-1",)), (2.5, ("2.5",)), (1e30, ("1e+30",))):
            a = m.x().copy()
            a.reshape(2, -1)[0, 3] = value
            out.append((Wire.of(a), ("row 0", *words, f"0..{m.levels - 1}")))
        ints = m.x().astype(np.int64)
        ints.reshape(2, -1)[1, 0] = 2**40
        out.append((Wire.of(ints), ("row 1",)))
        return out
    return tensor_cases(models, make)


def _too_many_rows(models):
    rows = LIMITS["max_rows_per_request"] + 1
    return tensor_cases(models, lambda m, f: [(Wire.of(np.zeros((rows, *m.rows(f)), np.float32)),
                                               (str(rows), "500"))])


def _over_size(models):
    """A request message above max_message_mb (4 MiB): RESOURCE_EXHAUSTED naming the setting, with a fix."""
    m = models["digits-ppca"]
    rows = lambda op: 5 * 2**20 // (4 * math.prod(m.rows(FIELD[op])))  # noqa: E731 - 5 MiB of float32 rows
    return [Case(op, m.name, EXHAUSTED, ("max_message_mb", "4 mib", "send fewer rows"),
                 Wire.of(np.zeros((rows(op), *m.rows(FIELD[op])), np.float32)))
            for op in data_ops(m)]


def _garbage(models):
    """Bytes that are not a protobuf message where a request belongs, in unary calls and in the middle of a
    request stream: INVALID_ARGUMENT naming the message."""
    garbage = (b"\xff" * 7, struct.pack("<Q", 2**64 - 1), b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05abc")
    return [Case(op, "digits-ppca", INVALID, ("request message", "protobuf"), garbage=bad)
            for op in ("sample", "log_likelihood", "encode", "decode") for bad in garbage]


def _n(models):
    return sampling(models, lambda m: [({"n": 0}, ("n", "at least 1")), ({"n": -1}, ("n", "at least 1")),
                                       ({"n": -2**63}, ("n", "at least 1")), ({"n": 1001}, ("n", "1001", "1000")),
                                       ({"n": 2**63 - 1}, ("n", "limit"))])


def _temperature(models):
    return sampling(models, lambda m: [({"temperature": t}, ("temperature",))
                                       for t in (0.0, -1.0, -0.0, math.nan, math.inf, -math.inf, 1e9, 100.5)])


def _langevin(models):
    """On an EBM the values are out of range; on any other family the fields do not apply; both name them."""
    return sampling(models, lambda m: [({"langevin_steps": s}, ("langevin_steps",))
                                       for s in (0, -5, LIMITS["max_langevin_steps"] + 1, 2**31 - 1)]
                    + [({"langevin_step_size": s}, ("langevin_step_size",))
                       for s in (0.0, -1.0, math.nan, math.inf, 1e300)])


def _seed(models):
    m = models["digits-ppca"]
    tensors = {"log_likelihood": Wire.of(m.x()), "encode": Wire.of(m.x()), "decode": Wire.of(m.z())}
    return [Case(op, m.name, INVALID, ("seed", "2**63"), tensors.get(op), {"seed": BAD_SEED})
            for op in ("sample", "log_likelihood", "encode", "decode")]


def _importance_samples(models):
    return [Case("log_likelihood", m.name, INVALID, ("importance_samples",), Wire.of(m.x()),
                 {"importance_samples": k})
            for m in models.values() if "log_likelihood" in m.operations
            for k in (0, -1, LIMITS["max_importance_samples"] + 1, 2**31 - 1)]


def _deterministic_draw(models):
    """``sample`` on an operation that is a deterministic map (a flow's encode) is refused, naming it."""
    return [Case(op, m.name, INVALID, ("sample", "deterministic"),
                 Wire.of(m.z() if op == "decode" else m.x()), {"sample": True})
            for m in models.values() if m.family == "flow" for op in ("encode", "decode") if op in m.operations]


CASES = {f.__name__[1:]: f for f in (_targets, _unsupported, _missing, _dtypes, _shapes, _ragged, _empty,
                                      _non_finite, _domain, _too_many_rows, _over_size, _garbage, _n,
                                      _temperature, _langevin, _seed, _importance_samples, _deterministic_draw)}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.usefixtures("server")  # first, so that pytest starts each server once for both APIs
def test_bad_input_gets_its_status_and_says_how_to_fix_it(api, models: dict[str, Model], kind: str) -> None:
    cases = CASES[kind](models)
    assert cases, f"no model in the test repository has a {kind} case: the repository lost a family"
    for case in cases:
        check(api, case)


def test_every_family_and_operation_is_covered(models: dict[str, Model]) -> None:
    """The table reaches every model and every operation, and the cases the issue names are in it."""
    cases = [c for make in CASES.values() for c in make(models)]
    assert {c.op for c in cases} == {"sample", "log_likelihood", "encode", "decode"}
    assert set(models) <= {c.model for c in cases}, set(models) - {c.model for c in cases}
    assert {"garbage", "shapes", "non_finite", "over_size"} <= set(CASES)


# -- genserve.v1 only ---------------------------------------------------------------------------------------


def test_sample_stream_chunk_size(channel: grpc.Channel, models: dict[str, Model]) -> None:
    stub = service_pb2_grpc.GenerativeServiceStub(channel)
    m = models["digits-ppca"]
    for size, words in ((-1, ("chunk_size", "negative")), (-2**63, ("chunk_size",)),
                        (10**7, ("chunk_size", "message limit")), (2**63 - 1, ("chunk_size",))):
        request = pb.SampleStreamRequest(sample=pb.SampleRequest(model=m.name, n=4), chunk_size=size)
        code, message = attempt(lambda r=request: list(stub.SampleStream(r, timeout=30)))
        assert code == INVALID and all(w in message for w in words), (size, code, message)


def test_a_bad_stream_chunk_after_good_ones_ends_the_stream_with_its_status(channel, models) -> None:
    stub = service_pb2_grpc.GenerativeServiceStub(channel)
    m = models["digits-ppca"]
    v1 = GenserveV1(channel)
    good = v1.request(valid_case(Case("log_likelihood", "", OK, ())))
    bad = v1.request(Case("log_likelihood", m.name, OK, (), zeros([2, 8, 8], data=b"\0" * 12)))
    code, message = attempt(lambda: list(stub.LogLikelihoodStream(iter([good, good, bad, good]), timeout=30)))
    assert code == INVALID and "x:" in message and "bytes" in message, (code, message)


def test_return_latents_on_a_family_without_latents_is_answered(channel, models: dict[str, Model]) -> None:
    stub = service_pb2_grpc.GenerativeServiceStub(channel)
    for m in models.values():
        if "sample" not in m.operations:
            continue
        response = stub.Sample(pb.SampleRequest(model=m.name, n=2, seed=1, return_latents=True), timeout=30)
        assert from_proto(response.samples).shape == (2, *m.shape)
