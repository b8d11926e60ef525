"""Machine-readable errors over gRPC: every refusal of both APIs (genserve.v1 and the Open Inference Protocol)
carries a google.rpc.Status in its trailer, with an ErrorInfo (domain genserve.dev, a stable reason, metadata
naming the method and model) and, when a request field is at fault, a BadRequest naming it; the clients raise
the GenserveError subclass of the code with those details parsed. One real server for the module.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from supervised import serving

from genserve.clients.channel import (
    ERRORS,
    FailedPreconditionError,
    FieldViolation,
    GenserveError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from genserve.clients.client import AsyncClient, Client
from genserve.core.tensors import to_proto
from genserve.oip import grpc_service_pb2 as oip_pb
from genserve.oip import grpc_service_pb2_grpc as oip_grpc
from genserve.server import errors
from genserve.server.config import ServerConfig
from genserve.server.transport import (
    DETAILS_KEY,
    DOMAIN,
    MAX_DETAILS_BYTES,
    Failure,
    failure_of,
    invalid,
    status_of,
    within_deadline,
)
from genserve.v1 import manifest_pb2, service_pb2_grpc
from genserve.v1 import service_pb2 as pb

PPCA = "digits-ppca"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
REASONS = {errors.EngineError: "INTERNAL_ERROR", errors.NotFound: "MODEL_NOT_FOUND",
           errors.Unsupported: "OPERATION_NOT_SUPPORTED", errors.NotReady: "MODEL_NOT_READY",
           errors.InvalidInput: "INVALID_ARGUMENT", errors.QueueFull: "QUEUE_FULL"}
"""The engine's reasons are API: a rename breaks clients that branch on them."""


