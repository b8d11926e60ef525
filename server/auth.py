"""Who may call the server: TLS credentials for the gRPC port and a bearer-token check as a server interceptor.

TLS: ``tls_cert`` + ``tls_key`` make the port TLS-only; ``tls_client_ca`` adds mutual TLS (a client must
present a certificate signed by that CA, checked in the handshake, before any RPC is seen).

Tokens: every RPC must carry ``authorization: Bearer <token>`` metadata with one of the tokens read from
``token_file`` (one per line) and/or the environment variable named by ``token_env``. A request without a
valid token is answered UNAUTHENTICATED (with how to authenticate) before its message is even parsed, and
counted in ``genserve_unauthenticated_total``. Tokens are compared as SHA-256 digests with
``hmac.compare_digest`` against every known token (no early exit), kept only as digests, and never logged or
echoed. Health checks (and, when asked, reflection) can stay open for load-balancer probes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from genserve.server.config import ServerConfig
from genserve.server.transport import Failure

log = logging.getLogger("genserve.server")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
OIP_PROBES = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")
"""The Open Inference Protocol's liveness and readiness probes, open together with health."""
TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")
"""A token is printable ASCII without spaces (what gRPC metadata values may carry)."""
SHORT_TOKEN = 16
HOW = ("send metadata 'authorization: Bearer <token>' with a token the server was configured with "
       "(genserve CLI: --token, --token-file or $GENSERVE_TOKEN; Client(token=...))")


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for ``cfg.tls_cert``/``tls_key`` (mutual with ``tls_client_ca``); None for plaintext."""
    if cfg.tls_cert is None:
        return None
    cert, key = _read(cfg.tls_cert, "tls_cert"), _read(cfg.tls_key, "tls_key")
    if b"-----BEGIN" not in cert or b"CERTIFICATE" not in cert:
        raise ValueError(f"tls_cert {cfg.tls_cert}: not a PEM certificate")
    if b"-----BEGIN" not in key or b"PRIVATE KEY" not in key:
        raise ValueError(f"tls_key {cfg.tls_key}: not a PEM private key")
    ca = None if cfg.tls_client_ca is None else _read(cfg.tls_client_ca, "tls_client_ca")
    if ca is not None and b"CERTIFICATE" not in ca:
        raise ValueError(f"tls_client_ca {cfg.tls_client_ca}: not a PEM certificate")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def parse_tokens(text: str, where: str, separators: str = r"\n") -> list[str]:
    """Tokens in ``text`` split on ``separators`` (blank entries and ``#`` comment lines skipped);
    ValueError naming the entry (never the token) when one is not printable ASCII without spaces."""
    out = []
    for i, raw in enumerate(re.split(separators, text), 1):
        token = raw.strip()
        if not token or token.startswith("#"):
            continue
        if not TOKEN_RE.match(token):
            raise ValueError(f"{where}: entry {i} is not a valid token (printable ASCII, no spaces)")
        out.append(token)
    return out


def read_tokens(cfg: ServerConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """The tokens of ``cfg.token_file`` and ``$cfg.token_env``; ValueError when auth is on but none is found."""
    environ = os.environ if environ is None else environ
    tokens: list[str] = []
    if cfg.token_file is not None:
        data = _read(cfg.token_file, "token_file")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"token_file {cfg.token_file}: not ASCII text") from None
        tokens += parse_tokens(text, f"token_file {cfg.token_file}")
    if cfg.token_env:
        if cfg.token_env not in environ:
            raise ValueError(f"token_env: the environment variable {cfg.token_env} is not set")
        tokens += parse_tokens(environ[cfg.token_env], f"${cfg.token_env}", r"[\s,]+")
    if not tokens:
        where = " and ".join(w for w in (cfg.token_file and f"token_file {cfg.token_file}",
                                         cfg.token_env and f"${cfg.token_env}") if w)
        raise ValueError(f"{where}: no token found; put one token per line (token auth refuses every call "
                         "without one)")
    return tokens


def bearer(metadata: Iterable[Any] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None."""
    for item in metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses RPCs without a valid bearer token; ``open_prefixes`` (method paths) pass without one.

    ``on_refused()`` is called once per refused RPC (the metrics counter).
    """

    def __init__(self, tokens: Iterable[str], open_prefixes: tuple[str, ...] = (),
                 on_refused: Callable[[], None] | None = None) -> None:
        self._digests: tuple[bytes, ...] = ()
        self.open_prefixes = tuple(open_prefixes)
        self.on_refused = on_refused
        self.update(tokens)

    def update(self, tokens: Iterable[str]) -> None:
        """Replace the accepted tokens (a reload rotates them); refuses an empty set."""
        digests = tuple(dict.fromkeys(_digest(t) for t in tokens))
        if not digests:
            raise ValueError("token auth needs at least one token")
        if any(len(t) < SHORT_TOKEN for t in tokens):
            log.warning("auth: some tokens are shorter than %d characters; use long random ones "
                        "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)", SHORT_TOKEN)
        self._digests = digests

    @property
    def count(self) -> int:
        return len(self._digests)

    def valid(self, token: str | None) -> bool:
        """Constant-time check against every known token (no early exit, no length leak: digests)."""
        if token is None:
            return False
        given = _digest(token)
        found = False
        for d in self._digests:
            found |= hmac.compare_digest(given, d)
        return found

    async def intercept_service(self, continuation: Callable[[Any], Any],
                                details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(self.open_prefixes):
            return await continuation(details)
        token = bearer(details.invocation_metadata)
        if self.valid(token):
            return await continuation(details)
        if self.on_refused is not None:
            try:
                self.on_refused()
            except Exception:  # noqa: BLE001 - metrics must never decide a request
                log.exception("auth: counting a refused call failed")
        why = "no bearer token" if token is None else "the bearer token is not valid"
        handler = await continuation(details)
        return refusal(handler, f"{why} for {details.method}; {HOW}")


def refusal(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED without parsing the request."""

    failure = Failure(grpc.StatusCode.UNAUTHENTICATED, message, reason="UNAUTHENTICATED")

    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(failure.code, failure.message, failure.trailing_metadata())

    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_stream_rpc_method_handler(abort)


def open_prefixes(cfg: ServerConfig) -> tuple[str, ...]:
    """Method paths that need no token under ``cfg``'s open_health / open_reflection."""
    out: tuple[str, ...] = ()
    if cfg.open_health:
        out += (HEALTH_PREFIX, *OIP_PROBES)
    if cfg.open_reflection:
        out += REFLECTION_PREFIXES
    return out
