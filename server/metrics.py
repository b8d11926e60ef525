"""Prometheus metrics of one server, in a registry of its own (several servers can live in one process).

Who records what: the transport calls ``observe_request`` once per finished RPC (its status code is known
only there); the engine records in-flight operations, samples generated, rows scored and which model versions
are loaded; each graph's batcher hands a ``BatchStats`` per ONNX Runtime call to ``observe_batch`` and reports
its queue depth. Batch size and request counts together show batching at work, as Triton's execution count
vs inference count do.
"""

from __future__ import annotations

import gc
import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# No `..._created` series beside every counter and histogram: they double the series count and no dashboard
# reads them (process-wide in prometheus_client; this module is the server's).
disable_created_metrics()

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds; from 100 µs (one small ONNX Runtime call) to a minute (a long Langevin chain)."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
"""Rows per ONNX Runtime call."""
GC_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
"""Seconds of one garbage collection: from a young generation's tens of µs to a full one's milliseconds."""


class WithoutRemoved:
    """A collector over another (the supervisor's ``MultiProcessCollector``) that leaves out samples whose value
    is NaN: the series a worker removed (``Metrics.set_model_loaded``), which multiprocess files cannot forget."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Any]:
        for metric in self.inner.collect():
            metric.samples = [s for s in metric.samples if not math.isnan(s.value)]
            yield metric


def multiprocess() -> bool:
    """Whether this is a worker of ``--processes N`` (prometheus_client's multiprocess mode, server/workers.py):
    metrics then live in the workers' files, and the one-process collectors do not apply."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


def histogram(name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
              registry: CollectorRegistry) -> Any:
    """A labelled histogram for the event loop's hot path: ``ScrapedHistogram`` in one process, prometheus_client's
    ``Histogram`` under ``--processes N`` (its values live in the workers' multiprocess files). Either answers
    ``.labels(*values).observe(amount)``."""
    if multiprocess():
        return Histogram(name, documentation, labelnames, buckets=buckets, registry=registry)
    return ScrapedHistogram(name, documentation, labelnames, buckets, registry)


def counter(name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> Any:
    """A labelled counter for the hot path: ``ScrapedValues`` in one process, prometheus_client's ``Counter``
    under ``--processes N``. Either answers ``.labels(*values).inc(amount)``; the exposition is ``<name>_total``."""
    if multiprocess():
        return Counter(name, documentation, labelnames, registry=registry)
    return ScrapedValues(name, documentation, labelnames, registry, counter=True)


def gauge(name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry,
          multiprocess_mode: str) -> Any:
    """A labelled gauge for the hot path: ``ScrapedValues`` in one process, prometheus_client's ``Gauge`` under
    ``--processes N`` (``multiprocess_mode``: how the workers' values add up). Either answers ``.labels(*values)``
    with ``inc``, ``dec`` and ``set``."""
    if multiprocess():
        return Gauge(name, documentation, labelnames, registry=registry, multiprocess_mode=multiprocess_mode)
    return ScrapedValues(name, documentation, labelnames, registry, counter=False)


class ScrapedValue:
    """One label set of a ``ScrapedValues``: a plain number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _Scraped:
    """What ``ScrapedValues`` and ``ScrapedHistogram`` share: name, help, label names, a child per label set
    (made by ``_child``), and registration as a custom collector."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        values = tuple(str(v) for v in values)
        child = self._children.get(values)
        if child is None:
            with self._lock:
                child = self._children.setdefault(values, self._child())
        return child


class ScrapedValues(_Scraped):
    """A labelled Prometheus counter or gauge kept in plain Python numbers and turned into samples when scraped
    (a custom collector, as ``ScrapedHistogram``): an update is one addition, where prometheus_client's takes a
    lock, several times per request on the event loop. Updates come from one thread (the event loop)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None, counter: bool) -> None:
        self.family = CounterMetricFamily if counter else GaugeMetricFamily
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> ScrapedValue:
        return ScrapedValue()

    def describe(self) -> list[Any]:
        return [self.family(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> list[Any]:
        family = self.family(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        for values, child in children:
            family.add_metric(list(values), child.value)
        return [family]


class ScrapedHistogram(_Scraped):
    """A labelled Prometheus histogram kept in plain Python numbers and turned into samples when scraped (a custom
    collector, prometheus_client's ``HistogramMetricFamily``): an observation is one ``bisect`` and two additions,
    where ``Histogram.observe`` takes two locks and walks the bucket list, about 6 us per observation on the event
    loop of a slow core, five times per request. The exposition is the same (``_bucket`` with ``le``, ``_count``,
    ``_sum``). Observations come from one thread (the event loop); a scrape copies each child's counts, so it may
    see one observation's count without its sum, as prometheus_client's own histograms may."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry | None) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets not in sorted order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self._le = [floatToGoString(b) for b in bounds]
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> ScrapedHistogramChild:
        return ScrapedHistogramChild(self.bounds)

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        for values, child in children:
            counts, total = list(child.counts), child.sum
            buckets, acc = [], 0
            for le, n in zip(self._le, counts, strict=True):
                acc += n
                buckets.append((le, float(acc)))
            family.add_metric(list(values), buckets, total)
        return [family]


class ScrapedHistogramChild:
    """One label set of a ``ScrapedHistogram``: observations per bucket (not cumulative) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose upper bound is >= it (Prometheus' ``le``)."""
        if amount == amount:  # NaN: in no bucket (its sum becomes NaN), as prometheus_client does
            self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class BatchStats(NamedTuple):
    """One ONNX Runtime call made by a batcher: what it merged and how long things took (a named tuple: one is
    made per call, on the event loop, where a frozen dataclass cost three times as much)."""

    model: str
    """Model name (the metrics label; versions of a model share their series)."""
    graph: str
    """Graph name within the model, e.g. ``logits``."""
    rows: int
    """Rows in the call (the batch size)."""
    requests: int
    """Submissions with rows in this call."""
    queue_waits: tuple[float, ...]
    """Seconds each submission whose first rows are in this call waited in the queue."""
    inference_s: float
    """Seconds the ONNX Runtime call took, in its worker thread."""
    ok: bool = True
    """False when the call raised (every submission in it failed)."""


class Metrics:
    """The server's metrics; ``render()`` gives the exposition text, ``serve_http`` the /metrics endpoint."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = counter("genserve_requests", "RPCs finished, by model, method and gRPC status code",
                                ["model", "method", "code"], registry=r)
        self.request_duration = histogram("genserve_request_duration_seconds",
                                          "RPC latency from arrival to answer, seconds", ["model", "method"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        # multiprocess_mode: how `--processes N` (prometheus_client's multiprocess mode) adds up the workers'
        # gauges; ignored in one process.
        self.inflight = gauge("genserve_inflight_requests", "Operations the engine is running now",
                              ["model", "method"], registry=r, multiprocess_mode="livesum")
        self.queue_wait = histogram("genserve_queue_wait_seconds",
                                    "Wait of a submission in a graph's batch queue until its first rows ran",
                                    ["model", "graph"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = histogram("genserve_batch_size_rows", "Rows per ONNX Runtime call (dynamic batching)",
                                    ["model", "graph"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = histogram("genserve_batch_requests",
                                        "Submissions merged into one ONNX Runtime call", ["model", "graph"],
                                        buckets=BATCH_BUCKETS, registry=r)
        self.inference = histogram("genserve_inference_duration_seconds", "ONNX Runtime call time per graph",
                                   ["model", "graph"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_failures = Counter("genserve_batch_failures", "ONNX Runtime calls that raised",
                                      ["model", "graph"], registry=r)
        self.queue_depth = gauge("genserve_queue_depth_rows", "Rows waiting in a graph's batch queue",
                                 ["model", "graph"], registry=r, multiprocess_mode="livesum")
        self.samples = counter("genserve_samples_generated", "Samples returned by Sample", ["model"],
                               registry=r)
        self.rows_scored = counter("genserve_rows_scored", "Rows scored by LogLikelihood", ["model"],
                                   registry=r)
        self.model_loaded = Gauge("genserve_model_loaded", "1 while a model version is loaded and serving",
                                  ["model", "version"], registry=r, multiprocess_mode="livemin")
        self.unauthenticated = Counter("genserve_unauthenticated",
                                       "RPCs refused for missing or bad credentials", registry=r)
        # The process's CPU seconds, resident memory and open files (process_*), and its garbage collections
        # by generation (python_gc_*), as Prometheus' own clients export them (one process only: in
        # --processes N mode the workers' values live in files, see server/workers.py, and these collectors
        # do not apply).
        self.gc_pause: ScrapedHistogram | None = None
        """Garbage collections of this process while it serves (``watch_gc``); one process only."""
        if not multiprocess():
            ProcessCollector(registry=r)
            GCCollector(registry=r)
            self.gc_pause = ScrapedHistogram(
                "genserve_gc_pause_seconds", "Garbage collections of the server process, by generation: seconds "
                "each held the interpreter (and so the event loop)", ["generation"], GC_BUCKETS, r)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._graph_children: dict[tuple[str, str], tuple[Any, ...]] = {}  # (model, graph) -> observe_batch's

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: a labelled child is a dict hit instead of prometheus-client's
        argument checks and lock (about 6 µs each, several times per request on the event loop). Label
        values are bounded (known model names, graphs, methods, status codes), so the cache stays small."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def watch_gc(self) -> Callable[[], None]:
        """Time every garbage collection of this process into ``genserve_gc_pause_seconds`` (a server that owns
        its process: ``serve``); returns the function that stops it. Collections never overlap (the collector
        runs one at a time, whichever thread triggers it) and the callback takes no lock, so it cannot wait on
        one held by the code whose allocation started the collection. Off under ``--processes N``."""
        if self.gc_pause is None:
            return lambda: None
        children = [self.gc_pause.labels(str(g)) for g in range(3)]
        started = [0.0]

        def timed(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                children[info["generation"]].observe(time.perf_counter() - started[0])

        gc.callbacks.append(timed)

        def stop() -> None:
            if timed in gc.callbacks:
                gc.callbacks.remove(timed)

        return stop

    # ---- transport ---------------------------------------------------------------------------------
    def observe_request(self, model: str, method: str, code: str, seconds: float) -> None:
        """One finished RPC: ``method`` the RPC name (``Sample``), ``code`` the grpc.StatusCode name."""
        self._child(self.requests, model, method, code).inc()
        self._child(self.request_duration, model, method).observe(seconds)

    # ---- engine ------------------------------------------------------------------------------------
    def track_inflight(self, model: str, method: str, delta: int) -> None:
        self._child(self.inflight, model, method).inc(delta)

    def observe_batch(self, stats: BatchStats) -> None:
        labels = (stats.model, stats.graph)
        children = self._graph_children.get(labels)
        if children is None:
            children = self._graph_children[labels] = tuple(
                self._child(m, *labels) for m in (self.batch_size, self.batch_requests, self.inference,
                                                  self.queue_wait))
        size, requests, inference, wait = children
        size.observe(stats.rows)
        requests.observe(stats.requests)
        inference.observe(stats.inference_s)
        for w in stats.queue_waits:
            wait.observe(w)
        if not stats.ok:
            self._child(self.batch_failures, *labels).inc()

    def set_queue_depth(self, model: str, graph: str, rows: int) -> None:
        self._child(self.queue_depth, model, graph).set(rows)

    def add_samples(self, model: str, n: int) -> None:
        self._child(self.samples, model).inc(n)

    def add_rows_scored(self, model: str, n: int) -> None:
        self._child(self.rows_scored, model).inc(n)

    def set_model_loaded(self, model: str, version: int, loaded: bool | None) -> None:
        """1 loaded, 0 failed to load; ``None`` removes the series (the version is no longer served). In
        ``--processes N`` mode a series cannot be removed from the workers' files (prometheus_client keeps the
        last value), so it is set to NaN there, which the supervisor's ``/metrics`` leaves out
        (``WithoutRemoved``)."""
        if loaded is None and multiprocess():
            self.model_loaded.labels(model, str(version)).set(math.nan)
        elif loaded is None:
            try:
                self.model_loaded.remove(model, str(version))
            except KeyError:
                pass
        else:
            self.model_loaded.labels(model, str(version)).set(1 if loaded else 0)

    # ---- exposition --------------------------------------------------------------------------------
    def render(self) -> str:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry).decode()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value by its full name (e.g. ``genserve_batch_size_rows_count``); for tests and tools."""
        return self.registry.get_sample_value(name, labels or {})

    def serve_http(self, host: str, port: int, certfile: str | None = None, keyfile: str | None = None,
                   client_cafile: str | None = None) -> tuple[Any, int]:
        """Serve /metrics on ``host:port`` (0: any free port) in a daemon thread; returns (server, port).

        Only ``/metrics`` answers; every other path is 404, so a readiness probe pointed at this port by mistake
        fails instead of passing. With ``certfile``/``keyfile`` it is HTTPS; with ``client_cafile`` too,
        scrapers need a client certificate signed by that CA."""
        tls: dict[str, Any] = {}
        if certfile:
            tls = {"certfile": certfile, "keyfile": keyfile, "client_cafile": client_cafile,
                   "client_auth_required": client_cafile is not None}
        return serve_registry(self.registry, host, port, **tls)


def serve_registry(registry: CollectorRegistry, host: str, port: int, **tls: Any) -> tuple[Any, int]:
    """``registry`` on ``host:port``/metrics only (see Metrics.serve_http); returns (server, port)."""
    server, _thread = start_http_server(port, addr=host, registry=registry, **tls)
    # wsgiref reads the app per request; swapped before the port is handed to anyone.
    server.set_app(metrics_only(server.get_app()))
    return server, int(server.server_port)


METRICS_PATH = "/metrics"


def metrics_only(app: Any) -> Any:
    """The WSGI ``app`` on ``/metrics``; 404 with a one-line text body on any other path."""

    def serve(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO", "") == METRICS_PATH:
            return app(environ, start_response)
        body = f"404 not found: this port serves Prometheus metrics at {METRICS_PATH} only\n".encode()
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    return serve