@pytest.fixture(scope="module", params=[1, 2], ids=["1 process", "2 processes"])
def server(repo_dir: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One process, and `genserve serve --processes 2` with the same settings (issue 17)."""
    cfg = ServerConfig(repo=repo_dir, host="127.0.0.1", port=0, metrics_port=0, provider="cpu", workers=2,
                       intra_op_threads=1, max_message_mb=1, max_rows_per_request=100, max_sample_n=10000,
                       max_queued_rows=10000, grace_s=2.0)
    with serving(cfg, request.param, tmp_path_factory.mktemp("processes") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def no_likelihood(channel) -> str:
    """A model without a likelihood (the GAN), from the repository."""
    stub = service_pb2_grpc.GenerativeServiceStub(channel)
    for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models:
        if manifest_pb2.OPERATION_LOG_LIKELIHOOD not in m.operations:
            return m.name
    raise AssertionError("the test repository has no model without a likelihood (the GAN)")


def details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[tuple[str, str]]]:
    """(the ErrorInfo, [(field, description)] of the BadRequest) of a failed call's google.rpc.Status, which
    must be there and agree with the call's code and message."""
    trailer = [v for k, v in error.trailing_metadata() or () if k == DETAILS_KEY]
    assert len(trailer) == 1, (error.code(), error.details(), error.trailing_metadata())
    status = status_pb2.Status.FromString(trailer[0])
    assert status.code == error.code().value[0] and status.message == error.details()
    info, violations = None, []
    for any_detail in status.details:
        e, b = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if any_detail.Unpack(e):
            info = e
        else:
            assert any_detail.Unpack(b), any_detail.type_url
            violations += [(v.field, v.description) for v in b.field_violations]
    assert info is not None and info.domain == DOMAIN and re.fullmatch(r"[A-Z][A-Z0-9_]*", info.reason), info
    return info, violations


def refused(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        result = call(*args, timeout=30)
        list(result) if not hasattr(result, "DESCRIPTOR") else None  # a server stream: read it to its status
    return e.value


# ---------------------------------------------------------------------------------------------------------------
# genserve.v1


def test_genserve_v1_details_name_the_field_reason_method_and_model(channel, no_likelihood) -> None:
    stub = service_pb2_grpc.GenerativeServiceStub(channel)
    x = to_proto(np.zeros((2, 8, 8), np.float32))
    cases = [  # (call, request, code, reason, fields, metadata)
        (stub.Sample, pb.SampleRequest(model=PPCA, n=0), "INVALID_ARGUMENT", "INVALID_ARGUMENT", ["n"],
         {"method": "Sample", "model": PPCA}),
        (stub.SampleStream, pb.SampleStreamRequest(sample=pb.SampleRequest(model=PPCA, n=0)), "INVALID_ARGUMENT",
         "INVALID_ARGUMENT", ["sample.n"], {"method": "SampleStream", "model": PPCA}),
        (stub.SampleStream, pb.SampleStreamRequest(sample=pb.SampleRequest(model=PPCA, n=4), chunk_size=-1),
         "INVALID_ARGUMENT", "INVALID_ARGUMENT", ["chunk_size"], {"method": "SampleStream"}),
        (stub.Sample, pb.SampleRequest(model="", n=1), "INVALID_ARGUMENT", "INVALID_ARGUMENT", ["model"],
         {"method": "Sample"}),
        (stub.Sample, pb.SampleRequest(model=PPCA, n=1, version=-1), "INVALID_ARGUMENT", "INVALID_ARGUMENT",
         ["version"], {"model": PPCA}),
        (stub.Sample, pb.SampleRequest(model=PPCA, n=1, temperature=0.0), "INVALID_ARGUMENT", "INVALID_ARGUMENT",
         ["temperature"], {"model": PPCA}),
        (stub.Sample, pb.SampleRequest(model=PPCA, n=1, seed=2**64 - 1), "INVALID_ARGUMENT", "INVALID_ARGUMENT",
         ["seed"], {"model": PPCA}),
        (stub.Sample, pb.SampleRequest(model=PPCA, n=5000), "INVALID_ARGUMENT", "ANSWER_TOO_LARGE", ["n"],
         {"model": PPCA}),
        (stub.LogLikelihood, pb.LogLikelihoodRequest(model=PPCA), "INVALID_ARGUMENT", "INVALID_ARGUMENT", ["x"],
         {"method": "LogLikelihood", "model": PPCA}),
        (stub.LogLikelihood, pb.LogLikelihoodRequest(model=PPCA, x=to_proto(np.zeros((101, 8, 8), np.float32))),
         "INVALID_ARGUMENT", "INVALID_ARGUMENT", ["x"], {"model": PPCA}),
        (stub.Decode, pb.DecodeRequest(model=PPCA, z=pb.Tensor(shape=[2, 16], dtype="float32", data=b"\0" * 12)),
         "INVALID_ARGUMENT", "INVALID_ARGUMENT", ["z"], {"method": "Decode"}),
        (stub.Sample, pb.SampleRequest(model="no-such-model", n=1), "NOT_FOUND", "MODEL_NOT_FOUND", [],
         {"method": "Sample", "model": "no-such-model"}),
        (stub.Sample, pb.SampleRequest(model=PPCA, n=1, version=99), "NOT_FOUND", "MODEL_NOT_FOUND", [],
         {"model": PPCA}),
        (stub.GetModel, pb.GetModelRequest(model="no-such-model"), "NOT_FOUND", "MODEL_NOT_FOUND", [],
         {"method": "GetModel", "model": "no-such-model"}),
        (stub.LogLikelihood, pb.LogLikelihoodRequest(model=no_likelihood, x=x), "FAILED_PRECONDITION",
         "OPERATION_NOT_SUPPORTED", [], {"method": "LogLikelihood", "model": no_likelihood}),
    ]
    for call, request, code, reason, fields, metadata in cases:
        error = refused(call, request)
        where = (request, error.code(), error.details())
        assert error.code().name == code, where
        info, violations = details(error)
        assert info.reason == reason, (info, where)
        assert [f for f, _ in violations] == fields, (violations, where)
        for f, description in violations:  # the message names the field, the description says what is wrong
            assert error.details().startswith(f"{f}: ") and description and description in error.details(), where
        assert metadata.items() <= dict(info.metadata).items(), (info.metadata, where)


def test_a_stream_failing_mid_way_carries_its_details(channel) -> None:
    stub = service_pb2_grpc.GenerativeServiceStub(channel)
    good = pb.LogLikelihoodRequest(model=PPCA, x=to_proto(np.zeros((2, 8, 8), np.float32)), seed=1)
    bad = pb.LogLikelihoodRequest(model=PPCA, x=pb.Tensor(shape=[2, 8, 8], dtype="float32", data=b"\0" * 12))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.LogLikelihoodStream(iter([good, good, bad]), timeout=30))
    info, violations = details(e.value)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in violations] == ["x"]
    assert info.metadata["method"] == "LogLikelihoodStream" and info.metadata["model"] == PPCA


