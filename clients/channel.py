"""How a client reaches servers: targets, load balancing, TLS, token, message sizes, gRPC's own retry policy.

Everything here builds arguments for ``grpc.secure_channel`` / ``grpc.insecure_channel`` (and their grpc.aio
twins); the sync and asyncio clients share it. Retries are gRPC's: a ``retryPolicy`` in the channel's service
config retries UNAVAILABLE (server down, restarting, connection refused, model loading) with exponential
backoff and jitter, inside the gRPC library, for unary and streaming calls alike (a stream only until its
first response arrives). There is no retry loop in genserve code.

Errors: a failed call raises a ``GenserveError``, of the subclass of its status code (``InvalidArgumentError``,
``NotFoundError``, ... ``ERRORS``), carrying the server's machine-readable details from the google.rpc.Status
trailer: ``reason`` (stable, UPPER_SNAKE; docs/errors.md lists them), ``field_violations`` and ``metadata``.
``GenserveError.from_http`` builds the same from an HTTP face's JSON error.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from genserve.core.cli_errors import RemoteError

SERVICE = "genserve.v1.GenerativeService"
HEALTH_SERVICE = "grpc.health.v1.Health"
DEFAULT_TARGET = "localhost:8500"
MAX_ATTEMPTS = 5
"""gRPC caps a retry policy's maxAttempts at 5 (the first try and four retries)."""

Credential = str | Path | bytes
DETAILS_KEY = "grpc-status-details-bin"
"""The trailer holding a serialized google.rpc.Status (gRPC's rich status convention)."""


@dataclass(frozen=True)
class FieldViolation:
    """A request field the server refused (``x``, ``sample.n``, ``inputs[0].datatype``) and what is wrong."""

    field: str
    description: str


