"""`genserve serve --processes N`: N server processes on one port, each with its own engine, one /metrics.

The gRPC Python multiprocessing pattern: every worker binds the same gRPC (and HTTP) port with SO_REUSEPORT,
so the kernel spreads connections over them, and each runs the whole server (engine, batchers, ONNX Runtime
sessions) in its own interpreter: N event loops, N GILs. The supervisor (this module, the process the user
started) holds the ports, spawns the workers, and:

- serves one ``/metrics`` for all, from prometheus_client's multiprocess mode (the workers write their values
  to files in a private folder; gauges add up or take the minimum across live workers, see server/metrics.py);
- prints the ready line once every worker is ready, and restarts a worker that dies;
- keeps one readiness flag per worker in shared memory: each worker's probes (gRPC health, the Open Inference
  Protocol's ServerReady/ModelReady, HTTP ``/v2/health/ready``) answer ready only while every worker is, since a
  probe reaches whichever worker its connection lands on (a worker that died and is starting again, or one
  that drains, takes the server out of a load balancer until it is back);
- forwards SIGTERM/SIGINT (every worker drains, as one server does) and SIGHUP (every worker reloads);
- passes on what one worker was asked to change: a ReloadRepository, LoadModel or UnloadModel that reached one
  worker over the network is applied by it, sent to the others over their pipes, and answered once every other
  worker has applied it too, so a client that got the answer finds the same models on whichever worker its
  next connection reaches (answering first let a later load on another worker be undone by an unload that had
  not arrived there yet);
- gathers what every worker counts for a question one worker was asked (the Open Inference Protocol's
  statistics: each worker counts only the calls that reached it), over the same pipes.

Workers are spawned (not forked): gRPC must not be initialised before a fork.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import Any

from genserve.server.config import ServerConfig

log = logging.getLogger("genserve.server")

START_TIMEOUT_S = 600.0
"""Longest wait for a worker to load the repository and bind its ports."""

ASK_TIMEOUT_S = 30.0
"""Longest wait of a worker for the others' answers to a question (``Peers.ask``) before it answers alone."""

CHANGE_TIMEOUT_S = 600.0
"""Longest wait of a worker for the others to apply its reload, load or unload before it answers anyway (a
load may warm up large graphs, as a start does)."""


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT and not listening: it keeps the port (0: a free one)
    for the workers, which bind it with SO_REUSEPORT too; connections go only to the listening workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise ValueError(f"cannot bind {host}:{port} ({e.strerror or e}); is the port in use?") from None
    return s


