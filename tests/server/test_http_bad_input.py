"""Bad input over HTTP/JSON: the gRPC APIs' bad-input table (tests/server/test_bad_input.py) sent to the Open
Inference Protocol's HTTP face, then the refusals only HTTP has (malformed JSON, wrong datatypes, shape/data
mismatches, the binary tensor extension's header and sizes, bodies over the limit, unknown models, versions,
operations and paths, content headers, requests that are not HTTP, the concurrency limit).

Each is the right 4xx with the JSON error body: ``error`` (the message, naming what is at fault and how to fix
it), ``code``, ``reason``, ``field_violations`` and ``metadata``; nothing is logged at ERROR; after the whole
matrix the server answers a good request and /v2/health/ready is 200. One server for the module (the table's
limits).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import math
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient
from ports import free_port
from supervised import Supervised, serving
from test_bad_input import BAD_SEED, CASES, FIELD, FIX, LIMITS, MODELS, OK, Case, OpenInference, load_models, valid_case
from tritonclient.utils import InferenceServerException
from waiting import until

from genserve.clients.channel import GenserveError, InvalidArgumentError, NotFoundError
from genserve.oip import grpc_service_pb2 as oip_pb
from genserve.server.app import BackgroundServer
from genserve.server.config import ServerConfig
from genserve.server.http_face import HTTP_STATUS
from genserve.server.http_tensors import infer_response

PPCA = "digits-ppca"
INFER = f"/v2/models/{PPCA}.log_likelihood/infer"
GOOD = {"inputs": [{"name": "x", "shape": [1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
        "parameters": {"seed": 1}}
DETAILS = {"error", "code", "reason", "domain", "field_violations", "metadata"}


@pytest.fixture(scope="module", params=[1, 2], ids=["1 process", "2 processes"])
def server(repo_dir: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One process, and `genserve serve --processes 2` with the same settings (issue 17)."""
    MODELS.update(load_models(repo_dir))
    cfg = ServerConfig(repo=repo_dir, host="127.0.0.1", port=0, metrics_port=0, http_port=free_port(),
                       provider="cpu", workers=2, intra_op_threads=1, grace_s=2.0, **LIMITS)
    with serving(cfg, request.param, tmp_path_factory.mktemp("processes") / "server.log") as srv:
        yield srv


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


def send(port: int, method: str, path: str, body: bytes | dict | None = None,
         headers: dict[str, str] | None = None, body_sent: bool = True) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body) of one request on a fresh connection; ``body_sent`` False declares the
    body's length but sends only the headers (a body refused for its size is never read)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if data is not None and not any(k.lower() == "content-length" for k in headers or {}):
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data if body_sent else None)
        r = conn.getresponse()
        raw = r.read()
        answer_headers = {k.lower(): v for k, v in r.getheaders()}
        if answer_headers.get("content-type", "").startswith("application/json"):
            return r.status, answer_headers, json.loads(raw, parse_constant=_no_constant)
        return r.status, answer_headers, raw
    finally:
        conn.close()


def _no_constant(token: str) -> float:
    raise AssertionError(f"the answer holds the bare token {token}, which is not JSON")


def check_error(status: int, headers: dict[str, str], answer: Any, want: int, words: tuple[str, ...] = (),
                reason: str | None = None, fields: list[str] | None = None, where: object = "") -> None:
    """The refusal is ``want`` with genserve's JSON error: the message names the words and says how to fix the
    request; the reason is stable UPPER_SNAKE; each field violation's description is in the message."""
    where = (where, status, answer)
    assert status == want, where
    assert headers.get("content-type") == "application/json" and isinstance(answer, dict), where
    assert DETAILS <= set(answer), where
    assert answer["code"] in grpc.StatusCode.__members__ and answer["domain"] == "genserve.dev", where
    assert re.fullmatch(r"[A-Z][A-Z0-9_]*", answer["reason"]), where
    message = answer["error"]
    assert message, where
    for word in words:
        assert word.lower() in message.lower(), (word, where)
    assert any(w in message.lower() for w in FIX), ("the message does not say how to fix the request", where)
    if reason is not None:
        assert answer["reason"] == reason, where
    if fields is not None:
        assert [v["field"] for v in answer["field_violations"]] == fields, where
    for v in answer["field_violations"]:
        assert v["field"] and v["description"] and v["description"] in message, where
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in answer["metadata"].items()), where