class GenserveError(RemoteError):
    """A failed call: ``code`` is the grpc.StatusCode, ``message`` the server's (or gRPC's) explanation.

    From the server's status details (empty when it sent none, e.g. a connection failure): ``reason``, the
    stable ErrorInfo reason; ``domain`` ("genserve.dev"); ``field_violations``, the request fields at fault;
    ``metadata``, string pairs such as the method, model or request id."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "", *, reason: str = "",
                 domain: str = "", field_violations: tuple[FieldViolation, ...] = (),
                 metadata: dict[str, str] | None = None) -> None:
        self.code = code
        self.message = message
        self.method = method
        self.reason = reason
        self.domain = domain
        self.field_violations = tuple(field_violations)
        self.metadata = dict(metadata or {})
        super().__init__(f"{code.name}: {message}" + (f" ({method})" if method else ""))

    @property
    def fields(self) -> list[str]:
        """The names of the fields at fault."""
        return [v.field for v in self.field_violations]

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, method: str, target: str) -> GenserveError:
        """The typed error of a failed call (the subclass of its code), with its status details."""
        code = (error.code() if hasattr(error, "code") else None) or grpc.StatusCode.UNKNOWN
        message = (error.details() if hasattr(error, "details") else None) or str(error)
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in message:
            message = f"cannot reach a genserve server at {target}: {message}"
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        return error_for(code, message, method, **_status_details(trailing))

    @classmethod
    def from_http(cls, status: int, body: bytes | str | dict[str, Any], method: str = "") -> GenserveError:
        """The typed error of an HTTP face's error answer (its JSON body: error, code, reason, domain,
        field_violations, metadata); a body that is not that JSON keeps its text as the message."""
        document: Any = body
        if isinstance(body, bytes | str):
            try:
                document = json.loads(body)
            except ValueError:
                document = None
        if not isinstance(document, dict):
            text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
            return error_for(HTTP_CODES.get(status, grpc.StatusCode.UNKNOWN), text or f"HTTP {status}", method)
        code = getattr(grpc.StatusCode, str(document.get("code", "")), None)
        if not isinstance(code, grpc.StatusCode):
            code = HTTP_CODES.get(status, grpc.StatusCode.UNKNOWN)
        violations = tuple(FieldViolation(str(v.get("field", "")), str(v.get("description", "")))
                           for v in document.get("field_violations") or () if isinstance(v, dict))
        metadata = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
        return error_for(code, str(document.get("error", "")) or f"HTTP {status}", method,
                         reason=str(document.get("reason", "")), domain=str(document.get("domain", "")),
                         field_violations=violations, metadata={str(k): str(v) for k, v in metadata.items()})


class InvalidArgumentError(GenserveError):
    """INVALID_ARGUMENT: a request field is wrong (``field_violations`` name it); fix the request."""


class NotFoundError(GenserveError):
    """NOT_FOUND: no such model, version or (OIP) ``<model>.<operation>``."""


class FailedPreconditionError(GenserveError):
    """FAILED_PRECONDITION: the model cannot do this operation (a GAN's likelihood)."""


class ResourceExhaustedError(GenserveError):
    """RESOURCE_EXHAUSTED: a queue or row budget is full, or the message is too large; retry later or send less."""


class UnavailableError(GenserveError):
    """UNAVAILABLE: the server is unreachable, draining, or the model is not ready (retried by the channel)."""


class DeadlineExceededError(GenserveError):
    """DEADLINE_EXCEEDED: the client's deadline, or the server's ceiling (reason DEADLINE_CEILING), passed."""


class UnauthenticatedError(GenserveError):
    """UNAUTHENTICATED: no bearer token, or one the server does not accept."""


class PermissionDeniedError(GenserveError):
    """PERMISSION_DENIED: the caller may not do this."""


class UnimplementedError(GenserveError):
    """UNIMPLEMENTED: the server has no such method (an older server, or the wrong service)."""


class InternalError(GenserveError):
    """INTERNAL or UNKNOWN: a server bug; ``metadata["request_id"]`` finds it in the server log."""


ERRORS: dict[grpc.StatusCode, type[GenserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError, grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError, grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError, grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError, grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError, grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError, grpc.StatusCode.UNKNOWN: InternalError,
}
"""The GenserveError subclass of each status code; other codes (CANCELLED, ...) raise GenserveError itself."""
HTTP_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
              413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
              501: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE,
              504: grpc.StatusCode.DEADLINE_EXCEEDED}
"""The status code of an HTTP error answer without genserve's JSON (a proxy's, say)."""


def error_for(code: grpc.StatusCode, message: str, method: str = "", **details: Any) -> GenserveError:
    """A GenserveError of the subclass of ``code`` (``ERRORS``)."""
    return ERRORS.get(code, GenserveError)(code, message, method, **details)


def _status_details(trailing: Any) -> dict[str, Any]:
    """reason, domain, field_violations and metadata from a call's trailing metadata (its google.rpc.Status);
    none when the server sent no status details or they do not parse."""
    for key, value in trailing or ():
        if key != DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except (DecodeError, TypeError):
            return {}
        out: dict[str, Any] = {}
        violations: list[FieldViolation] = []
        for detail in status.details:
            info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
            if detail.Unpack(info):
                out.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
            elif detail.Unpack(bad):
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        return {**out, "field_violations": tuple(violations)}
    return {}


def _read(value: Credential | None, what: str) -> bytes | None:
    """PEM bytes from bytes or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    path = Path(value).expanduser()
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def read_token(token: str | None, token_file: str | Path | None) -> str | None:
    """The bearer token from the argument, else the first line of the token file; ValueError when both."""
    if token and token_file:
        raise ValueError("give a token or a token file, not both")
    if token_file:
        data = _read(token_file, "token file")
        token = (data or b"").decode().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
    return token or None


def _split_host_port(address: str) -> tuple[str, str]:
    if address.startswith("["):  # [::1]:8500
        host, _, port = address[1:].partition("]:")
    else:
        host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"server address {address!r} is not HOST:PORT (e.g. localhost:8500 or [::1]:8500)")
    return host, port


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def resolve_target(target: str | Sequence[str]) -> tuple[str, bool, str | None]:
    """(gRPC target, several backends?, authority to announce) for one address, a list, or a resolver URI.

    ``"host:port"`` is one server. A list (or a comma-separated string) of ``host:port`` becomes a static
    ``ipv4:``/``ipv6:`` address list (host names are resolved once, here) to balance over. ``dns:///name:port``,
    ``ipv4:a:p,b:p`` and ``ipv6:`` targets go to gRPC as they are (DNS is re-resolved by gRPC).
    """
    if isinstance(target, str):
        if target.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
            return target, not target.startswith("unix:"), None
        parts = [t.strip() for t in target.split(",") if t.strip()]
    else:
        parts = [str(t).strip() for t in target]
    if not parts:
        raise ValueError("no server address given; use HOST:PORT, e.g. localhost:8500")
    if len(parts) == 1:
        _split_host_port(parts[0])
        return parts[0], False, None
    addresses: list[tuple[int, str]] = []
    for part in parts:
        host, port = _split_host_port(part)
        version = _ip_version(host)
        if version is None:
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise ValueError(f"cannot resolve server host {host!r}: {e.strerror}") from None
            # One address per entry, IPv4 first: a static list must be all one family.
            infos.sort(key=lambda info: info[0] != socket.AF_INET)
            host = infos[0][4][0]
            version = _ip_version(host)
        addresses.append((version or 4, f"[{host}]:{port}" if version == 6 else f"{host}:{port}"))
    families = {v for v, _ in addresses}
    if len(families) > 1:
        raise ValueError(
            f"servers {parts} mix IPv4 and IPv6 addresses; list one family, or use a dns:/// name"
        )
    scheme = "ipv6" if families == {6} else "ipv4"
    authority = parts[0] if _ip_version(_split_host_port(parts[0])[0]) is None else None
    return f"{scheme}:" + ",".join(a for _, a in addresses), True, authority


def service_config(retries: int, backoff: tuple[float, float], load_balancing: str | None) -> dict[str, Any]:
    """The channel's service config: retry policy on UNAVAILABLE for every genserve and health method."""
    if not 0 <= retries < MAX_ATTEMPTS:
        raise ValueError(
            f"retries must be 0..{MAX_ATTEMPTS - 1} (gRPC allows {MAX_ATTEMPTS} attempts), got {retries}"
        )
    initial, most = backoff
    if not 0 < initial <= most:
        raise ValueError(f"backoff must be (initial, max) seconds with 0 < initial <= max, got {backoff}")
    config: dict[str, Any] = {}
    if retries:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE}, {"service": HEALTH_SERVICE}],
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": f"{initial:.3f}s",
                    "maxBackoff": f"{most:.3f}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
        if load_balancing == "round_robin":
            # Client-side health checking: a server that turns NOT_SERVING (draining after SIGTERM) gets no new
            # calls from the moment it says so, instead of holding them until it refuses them.
            config["healthCheckConfig"] = {"serviceName": ""}
    return config


