"""The running server: grpc.aio with GenerativeService, health and reflection, OIP HTTP, metrics, signals, reload.

Limits (stated once, here): requests and responses are at most ``cfg.max_message_mb`` MiB each way (gRPC
max_send/max_receive_message_length; 64 MiB by default, e.g. ~260k digit images of 8x8 float32 per message);
rows per request ``cfg.max_rows_per_request``; samples per request ``cfg.max_sample_n``; a unary Sample whose
answer would not fit one message is refused with a pointer to SampleStream.

Shutdown (SIGTERM or SIGINT) answers every RPC or refuses it with UNAVAILABLE, which clients retry (on another
replica when they balance over several); never CANCELLED. Health turns NOT_SERVING for every service first; RPCs
still arriving are served until arrivals pause for QUIET_S (the lame-duck period, at most LAME_DUCK_SHARE of the
grace period). Then new RPCs are held at the door, not run (``Drain``): a client waiting for an answer sends
nothing more, so arrivals pause (at the latest at HOLD_SHARE of the grace period). Only then does grpc stop: it
closes the port and sends GOAWAY, then the held RPCs are refused with UNAVAILABLE, which reaches each client
after the GOAWAY on the same connection, so its retry goes elsewhere. grpc kills (CANCELLED) any call that
arrives after its stop began, hence the quiet moment first; only clients that keep sending without waiting for
answers, so that arrivals never pause, can still meet it. Measured 2026-12-02 (8 closed-loop client threads
calling Decode, SIGTERM under load, busy 2-core machine): before the door every drain cancelled some calls
(1 to 36, 54 in 8 drains), with it none (0 in 10 drains; tests/server/test_drain.py). Accepted RPCs run to
their end (up to ``cfg.grace_s`` in all, then what is left is cancelled), and the engine stops.

Reload (SIGHUP, the ReloadRepository RPC, or every ``cfg.poll_s`` seconds) goes through one lock and
refreshes per-model health afterwards; it also re-reads the token file (token rotation).

Security (server/auth.py): ``cfg.tls_cert``/``tls_key`` make the gRPC port TLS-only, ``tls_client_ca`` adds
mutual TLS; ``cfg.token_file``/``token_env`` require a bearer token on every RPC except health checks
(``open_health``) and, when asked, reflection (``open_reflection``). The metrics port is plain HTTP unless
``metrics_tls`` serves it over HTTPS with the same certificate (and the same client CA, for mutual TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from genserve.server import auth, oip, tracing
from genserve.server.config import ServerConfig
from genserve.server.interface import EngineInterface, ModelStatus, ReloadResult
from genserve.server.message_parsing import Registrar, SafeParsing
from genserve.server.metrics import Metrics
from genserve.server.oip_models import reflection_pool
from genserve.server.process import apply_process_settings, release_heap, settle_heap
from genserve.server.servicer import GenerativeServicer
from genserve.server.transport import Failure
from genserve.v1 import service_pb2, service_pb2_grpc

if TYPE_CHECKING:
    from genserve.server.http_face import HttpFace
    from genserve.server.workers import Peers

log = logging.getLogger("genserve.server")

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GenerativeService"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
STATISTICS = "oip-statistics"
"""The name under which a worker keeps its OIP statistics for its replacement (``Server.keep_statistics``)."""


QUIET_S = 0.2
"""Shutdown: the lame-duck period, and the holding that follows it, end once no RPC arrived for this long."""
LAME_DUCK_SHARE = 0.25
"""Shutdown: the lame-duck period (new RPCs still served) ends at the latest at this share of the grace period."""
HOLD_SHARE = 0.5
"""Shutdown: holding new RPCs (until arrivals pause) ends at the latest at this share of the grace period."""
GOAWAY_LEAD_S = 0.05
"""Shutdown: held RPCs are refused this long after grpc's stop began, so its GOAWAY is written first."""
SHUTTING_DOWN = "the server is shutting down; retry on another replica"
"""The message of UNAVAILABLE refusals during shutdown."""