# ---------------------------------------------------------------------------------------------------------------
# The gRPC APIs' table, over HTTP


class Http:
    """The OIP's HTTP face: each case as an infer request with the binary tensor extension (any bytes, any
    dtype), and with JSON ``data`` where the tensor's bytes are a whole array of a datatype JSON can carry."""

    def __init__(self, port: int, max_body: int) -> None:
        self.port = port
        self.max_body = max_body

    def path(self, case: Case) -> str:
        name = f"{case.model}.{case.op}" if case.model else ""
        version = f"/versions/{case.version}" if case.version else ""
        return f"/v2/models/{quote(name, safe='')}{version}/infer"

    def documents(self, case: Case) -> list[tuple[bytes, dict[str, str]]]:
        """(body, headers) of each form of the case."""
        parameters: dict[str, Any] = {"seed": 1, **({"n": 1} if case.op == "sample" else {})}
        for key, value in case.options.items():
            parameters[key] = -1 if value is BAD_SEED else value
        document = {"parameters": parameters, "inputs": []}
        if case.tensor is None:
            return [(json.dumps(document).encode(), {})]
        t = case.tensor
        tensor = {"name": FIELD[case.op], "datatype": OpenInference.DATATYPE.get(t.dtype, t.dtype.upper()),
                  "shape": list(t.shape)}
        binary = json.dumps({**document, "inputs": [{**tensor, "parameters": {"binary_data_size": len(t.data)}}]})
        forms = [(binary.encode() + t.data, {"Inference-Header-Content-Length": str(len(binary.encode()))})]
        dtype = np.dtype(t.dtype) if t.dtype in OpenInference.DATATYPE else None
        count = math.prod(t.shape) if all(d >= 0 for d in t.shape) else -1
        if dtype is not None and count >= 0 and len(t.data) == count * dtype.itemsize and count <= 2**20:
            values = np.frombuffer(t.data, dtype.newbyteorder("<")).tolist()
            values = [v if not isinstance(v, float) or math.isfinite(v) else
                      ("NaN" if v != v else "Infinity" if v > 0 else "-Infinity") for v in values]
            forms.append((json.dumps({**document, "inputs": [{**tensor, "data": values}]}).encode(), {}))
        return forms

    def outcomes(self, case: Case) -> list[tuple[int, dict[str, str], Any]]:
        forms = [(case.garbage, {})] if case.garbage is not None else self.documents(case)
        out = []
        for body, headers in forms:
            out.append(send(self.port, "POST", self.path(case), body, headers, body_sent=len(body) <= self.max_body))
        return out


def expected(case: Case) -> tuple[int, tuple[str, ...], str | None]:
    """(HTTP status, words, reason) of a table case over HTTP."""
    if case.garbage is not None:  # not protobuf there; not JSON here
        return 400, ("not JSON",), "MALFORMED_JSON"
    if not case.model or "/" in case.model:  # no model in the path, or a path of its own: no such endpoint
        return 404, ("no endpoint",), "ENDPOINT_NOT_FOUND"
    code = case.code_for("oip")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the table's one: a message over max_message_mb
        return 413, ("max_message_mb", "4 mib"), "MESSAGE_TOO_LARGE"
    return HTTP_STATUS[code], case.words, None


