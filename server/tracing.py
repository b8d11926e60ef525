"""OpenTelemetry tracing, off unless ``otlp_endpoint`` is set: RPC spans, queue waits and graph calls over OTLP.

``setup_tracing(cfg)`` makes a TracerProvider (service.name "genserve", OTEL_RESOURCE_ATTRIBUTES merged in) with a
BatchSpanProcessor and the OTLP/gRPC exporter, and returns a ``Tracing`` whose ``interceptor`` is the standard
``opentelemetry.instrumentation.grpc`` aio server interceptor: one SERVER span per RPC, named for the gRPC method
(``/genserve.v1.GenerativeService/LogLikelihood``), with its status code, continuing the caller's trace when the
request carries a W3C ``traceparent``. The provider is the server's own, not the process's global one.

The engine's spans come from the batcher, which merges rows of several requests into one ONNX Runtime call run in a
worker thread, so one call cannot be the child of each request it serves:

* ``genserve.queue_wait``, per submission, in its request's trace (child of the RPC span): from the submission
  to the call that takes its first rows; it links to that call's span.
* ``genserve.graph_call``, per ONNX Runtime call (graph, rows, padded rows, requests, instance): the child of the
  request when all its rows come from one request; otherwise the root of its own trace, linked to every request
  span whose rows it carries (OpenTelemetry's model for batch processing).

Off (the default), opentelemetry is never imported and ``tracer`` is None: the batcher checks that one module
attribute per submission and per call, and does nothing else.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

tracer: Any = None
"""The engine's tracer while tracing is on (set by ``setup_tracing``, cleared by ``Tracing.shutdown``); None: off."""

_trace: Any = None  # the opentelemetry.trace module, bound by setup_tracing (never imported when tracing is off)
_Context: Any = None
_Status: Any = None
_StatusCode: Any = None

SERVICE_NAME = "genserve"


class Tracing:
    """What ``setup_tracing`` made: the provider and the gRPC server interceptor to put first in the chain."""

    def __init__(self, provider: Any, interceptor: Any, engine_tracer: Any) -> None:
        self.provider = provider
        self.interceptor = interceptor
        self.tracer = engine_tracer

    def force_flush(self, timeout_ms: int = 30000) -> bool:
        """Export every ended span now (tests, and before exit)."""
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Stop the engine's spans, flush what is buffered to the exporter and close it."""
        global tracer
        if tracer is self.tracer:
            tracer = None
        self.provider.shutdown()


def setup_tracing(cfg: Any, exporter: Any = None) -> Tracing | None:
    """Tracing for a server of ``cfg`` (a ServerConfig): None when ``cfg.otlp_endpoint`` is empty and no
    ``exporter`` is given (tests pass an InMemorySpanExporter); otherwise spans go to the OTLP endpoint
    (``http://collector:4317``: plaintext gRPC, ``https://``: TLS) or to ``exporter``."""
    global tracer, _trace, _Context, _Status, _StatusCode
    endpoint = getattr(cfg, "otlp_endpoint", "")
    if not endpoint and exporter is None:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import Status, StatusCode
    except ImportError as e:
        raise ValueError(f"--otlp-endpoint needs the OpenTelemetry packages ({e.name} is missing): "
                         "pip install 'genserve[otel]'") from None
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("genserve")
    except PackageNotFoundError:
        release = "unknown"
    resource = Resource.create({"service.name": SERVICE_NAME, "service.version": release,
                                "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
                                "process.pid": os.getpid()})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _trace, _Context, _Status, _StatusCode = trace, Context, Status, StatusCode
    tracer = provider.get_tracer("genserve.server")
    return Tracing(provider, aio_server_interceptor(tracer_provider=provider), tracer)


def submitted() -> tuple[Any, int]:
    """For a submission queued now: the current request's span context (None outside a traced request) and the
    time (ns since the epoch, OpenTelemetry's clock)."""
    context = _trace.get_current_span().get_span_context()
    return (context if context.is_valid else None), time.time_ns()


def start_call(model: str, graph: str, instance: int, rows: int, padded: int,
               parts: Sequence[tuple[Any, int, bool]]) -> Any:
    """The span of one graph call, started now; ``parts``: (``submitted()`` or None, rows, first rows taken)
    per submission in the call. Records the queue wait of each submission whose first rows this call takes."""
    now = time.time_ns()
    parents: list[Any] = []
    for trace, _, _ in parts:
        if trace is not None and trace[0] is not None and trace[0] not in parents:
            parents.append(trace[0])
    attributes = {"genserve.model": model, "genserve.graph": graph, "genserve.instance": instance,
                  "genserve.rows": rows, "genserve.padded_rows": padded, "genserve.requests": len(parts)}
    if len(parents) == 1:  # one request's rows: the call is part of its trace
        span = tracer.start_span("genserve.graph_call", context=_parent(parents[0]), attributes=attributes,
                                 start_time=now)
    else:  # rows of several requests (or of none, as warm-up): a trace of its own, linked to each request
        span = tracer.start_span("genserve.graph_call", context=_Context(), attributes=attributes,
                                 links=[_trace.Link(p) for p in parents], start_time=now)
    link = [_trace.Link(span.get_span_context())]
    for trace, part_rows, first in parts:
        if first and trace is not None:
            wait = tracer.start_span("genserve.queue_wait", context=_parent(trace[0]), links=link,
                                     start_time=trace[1],
                                     attributes={"genserve.model": model, "genserve.graph": graph,
                                                 "genserve.rows": part_rows})
            wait.end(end_time=max(now, trace[1]))
    return span


def failed(span: Any, error: BaseException) -> None:
    """The call raised: the span records the exception and ends in error (``end_call`` still ends it)."""
    span.record_exception(error)
    span.set_status(_Status(_StatusCode.ERROR, f"{type(error).__name__}: {str(error)[:200]}"))


def end_call(span: Any, seconds: float, ok: bool) -> None:
    """End a graph call's span; ``seconds``: ONNX Runtime's own time, without the thread pool's wait."""
    span.set_attribute("genserve.run_seconds", seconds)
    if not ok and span.status.is_unset:
        span.set_status(_Status(_StatusCode.ERROR, "the call did not complete"))
    span.end()


def _parent(context: Any) -> Any:
    """A Context whose current span is ``context`` (a SpanContext; None: a root, not the caller's context)."""
    if context is None:
        return _Context()
    return _trace.set_span_in_context(_trace.NonRecordingSpan(context))