class Drain:
    """When the last RPC other than a health check arrived or was answered, and the door of a shutdown.

    Every RPC passes this door (message_parsing.SafeParsing wraps the handlers with it). ``hold()``: from then
    on new RPCs wait at the door without running until ``refuse()``, then get UNAVAILABLE. A closed-loop client
    whose call is held sends nothing more, so arrivals pause and grpc's stop, which kills calls that arrive
    after it began, finds none on the wire. An answer counts as activity too: its client may send the next
    call at once.
    """

    def __init__(self) -> None:
        self.last = -math.inf
        self.held = 0
        self.refused = 0
        self.holding = False
        self._open: asyncio.Event | None = None

    def hold(self) -> None:
        self.holding = True
        if self._open is None:
            self._open = asyncio.Event()

    def refuse(self) -> None:
        """Answer every held RPC, and every later one, with UNAVAILABLE."""
        if self._open is not None:
            self._open.set()

    def answered(self) -> None:
        self.last = max(self.last, time.monotonic())

    async def quiet(self, until: float) -> None:
        """Return once no RPC arrived or was answered for QUIET_S, or at ``until`` (time.monotonic)."""
        tick = QUIET_S / 5
        while time.monotonic() < until:
            before = time.monotonic()
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - before > 2 * tick:
                self.last = now  # this process stalled: calls may wait in grpc, not yet at the door
            elif now - self.last >= QUIET_S:
                return

    def passed(self, method: str) -> None:
        """An RPC came through the open door (the per-call path: one clock read)."""
        self.last = time.monotonic()

    async def enter(self, method: str) -> None:
        """An RPC at the door: through when open; held while holding, then refused (a Failure, UNAVAILABLE)."""
        self.last = time.monotonic()
        if not self.holding:
            return
        assert self._open is not None
        self.held += 1
        try:
            await self._open.wait()
        finally:
            self.held -= 1
        self.refused += 1
        raise Failure(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, metadata={"method": method})


RECEIVE_SLACK = 2
"""The server's gRPC receive limit is this many times max_message_mb: a message between the two reaches
SafeParsing, which refuses it with a message that says how to fit the request (gRPC's own refusal does not)."""