# ---------------------------------------------------------------------------------------------------------------
# The Open Inference Protocol


def infer_request(name: str, **parameters: object) -> oip_pb.ModelInferRequest:
    r = oip_pb.ModelInferRequest(model_name=name)
    for key, value in parameters.items():
        if isinstance(value, bool):
            r.parameters[key].bool_param = value
        elif isinstance(value, int):
            r.parameters[key].int64_param = value
        else:
            r.parameters[key].double_param = float(value)
    return r


def test_open_inference_details(channel, no_likelihood) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    x = infer_request(f"{PPCA}.log_likelihood")
    x.inputs.add(name="x", datatype="FP32", shape=[2, 8, 8])
    x.raw_input_contents.append(b"\0" * 12)
    wrong_type = infer_request(f"{PPCA}.log_likelihood")
    wrong_type.inputs.add(name="x", datatype="STRING", shape=[2, 8, 8])
    cases = [  # (call, request, code, reason, fields, metadata)
        (stub.ModelInfer, infer_request(f"{PPCA}.sample", n=0), "INVALID_ARGUMENT", "INVALID_ARGUMENT", ["n"],
         {"method": "oip.Sample", "model": PPCA}),
        (stub.ModelInfer, infer_request(f"{PPCA}.sample", n=5000), "INVALID_ARGUMENT", "ANSWER_TOO_LARGE", ["N"],
         {"method": "oip.Sample", "model": PPCA}),
        (stub.ModelInfer, infer_request(f"{PPCA}.sample", n=1, temperature=-1.0), "INVALID_ARGUMENT",
         "INVALID_ARGUMENT", ["temperature"], {"model": PPCA}),
        (stub.ModelInfer, x, "INVALID_ARGUMENT", "INVALID_ARGUMENT", [], {"method": "oip.LogLikelihood"}),
        (stub.ModelInfer, wrong_type, "INVALID_ARGUMENT", "INVALID_ARGUMENT", [], {"model": PPCA}),
        (stub.ModelInfer, infer_request("no-such-model.sample", n=1), "NOT_FOUND", "MODEL_NOT_FOUND", [],
         {"model": "no-such-model.sample"}),
        (stub.ModelInfer, infer_request(f"{no_likelihood}.log_likelihood"), "NOT_FOUND", "MODEL_NOT_FOUND", [],
         {"model": f"{no_likelihood}.log_likelihood"}),
        (stub.ModelMetadata, oip_pb.ModelMetadataRequest(name="no-such-model.sample"), "NOT_FOUND",
         "MODEL_NOT_FOUND", [], {}),
        (stub.ModelConfig, oip_pb.ModelConfigRequest(name=f"{PPCA}.sample", version="x"), "INVALID_ARGUMENT",
         "INVALID_ARGUMENT", [], {}),
    ]
    for call, request, code, reason, fields, metadata in cases:
        error = refused(call, request)
        where = (request, error.code(), error.details())
        assert error.code().name == code, where
        info, violations = details(error)
        assert info.reason == reason, (info, where)
        assert [f for f, _ in violations] == fields, (violations, where)
        assert metadata.items() <= dict(info.metadata).items(), (info.metadata, where)


# ---------------------------------------------------------------------------------------------------------------
# The clients: typed exceptions with the details parsed


