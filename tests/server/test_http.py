"""The Open Inference Protocol over HTTP/JSON, called with tritonclient.http and with plain HTTP requests.

A real server on free loopback ports serves the test repository over gRPC and HTTP at once; every HTTP
answer must be EQUAL (bit for bit) to the gRPC OIP answer for the same inputs and seed. Also: the metrics
port serves /metrics only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402  (the dev extra installs it)
from ports import free_port
from supervised import Supervised, serving
from tls_certs import make_certificates
from tritonclient.utils import InferenceServerException  # noqa: E402

from genserve.server.app import BackgroundServer, ready_line
from genserve.server.config import ServerConfig

VAE = "digits-vae"
SEED = 20251202


@pytest.fixture(scope="module", params=[1, 2], ids=["1 process", "2 processes"])
def server(repo_dir: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One process, and `genserve serve --processes 2` with the same settings (issue 17)."""
    cfg = ServerConfig(repo=repo_dir, host="127.0.0.1", port=0, metrics_port=free_port(), http_port=free_port(),
                       provider="cpu", intra_op_threads=1, max_batch_size=64, max_queue_delay_ms=2.0, workers=2,
                       grace_s=5.0)
    with serving(cfg, request.param, tmp_path_factory.mktemp("processes") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: BackgroundServer):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_oip(server: BackgroundServer):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def models(grpc_oip) -> dict[str, list[str]]:
    """Model -> its operations, from the gRPC repository index."""
    out: dict[str, list[str]] = {}
    for m in grpc_oip.get_model_repository_index().models:
        model, _, op = m.name.rpartition(".")
        out.setdefault(model, []).append(op)
    assert VAE in out and "log_likelihood" in out[VAE], out
    return out