class Peers:
    """A worker's pipe to the supervisor: tell it what this worker changed, apply what another changed, ask the
    others a question and answer theirs (``answers``: a function per kind of question, bytes in, bytes out)."""

    def __init__(self, conn: Connection, index: int = 0, ready_flags: Any = None, state_dir: str = "") -> None:
        self.conn = conn
        self.index = index
        self.ready_flags = ready_flags
        """One byte per worker in memory shared with the supervisor (``multiprocessing.RawArray``): 1 ready."""
        self.state_dir = state_dir
        """The supervisor's folder (its metrics folder), where ``keep`` writes what a replacement reads."""
        self.answers: dict[str, Callable[[bytes], bytes]] = {}
        self._sent = 0
        self._waiting: dict[int, Any] = {}  # message number -> the future the supervisor's "done" resolves

    def set_ready(self, ready: bool) -> None:
        """This worker's flag: set once it serves, cleared as it starts to drain."""
        if self.ready_flags is not None:
            self.ready_flags[self.index] = int(ready)

    def keep(self, name: str, data: bytes) -> None:
        """Leave ``data`` for this worker's replacement, should this one die (``kept``): a file per worker index
        in ``state_dir``, replaced whole (written aside, then renamed), so a reader never sees half of it."""
        if not self.state_dir:
            return
        path = os.path.join(self.state_dir, f"{name}-worker{self.index}.bin")
        aside = f"{path}.{os.getpid()}.partial"
        with open(aside, "wb") as f:
            f.write(data)
        os.replace(aside, path)

    def kept(self, name: str) -> bytes | None:
        """What the worker this one replaced kept under ``name`` (None: nothing; a first start)."""
        if not self.state_dir:
            return None
        try:
            with open(os.path.join(self.state_dir, f"{name}-worker{self.index}.bin"), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def all_ready(self) -> bool:
        """Whether every worker is ready (the supervisor clears the flag of a worker that died)."""
        return self.ready_flags is None or all(self.ready_flags)

    async def notify(self, kind: str, name: str = "") -> None:
        """After this worker applied a reload (``kind`` "reload"), load or unload of ``name``: returns once every
        other worker has applied it too (or after CHANGE_TIMEOUT_S, with a warning), so the answer that follows
        holds for every worker."""
        await self._round_trip(("change", kind, name), CHANGE_TIMEOUT_S, f"{kind} {name}")

    async def ask(self, kind: str, payload: bytes) -> list[bytes]:
        """Every other worker's answer to ``payload`` (by its ``answers[kind]``); [] when the others cannot be
        reached within ASK_TIMEOUT_S. A worker that could not answer (say, it has not loaded the model yet) is
        left out."""
        answers = await self._round_trip(("ask", kind, payload), ASK_TIMEOUT_S, kind)
        return [a for a in answers or () if a is not None]

    async def _round_trip(self, message: tuple, timeout_s: float, what: str) -> list | None:
        """Send ``message`` (numbered) to the supervisor; the other workers' answers once all have answered."""
        import asyncio

        self._sent += 1
        number = self._sent
        done = asyncio.get_running_loop().create_future()
        self._waiting[number] = done
        try:
            self.conn.send((message[0], number, *message[1:]))
            return await asyncio.wait_for(done, timeout_s)
        except (OSError, ValueError):
            return None  # the supervisor is gone; SIGTERM follows
        except TimeoutError:
            log.warning("%s: the other workers did not answer within %.0f s", what, timeout_s)
            return None
        finally:
            self._waiting.pop(number, None)

    def listen(self, apply: Callable[[str, str], Any]) -> None:
        """Call ``apply(kind, name)`` on the running event loop for each change another worker made and confirm it
        once applied; answer the others' questions; resolve this worker's own messages as the supervisor answers."""
        import asyncio

        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                loop.remove_reader(self.conn.fileno())  # the supervisor is gone; SIGTERM follows
                for done in self._waiting.values():
                    if not done.done():
                        done.set_result(None)
                return
            if message[0] == "done":
                done = self._waiting.get(message[1])
                if done is not None and not done.done():
                    done.set_result(message[2])
            elif message[0] == "apply":
                _, key, kind, name = message
                task = asyncio.ensure_future(apply(kind, name))
                task.add_done_callback(lambda t: self._applied(t, key, kind, name))
            elif message[0] == "ask":
                _, key, kind, payload = message
                self._answer(key, self._answered(kind, payload))

        loop.add_reader(self.conn.fileno(), readable)

    def _answered(self, kind: str, payload: bytes) -> bytes | None:
        try:
            return self.answers[kind](payload)
        except Exception as e:  # noqa: BLE001 - the asking worker answers without this one
            log.debug("cannot answer another worker's %s question: %s", kind, e)
            return None

    def _applied(self, task: Any, key: Any, kind: str, name: str) -> None:
        """Confirm a change of another worker (``key`` None: a SIGHUP reload, which nobody waits for); one that
        failed here is confirmed too (the worker that was asked answered with its own outcome) and logged."""
        if not task.cancelled() and task.exception() is not None:
            log.warning("applying %s %s from another worker failed: %s", kind, name, task.exception())
        if key is not None:
            self._answer(key, None)

    def _answer(self, key: Any, value: bytes | None) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(("answer", key, value))


def worker_main(cfg: ServerConfig, index: int, conn: Connection, log_level: str, metrics_dir: str,
                log_format: str = "text", ready_flags: Any = None) -> None:
    """One worker: the whole server on the shared ports, its ready line and changes sent over ``conn``."""
    # Before prometheus_client is imported: its values then live in files the supervisor reads.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    import asyncio

    from genserve.server.app import serve
    from genserve.server.logs import configure

    configure(log_level, log_format, worker=index)
    # Ctrl-C and a hangup reach the whole process group; the supervisor forwards them (SIGTERM, a reload).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    peers = Peers(conn, index, ready_flags, state_dir=metrics_dir)
    try:
        code = asyncio.run(serve(cfg, announce=lambda line: conn.send(("ready", line)), peers=peers))
    except Exception as e:  # noqa: BLE001 - the supervisor reports it
        with contextlib.suppress(OSError):
            conn.send(("failed", str(e)))
        raise SystemExit(1) from None
    raise SystemExit(code)


class Supervisor:
    """Starts, watches and stops the workers of ``cfg`` (``cfg.processes`` of them)."""

    def __init__(self, cfg: ServerConfig, log_level: str = "INFO", log_format: str = "text") -> None:
        self.cfg = cfg
        self.log_level = log_level
        self.log_format = log_format
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[tuple[Any, Connection]] = []
        # (worker, its message number) -> (the workers yet to answer, the answers so far)
        self._pending: dict[tuple[int, int], tuple[set[int], list[Any]]] = {}
        self._reserved: list[socket.socket] = []
        self._stopping = False
        self._hup = False
        self._metrics_dir = ""
        self._metrics_http: Any = None
        self.port = self.http_port = self.metrics_port = 0
        self.worker_cfg: ServerConfig | None = None
        # Explicit model control: the models loaded now (start's plus what LoadModel/UnloadModel changed since),
        # so that a worker started in place of a dead one serves the same models as the others; None otherwise.
        self._loaded: set[str] | None = None
        self._ready_flags = self._ctx.RawArray("b", cfg.processes)  # each worker's readiness (Peers.all_ready)

    def start(self) -> str:
        """Reserve the ports, start every worker and wait for all to be ready; returns the ready line."""
        cfg = self.cfg
        self._metrics_dir = tempfile.mkdtemp(prefix="genserve-metrics-")
        grpc_socket = reserve_port(cfg.host, cfg.port)
        self._reserved.append(grpc_socket)
        self.port = grpc_socket.getsockname()[1]
        if cfg.http_port:
            http_socket = reserve_port(cfg.host, cfg.http_port)
            self._reserved.append(http_socket)
            self.http_port = http_socket.getsockname()[1]
        self.worker_cfg = replace(cfg, port=self.port, http_port=self.http_port, metrics_port=0)
        if cfg.model_control == "explicit":
            from genserve.server.repository import scan  # here: the supervisor needs ONNX Runtime for nothing else

            names = cfg.load_model_names()
            self._loaded = set(scan(cfg.repo)) if "*" in names and cfg.repo.is_dir() else names - {"*"}
        for index in range(cfg.processes):
            self._workers.append(self._spawn(index))
        line = ""
        for index in range(cfg.processes):
            line = self._wait_ready(index)
        self._serve_metrics()
        return self._ready_line(line)

    def _restart_cfg(self) -> ServerConfig | None:
        """The configuration of a worker started in place of a dead one: under explicit model control it loads
        the models loaded now (those of them still in the repository), not only those named at start."""
        if self._loaded is None or self.worker_cfg is None:
            return self.worker_cfg
        from genserve.server.repository import scan

        present = set(scan(self.cfg.repo)) if self.cfg.repo.is_dir() else set()
        return replace(self.worker_cfg, load_models=",".join(sorted(self._loaded & present)))

    def _spawn(self, index: int, cfg: ServerConfig | None = None) -> tuple[Any, Connection]:
        parent, child = self._ctx.Pipe()
        self._ready_flags[index] = 0
        process = self._ctx.Process(target=worker_main, args=(cfg or self.worker_cfg, index, child, self.log_level,
                                                                 self._metrics_dir, self.log_format,
                                                                 self._ready_flags),
                                    name=f"genserve-worker-{index}", daemon=False)
        process.start()
        child.close()
        return process, parent

    def _wait_ready(self, index: int) -> str:
        process, conn = self._workers[index]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if conn.poll(0.1):
                try:
                    kind, text = conn.recv()
                except EOFError:
                    break
                if kind == "ready":
                    return text
                if kind == "failed":
                    self.stop()
                    raise ValueError(text)
            elif not process.is_alive():
                break
        self.stop()
        raise ValueError(f"server worker {index} did not start (exit code {process.exitcode}); see its log above")

    def _serve_metrics(self) -> None:
        cfg = self.cfg
        if not cfg.metrics_port:
            return
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from genserve.server.metrics import WithoutRemoved, serve_registry

        registry = CollectorRegistry()
        registry.register(WithoutRemoved(MultiProcessCollector(None, path=self._metrics_dir)))
        tls: dict[str, Any] = {}
        if cfg.metrics_tls:
            ca = cfg.tls_client_ca
            tls = {"certfile": str(cfg.tls_cert), "keyfile": str(cfg.tls_key),
                   "client_cafile": None if ca is None else str(ca), "client_auth_required": ca is not None}
        try:
            self._metrics_http, self.metrics_port = serve_registry(registry, cfg.host, cfg.metrics_port, **tls)
        except OSError as e:
            self.stop()
            raise ValueError(f"cannot serve metrics on {cfg.host}:{cfg.metrics_port} ({e.strerror or e}); pick "
                             "another --metrics-port (0: off)") from None

    def _ready_line(self, worker_line: str) -> str:
        """The worker's ready line with the supervisor's metrics port and the process count."""
        import re

        line = re.sub(r"metrics=\S+ metrics_port=\d+", self._metrics_words(), worker_line)
        return f"{line} processes={self.cfg.processes}"

    def _metrics_words(self) -> str:
        if not self.metrics_port:
            return "metrics=off metrics_port=0"
        scheme = "https" if self.cfg.metrics_tls else "http"
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"metrics={scheme}://{host}:{self.metrics_port}/metrics metrics_port={self.metrics_port}"

    def run(self) -> int:
        """Until SIGTERM/SIGINT: pass changes between workers, forward SIGHUP, restart a worker that died."""
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        while not self._stopping:
            if self._hup:
                self._hup = False
                self._broadcast(("apply", None, "reload", ""), None)
            conns = {conn: i for i, (_, conn) in enumerate(self._workers)}
            sentinels = {p.sentinel: i for i, (p, _) in enumerate(self._workers)}
            for ready in wait([*conns, *sentinels], timeout=0.5):
                if ready in conns:
                    self._relay(conns[ready])
                elif not self._stopping:
                    self._restart(sentinels[ready])
        return self.stop()

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self._stopping:  # a second signal: do not wait for the drain
            for process, _ in self._workers:
                with contextlib.suppress(OSError):
                    process.kill()
        self._stopping = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._hup = True

    def _relay(self, index: int) -> None:
        conn = self._workers[index][1]
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the worker is going; its sentinel says so
        if message[0] in ("change", "ask"):  # worker ``index`` applied a change, or asks a question: the others
            kind, number, *rest = message    # apply or answer it, then it may answer its client
            if kind == "change" and self._loaded is not None and rest[0] in ("load", "unload"):
                (self._loaded.add if rest[0] == "load" else self._loaded.discard)(rest[1])
            key = (index, number)
            self._pending[key] = ({i for i in range(len(self._workers)) if i != index}, [])
            self._broadcast(("apply" if kind == "change" else "ask", key, *rest), index)
            self._confirm(key)
        elif message[0] == "answer":
            _, key, value = message
            if key in self._pending and index in self._pending[key][0]:
                self._pending[key][0].discard(index)
                self._pending[key][1].append(value)
                self._confirm(key)

    def _confirm(self, key: tuple[int, int]) -> None:
        """Send worker ``key[0]`` the answers to its message ``key[1]`` once every other worker has answered."""
        if key in self._pending and not self._pending[key][0]:
            _, answers = self._pending.pop(key)
            with contextlib.suppress(OSError, ValueError):
                self._workers[key[0]][1].send(("done", key[1], answers))

    def _broadcast(self, message: tuple, origin: int | None) -> None:
        for i, (_, conn) in enumerate(self._workers):
            if i != origin:
                with contextlib.suppress(OSError, ValueError):
                    conn.send(message)

    def _restart(self, index: int) -> None:
        process, conn = self._workers[index]
        self._ready_flags[index] = 0  # the others answer "not ready" until its replacement is
        process.join(timeout=1)
        log.error("server worker %d (pid %s) exited with code %s; starting a new one", index, process.pid,
                  process.exitcode)
        conn.close()
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid, self._metrics_dir)
        # Nobody waits for the dead worker any longer (its replacement reads the repository as it starts), and
        # its own changes have no one left to answer.
        for key in list(self._pending):
            if key[0] == index:
                del self._pending[key]
            else:
                self._pending[key][0].discard(index)
                self._confirm(key)
        self._workers[index] = self._spawn(index, self._restart_cfg())
        try:
            self._wait_ready(index)
        except ValueError as e:
            log.error("server worker %d did not come back: %s", index, e)

    def stop(self) -> int:
        """SIGTERM every worker (each drains within grace_s), then SIGKILL what is left; 0 when all exited 0."""
        self._stopping = True
        for process, _ in self._workers:
            if process.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.grace_s + 5.0
        for process, _ in self._workers:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        codes = [process.exitcode for process, _ in self._workers]
        for _, conn in self._workers:
            conn.close()
        self._workers = []
        if self._metrics_http is not None:
            with contextlib.suppress(Exception):
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
            self._metrics_http = None
        for s in self._reserved:
            s.close()
        self._reserved = []
        if self._metrics_dir:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = ""
        return 0 if all(code == 0 for code in codes) else 1


def supervise(cfg: ServerConfig, announce: Callable[[str], None] = print, log_level: str = "INFO",
              log_format: str = "text") -> int:
    """Run ``cfg.processes`` workers until SIGTERM/SIGINT; the exit code (0 when every worker drained)."""
    supervisor = Supervisor(cfg, log_level, log_format)
    announce(supervisor.start())
    return supervisor.run()