@pytest.mark.parametrize("kind", list(CASES))
def test_the_grpc_bad_input_table_over_http(server, kind: str) -> None:
    face = Http(server.http_port, LIMITS["max_message_mb"] * 2**20)
    cases = CASES[kind](MODELS)
    assert cases, kind
    for case in cases:
        want, words, reason = expected(case)
        for status, headers, answer in face.outcomes(case):
            check_error(status, headers, answer, want, words, reason, where=(kind, case.op, case.model, case.words))
            if want != 404 or reason != "ENDPOINT_NOT_FOUND":
                assert answer["metadata"].get("model"), answer  # the model as the request named it
        # the server answers a valid request of the same kind right after
        for status, _, answer in face.outcomes(valid_case(case)):
            assert status == 200 and "outputs" in answer, (case.op, status, answer)


# ---------------------------------------------------------------------------------------------------------------
# What only HTTP has


def tensor(**changes: Any) -> dict[str, Any]:
    return {"inputs": [{**GOOD["inputs"][0], **changes}], "parameters": {"seed": 1}}


HTTP_CASES: list[tuple[str, str, Any, dict[str, str], int, tuple[str, ...], str, list[str] | None]] = [
    # (method, path, body, headers, status, words, reason, fields)
    # malformed JSON
    ("POST", INFER, b"{not json", {}, 400, ("not JSON",), "MALFORMED_JSON", []),
    ("POST", INFER, b"", {}, 400, ("not JSON",), "MALFORMED_JSON", []),
    ("POST", INFER, b"\xff\xfe{}", {}, 400, ("not JSON",), "MALFORMED_JSON", []),
    ("POST", INFER, b"[" * 100_000 + b"]" * 100_000, {}, 400, ("not JSON",), "MALFORMED_JSON", []),
    ("POST", INFER, b"[1, 2]", {}, 400, ("JSON object",), "INVALID_ARGUMENT", None),
    ("POST", INFER, {"inputs": 5}, {}, 400, ("inputs",), "INVALID_ARGUMENT", ["inputs"]),
    ("POST", INFER, {"inputs": ["x"]}, {}, 400, ("inputs[0]", "JSON object"), "INVALID_ARGUMENT", ["inputs[0]"]),
    ("POST", INFER, {**GOOD, "id": 7}, {}, 400, ("id",), "INVALID_ARGUMENT", ["id"]),
    ("POST", INFER, {**GOOD, "parameters": [1]}, {}, 400, ("parameters",), "INVALID_ARGUMENT", ["parameters"]),
    ("POST", INFER, {**GOOD, "parameters": {"seed": 2**64}}, {}, 400, ("int64",), "INVALID_ARGUMENT",
     ["parameters.seed"]),
    ("POST", INFER, {**GOOD, "parameters": {"seed": [1]}}, {}, 400, ("seed",), "INVALID_ARGUMENT",
     ["parameters.seed"]),
    ("POST", INFER, {**GOOD, "outputs": [{"name": 3}]}, {}, 400, ("outputs[0]",), "INVALID_ARGUMENT",
     ["outputs[0].name"]),
    ("POST", INFER, {**GOOD, "outputs": [{"name": "log_prob", "parameters": {"binary_data": "yes"}}]}, {}, 400,
     ("binary_data",), "INVALID_ARGUMENT", ["outputs[0].parameters.binary_data"]),
    ("POST", INFER, {**GOOD, "outputs": [{"name": "nope"}]}, {}, 400, ("nope", "its outputs are"),
     "INVALID_ARGUMENT", None),
    # wrong datatype
    ("POST", INFER, tensor(datatype="BYTES"), {}, 400, ("datatype 'BYTES'", "FP32"), "INVALID_ARGUMENT",
     ["inputs[0].datatype"]),
    ("POST", INFER, tensor(datatype=None), {}, 400, ("datatype None",), "INVALID_ARGUMENT", ["inputs[0].datatype"]),
    ("POST", INFER, tensor(data=["a"] * 64), {}, 400, ("must be numbers",), "INVALID_ARGUMENT", ["inputs[0].data"]),
    ("POST", INFER, tensor(data=[True] * 64), {}, 400, ("must be numbers",), "INVALID_ARGUMENT", ["inputs[0].data"]),
    ("POST", INFER, tensor(data=[10**400] * 64), {}, 400, ("beyond the range",), "INVALID_ARGUMENT",
     ["inputs[0].data"]),
    ("POST", INFER, tensor(datatype="INT64", data=[0.5] * 64), {}, 400, ("must be integers",), "INVALID_ARGUMENT",
     ["inputs[0].data"]),
    ("POST", INFER, tensor(datatype="UINT8", data=[300] * 64), {}, 400, ("outside the range of UINT8", "0..255"),
     "INVALID_ARGUMENT", ["inputs[0].data"]),
    ("POST", INFER, tensor(datatype="BOOL", data=[1] * 64), {}, 400, ("true/false",), "INVALID_ARGUMENT",
     ["inputs[0].data"]),
    ("POST", INFER, tensor(data=[{"v": 1}] * 64), {}, 400, ("must be numbers",), "INVALID_ARGUMENT",
     ["inputs[0].data"]),
    # shape and data mismatch
    ("POST", INFER, tensor(data=[1.0]), {}, 400, ("data has 1 elements, but shape [1, 8, 8] needs 64",),
     "INVALID_ARGUMENT", ["inputs[0].data"]),
    ("POST", INFER, tensor(data=[[0.0] * 8] * 9), {}, 400, ("data has 72 elements",), "INVALID_ARGUMENT",
     ["inputs[0].data"]),
    ("POST", INFER, tensor(shape="1,8,8"), {}, 400, ("shape",), "INVALID_ARGUMENT", ["inputs[0].shape"]),
    ("POST", INFER, tensor(shape=[1, 8, 8.0]), {}, 400, ("shape",), "INVALID_ARGUMENT", ["inputs[0].shape"]),
    ("POST", INFER, tensor(shape=[1, -8, -8]), {}, 400, ("negative dimension",), "INVALID_ARGUMENT",
     ["inputs[0].shape"]),
    ("POST", INFER, tensor(shape=[1] * 70, data=[0.0]), {}, 400, ("70 axes",), "INVALID_ARGUMENT",
     ["inputs[0].shape"]),
    ("POST", INFER, tensor(shape=[1, 64], data=[0.0] * 64), {}, 400, ("shape",), "INVALID_ARGUMENT", None),
    ("POST", INFER, tensor(name=None), {}, 400, ("name",), "INVALID_ARGUMENT", ["inputs[0].name"]),
    ("POST", INFER, tensor(name="y"), {}, 400, ("no input 'y'", "its inputs are"), "INVALID_ARGUMENT", None),
    ("POST", INFER, {"inputs": [{k: v for k, v in GOOD["inputs"][0].items() if k != "data"}]}, {}, 400,
     ("no data",), "INVALID_ARGUMENT", ["inputs[0].data"]),
    ("POST", INFER, {"inputs": GOOD["inputs"] * 2}, {}, 400, ("given twice",), "INVALID_ARGUMENT", None),
    ("POST", INFER, tensor(data=["NaN"] + [0.0] * 63), {}, 400, ("nan or infinite",), "INVALID_ARGUMENT", None),
    # the binary tensor extension: its header and sizes
    ("POST", INFER, b'{"inputs": []}', {"Inference-Header-Content-Length": "x"}, 400,
     ("Inference-Header-Content-Length",), "INVALID_ARGUMENT", ["Inference-Header-Content-Length"]),
    ("POST", INFER, b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400,
     ("Inference-Header-Content-Length is 999",), "INVALID_ARGUMENT", ["Inference-Header-Content-Length"]),
    ("POST", INFER, b'{"inputs": []}', {"Inference-Header-Content-Length": "5"}, 400, ("not JSON",),
     "MALFORMED_JSON", []),
]
"""Refusals only the HTTP face has; the binary ones are built in ``binary_cases``."""