def call(port: int, method: str, path: str, body: bytes | dict | None = None,
         headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> tuple[int, Any, dict]:
    """(status, parsed JSON body, headers) of a plain HTTP request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    scheme = "https" if context is not None else "http"
    host = "localhost" if context is not None else "127.0.0.1"
    request = urllib.request.Request(f"{scheme}://{host}:{port}{path}", data=data, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def inputs(name: str, array: np.ndarray, datatype: str, binary: bool) -> Any:
    t = httpclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def grpc_input(name: str, array: np.ndarray, datatype: str) -> Any:
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def same_bytes(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), what


# ---------------------------------------------------------------------------------------------------------------
# Health, metadata, index, configuration, statistics


def test_health_metadata_and_index_match_grpc(http, grpc_oip, server, models) -> None:
    assert http.is_server_live() and http.is_server_ready()
    meta = http.get_server_metadata()
    assert meta["name"] == "genserve" and set(meta["extensions"]) == set(grpc_oip.get_server_metadata().extensions)
    index = {(m["name"], m["version"], m["state"]) for m in http.get_model_repository_index()}
    assert index == {(m.name, m.version, m.state) for m in grpc_oip.get_model_repository_index().models}
    for model, ops in models.items():
        for op in ops:
            name = f"{model}.{op}"
            assert http.is_model_ready(name) and http.is_model_ready(name, model_version="1")
            assert not http.is_model_ready(name, model_version="99")
            got, want = http.get_model_metadata(name), grpc_oip.get_model_metadata(name, as_json=True)
            assert got["versions"] == want["versions"] and got["platform"] == want["platform"]
            for side in ("inputs", "outputs"):
                assert [(t["name"], t["datatype"], t["shape"]) for t in got[side]] == \
                       [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in want[side]]
            config = http.get_model_config(name, model_version="1")
            assert config == json.loads(json.dumps(config))
            reference = grpc_oip.get_model_config(name, as_json=True)["config"]
            assert config["name"] == name and config["max_batch_size"] == reference.get("max_batch_size", 0)
            assert [int(d) for i in reference["input"] for d in i.get("dims", [])] == \
                   [d for i in config["input"] for d in i["dims"]]
    assert not http.is_model_ready(VAE)  # the bare model is not an OIP model; its operations are
    line = server.ready if isinstance(server, Supervised) else ready_line(server.server)
    assert f"http=http://127.0.0.1:{server.http_port}/v2 http_port={server.http_port}" in line


def test_plain_http_health_and_metadata(server) -> None:
    port = server.http_port
    assert call(port, "GET", "/v2/health/live")[:2] == (200, {"live": True})
    assert call(port, "GET", "/v2/health/ready")[:2] == (200, {"ready": True})
    status, body, _ = call(port, "GET", f"/v2/models/{VAE}.encode/versions/1")
    assert status == 200 and body["name"] == f"{VAE}.encode" and body["inputs"][0]["shape"] == [-1, 8, 8]
    status, body, _ = call(port, "POST", "/v2/repository/index", {"ready": True})
    assert status == 200 and {"name": f"{VAE}.sample", "version": "1", "state": "READY", "reason": ""} in body


# ---------------------------------------------------------------------------------------------------------------
# Inference: byte-equal to gRPC for the same seeds


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_operation_is_byte_equal_to_grpc(http, grpc_oip, models, binary) -> None:
    for model, ops in sorted(models.items()):
        n = np.array([4], dtype=np.int64)
        outputs = [httpclient.InferRequestedOutput(o, binary_data=binary)
                   for o in ("samples", "latents") if o != "latents" or "encode" in ops or "decode" in ops]
        sampled = http.infer(f"{model}.sample", [inputs("N", n, "INT64", binary)], outputs=outputs,
                             parameters={"seed": SEED})
        reference = grpc_oip.infer(f"{model}.sample", [grpc_input("N", n, "INT64")], parameters={"seed": SEED})
        x = reference.as_numpy("samples")
        same_bytes(sampled.as_numpy("samples"), x, f"{model} sample")
        assert sampled.get_response()["parameters"]["seed"] == SEED
        if "log_likelihood" in ops:
            params = {"seed": SEED, "importance_samples": 7} if model == VAE else {"seed": SEED}
            got = http.infer(f"{model}.log_likelihood", [inputs("x", x, "FP32", binary)], parameters=params)
            want = grpc_oip.infer(f"{model}.log_likelihood", [grpc_input("x", x, "FP32")], parameters=params)
            for name in ("log_prob", "bits_per_dim"):
                if want.as_numpy(name) is not None:
                    same_bytes(got.as_numpy(name), want.as_numpy(name), f"{model} {name}")
            assert got.get_response()["parameters"]["likelihood_kind"] == \
                   want.get_response().parameters["likelihood_kind"].string_param
        if "encode" in ops:
            params = {"seed": SEED, "sample": True} if model == VAE else {"seed": SEED}  # a draw from q(z|x)
            got = http.infer(f"{model}.encode", [inputs("x", x, "FP32", binary)], parameters=params)
            want = grpc_oip.infer(f"{model}.encode", [grpc_input("x", x, "FP32")], parameters=params)
            z = want.as_numpy("z")
            same_bytes(got.as_numpy("z"), z, f"{model} encode")
            if "decode" in ops:
                got = http.infer(f"{model}.decode", [inputs("z", z, "FP32", binary)], parameters={"seed": SEED})
                want = grpc_oip.infer(f"{model}.decode", [grpc_input("z", z, "FP32")], parameters={"seed": SEED})
                same_bytes(got.as_numpy("x"), want.as_numpy("x"), f"{model} decode")


def test_plain_json_inference_equals_grpc(server, grpc_oip) -> None:
    """curl-style: nested JSON data, parameters, JSON outputs; the same numbers as gRPC."""
    x = grpc_oip.infer(f"{VAE}.sample", [grpc_input("N", np.array([3], np.int64), "INT64")],
                       parameters={"seed": 1}).as_numpy("samples")
    body = {"id": "r1", "parameters": {"seed": SEED, "importance_samples": 5},
            "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
    status, answer, headers = call(server.http_port, "POST", f"/v2/models/{VAE}.log_likelihood/infer", body)
    assert status == 200 and headers["content-type"] == "application/json", answer
    want = grpc_oip.infer(f"{VAE}.log_likelihood", [grpc_input("x", x, "FP32")],
                          parameters={"seed": SEED, "importance_samples": 5})
    got = {o["name"]: np.array(o["data"], dtype=np.float64).reshape(o["shape"]) for o in answer["outputs"]}
    same_bytes(got["log_prob"], want.as_numpy("log_prob"), "log_prob")
    assert answer["id"] == "r1" and answer["model_version"] == "1"
    assert answer["parameters"] == {"seed": SEED, "likelihood_kind": "lower_bound"}

    # A large JSON body and answer (decoded and encoded off the event loop): the same bytes.
    rows = np.repeat(x, 700, axis=0)
    body = {"parameters": {"seed": SEED}, "inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP32",
                                                      "data": rows.reshape(-1).tolist()}]}
    status, answer, _ = call(server.http_port, "POST", f"/v2/models/{VAE}.encode/infer", body)
    assert status == 200, answer
    want = grpc_oip.infer(f"{VAE}.encode", [grpc_input("x", rows, "FP32")], parameters={"seed": SEED})
    z = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(answer["outputs"][0]["shape"])
    same_bytes(z, want.as_numpy("z"), "encode of 2100 rows")

    # Sample with the count as a parameter and no seed: the drawn seed comes back and reproduces the answer.
    path = f"/v2/models/{VAE}.sample/versions/1/infer"
    status, first, _ = call(server.http_port, "POST", path, {"parameters": {"n": 2}, "inputs": []})
    assert status == 200, first
    seed = first["parameters"]["seed"]
    status, again, _ = call(server.http_port, "POST", path, {"parameters": {"n": 2, "seed": seed}, "inputs": []})
    assert [o["data"] for o in again["outputs"]] == [o["data"] for o in first["outputs"]]


def test_statistics_count_both_faces(http, grpc_oip) -> None:
    name = f"{VAE}.decode"
    before = http.get_inference_statistics(name)["model_stats"][0]["inference_stats"]["success"]["count"]
    z = np.zeros((2, int(http.get_model_metadata(name)["inputs"][0]["shape"][1])), np.float32)
    http.infer(name, [inputs("z", z, "FP32", True)])
    grpc_oip.infer(name, [grpc_input("z", z, "FP32")])
    stats = http.get_inference_statistics(name)["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == before + 2
    assert isinstance(stats["inference_count"], int) and isinstance(stats["last_inference"], int)
    same = grpc_oip.get_inference_statistics(name, as_json=True)["model_stats"][0]
    assert int(same["inference_stats"]["success"]["count"]) == before + 2
    assert any(s["name"] == name for s in http.get_inference_statistics()["model_stats"])


# ---------------------------------------------------------------------------------------------------------------
# Errors: the right status, a JSON body with the transport's message


def test_errors_are_json_with_the_right_status(server, models) -> None:
    port = server.http_port
    infer = f"/v2/models/{VAE}.log_likelihood/infer"
    cases = [
        ("GET", "/v2/models/no-such-model.sample", None, 404, "no-such-model"),
        ("POST", "/v2/models/no-such-model.sample/infer", {"inputs": []}, 404, "no-such-model"),
        ("GET", f"/v2/models/{VAE}", None, 404, "'<model>.<operation>'"),
        ("GET", f"/v2/models/{VAE}.sample/versions/7", None, 404, "version"),
        ("GET", f"/v2/models/{VAE}.sample/versions/x", None, 400, "not a version number"),
        ("POST", infer, b"{not json", 400, "not JSON"),
        ("POST", infer, {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0, 1, 2]}]},
         400, "shape"),
        ("POST", infer, {"inputs": [{"name": "x", "shape": [1, 8, 8], "datatype": "FP32", "data": [1.0]}]},
         400, "data has 1 elements, but shape [1, 8, 8] needs 64"),
        ("POST", infer, {"inputs": [{"name": "x", "shape": [1, 8, 8], "datatype": "FP32", "data": ["a"] * 64}]},
         400, "must be numbers"),
        ("POST", infer, {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
         400, "datatype 'BYTES'"),
        ("POST", f"/v2/models/{VAE}.sample/infer", {"parameters": {"n": 1, "importance_samples": 3}, "inputs": []},
         400, "does not take the request parameter(s) 'importance_samples'"),
        ("GET", infer, None, 405, "GET is not allowed"),
        ("GET", "/v3/anything", None, 404, "/v2"),
    ]
    lacking = [(m, op) for m, ops in sorted(models.items()) for op in ("log_likelihood", "encode") if op not in ops]
    assert lacking, "the test repository has a model without a likelihood or an encoder (the GAN)"
    m, op = lacking[0]
    cases.append(("POST", f"/v2/models/{m}.{op}/infer", {"inputs": []}, 404, f"without a {op} operation"))
    for method, path, body, status, message in cases:
        got, answer, headers = call(port, method, path, body)
        assert got == status and headers["content-type"] == "application/json", (path, body, got, answer)
        assert {"error", "code", "reason", "field_violations", "metadata"} <= set(answer), (path, answer)
        assert message in answer["error"], (path, answer)
    assert call(port, "GET", "/v2/health/ready")[0] == 200  # healthy after


def test_a_body_over_the_message_limit_is_413_before_it_is_read(server) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as s:
        s.sendall(f"POST /v2/models/{VAE}.log_likelihood/infer HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Length: {65 * 2**20}\r\n\r\n".encode())
        reply = s.makefile("rb")
        status = reply.readline().decode()
        headers = dict(line.decode().strip().split(": ", 1) for line in iter(reply.readline, b"\r\n"))
        body = json.loads(reply.read(int(headers["content-length"])))
    assert status.startswith("HTTP/1.1 413"), status
    assert "above this server's message limit of 64 MiB" in body["error"]


def test_tritonclient_sees_the_error_message(http) -> None:
    with pytest.raises(InferenceServerException, match="no model named 'digits-vae.nope'") as info:
        http.infer(f"{VAE}.nope", [inputs("N", np.array([1], np.int64), "INT64", True)])
    assert info.value.status() == "404"


# ---------------------------------------------------------------------------------------------------------------
# Token auth and TLS: the gRPC port's settings; the metrics port serves /metrics only


@pytest.fixture(scope="module")
def small_repo(repo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo1")
    shutil.copytree(repo_dir / "digits-ppca", repo / "digits-ppca")
    return repo


@pytest.fixture(params=[1, 2], ids=["1 process", "2 processes"])
def processes(request: pytest.FixtureRequest) -> int:
    """A test's own server in one process, and as `genserve serve --processes 2` (issue 17)."""
    return request.param


def test_token_auth_and_tls(small_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: int
                            ) -> None:
    certs = make_certificates(tmp_path / "certs")
    token = "http-test-token-0123456789abcdef"
    monkeypatch.setenv("GENSERVE_HTTP_TEST_TOKEN", token)
    # With 2 processes the refusal counter is read from the one /metrics (port given), not from the Engine.
    cfg = ServerConfig(repo=small_repo, port=0, metrics_port=0 if processes == 1 else free_port(),
                       http_port=free_port(), provider="cpu", workers=1, grace_s=1.0,
                       token_env="GENSERVE_HTTP_TEST_TOKEN", tls_cert=certs / "server.pem",
                       tls_key=certs / "server.key")
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with serving(cfg, processes, tmp_path / "server.log") as srv:
        port = srv.http_port
        path = "/v2/models/digits-ppca.sample/infer"
        body = {"parameters": {"n": 1, "seed": 3}, "inputs": []}
        status, answer, headers = call(port, "POST", path, body, context=context)
        assert status == 401 and "no bearer token" in answer["error"] and headers["www-authenticate"] == "Bearer"
        status, answer, _ = call(port, "POST", path, body, {"Authorization": "Bearer wrong"}, context)
        assert status == 401 and "not valid" in answer["error"] and token not in answer["error"]
        assert call(port, "GET", "/v2", context=context)[0] == 401
        refused = srv.metric if isinstance(srv, Supervised) else srv.server.metrics.value
        assert refused("genserve_unauthenticated_total") == 3
        status, answer, _ = call(port, "POST", path, body, {"Authorization": f"Bearer {token}"}, context)
        assert status == 200 and answer["outputs"][0]["shape"] == [1, 8, 8]
        assert call(port, "GET", "/v2/health/ready", context=context)[0] == 200  # open_health
        with pytest.raises(OSError):  # HTTPS only
            call(port, "GET", "/v2/health/live")
        assert "http=https://" in (srv.ready if isinstance(srv, Supervised) else ready_line(srv.server))


def test_mutual_tls_needs_a_client_certificate(small_repo: Path, tmp_path: Path, processes: int) -> None:
    certs = make_certificates(tmp_path / "certs")
    cfg = ServerConfig(repo=small_repo, port=0, metrics_port=0, http_port=free_port(), provider="cpu",
                       workers=1, grace_s=1.0, tls_cert=certs / "server.pem", tls_key=certs / "server.key",
                       tls_client_ca=certs / "ca.pem")
    with serving(cfg, processes, tmp_path / "server.log") as srv:
        for name, served in (("client", True), ("stranger", False), (None, False)):
            context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
            if name is not None:
                context.load_cert_chain(certs / f"{name}.pem", certs / f"{name}.key")
            if served:
                assert call(srv.http_port, "GET", "/v2/health/live", context=context)[0] == 200
            else:
                with pytest.raises(OSError):
                    call(srv.http_port, "GET", "/v2/health/live", context=context)


def test_metrics_port_serves_metrics_only(server) -> None:
    port = server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        # a series every server has from its start (request counters appear in --processes N mode only once a
        # request was counted, so running this test alone would not find them there)
        assert r.status == 200 and "genserve_model_loaded{" in r.read().decode()
    for path in ("/", "/healthz", "/metrics/extra", "/favicon.ico", "/v2/health/ready"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
        assert info.value.code == 404, path
        assert "/metrics only" in info.value.read().decode()


def test_http_requests_are_counted_under_their_own_method(server, http) -> None:
    http.infer(f"{VAE}.sample", [inputs("N", np.array([1], np.int64), "INT64", True)])
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert f'genserve_requests_total{{code="OK",method="http.Sample",model="{VAE}"}}' in text


def test_answers_go_out_at_once_not_after_a_delayed_ack(small_repo: Path) -> None:
    """Bug: the HTTP face's connections kept Nagle's algorithm on (asyncio turns it off only for sockets made
    with proto IPPROTO_TCP), so an answer's body, written after its headers, waited for the client's delayed
    ACK: 40 ms per request on a kept-alive connection (tritonclient.http, perf_analyzer). The server's end of
    a connection must have TCP_NODELAY set."""
    cfg = ServerConfig(repo=small_repo, port=0, metrics_port=0, http_port=free_port(), provider="cpu",
                       workers=1, grace_s=1.0)
    with BackgroundServer(cfg) as srv, socket.create_connection(("127.0.0.1", srv.http_port), timeout=30) as c:
        c.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        assert c.recv(4096).startswith(b"HTTP/1.1 200")  # accepted, and answered on this connection
        ends = []
        for fd in os.listdir("/proc/self/fd"):  # the server runs in this process: find its end of ``c``
            try:
                copy = os.dup(int(fd))
            except OSError:
                continue  # closed since it was listed (listdir's own descriptor)
            try:
                s = socket.socket(fileno=copy)
            except OSError:
                os.close(copy)
                continue  # not a socket
            with s:
                try:
                    if s.type == socket.SOCK_STREAM and s.getpeername() == c.getsockname():
                        ends.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                except OSError:
                    pass  # not connected, or not TCP
        assert ends and all(ends), f"the server's end of the connection: TCP_NODELAY {ends}"


def test_the_http_port_closes_with_the_server(small_repo: Path, tmp_path: Path, processes: int) -> None:
    cfg = ServerConfig(repo=small_repo, port=0, metrics_port=0, http_port=free_port(), provider="cpu",
                       workers=1, grace_s=1.0)
    srv = BackgroundServer(cfg) if processes == 1 else Supervised.from_config(cfg, tmp_path / "server.log")
    port = srv.http_port
    assert call(port, "GET", "/v2/health/live")[0] == 200
    srv.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert ServerConfig(repo=small_repo).http_port == 0  # off unless asked for
    with pytest.raises(ValueError, match="http_port"):
        ServerConfig(repo=small_repo, port=9000, http_port=9000)