def grpc_options(max_message_mb: int, receive_slack: int = 1, reuse_port: bool = False,
                 max_connection_age_s: float = 0.0, max_connection_age_grace_s: float = 0.0
                 ) -> list[tuple[str, Any]]:
    """Channel arguments of the server (``receive_slack`` RECEIVE_SLACK); also what a client needs for messages
    above gRPC's 4 MiB default. ``reuse_port``: the port is shared by the processes of ``--processes N``;
    ``max_connection_age_s`` (> 0) closes each connection after about that long, calls in flight getting
    ``max_connection_age_grace_s`` more, so clients balancing over a headless Service see new pods."""
    size = int(max_message_mb) * 2**20
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size * receive_slack),
        # One process: a busy port must fail loudly, not be shared with another server.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    if max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace_s * 1000))]
    return options


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    """GenerativeService, health, reflection and metrics over one engine: ``await start(cfg)``, ``stop()``.

    ``port`` and ``metrics_port`` are the bound ports (useful when the config asks for port 0 = any free);
    ``drain`` is the door that holds and then refuses RPCs during ``stop()``.
    """

    def __init__(self) -> None:
        self.cfg: ServerConfig | None = None
        self.engine: EngineInterface | None = None
        self.metrics: Metrics | None = None
        self.health: health_aio.HealthServicer | None = None
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.http: HttpFace | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: Any = None
        self._poller: asyncio.Task | None = None
        self._reload_lock = asyncio.Lock()
        self._health_names: set[str] = set()
        self._stopping = False
        self.drain = Drain()
        self.auth: auth.TokenAuth | None = None
        self._peers_seen: bool | None = None  # every process ready, at the last look (sync_peers)
        self._oip: oip.OipServicer | None = None
        self._requests = 0  # answered, both APIs and HTTP (keep_statistics: whether anything changed)
        self._kept_mark = -1  # self._requests at keep_statistics' last write
        self.peers: Peers | None = None
        """The other processes of ``--processes N`` (set before ``start``); None: this process is the server."""
        self.servicer: GenerativeServicer | None = None
        self.tracing: tracing.Tracing | None = None
        """OpenTelemetry (``cfg.otlp_endpoint``; server/tracing.py); None: off."""
        self.owns_process = False
        """Set by ``serve``: the process is this server's, so its heap is settled (``settle_heap``) once the
        models are loaded and after every change to them, and its garbage collections are timed
        (``Metrics.watch_gc``); servers inside another program leave both alone."""
        self._gc_watch: Callable[[], None] | None = None  # stops timing garbage collections

    async def start(self, cfg: ServerConfig, engine: EngineInterface | None = None) -> None:
        """Load the repository, bind ``cfg.host:cfg.port`` and serve; ``engine`` replaces the default one."""
        self.cfg = cfg
        # Credentials first: a typo in a TLS or token path fails at once, before models load.
        credentials = auth.server_credentials(cfg)
        if cfg.auth:
            self.auth = auth.TokenAuth(auth.read_tokens(cfg), auth.open_prefixes(cfg), self._refused)
        if engine is None:
            from genserve.server.engine import Engine

            self.metrics = Metrics()
            engine = Engine(cfg, self.metrics)
        else:
            self.metrics = engine.metrics
        self.engine = engine
        await engine.start()

        # The token check is an interceptor (refusals parse nothing); safe parsing and the drain's door wrap the
        # handlers where the services are registered (``services``), so that a server without auth or tracing
        # runs no interceptor chain per RPC.
        parsing = SafeParsing(max_bytes=cfg.max_message_mb * 2**20, door=self.drain)
        interceptors: list[Any] = [] if self.auth is None else [self.auth]
        self.tracing = tracing.setup_tracing(cfg)
        if self.tracing is not None:  # outermost: refusals (tokens, parsing, the drain) get their span too
            interceptors.insert(0, self.tracing.interceptor)
        options = grpc_options(cfg.max_message_mb, RECEIVE_SLACK, reuse_port=cfg.processes > 1,
                               max_connection_age_s=cfg.max_connection_age_s,
                               max_connection_age_grace_s=cfg.max_connection_age_grace_s or cfg.max_deadline_s)
        self._grpc = grpc.aio.server(options=options, interceptors=interceptors or None,
                                     maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        services = Registrar(self._grpc, parsing)
        self.servicer = servicer = GenerativeServicer(engine, cfg, observe=self._answered, control=self)
        service_pb2_grpc.add_GenerativeServiceServicer_to_server(servicer, services)
        self.health = _PeersHealth(self.sync_peers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        # The Open Inference Protocol (KServe v2 / Triton GRPCInferenceService) beside GenerativeService, with one
        # row budget for both APIs: max_queued_rows bounds the server, whichever protocol the rows came by.
        # reflection_pool() also holds the OIP descriptors (genserve.oip has its own pool).
        oip_servicer = oip.register_oip(services, engine, cfg, observe=self._answered, rows=servicer.rows,
                                        control=self)
        self._oip = oip_servicer
        if self.peers is not None:  # --processes N: the statistics count the calls every worker answered
            peers = self.peers
            kept = peers.kept(STATISTICS)
            if kept is not None:  # this worker replaces one that died: its figures go on counting here
                try:
                    oip_servicer.carried = oip.pb.ModelStatisticsResponse.FromString(kept)
                except DecodeError:
                    log.warning("the statistics kept by the worker this one replaced do not parse; they restart "
                                "from zero")

            async def others(data: bytes) -> list[bytes]:
                self.keep_statistics(always=True)  # figures once reported are never lost with a worker
                return await peers.ask("statistics", data)

            def answer(data: bytes) -> bytes:
                self.keep_statistics(always=True)
                return oip_servicer.local_statistics(oip.pb.ModelStatisticsRequest.FromString(data)).SerializeToString()

            oip_servicer.others = others
            peers.answers["statistics"] = answer
        if cfg.http_port:  # the same OIP over HTTP/JSON: same row budget, statistics shared with the gRPC face
            from genserve.server.http_face import HttpFace  # starlette and uvicorn only when asked for

            self.http = HttpFace(engine, cfg, shared=oip_servicer, observe=self._observe, rows=servicer.rows,
                                 tokens=self.auth, control=self)
        # What reflection.enable_server_reflection does for a grpc.aio server, added through ``services``.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(
            [SERVICE_NAME, HEALTH_NAME, oip.SERVICE_NAME, reflection.SERVICE_NAME], pool=reflection_pool()), services)
        target = address(cfg.host, cfg.port)
        try:
            if credentials is None:
                self.port = self._grpc.add_insecure_port(target)
            else:
                self.port = self._grpc.add_secure_port(target, credentials)
        except RuntimeError as e:
            await engine.stop()
            raise ValueError(f"cannot listen on {target} ({str(e).split(';')[0]}); is the port in use? "
                             "pick another with --port") from None
        try:
            self._start_metrics_http()
        except OSError as e:
            await self._grpc.stop(None)
            await engine.stop()
            raise ValueError(f"cannot serve metrics on {address(cfg.host, cfg.metrics_port)} "
                             f"({e.strerror or e}); pick another --metrics-port (0: off)") from None
        if self.http is not None:
            try:
                self.http_port = self.http.start(cfg.host, cfg.http_port)
            except (OSError, ValueError) as e:
                self._close_metrics_http()
                await self._grpc.stop(None)
                await engine.stop()
                why = e.strerror if isinstance(e, OSError) and e.strerror else e
                raise ValueError(f"cannot serve HTTP on {address(cfg.host, cfg.http_port)} ({why}); pick "
                                 "another --http-port (0: off)") from None
        await self._grpc.start()
        await self.refresh_health()
        if cfg.poll_s > 0:
            self._poller = asyncio.ensure_future(self._poll())
        log.info("serving on %s (%s)", address(cfg.host, self.port), security(cfg))
        if self.auth is not None:
            log.info("auth: %d bearer token(s) accepted", self.auth.count)
        if self.owns_process and self.metrics is not None:
            self._gc_watch = self.metrics.watch_gc()
        self._settle()

    def _settle(self) -> None:
        if self.owns_process and not self._stopping:
            settle_heap()

    def _refused(self) -> None:
        if self.metrics is not None:
            self.metrics.unauthenticated.inc()

    def reload_tokens(self) -> None:
        """Re-read the token file and variable (rotation); on a problem the tokens in use stay."""
        if self.auth is None:
            return
        try:
            self.auth.update(auth.read_tokens(self.cfg))
        except ValueError as e:
            log.warning("auth: keeping the tokens in use; re-reading them failed: %s", e)

    def _start_metrics_http(self) -> None:
        """The Prometheus endpoint on its own port (``cfg.metrics_port``; 0 leaves it off)."""
        if not self.cfg.metrics_port or self.metrics is None:
            return
        tls = {}
        if self.cfg.metrics_tls:
            ca = self.cfg.tls_client_ca
            tls = {"certfile": str(self.cfg.tls_cert), "keyfile": str(self.cfg.tls_key),
                   "client_cafile": None if ca is None else str(ca)}
        self._http, self.metrics_port = self.metrics.serve_http(self.cfg.host, self.cfg.metrics_port, **tls)

    def _answered(self, method: str, model: str, code: str, seconds: float) -> None:
        """A gRPC request's end: for the metrics and the drain (its client may send the next call at once)."""
        self.drain.answered()
        self._observe(method, model, code, seconds)

    def _observe(self, method: str, model: str, code: str, seconds: float) -> None:
        self._requests += 1
        if self.metrics is not None:
            self.metrics.observe_request(model, method, code, seconds)

    async def refresh_health(self) -> None:
        """Overall and service SERVING; a model SERVING when ready, NOT_SERVING when failed or gone."""
        assert self.health is not None
        statuses = self.engine.list_models()
        names = {s.name for s in statuses}
        # Overall health is the server's: SERVING while any model serves (or the repository is empty), so
        # one broken model does not take the others out of a load balancer; per-model health says which.
        everywhere = self.peers is None or self.peers.all_ready()
        overall = SERVING if everywhere and (not names or any(self.engine.ready(n) for n in names)) else NOT_SERVING
        await self.health.set("", overall)
        await self.health.set(SERVICE_NAME, overall)
        for name in sorted(names | self._health_names):
            serving = everywhere and name in names and self.engine.ready(name)
            await self.health.set(name, SERVING if serving else NOT_SERVING)
        self._health_names |= names

    def ready(self, name: str | None = None) -> bool:
        """The engine's readiness (``Engine.ready``) and, with ``--processes N``, every process ready: a probe
        reaches one process, and answers for all of them (a process that died and is starting again, or is
        draining, takes the server out of service until it is back)."""
        return self.engine.ready(name) and (self.peers is None or self.peers.all_ready())

    async def sync_peers(self) -> None:
        """With ``--processes N``: refresh health if the processes' readiness changed since the last look (read
        before the refresh, which reads it again: a change meanwhile is seen at the next look)."""
        if self.peers is None or self._stopping:
            return
        now = self.peers.all_ready()
        if now != self._peers_seen:
            self._peers_seen = now
            await self.refresh_health()

    async def follow_peers(self, every_s: float = 0.2) -> None:
        """With ``--processes N``: look every ``every_s`` for the watchers of gRPC health (pushed, not computed
        per call; a Check looks for itself first, ``_PeersHealth``) and keep this worker's statistics."""
        while True:
            await self.sync_peers()
            try:
                self.keep_statistics()
            except OSError as e:
                log.warning("could not keep this worker's statistics for a replacement: %s", e)
            await asyncio.sleep(every_s)

    def keep_statistics(self, always: bool = False) -> None:
        """With ``--processes N``: write this worker's OIP statistics (every model) where the worker that would
        replace it after a crash reads them (``Peers.keep``), when they changed since the last write or
        ``always``: a worker killed outright loses at most the last ``follow_peers`` interval (0.2 s) of its
        figures, and none that a ModelStatistics answer has shown."""
        if self.peers is None or self._oip is None or (self._requests == self._kept_mark and not always):
            return
        self._kept_mark = self._requests
        self.peers.keep(STATISTICS, self._oip.local_statistics(oip.pb.ModelStatisticsRequest()).SerializeToString())

    async def reload(self, from_peer: bool = False) -> ReloadResult:
        """Rescan the repository (one reload at a time) and refresh health; returns the engine's result. With
        ``--processes N``, the other workers follow (``from_peer``: this one is following)."""
        self.reload_tokens()
        async with self._reload_lock:
            result = await self.engine.reload()
            await self.refresh_health()
            self._settle()
        for error in result.errors:
            log.warning("reload: %s version %s failed to load: %s", error.model, error.version, error.message)
        if self.peers is not None and not from_peer:
            await self.peers.notify("reload")
        return result

    async def load_model(self, name: str, from_peer: bool = False) -> ModelStatus:
        """Load or reload one model (explicit model control), then refresh health; the other workers follow."""
        async with self._reload_lock:
            try:
                status = await self.engine.load_model(name)
            finally:  # a failed load may still have changed what serves
                await self.refresh_health()
                self._settle()
        if self.peers is not None and not from_peer:
            await self.peers.notify("load", name)
        return status

    async def unload_model(self, name: str, from_peer: bool = False) -> ModelStatus:
        """Unload one model (explicit model control), then refresh health; the other workers follow."""
        async with self._reload_lock:
            status = await self.engine.unload_model(name)
            await self.refresh_health()
            self._settle()
        if self.peers is not None and not from_peer:
            await self.peers.notify("unload", name)
        return status

    async def apply(self, kind: str, name: str) -> None:
        """A change another worker made (``--processes N``): "reload", "load" or "unload" of ``name``."""
        if kind == "reload":
            await self.reload(from_peer=True)
        elif kind == "load":
            await self.load_model(name, from_peer=True)
        elif kind == "unload":
            await self.unload_model(name, from_peer=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_s)
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - a failed poll must not end polling
                log.exception("polling reload failed")

    def schedule_reload(self) -> None:
        """For SIGHUP: reload in the background, logging the outcome."""
        task = asyncio.ensure_future(self.reload())
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                               or log.error("reload failed: %s", t.exception()))

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop within ``grace`` s (default cfg.grace_s): health, then RPCs, then the engine."""
        if self._stopping or self._grpc is None:
            return
        self._stopping = True
        grace = self.cfg.grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        if self._poller is not None:
            self._poller.cancel()
        assert self.health is not None
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.draining = True  # HTTP readiness fails with gRPC health, for the whole drain
        # Lame duck: calls a client sent before it saw NOT_SERVING may still be on the wire; serve them until
        # arrivals pause. Under continuous load they do not: then hold new RPCs at the door (unanswered, so each
        # closed-loop client waits) until arrivals pause, because grpc's stop kills calls still arriving.
        start = deadline - grace
        await self.drain.quiet(start + grace * LAME_DUCK_SHARE)
        self.drain.hold()
        try:
            await self.drain.quiet(start + grace * HOLD_SHARE)
            # Close the port and send GOAWAY, let accepted RPCs finish; leave a little of the grace period for
            # the engine's stop. The held RPCs are refused after the GOAWAY is out: they retry elsewhere.
            margin = min(1.0, grace * 0.1)
            left = max(0.0, deadline - time.monotonic() - margin)
            stopping = [self._grpc.stop(left)] + ([self.http.stop(left)] if self.http is not None else [])
            closing = asyncio.gather(*stopping)
            await asyncio.sleep(GOAWAY_LEAD_S)
        finally:
            self.drain.refuse()
        await closing
        if self.drain.refused:
            log.info("shutdown: %d RPCs arriving during the drain were refused with UNAVAILABLE",
                     self.drain.refused)
        try:
            await asyncio.wait_for(self.engine.stop(), timeout=max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("engine did not stop within the grace period")
        self._close_metrics_http()
        if self.tracing is not None:
            # Flushes the spans still buffered; off the loop, as an unreachable collector takes its export timeout.
            await asyncio.to_thread(self.tracing.shutdown)
        if self.owns_process:
            release_heap()
            if self._gc_watch is not None:
                self._gc_watch()
                self._gc_watch = None

    def _close_metrics_http(self) -> None:
        if self._http is not None:
            with contextlib.suppress(Exception):
                self._http.shutdown()
                self._http.server_close()
            self._http = None

    async def wait(self) -> None:
        assert self._grpc is not None
        await self._grpc.wait_for_termination()


class BackgroundServer:
    """A Server on its own event loop in a daemon thread, for synchronous code (tests, notebooks).

    Example: ``with BackgroundServer(cfg) as srv: grpc.insecure_channel(f"127.0.0.1:{srv.port}")``.
    """

    def __init__(self, cfg: ServerConfig, engine: EngineInterface | None = None) -> None:
        self.server = Server()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="genserve-server", daemon=True)
        self._thread.start()
        try:
            self.call(self.server.start(cfg, engine))
        except BaseException:
            self._close()
            raise

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int:
        return self.server.metrics_port

    @property
    def http_port(self) -> int:
        return self.server.http_port

    def call(self, coro: Any, timeout: float | None = 120.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace: float | None = None) -> None:
        if self._thread.is_alive():
            try:
                self.call(self.server.stop(grace))
            finally:
                self._close()

    def _close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PeersHealth(health_aio.HealthServicer):
    """gRPC health whose Check first brings the status up to date with the other processes' readiness
    (``--processes N``), so a probe never sees a state the polling loop has not caught up with yet."""

    def __init__(self, sync: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self._sync = sync

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method's name
        await self._sync()
        return await super().Check(request, context)


def ready_line(server: Server) -> str:
    """The one line printed when the server is ready: address, ports, and each model's versions or state."""
    cfg = server.cfg
    models = []
    for s in sorted(server.engine.list_models(), key=lambda s: s.name):
        if s.state == "READY":
            models.append(f"{s.name}:v{','.join(str(v) for v in s.versions)}")
        else:
            models.append(f"{s.name}:{s.state}")
    scheme = "https" if cfg.metrics_tls else "http"
    metrics = f"{scheme}://{address(cfg.host, server.metrics_port)}/metrics" if server.metrics_port else "off"
    web = "https" if cfg.tls_cert is not None else "http"
    http = f"{web}://{address(cfg.host, server.http_port)}/v2" if server.http_port else "off"
    return (f"genserve: serving grpc={address(cfg.host, server.port)} port={server.port} "
            f"http={http} http_port={server.http_port} "
            f"metrics={metrics} metrics_port={server.metrics_port} {security(cfg)} "
            f"models={' '.join(models) or '(none)'}")