@dataclass(frozen=True)
class ChannelSettings:
    """Everything needed to open a channel; built once by a client from its constructor arguments."""

    target: str
    """The gRPC target string (one address, or a resolver URI / static list for load balancing)."""
    display: str
    """The address as the user gave it, for error messages."""
    options: tuple[tuple[str, Any], ...]
    credentials: grpc.ChannelCredentials | None
    """None for a plaintext channel."""
    metadata: tuple[tuple[str, str], ...]
    """Sent with every call: the bearer token, when there is one."""

    @classmethod
    def build(
        cls,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        tls: bool | None = None,
        tls_ca: Credential | None = None,
        tls_cert: Credential | None = None,
        tls_key: Credential | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
        retries: int = MAX_ATTEMPTS - 1,
        backoff: tuple[float, float] = (0.5, 5.0),
        load_balancing: str | None = None,
        max_message_mb: int = 64,
        options: Sequence[tuple[str, Any]] = (),
    ) -> ChannelSettings:
        grpc_target, several, authority = resolve_target(target)
        if load_balancing is None and several:
            load_balancing = "round_robin"
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key (tls_cert and tls_key)")
        if tls is None:
            tls = any(v is not None for v in (tls_ca, tls_cert, tls_server_name))
        credentials = None
        if tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca, "TLS CA file"),
                private_key=_read(tls_key, "TLS key file"),
                certificate_chain=_read(tls_cert, "TLS certificate file"),
            )
        elif tls_ca or tls_cert:
            raise ValueError("TLS files given but tls=False; drop them or enable TLS")
        size = int(max_message_mb) * 2**20
        if size <= 0:
            raise ValueError(f"max_message_mb must be positive, got {max_message_mb}")
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
            ("grpc.enable_retries", 1 if retries else 0),
            ("grpc.service_config", json.dumps(service_config(retries, backoff, load_balancing))),
            # gRPC's default reconnect backoff grows to 120 s; a client waiting out a restart should notice
            # the server back within seconds.
            ("grpc.max_reconnect_backoff_ms", 10_000),
        ]
        if tls_server_name:
            opts.append(("grpc.ssl_target_name_override", tls_server_name))
        if authority:
            opts.append(("grpc.default_authority", authority))
        opts.extend(options)
        bearer = read_token(token, token_file)
        metadata = (("authorization", f"Bearer {bearer}"),) if bearer else ()
        display = target if isinstance(target, str) else ",".join(target)
        return cls(grpc_target, display, tuple(opts), credentials, metadata)

    def open(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=list(self.options))
        return grpc.secure_channel(self.target, self.credentials, options=list(self.options))

    def open_aio(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target, options=list(self.options))
        return grpc.aio.secure_channel(self.target, self.credentials, options=list(self.options))