def test_the_client_raises_the_subclass_of_the_code_with_the_details(server, no_likelihood) -> None:
    with Client(f"127.0.0.1:{server.port}", retries=0) as c:
        with pytest.raises(InvalidArgumentError) as e:
            c.sample(PPCA, 20000)  # over max_sample_n
        assert isinstance(e.value, GenserveError) and e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.reason == "INVALID_ARGUMENT" and e.value.domain == DOMAIN
        assert e.value.fields == ["sample.n"] and e.value.field_violations[0].description in e.value.message
        assert e.value.metadata == {"method": "SampleStream", "model": PPCA} and e.value.method
        with pytest.raises(NotFoundError) as e:
            c.sample("no-such-model", 1)
        assert e.value.reason == "MODEL_NOT_FOUND" and "no-such-model" in e.value.message
        with pytest.raises(FailedPreconditionError) as e:
            c.log_likelihood(no_likelihood, np.zeros((1, 8, 8), np.float32))
        assert e.value.reason == "OPERATION_NOT_SUPPORTED" and not e.value.field_violations
        with pytest.raises(GenserveError):  # what callers catch today still catches it
            c.sample(PPCA, 20000)


def test_the_async_client_raises_the_same(server) -> None:
    async def run() -> GenserveError:
        async with AsyncClient(f"127.0.0.1:{server.port}", retries=0) as c:
            try:
                await c.sample(PPCA, 1, temperature=0.0)
            except GenserveError as e:
                return e
        raise AssertionError("temperature 0 was accepted")

    e = asyncio.run(run())
    assert isinstance(e, InvalidArgumentError) and e.fields == ["temperature"] and e.reason == "INVALID_ARGUMENT"
    assert e.metadata == {"method": "Sample", "model": PPCA}


def test_an_unreachable_server_is_unavailable_without_details() -> None:
    from ports import free_port

    with Client(f"127.0.0.1:{free_port()}", retries=0, timeout=30) as c, pytest.raises(UnavailableError) as e:
        c.models()
    assert e.value.reason == "" and e.value.field_violations == () and "cannot reach" in e.value.message


def test_http_errors_parse_to_the_same_exceptions() -> None:
    body = Failure(grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].datatype is wrong",
                   reason="INVALID_ARGUMENT", metadata={"model": "m.sample"}).to_json()
    body["field_violations"] = [{"field": "inputs[0].datatype", "description": "is wrong"}]
    e = GenserveError.from_http(400, __import__("json").dumps(body).encode())
    assert isinstance(e, InvalidArgumentError) and e.reason == "INVALID_ARGUMENT" and e.domain == DOMAIN
    assert e.field_violations == (FieldViolation("inputs[0].datatype", "is wrong"),)
    assert e.metadata == {"model": "m.sample"} and e.message == "inputs[0].datatype is wrong"
    plain = GenserveError.from_http(503, b"Service Unavailable")  # not genserve's JSON (a proxy's)
    assert isinstance(plain, UnavailableError) and plain.message == "Service Unavailable" and plain.reason == ""
    assert isinstance(GenserveError.from_http(404, {"error": "x"}), NotFoundError)


def test_every_code_the_server_sends_has_a_subclass() -> None:
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                 "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "PERMISSION_DENIED", "INTERNAL", "UNIMPLEMENTED"):
        cls = ERRORS[grpc.StatusCode[code]]
        assert issubclass(cls, GenserveError) and cls is not GenserveError, code


# ---------------------------------------------------------------------------------------------------------------
# The transport's statuses, without a server


def test_engine_errors_keep_their_reasons_and_fields() -> None:
    for cls, reason in REASONS.items():
        assert cls.reason == reason, cls
        failure = status_of(cls("n", "x") if cls is errors.InvalidInput else cls("broken"), "Sample")
        assert failure.reason == reason and failure.code.name == cls.code
    f = status_of(errors.InvalidInput("more than the limit of 5 rows; send fewer", "x"), "LogLikelihood")
    assert [(v.field, v.description) for v in f.violations] == [("x", "more than the limit of 5 rows; send fewer")]
    assert f.message == "x: more than the limit of 5 rows; send fewer"