def binary_cases() -> list[tuple[str, str, Any, dict[str, str], int, tuple[str, ...], str, list[str] | None]]:
    x = np.zeros((1, 8, 8), np.float32).tobytes()

    def body(size: int | None, raw: bytes, data: bool = False) -> tuple[bytes, dict[str, str]]:
        t: dict[str, Any] = {"name": "x", "shape": [1, 8, 8], "datatype": "FP32"}
        if size is not None:
            t["parameters"] = {"binary_data_size": size}
        if data:
            t["data"] = [0.0] * 64
        head = json.dumps({"inputs": [t]}).encode()
        return head + raw, {"Inference-Header-Content-Length": str(len(head))}

    out = []
    for (b, h), status, words, fields in (
            (body(len(x) + 4, x), 400, ("binary_data_size 260 does not fit the 256 bytes",),
             ["inputs[0].parameters.binary_data_size"]),
            (body(-1, x), 400, ("binary_data_size -1",), ["inputs[0].parameters.binary_data_size"]),
            (body("256", x), 400, ("binary_data_size '256'",), ["inputs[0].parameters.binary_data_size"]),
            (body(len(x), x + b"\0" * 8), 400, ("8 bytes after the json",), ["Inference-Header-Content-Length"]),
            (body(len(x), x, data=True), 400, ("both data and binary_data_size",), ["inputs[0].data"]),
            (body(12, x[:12]), 400, ("bytes",), None),  # the raw bytes do not fill the shape: the OIP's check
            (body(None, x), 400, ("no data (or binary_data_size)",), ["inputs[0].data"])):
        out.append(("POST", INFER, b, h, status, words, "INVALID_ARGUMENT", fields))
    return out


