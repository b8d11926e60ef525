"""The Open Inference Protocol over HTTP/JSON (KServe v2 REST, Triton's HTTP API): a third face of the engine.

Served by starlette on uvicorn, on its own port (``http_port``; 0, the default, leaves it off) in the same
process and event loop as gRPC, over the same engine, transport layer and OIP adapter (server/oip.py): a JSON
request becomes the ``inference.ModelInferRequest`` a gRPC client would send (server/http_tensors.py), so
the models (``<model>.<operation>``), parameters, limits, row budget, statistics and answers are the gRPC
face's, to the byte.

Endpoints (``{v}`` a version number; without it, the default, the highest loaded version):

============================================================ ==================================================
``GET  /v2/health/live``, ``/v2/health/ready``               200 when live / every model serves, else 400
``GET  /v2``                                                 server metadata (name, version, extensions)
``GET  /v2/models/{model}[/versions/{v}]``                   model metadata (inputs, outputs, versions)
``GET  /v2/models/{model}[/versions/{v}]/ready``             200 when ready, else 400
``POST /v2/models/{model}[/versions/{v}]/infer``             inference (JSON tensors, binary tensor extension)
``GET  /v2/models/{model}[/versions/{v}]/config``            Triton's ModelConfig as JSON
``GET  /v2/models[/{model}[/versions/{v}]]/stats``           Triton's statistics as JSON (no model: every one)
``POST /v2/repository/index``                                every ``<model>.<operation>`` and version
============================================================ ==================================================

Readiness answers 400 when false, as the KServe v2 REST protocol (4xx) and Triton do; during shutdown the
server is not ready. Errors answer a JSON object (``Failure.to_json``): ``error``, the transport's message
(KServe v2's field, which tritonclient reads), and the machine-readable details the gRPC faces send as a
google.rpc.Status: ``code`` (the gRPC status name), ``reason`` (stable, UPPER_SNAKE), ``field_violations``
([{field, description}]) and ``metadata``. The HTTP status is mapped once from the gRPC status
(``HTTP_STATUS``): INVALID_ARGUMENT, OUT_OF_RANGE and FAILED_PRECONDITION 400 (KServe v2 answers every bad
request 400; HTTP's 412 is about conditional headers, not a model that cannot do an operation), NOT_FOUND 404
(also unknown paths; a wrong method 405), UNAUTHENTICATED 401, PERMISSION_DENIED 403, RESOURCE_EXHAUSTED 429
(a body over max_message_mb is 413; a compressed one 415), UNAVAILABLE 503, DEADLINE_EXCEEDED 504,
UNIMPLEMENTED 501, anything else 500. A request that is not HTTP (uvicorn's parser refuses it) is answered
400 with the same JSON (reason MALFORMED_HTTP) before the connection closes. A JSON answer never holds NaN
or infinities as bare tokens (not JSON): a non-finite FP32/FP64 element is written as the string "NaN",
"Infinity" or "-Infinity", protobuf's JSON mapping of floats, which numpy (and so tritonclient) reads back
as the float; raw binary outputs are the bytes. docs/errors.md lists the reasons.

Limits: a body is at most ``max_message_mb`` MiB (JSON text included; the binary extension carries tensors in
a quarter of the space JSON numbers take); ``max_concurrent_rpcs`` bounds requests in progress (503 beyond,
reason TOO_MANY_REQUESTS; the health probes are not counted nor refused; uvicorn's own limit, beyond
``CONNECTION_SLACK`` times that many connections, is only a guard against connection floods).
Deadlines: the request parameter ``timeout`` (microseconds, Triton's), capped at ``max_deadline_s``.
Auth: with token auth on, every request needs ``Authorization: Bearer <token>`` (the gRPC tokens, rotated with
them) except the health probes while ``open_health``; TLS: with ``tls_cert`` the port speaks HTTPS only
(``tls_client_ca``: clients need a certificate, as on the gRPC port). Response compression and BYTES tensors
are not offered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import h11
import uvicorn
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from genserve.oip import grpc_service_pb2 as pb
from genserve.server import auth
from genserve.server.config import ServerConfig
from genserve.server.http_tensors import HEADER_LENGTH, binary_outputs, infer_request, infer_response, parse_body
from genserve.server.interface import EngineInterface, ModelControl
from genserve.server.limits import RowBudget
from genserve.server.oip import OipServicer, control_name
from genserve.server.transport import Failure, Observe, failure_of, invalid, status_of, too_large

log = logging.getLogger("genserve.server")

S = grpc.StatusCode
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    S.INVALID_ARGUMENT: 400, S.OUT_OF_RANGE: 400, S.FAILED_PRECONDITION: 400, S.NOT_FOUND: 404,
    S.ALREADY_EXISTS: 409, S.ABORTED: 409, S.UNAUTHENTICATED: 401, S.PERMISSION_DENIED: 403,
    S.RESOURCE_EXHAUSTED: 429, S.UNAVAILABLE: 503, S.DEADLINE_EXCEEDED: 504, S.UNIMPLEMENTED: 501,
    S.CANCELLED: 499,
}
"""The HTTP status of each transport status; any other (INTERNAL, UNKNOWN, DATA_LOSS) is 500."""
OFFLOAD_BYTES = 256 * 2**10
"""Bodies (and answers' tensors) above this size are decoded (encoded) in a worker thread."""
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
"""Paths that need no token while ``open_health``."""
CONNECTION_SLACK = 4
"""uvicorn refuses connections (plain text) past this many times ``max_concurrent_rpcs``; requests in progress
past ``max_concurrent_rpcs`` are refused by the face itself, with a JSON error."""
INT64 = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
         FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64)