def security(cfg: ServerConfig) -> str:
    """``tls=off|on|mutual auth=off|token``: what a client needs (never the tokens themselves)."""
    tls = "off" if cfg.tls_cert is None else ("mutual" if cfg.tls_client_ca else "on")
    return f"tls={tls} auth={'token' if cfg.auth else 'off'}"


async def serve(cfg: ServerConfig, announce: Callable[[str], None] = print, peers: Peers | None = None) -> int:
    """Serve until SIGTERM/SIGINT (a second signal exits at once, code 1); SIGHUP reloads the repository.

    ``peers``: this is one worker of ``--processes N`` (server/workers.py); the supervisor forwards SIGTERM and
    SIGHUP, so the worker leaves SIGINT and SIGHUP (sent to the whole process group by a terminal) alone."""
    apply_process_settings(cfg.switch_interval_ms, cfg.malloc_arena_max)  # this process is the server's
    server = Server()
    server.peers = peers
    server.owns_process = True
    await server.start(cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if peers is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.schedule_reload)
    else:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        peers.listen(server.apply)
    if peers is not None:
        peers.set_ready(True)  # before the ready line: once the supervisor prints its own, every flag is set
    announce(ready_line(server))
    following = None
    if peers is not None:
        following = asyncio.ensure_future(server.follow_peers())
    await stop.wait()
    if peers is not None:
        peers.set_ready(False)  # the others stop answering ready too: the server as a whole is going
        following.cancel()
    log.info("stopping: draining accepted requests for up to %.1f s", cfg.grace_s)
    stop.clear()
    draining = asyncio.ensure_future(server.stop())
    again = asyncio.ensure_future(stop.wait())
    await asyncio.wait({draining, again}, return_when=asyncio.FIRST_COMPLETED)
    again.cancel()
    if not draining.done():
        log.warning("second signal: exiting without waiting for the requests still running")
        draining.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await draining
        return 1
    draining.result()
    return 0
