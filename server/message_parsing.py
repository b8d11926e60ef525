"""Parsing of request messages: one that is not valid protobuf answers INVALID_ARGUMENT, not gRPC's UNKNOWN.

gRPC parses a request with the method's deserializer before any handler runs; a parse error there becomes
status UNKNOWN and an ERROR with a traceback in the log, for every malformed message a client sends. This
interceptor swaps in a deserializer that returns an ``Unparsed`` marker instead, and a handler wrapper that
answers the marker with INVALID_ARGUMENT naming the message type.

Size: gRPC itself refuses a message over its receive limit with a terse RESOURCE_EXHAUSTED. The server sets
that limit above ``max_message_mb`` (server/app.py, ``RECEIVE_SLACK``) and this deserializer refuses a message over
``max_message_mb`` first, with a message that says how to fit the request.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

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


def _unary_request(behaviour: Callable[..., Any], method: str, streaming_response: bool) -> Callable[..., Any]:
    if streaming_response and inspect.isasyncgenfunction(behaviour):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Unparsed):
                await abort(context, request.failure)
            async for response in behaviour(request, context):
                yield response

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Unparsed):
            await abort(context, request.failure)
        return await behaviour(request, context)

    return unary


def _checked_stream(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async def check() -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Unparsed):
                f = request.failure
                raise BadMessage(f.code, f.message, reason=f.reason, metadata=f.metadata)
            yield request

    return check()


def _stream_request(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):
        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behaviour(_checked_stream(requests, method), context):
                yield response

        return stream

    async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(_checked_stream(requests, method), context)

    return unary


class SafeParsing(grpc.aio.ServerInterceptor):
    """Wraps every handler so that an unparsable request is INVALID_ARGUMENT (see the module docstring).

    The wrapped handler of a method is built once and reused while the service hands out the same handler
    (building one costs tens of microseconds, which every RPC on the event loop would otherwise pay)."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method -> (service's handler, wrapped handler)

    async def intercept_service(self, continuation: Callable[[Any], Any],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method)
        if len(self._wrapped) < 1024:  # method names come from the server's own services; bound it anyway
            self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Any, method: str) -> Any:
        parse = _safe(handler.request_deserializer, method, self.max_bytes)
        out = handler.response_serializer
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_stream_request(handler.stream_stream, method),
                                                         request_deserializer=parse, response_serializer=out)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_stream_request(handler.stream_unary, method),
                                                        request_deserializer=parse, response_serializer=out)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_unary_request(handler.unary_stream, method, True),
                                                        request_deserializer=parse, response_serializer=out)
        return grpc.unary_unary_rpc_method_handler(_unary_request(handler.unary_unary, method, False),
                                                   request_deserializer=parse, response_serializer=out)
