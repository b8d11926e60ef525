"""OpenTelemetry tracing (server/tracing.py): a span per RPC from the standard gRPC instrumentation, a queue wait per
submission in the request's trace and a span per ONNX Runtime call, linked to the requests whose rows it carries;
off by default, when nothing of OpenTelemetry is even imported."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from genserve.server import tracing

ROOT = Path(__file__).resolve().parents[2]


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = ("import sys, genserve.server.app, genserve.server.batcher, genserve.server.tracing as t; "
            "from genserve.server.config import ServerConfig; "
            "print(t.setup_tracing(ServerConfig(repo='.')), t.tracer, "
            "sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "None None []"


def test_the_endpoint_is_a_url() -> None:
    from genserve.server.config import ServerConfig

    assert ServerConfig(repo=".", otlp_endpoint="http://collector:4317").otlp_endpoint == "http://collector:4317"
    with pytest.raises(ValueError, match="http:// or https://"):
        ServerConfig(repo=".", otlp_endpoint="collector:4317")
    env = ServerConfig.from_toml(None, {"repo": "."}, environ={"GENSERVE_OTLP_ENDPOINT": "https://otel:4317"})
    assert env.otlp_endpoint == "https://otel:4317"


def test_rpcs_queue_waits_and_graph_calls_are_traced(engine_config, monkeypatch: pytest.MonkeyPatch) -> None:
    import opentelemetry.instrumentation.grpc  # noqa: F401 - a dev dependency: missing, the test fails
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from genserve.clients.client import Client
    from genserve.server.app import BackgroundServer

    exporter = InMemorySpanExporter()
    made: list[tracing.Tracing] = []
    setup = tracing.setup_tracing

    def with_memory(cfg, exporter_=None):
        made.append(setup(cfg, exporter))
        return made[-1]

    monkeypatch.setattr(tracing, "setup_tracing", with_memory)
    x = np.full((3, 8, 8), 2.0, np.float32)
    srv = BackgroundServer(replace(engine_config, otlp_endpoint="http://127.0.0.1:9"))  # never reached
    try:
        assert srv.server.tracing is made[0] and tracing.tracer is not None
        with Client(f"127.0.0.1:{srv.port}") as client:
            client.log_likelihood("digits-ppca", x, seed=1)
            client.sample("digits-ppca", 5, seed=2)
            # Streams (server- and bidirectional) pass the instrumentation's wrapper too.
            assert sum(len(c[1]) for c in client.sample_chunks("digits-ppca", 4, seed=3, chunk_size=2)) == 4
            assert client.score_stream("digits-ppca", np.zeros((5, 8, 8), np.float32), chunk_size=2,
                                       progress=False, seed=4).log_prob.shape == (5,)
            with pytest.raises(Exception):  # noqa: B017 - NOT_FOUND: its RPC span carries the code
                client.log_likelihood("no-such-model", x, seed=1)
    finally:
        srv.stop()  # every RPC's span has ended (one may end just after its client has the answer) and is flushed
    assert tracing.tracer is None  # stop() shut the provider down
    spans = exporter.get_finished_spans()

    def rpc(method: str, code: int = 0):
        found = [s for s in spans if s.name == f"/genserve.v1.GenerativeService/{method}"
                 and s.kind == SpanKind.SERVER and s.attributes["rpc.grpc.status_code"] == code]
        assert len(found) == 1, [(s.name, dict(s.attributes)) for s in spans]
        return found[0]

    for method, graph, rows in (("LogLikelihood", "log_prob", 3), ("Sample", "generator", 5)):
        call = rpc(method)
        assert call.resource.attributes["service.name"] == "genserve"
        assert call.attributes["rpc.method"] == method and call.status.status_code != StatusCode.ERROR
        trace_id = call.context.trace_id
        waits = [s for s in spans if s.name == "genserve.queue_wait" and s.context.trace_id == trace_id]
        assert waits and all(w.parent.span_id == call.context.span_id for w in waits)
        assert {w.attributes["genserve.graph"] for w in waits} == {graph}
        assert sum(w.attributes["genserve.rows"] for w in waits) >= rows
        assert all(w.end_time >= w.start_time for w in waits)
        # The call: in the request's trace (its only request), or linked to it when merged with others'.
        graph_calls = [s for s in spans if s.name == "genserve.graph_call" and s.attributes["genserve.graph"] == graph
                       and (s.context.trace_id == trace_id
                            or any(link.context.span_id == call.context.span_id for link in s.links))]
        assert graph_calls, [(s.name, dict(s.attributes)) for s in spans]
        for g in graph_calls:
            assert g.attributes["genserve.model"] == "digits-ppca" and g.attributes["genserve.rows"] >= 1
            assert g.attributes["genserve.instance"] == 0 and g.attributes["genserve.run_seconds"] > 0
            assert g.status.status_code != StatusCode.ERROR
        # Each queue wait links to the call that took its rows.
        call_ids = {g.context.span_id for g in graph_calls}
        assert all(any(link.context.span_id in call_ids for link in w.links) for w in waits)
    # NOT_FOUND: the caller's fault, so not an error of the server's span (OpenTelemetry's gRPC conventions).
    refused = rpc("LogLikelihood", code=5)
    rpc("SampleStream")
    rpc("LogLikelihoodStream")
    assert not [s for s in spans if s.context.trace_id == refused.context.trace_id and s is not refused]


def test_a_merged_call_links_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of two requests in one call: the call is a root span linked to both request spans, and each request's
    queue wait sits in its own trace, linked to the call."""
    import asyncio

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from genserve.server.batcher import Batcher
    from genserve.server.config import ServerConfig

    exporter = InMemorySpanExporter()
    made = tracing.setup_tracing(ServerConfig(repo="."), exporter)
    try:
        requests = made.provider.get_tracer("test")
        batcher = Batcher("double", lambda i, f: {"y": 2 * f["x"]}, max_batch_size=8, max_queue_delay_ms=50,
                          model="m")

        async def request(k: int) -> float:
            with requests.start_as_current_span(f"request{k}"):
                out = await batcher.submit({"x": np.full((2, 1), k, np.float32)})
            return float(out["y"][0, 0])

        async def main() -> list[float]:
            outs = await asyncio.gather(request(1), request(2))
            await batcher.stop()
            return outs

        assert asyncio.run(main()) == [2.0, 4.0]
        assert made.force_flush()
    finally:
        made.shutdown()
    spans = exporter.get_finished_spans()
    (call,) = [s for s in spans if s.name == "genserve.graph_call"]
    roots = {s.name: s for s in spans if s.name.startswith("request")}
    assert call.parent is None and call.attributes["genserve.rows"] == 4 and call.attributes["genserve.requests"] == 2
    assert {link.context.span_id for link in call.links} == {r.context.span_id for r in roots.values()}
    waits = [s for s in spans if s.name == "genserve.queue_wait"]
    assert sorted(w.parent.span_id for w in waits) == sorted(r.context.span_id for r in roots.values())
    assert all(w.links[0].context.span_id == call.context.span_id for w in waits)