class HttpFailure(Failure):
    """A failure of the HTTP face itself whose HTTP status is not its code's mapping (413, 405, ...)."""

    def __init__(self, status: int, code: grpc.StatusCode, message: str, *, reason: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(code, message, reason=reason)
        self.status = status
        self.headers = headers


def too_large_failure(message: str) -> HttpFailure:
    """A body over max_message_mb: 413 rather than the 429 of RESOURCE_EXHAUSTED (a full queue)."""
    return HttpFailure(413, grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason="MESSAGE_TOO_LARGE")


def failure_response(failure: Failure) -> JSONResponse:
    """The JSON error answer of a failure: its HTTP status, ``Failure.to_json`` as the body."""
    if isinstance(failure, HttpFailure):
        return JSONResponse(failure.to_json(), status_code=failure.status, headers=failure.headers)
    return JSONResponse(failure.to_json(), status_code=HTTP_STATUS.get(failure.code, 500))


def _error_bytes(status: int, code: grpc.StatusCode, message: str, reason: str) -> bytes:
    return json.dumps(HttpFailure(status, code, message, reason=reason).to_json()).encode()


class _JsonH11(H11Protocol):
    """uvicorn's h11 protocol, answering a request it cannot parse with the face's JSON error, not plain text,
    and sending small writes at once (TCP_NODELAY)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # asyncio turns Nagle's algorithm off only for sockets made with proto IPPROTO_TCP, and the listening
        # socket (socket.create_server) has proto 0. With Nagle on, an answer's body (its second write, after
        # the headers) waited for the client's delayed ACK: 40 ms per request on a kept-alive connection, for
        # tritonclient.http and perf_analyzer alike.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)

    def send_400_response(self, msg: str) -> None:
        body = _error_bytes(400, grpc.StatusCode.INVALID_ARGUMENT,
                            f"{msg.rstrip('.')}: the request is not valid HTTP/1.1; send an HTTP request "
                            "(e.g. POST /v2/models/<model>.<operation>/infer with a JSON body)",
                            reason="MALFORMED_HTTP")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response had begun: nothing more can be said on this connection
            pass
        self.transport.close()


def plain(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP JSON: proto field names, every field, 64-bit integers as numbers
    (protobuf's JSON writes them as strings)."""
    document = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, document)


