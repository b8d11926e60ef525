"""Parsing of request messages: one that is not valid protobuf answers INVALID_ARGUMENT, not gRPC's UNKNOWN.

gRPC parses a request with the method's deserializer before any handler runs; a parse error there becomes
status UNKNOWN and an ERROR with a traceback in the log, for every malformed message a client sends. Every
method handler is therefore wrapped where its service is registered: a deserializer that returns an
``Unparsed`` marker instead, and a handler wrapper that answers the marker with INVALID_ARGUMENT naming the
message type (and passes the drain's door, server/app.py).

Size: gRPC itself refuses a message over its receive limit with a terse RESOURCE_EXHAUSTED. The server sets
that limit above ``max_message_mb`` (server/app.py, ``RECEIVE_SLACK``) and this deserializer refuses a message over
``max_message_mb`` first, with a message that says how to fit the request.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc

from genserve.server.transport import Failure, abort, too_large


class Unparsed:
    """Stands for a request message that did not parse, or was over the size limit: ``failure`` says which."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure


class BadMessage(Failure):
    """Raised inside a request stream at a message that did not parse (a transport Failure: its status)."""


def _safe(deserializer: Callable[[bytes], Any] | None, method: str, max_bytes: int | None
          ) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        if max_bytes is not None and len(data) > max_bytes:
            return Unparsed(Failure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    too_large(len(data), max_bytes, f"the request message of {method}"),
                                    reason="MESSAGE_TOO_LARGE", metadata={"method": method}))
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any parse failure is the client's malformed message
            return Unparsed(Failure(grpc.StatusCode.INVALID_ARGUMENT, _what(method), reason="MALFORMED_MESSAGE",
                                    metadata={"method": method}))

    return parse


def _what(method: str) -> str:
    return f"the request message of {method} is not valid protobuf; send a message built from the service's .proto"


class Door(Protocol):
    """What every RPC passes on its way in (server/app.py ``Drain``): ``holding`` is read on every call, so
    an open door costs one attribute read; ``enter`` waits while the door holds and raises a Failure when the
    call is refused."""

    holding: bool

    def passed(self, method: str) -> None: ...

    async def enter(self, method: str) -> None: ...


def _unary_request(behaviour: Callable[..., Any], method: str, streaming_response: bool,
                   door: Door | None) -> Callable[..., Any]:
    if streaming_response and inspect.isasyncgenfunction(behaviour):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if door is not None:
                await _through(door, method, context)
            if isinstance(request, Unparsed):
                await abort(context, request.failure)
            async for response in behaviour(request, context):
                yield response

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if door is not None:
            if door.holding:
                await _through(door, method, context)
            else:
                door.passed(method)
        if isinstance(request, Unparsed):
            await abort(context, request.failure)
        return await behaviour(request, context)

    return unary


async def _through(door: Door, method: str, context: grpc.aio.ServicerContext) -> None:
    try:
        await door.enter(method)
    except Failure as f:
        await abort(context, f)


def _checked_stream(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async def check() -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Unparsed):
                f = request.failure
                raise BadMessage(f.code, f.message, reason=f.reason, metadata=f.metadata)
            yield request

    return check()


def _stream_request(behaviour: Callable[..., Any], method: str, door: Door | None) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):
        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if door is not None:
                await _through(door, method, context)
            async for response in behaviour(_checked_stream(requests, method), context):
                yield response

        return stream

    async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        if door is not None:
            await _through(door, method, context)
        return await behaviour(_checked_stream(requests, method), context)

    return unary


class Guarded(grpc.GenericRpcHandler):
    """A service's generic handler whose method handlers are wrapped once, at first use, by ``SafeParsing``."""

    def __init__(self, inner: grpc.GenericRpcHandler, guard: SafeParsing) -> None:
        self.inner, self.guard = inner, guard
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method -> (service's handler, wrapped handler)

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        handler = self.inner.service(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.guard.wrap(handler, details.method)
        if len(self._wrapped) < 1024:  # method names come from the server's own services; bound it anyway
            self._wrapped[details.method] = (handler, wrapped)
        return wrapped


class Registrar:
    """Stands in for the grpc.aio server where services are added (the generated ``add_*_to_server``, the
    health and reflection services): every generic handler is added ``Guarded``; everything else goes to the
    server itself."""

    def __init__(self, server: grpc.aio.Server, guard: SafeParsing) -> None:
        self._server, self._guard = server, guard

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(tuple(Guarded(h, self._guard) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._guard.wrap(h, f"/{service}/{name}") for name, h in handlers.items()})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class SafeParsing:
    """Wraps every method handler so that an unparsable request is INVALID_ARGUMENT (see the module docstring),
    and so that every call but a health check passes the ``door`` (the drain's).

    Handlers are wrapped where services are registered (``Registrar``), not by a server interceptor: grpc.aio
    runs any interceptor chain as coroutines on every RPC (about 30 us each on the event loop here), and
    without one it looks the handler up synchronously."""

    def __init__(self, max_bytes: int | None = None, door: Door | None = None) -> None:
        self.max_bytes = max_bytes
        self.door = door

    def wrap(self, handler: Any, method: str) -> Any:
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = _safe(handler.request_deserializer, method, self.max_bytes)
        out = handler.response_serializer
        door = None if method.startswith("/grpc.health.") else self.door  # probes answer to the end
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_stream_request(handler.stream_stream, method, door),
                                                         request_deserializer=parse, response_serializer=out)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_stream_request(handler.stream_unary, method, door),
                                                        request_deserializer=parse, response_serializer=out)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_unary_request(handler.unary_stream, method, True, door),
                                                        request_deserializer=parse, response_serializer=out)
        return grpc.unary_unary_rpc_method_handler(_unary_request(handler.unary_unary, method, False, door),
                                                   request_deserializer=parse, response_serializer=out)