def test_http_only_refusals(server) -> None:
    for method, path, body, headers, status, words, reason, fields in HTTP_CASES + binary_cases():
        got = send(server.http_port, method, path, body, headers)
        check_error(*got, status, words, reason, fields, where=(path, body if len(str(body)) < 300 else "...", headers))
        assert got[2]["metadata"].get("model"), got  # the model of the path, in every refusal of an infer


def test_unknown_models_versions_operations_and_paths(server) -> None:
    port = server.http_port
    cases = [  # (method, path, status, words, reason)
        ("POST", "/v2/models/no-such-model.sample/infer", 404, ("no-such-model", "digits-ppca"), "MODEL_NOT_FOUND"),
        ("POST", f"/v2/models/{PPCA}.sample/versions/99/infer", 404, ("version 99", "loaded versions"),
         "MODEL_NOT_FOUND"),
        ("POST", f"/v2/models/{PPCA}.sample/versions/x/infer", 400, ("not a version number",), "INVALID_ARGUMENT"),
        ("POST", f"/v2/models/{PPCA}.sample/versions/-1/infer", 400, ("not a version number",), "INVALID_ARGUMENT"),
        ("POST", f"/v2/models/{PPCA}.nope/infer", 404, ("'<model>.<operation>'", "digits-ppca.sample"),
         "MODEL_NOT_FOUND"),
        ("POST", f"/v2/models/{PPCA}/infer", 404, ("'<model>.<operation>'",), "MODEL_NOT_FOUND"),
        ("GET", "/v2/models/no-such-model.sample", 404, ("no-such-model",), "MODEL_NOT_FOUND"),
        ("GET", "/v2/models/no-such-model.sample/config", 404, ("no-such-model",), "MODEL_NOT_FOUND"),
        ("GET", "/v2/models/no-such-model.sample/stats", 404, ("no-such-model",), "MODEL_NOT_FOUND"),
        ("GET", "/v2/nope", 404, ("no endpoint /v2/nope",), "ENDPOINT_NOT_FOUND"),
        ("GET", "/", 404, ("no endpoint /",), "ENDPOINT_NOT_FOUND"),
        ("GET", INFER, 405, ("GET is not allowed", "POST"), "METHOD_NOT_ALLOWED"),
        ("DELETE", "/v2/health/ready", 405, ("DELETE is not allowed",), "METHOD_NOT_ALLOWED"),
    ]
    for method, path, status, words, reason in cases:
        body = {"parameters": {"n": 1}, "inputs": []} if method == "POST" else None
        got = send(port, method, path, body)
        check_error(*got, status, words, reason, [], where=(method, path))
    assert "POST" in send(port, "GET", INFER)[1]["allow"]
    answer = send(port, "GET", "/v2/models/no-such-model.sample/ready")
    assert answer[0] == 400 and answer[2]["ready"] is False  # readiness answers, 400 when not ready