def test_a_bug_is_internal_with_its_request_id(caplog: pytest.LogCaptureFixture) -> None:
    f = status_of(ZeroDivisionError("x"), "Sample")
    assert f.code == grpc.StatusCode.INTERNAL and f.reason == "INTERNAL_ERROR"
    assert f.metadata["request_id"] in f.message


def test_deadline_reasons() -> None:
    async def never() -> None:
        await asyncio.Event().wait()

    async def run(remaining: float | None, ceiling: float) -> Failure:
        with pytest.raises(Failure) as e:
            await within_deadline(never(), remaining, ceiling)
        return e.value

    capped = asyncio.run(run(None, 0.01))
    assert capped.code == grpc.StatusCode.DEADLINE_EXCEEDED and capped.reason == "DEADLINE_CEILING"
    client = asyncio.run(run(0.01, 60.0))
    assert client.code == grpc.StatusCode.DEADLINE_EXCEEDED and client.reason == "DEADLINE_EXCEEDED"


def test_status_round_trip_and_size_bound() -> None:
    f = invalid("is 3; use >= 4", "sample.n")
    f.metadata["model"] = "m"
    back = failure_of(f.code, f.message, f.trailing_metadata())
    assert (back.code, back.message, back.reason, back.violations, back.metadata) == (
        f.code, f.message, f.reason, f.violations, f.metadata)
    assert failure_of(grpc.StatusCode.NOT_FOUND, "gone").reason == "MODEL_NOT_FOUND"  # no trailer: the default
    huge = Failure(grpc.StatusCode.NOT_FOUND, "no model named 'x'; the repository has: " + "m, " * 3000)
    assert huge.trailing_metadata() == ()  # too large for a trailer: the message alone, as gRPC can carry it
    assert len(huge.to_status().SerializeToString()) > MAX_DETAILS_BYTES


def test_the_documented_reasons_are_the_reasons() -> None:
    """docs/errors.md lists every reason the server sends; each reason in the code is in it."""
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", DOCS.read_text(), re.M))
    sources = [Path(__file__).resolve().parents[2] / p for p in (
        "server/errors.py", "server/transport.py", "server/http_face.py", "server/http_tensors.py",
        "server/message_parsing.py", "server/auth.py", "server/engine.py")]
    used = {m for p in sources for m in re.findall(r'reason(?:=| = )"([A-Z_]+)"', p.read_text())}
    assert set(REASONS.values()) <= documented
    assert used <= documented, used - documented


def test_a_message_that_does_not_parse_or_is_too_large_carries_its_details(channel) -> None:
    garbage = channel.unary_unary("/genserve.v1.GenerativeService/LogLikelihood",
                                  request_serializer=lambda b: b, response_deserializer=lambda b: b)
    malformed = refused(garbage, b"\xff\xff\xff")
    huge = refused(garbage, pb.LogLikelihoodRequest(model=PPCA, x=to_proto(
        np.zeros((6000, 8, 8), np.float32))).SerializeToString())  # ~1.5 MiB, over the 1 MiB limit
    info, _ = details(malformed)
    assert malformed.code() == grpc.StatusCode.INVALID_ARGUMENT and info.reason == "MALFORMED_MESSAGE"
    assert info.metadata["method"] == "/genserve.v1.GenerativeService/LogLikelihood"
    info, _ = details(huge)
    assert huge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and info.reason == "MESSAGE_TOO_LARGE"


@pytest.mark.parametrize("processes", [1, 2], ids=["1 process", "2 processes"])
def test_a_refused_token_carries_its_details(repo_dir: Path, tmp_path: Path, processes: int) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    cfg = ServerConfig(repo=repo_dir, host="127.0.0.1", port=0, metrics_port=0, provider="cpu", token_file=tokens)
    with serving(cfg, processes, tmp_path / "server.log") as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        e = refused(service_pb2_grpc.GenerativeServiceStub(ch).ListModels, pb.ListModelsRequest())
    info, _ = details(e)
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and info.reason == "UNAUTHENTICATED"