def _numbers(descriptor: Any, document: dict[str, Any]) -> dict[str, Any]:
    for f in descriptor.fields:
        if f.name not in document:
            continue
        value = document[f.name]
        if f.type in INT64:
            document[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif f.message_type is not None:
            options = f.message_type.GetOptions()
            if options.map_entry:
                inner = f.message_type.fields_by_name["value"]
                if inner.message_type is not None:
                    document[f.name] = {k: _numbers(inner.message_type, v) for k, v in value.items()}
            elif isinstance(value, list):
                document[f.name] = [_numbers(f.message_type, v) for v in value]
            elif isinstance(value, dict):
                document[f.name] = _numbers(f.message_type, value)
    return document


class _Context:
    """What the OIP servicer's handlers need of a gRPC context: ``abort`` raises the Failure instead."""

    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining

    async def abort(self, code: grpc.StatusCode, message: str, trailing_metadata: Any = ()) -> None:
        raise failure_of(code, message, trailing_metadata)

    def time_remaining(self) -> float | None:
        return self.remaining


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the app's SIGTERM drains gRPC and HTTP together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpFace:
    """The HTTP/JSON endpoint over ``engine``: ``port = start(host, port)`` on the running loop, ``await stop(grace)``.

    ``shared`` is the gRPC OIP servicer: its statistics are shared (ModelStatistics and /stats count both
    faces, as Triton's do); ``rows`` is the server-wide row budget; ``observe`` records each request for the
    Prometheus metrics under the method ``http.<Operation>``; ``tokens`` checks bearer tokens (None: no auth).
    """

    def __init__(self, engine: EngineInterface, cfg: ServerConfig, shared: OipServicer | None = None,
                 observe: Observe | None = None, rows: RowBudget | None = None,
                 tokens: auth.TokenAuth | None = None, control: ModelControl | None = None) -> None:
        self.engine = engine
        self.control = control or engine
        self.cfg = cfg
        self.max_body = cfg.max_message_mb * 2**20
        relabel = None
        if observe is not None:
            def relabel(method: str, model: str, code: str, seconds: float) -> None:
                observe(method.replace("oip.", "http.", 1), model, code, seconds)
        self.oip = OipServicer(engine, cfg, observe=relabel, rows=rows)
        if shared is not None:
            self.oip.stats = shared.stats
            self.oip.others = shared.others  # with --processes N, every worker's statistics
        self.tokens = tokens
        self.open_paths = OPEN_PATHS if cfg.open_health else ()
        self.draining = False
        self.in_progress = 0
        """Requests being answered (bounded by max_concurrent_rpcs)."""
        self.port = 0
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None
        self.app = self._app()

    # -- the application ------------------------------------------------------------------------------------

    def _app(self) -> Starlette:
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        routes = [
            Route("/v2/health/live", self._wrap(self.live)),
            Route("/v2/health/ready", self._wrap(self.ready)),
            Route("/v2", self._wrap(self.server_metadata)),
            Route("/v2/repository/index", self._wrap(self.index), methods=["POST"]),
            Route("/v2/repository/models/{model}/load", self._wrap(self.load), methods=["POST"]),
            Route("/v2/repository/models/{model}/unload", self._wrap(self.unload), methods=["POST"]),
            Route("/v2/models/stats", self._wrap(self.stats)),
        ]
        for base in (model, versioned):
            routes += [
                Route(base, self._wrap(self.metadata)),
                Route(base + "/ready", self._wrap(self.model_ready)),
                Route(base + "/infer", self._wrap(self.infer), methods=["POST"]),
                Route(base + "/config", self._wrap(self.config)),
                Route(base + "/stats", self._wrap(self.stats)),
            ]

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            if exc.status_code == 404:
                return failure_response(HttpFailure(
                    404, grpc.StatusCode.NOT_FOUND, f"no endpoint {request.url.path}; use the Open Inference "
                    "Protocol's, under /v2 (e.g. GET /v2/models/<model>.<operation>, POST .../infer)",
                    reason="ENDPOINT_NOT_FOUND"))
            if exc.status_code == 405:
                return failure_response(HttpFailure(
                    405, grpc.StatusCode.UNIMPLEMENTED, f"{request.method} is not allowed on {request.url.path}; "
                    f"use {exc.headers.get('Allow', 'another method') if exc.headers else 'another method'}",
                    reason="METHOD_NOT_ALLOWED", headers=exc.headers))
            code = grpc.StatusCode.INVALID_ARGUMENT if exc.status_code == 400 else grpc.StatusCode.UNKNOWN
            return failure_response(HttpFailure(exc.status_code, code, str(exc.detail),
                                                reason=f"HTTP_{exc.status_code}", headers=exc.headers))

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    def _wrap(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """The handler behind the token check, with every failure answered as a JSON error."""
        async def endpoint(request: Request) -> Response:
            refused = self._refusal(request)
            if refused is not None:
                return refused
            if request.url.path in OPEN_PATHS:  # health probes are cheap: never refused, never counted
                return await self._answer(handler, request)
            if self.in_progress >= self.cfg.max_concurrent_rpcs:
                return failure_response(HttpFailure(
                    503, grpc.StatusCode.UNAVAILABLE, f"{self.in_progress} requests are in progress, this server's "
                    f"limit (max_concurrent_rpcs); retry shortly, or spread requests over more servers",
                    reason="TOO_MANY_REQUESTS", headers={"Retry-After": "1"}))
            self.in_progress += 1
            try:
                return await self._answer(handler, request)
            finally:
                self.in_progress -= 1

        return endpoint

    @staticmethod
    async def _answer(handler: Callable[[Request], Awaitable[Response]], request: Request) -> Response:
        """The handler's answer, or its failure as the JSON error (the path's model in its metadata)."""
        try:
            return await handler(request)
        except Failure as f:
            model = request.path_params.get("model")
            if model:
                f.metadata.setdefault("model", model)
            return failure_response(f)
        except Exception as e:  # noqa: BLE001 - a bug: 500 with a request id, the traceback to the log
            return failure_response(status_of(e, f"HTTP {request.method} {request.url.path}"))

    def _refusal(self, request: Request) -> Response | None:
        if self.tokens is None or request.url.path in self.open_paths:
            return None
        token = auth.bearer([("authorization", request.headers.get("authorization", ""))])
        if self.tokens.valid(token):
            return None
        if self.tokens.on_refused is not None:
            with contextlib.suppress(Exception):
                self.tokens.on_refused()
        why = "no bearer token" if token is None else "the bearer token is not valid"
        return failure_response(HttpFailure(
            401, grpc.StatusCode.UNAUTHENTICATED, f"{why} for {request.method} {request.url.path}; send the header "
            "'Authorization: Bearer <token>' with a token the server was configured with",
            reason="UNAUTHENTICATED", headers={"WWW-Authenticate": "Bearer"}))

    @staticmethod
    def _names(request: Request) -> tuple[str, str]:
        return request.path_params.get("model", ""), request.path_params.get("version", "")

    # -- health and metadata --------------------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = not self.draining and self.control.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 400)

    async def model_ready(self, request: Request) -> Response:
        name, version = self._names(request)
        answer = await self.oip.ModelReady(pb.ModelReadyRequest(name=name, version=version), _Context())
        ready = answer.ready and not self.draining
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 400)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(plain(await self.oip.ServerMetadata(pb.ServerMetadataRequest(), _Context())))

    async def metadata(self, request: Request) -> Response:
        name, version = self._names(request)
        answer = await self.oip.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), _Context())
        return JSONResponse(plain(answer))

    async def config(self, request: Request) -> Response:
        name, version = self._names(request)
        answer = await self.oip.ModelConfig(pb.ModelConfigRequest(name=name, version=version), _Context())
        return JSONResponse(plain(answer.config))

    async def stats(self, request: Request) -> Response:
        name, version = self._names(request)
        answer = await self.oip.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version),
                                                _Context())
        return JSONResponse(plain(answer))

    async def _small_json(self, request: Request, example: str) -> dict[str, Any]:
        """The JSON object of a small request body (empty: {}); INVALID_ARGUMENT showing ``example`` otherwise."""
        body = await self._body(request)
        if not body.strip():
            return {}
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise invalid(f"the request body is not JSON ({e}); send {example}", reason="MALFORMED_JSON") from None
        if not isinstance(document, dict):
            raise invalid(f"the request body is a JSON object, e.g. {example}")
        return document

    async def index(self, request: Request) -> Response:
        document = await self._small_json(request, '{} or {"ready": true}')
        ready = document.get("ready", False)
        if not isinstance(ready, bool):
            raise invalid("the repository index request is {\"ready\": true|false}")
        answer = await self.oip.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), _Context())
        return JSONResponse([plain(m) for m in answer.models])

    async def load(self, request: Request) -> Response:
        """Triton's model repository extension: load or reload a model (explicit model control)."""
        await self.control.load_model(await self._control_name(request))
        return JSONResponse({})

    async def unload(self, request: Request) -> Response:
        await self.control.unload_model(await self._control_name(request))
        return JSONResponse({})

    async def _control_name(self, request: Request) -> str:
        """The model folder of a load/unload path; its body is ``{}`` or ``{"parameters": {...}}``."""
        document = await self._small_json(request, '{} or {"parameters": {...}}')
        if not isinstance(document.get("parameters", {}), dict):
            raise invalid('a repository load or unload body is {} or {"parameters": {...}}')
        parameters = list(document.get("parameters", {}))
        return control_name(request.path_params["model"], parameters, {s.name for s in self.engine.list_models()})

    # -- inference ------------------------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        name, version = self._names(request)
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise HttpFailure(415, grpc.StatusCode.INVALID_ARGUMENT,
                              f"Content-Encoding {request.headers['content-encoding']!r} is not accepted; send the "
                              "body uncompressed", reason="UNSUPPORTED_CONTENT_ENCODING")
        body = await self._body(request)
        header_length = request.headers.get(HEADER_LENGTH)

        def decode() -> tuple[pb.ModelInferRequest, set[str] | bool]:
            document, binary = parse_body(body, header_length)
            return infer_request(document, binary, name, version), binary_outputs(document)

        # JSON of a large request or answer takes milliseconds to parse or write: off the loop gRPC shares.
        message, raw = await asyncio.to_thread(decode) if len(body) > OFFLOAD_BYTES else decode()
        answer = await self.oip._infer(message, None)  # the gRPC face's own path: same checks, same bytes
        if sum(len(b) for b in answer.raw_output_contents) > OFFLOAD_BYTES:
            body, header = await asyncio.to_thread(infer_response, answer, raw)
        else:
            body, header = infer_response(answer, raw)
        if header is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header)})

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) past max_message_mb before all of it is read."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise too_large_failure(too_large(int(declared), self.max_body, "the request body"))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise too_large_failure(too_large(size, self.max_body, "the request body"))
            chunks.append(chunk)
        return b"".join(chunks)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (0: any free port) and serve on the running loop; returns the bound port.
        OSError when the port cannot be bound; ValueError when the TLS files do not load."""
        cfg = self.cfg
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=2048,
                                    reuse_port=cfg.processes > 1)  # --processes N share the port
        tls: dict[str, Any] = {}
        if cfg.tls_cert is not None:
            tls = {"ssl_certfile": str(cfg.tls_cert), "ssl_keyfile": str(cfg.tls_key)}
            if cfg.tls_client_ca is not None:
                tls.update(ssl_ca_certs=str(cfg.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False, http=_JsonH11,
                                limit_concurrency=cfg.max_concurrent_rpcs * CONNECTION_SLACK,
                                timeout_graceful_shutdown=max(1, int(cfg.grace_s)), **tls)
        try:
            config.load()
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise ValueError(f"HTTP port: cannot load the TLS certificate ({e})") from None
        self._server = _Uvicorn(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                                     or log.error("HTTP endpoint failed: %s", t.exception()))
        self.port = int(sock.getsockname()[1])
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in progress finish within ``grace`` seconds, then close."""
        self.draining = True
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=max(0.1, grace))
        except TimeoutError:
            self._server.force_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=1.0)