def test_content_headers(server) -> None:
    port = server.http_port
    # Content-Type is not checked: curl -d sends application/x-www-form-urlencoded, KServe's examples use it
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
        status, _, answer = send(port, "POST", INFER, GOOD, {"Content-Type": content_type})
        assert status == 200 and answer["outputs"][0]["name"] == "log_prob", (content_type, answer)
    got = send(port, "POST", INFER, b"x=1&y=2", {"Content-Type": "application/x-www-form-urlencoded"})
    check_error(*got, 400, ("not JSON",), "MALFORMED_JSON", [])
    got = send(port, "POST", INFER, b"\x1f\x8b\x08\x00", {"Content-Encoding": "gzip"})
    check_error(*got, 415, ("Content-Encoding 'gzip'", "uncompressed"), "UNSUPPORTED_CONTENT_ENCODING", [])


def test_a_body_over_the_limit_is_413_with_the_json_error(server) -> None:
    limit = LIMITS["max_message_mb"] * 2**20
    big = b"[" + b"0.0," * (limit // 4) + b"0.0]"
    got = send(server.http_port, "POST", INFER, big, body_sent=False)  # refused on its declared length, unread
    check_error(*got, 413, ("above this server's message limit of 4 MiB", "max_message_mb"), "MESSAGE_TOO_LARGE",
                [])


def test_a_request_that_is_not_http_gets_the_json_error(server) -> None:
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
                    b"POST /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as s:
            s.sendall(garbage)
            reply = s.makefile("rb")
            status = reply.readline().decode()
            headers = {}
            for line in iter(reply.readline, b"\r\n"):
                key, _, value = line.decode().strip().partition(": ")
                headers[key.lower()] = value
            answer = json.loads(reply.read(int(headers["content-length"])))
        check_error(int(status.split()[1]), headers, answer, 400, ("not valid HTTP/1.1",), "MALFORMED_HTTP", [],
                    where=garbage)


def test_tritonclient_sees_status_and_message(server) -> None:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        x = httpclient.InferInput("x", [2, 8, 7], "FP32")
        x.set_data_from_numpy(np.zeros((2, 8, 7), np.float32), binary_data=False)
        with pytest.raises(InferenceServerException) as e:
            c.infer(f"{PPCA}.log_likelihood", [x])
        assert e.value.status() == "400" and "shape" in e.value.message(), e.value
        with pytest.raises(InferenceServerException) as e:
            c.infer("no-such-model.log_likelihood", [x])
        assert e.value.status() == "404" and "no-such-model" in e.value.message(), e.value
        with pytest.raises(InferenceServerException) as e:
            c.get_model_metadata("no-such-model.sample")
        assert e.value.status() == "404" and "no-such-model" in e.value.message()
        n = httpclient.InferInput("N", [1], "INT64")
        n.set_data_from_numpy(np.array([LIMITS["max_sample_n"] + 1], np.int64), binary_data=True)
        with pytest.raises(InferenceServerException) as e:
            c.infer(f"{PPCA}.sample", [n])
        assert e.value.status() == "400" and str(LIMITS["max_sample_n"]) in e.value.message()
    finally:
        c.close()


def test_the_python_error_from_an_http_answer(server) -> None:
    status, _, body = send(server.http_port, "POST", INFER, tensor(data=[1.0]))
    e = GenserveError.from_http(status, body)
    assert isinstance(e, InvalidArgumentError) and e.fields == ["inputs[0].data"] and e.reason == "INVALID_ARGUMENT"
    status, _, body = send(server.http_port, "GET", "/v2/models/no-such-model.sample")
    assert isinstance(GenserveError.from_http(status, json.dumps(body).encode()), NotFoundError)


def test_healthy_after_the_matrix(server) -> None:
    """Runs last in the module: every refusal above left the server serving."""
    status, _, answer = send(server.http_port, "POST", INFER, GOOD)
    assert status == 200 and len(answer["outputs"][0]["data"]) == 1
    assert send(server.http_port, "GET", "/v2/health/ready")[0] == 200
    assert send(server.http_port, "GET", "/v2/health/live")[0] == 200


# ---------------------------------------------------------------------------------------------------------------
# Non-finite numbers in a JSON answer; the concurrency limit


def test_non_finite_outputs_are_valid_json_that_numpy_reads_back() -> None:
    values = np.array([1.5, np.nan, np.inf, -np.inf, -0.0], np.float32)
    response = oip_pb.ModelInferResponse(model_name="m.log_likelihood", model_version="1")
    response.outputs.add(name="log_prob", datatype="FP32", shape=[5])
    response.raw_output_contents.append(values.tobytes())
    text, header = infer_response(response, False)
    assert header is None
    document = json.loads(text, parse_constant=_no_constant)  # strict JSON: no bare NaN/Infinity tokens
    data = document["outputs"][0]["data"]
    assert data[1:4] == ["NaN", "Infinity", "-Infinity"]
    back = np.array(data, dtype=np.float32)  # what tritonclient.http does with JSON data
    assert back.tobytes() == values.tobytes() or (np.isnan(back[1]) and np.array_equal(back[[0, 2, 3, 4]],
                                                                                       values[[0, 2, 3, 4]]))
    binary, header = infer_response(response, True)
    assert binary[header:] == values.tobytes()  # raw outputs are the bytes


# One process only: it waits on the HTTP face's in_progress counter, which a subprocess cannot show.
def test_requests_past_max_concurrent_rpcs_get_a_json_503(repo_dir: Path, tmp_path: Path) -> None:
    """Two requests whose bodies are half sent hold both slots; a third is refused at once with the JSON error
    (not uvicorn's plain text); once the two finish, requests are served again."""
    shutil.copytree(repo_dir / PPCA, tmp_path / PPCA)
    cfg = ServerConfig(repo=tmp_path, host="127.0.0.1", port=0, metrics_port=0, http_port=free_port(),
                       provider="cpu", workers=1, grace_s=2.0, max_concurrent_rpcs=2)
    body = json.dumps(GOOD).encode()
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
    with BackgroundServer(cfg) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.http_port), timeout=60) for _ in range(2)]
        try:
            for s in held:
                s.sendall(head + body[:10])
            asyncio.run(until(lambda: srv.server.http.in_progress == 2, timeout=120))
            got = send(srv.http_port, "POST", INFER, GOOD)
            check_error(*got, 503, ("max_concurrent_rpcs",), "TOO_MANY_REQUESTS", [])
            assert got[1]["retry-after"] == "1"
            for s in held:
                s.sendall(body[10:])
                reply = s.makefile("rb").read()
                assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        finally:
            for s in held:
                s.close()
        status, _, answer = send(srv.http_port, "POST", INFER, GOOD)
        assert status == 200 and answer["outputs"][0]["name"] == "log_prob"
        assert OK == grpc.StatusCode.OK
