"""The peer servers: their pinned virtualenvs, their start commands, and a process handle for each.

Each peer lives in its own virtualenv under ``~/.cache/genserve-bench/venvs/<peer>``, made on first use with
the pins below and reused while its marker file (``.genserve-pins``) holds the same pins. Nothing is installed
into genserve's own environment. A peer that cannot be installed or started raises ``PeerUnavailable`` with
the reason, which the benchmark reports in its table.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.peers.graph import PeerGraph, triton_model_config
from benchmarks.peers.oipload import ready
from benchmarks.peers.summary import FLOOR
from benchmarks.serverproc import free_port

CACHE = Path.home() / ".cache" / "genserve-bench" / "venvs"
RUNTIMES = Path(__file__).resolve().parent / "runtimes"
ORT = "onnxruntime==1.32.0"
"""The ONNX Runtime every peer runs: genserve's (checked against this process's at start)."""

PINS = {
    # uvloop 0.22 crashes MLServer's workers at start (SeldonIO/MLServer#2286)
    "mlserver": ["mlserver==1.7.1", "uvloop==0.21.0", ORT, "numpy==2.4.6"],
    "kserve": ["kserve==0.21.0", ORT, "numpy==2.4.6"],
    # the wheel ships the Triton 2.51 server binary with its Python backend; it needs numpy < 2
    "pytriton": ["nvidia-pytriton==0.7.0", ORT, "numpy==1.26.4"],
}
VERSIONS = {"mlserver": ["mlserver", "onnxruntime", "numpy", "grpcio"], "kserve": ["kserve", "onnxruntime", "numpy",
            "grpcio"], "pytriton": ["nvidia-pytriton", "onnxruntime", "numpy", "tritonclient"]}
"""Distributions whose installed versions the result records, per peer."""


class PeerUnavailable(RuntimeError):
    """A peer could not be installed or started; the message says why."""


def venv(peer: str, log: object = None, pins: list[str] | None = None) -> Path:
    """The peer's virtualenv with its pins (``pins``, else ``PINS[peer]``), made (or completed) now when its
    marker differs."""
    wanted = pins if pins is not None else PINS[peer]
    path = CACHE / peer
    marker = path / ".genserve-pins"
    text = "\n".join(wanted) + "\n"
    if marker.exists() and marker.read_text() == text and (path / "bin" / "python").exists():
        return path
    if log:
        log(f"{peer}: installing {' '.join(wanted)} into {path} (first use; a few minutes)")
    try:
        if not (path / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True, text=True)
        subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", *wanted], check=True,
                       capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        tail = " | ".join((e.stderr or e.stdout or "").strip().splitlines()[-3:])
        raise PeerUnavailable(f"install into {path} failed: {tail}") from None
    marker.write_text(text)
    return path


def installed_versions(peer: str) -> dict[str, str]:
    """Versions of the peer's key distributions as installed in its virtualenv."""
    code = ("import importlib.metadata as m, json, sys; "
            f"print(json.dumps({{d: m.version(d) for d in {VERSIONS[peer]!r}}}))")
    out = subprocess.run([str(CACHE / peer / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr.strip()[-200:]}


@dataclass
class PeerServer:
    """One peer server process (its own process group), serving ``graph`` under per-rows model names."""

    peer: str
    graph: PeerGraph
    work: Path
    max_batch_size: int
    """Rows per graph call at most (MLServer counts requests: it gets max_batch_size // rows per model)."""
    delay_ms: float
    rows: list[int]
    start_timeout_s: float = 300.0
    mlserver_workers: int = 1
    pytriton_instances: int = 1
    proc: subprocess.Popen | None = field(default=None, repr=False)
    grpc_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def model_name(self, rows: int) -> str:
        """MLServer batches whole requests, so each request size gets a model whose limit is in rows."""
        if self.peer == "mlserver" and rows > 1:
            return f"{self.graph.oip_name}.rows{rows}"
        return self.graph.oip_name

    def _command(self, env: dict[str, str]) -> list[str]:
        py = str(CACHE / self.peer / "bin" / "python")
        spec = str(self.graph.write(self.work / "graph.json"))
        if self.peer == FLOOR:  # genserve's own interpreter: grpcio, onnxruntime and the OIP messages are there
            return [sys.executable, str(RUNTIMES / "grpc_floor.py"), spec, self.graph.oip_name, str(self.grpc_port),
                    str(self._model_config())]
        http, metrics = free_port(), free_port()
        if self.peer == "kserve":
            return [py, str(RUNTIMES / "kserve_server.py"), spec, self.graph.oip_name,
                    "--http_port", str(http), "--grpc_port", str(self.grpc_port),
                    "--model_config", str(self._model_config())]
        if self.peer == "pytriton":
            # Triton's Python backend stub loads libpython: the venv's own interpreter's, not the system's
            # (the system's 3.11.2 against this 3.11's standard library fails in threading).
            libdir = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                    capture_output=True, text=True, check=True).stdout.strip()
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
            return [py, str(RUNTIMES / "pytriton_server.py"), spec, self.graph.oip_name, str(http),
                    str(self.grpc_port), str(metrics), str(self.max_batch_size), str(int(self.delay_ms * 1000)),
                    str(self.pytriton_instances)]
        settings = {"http_port": http, "grpc_port": self.grpc_port, "metrics_port": metrics, "debug": False,
                    "parallel_workers": self.mlserver_workers, "load_models_at_startup": True,
                    "host": "127.0.0.1"}
        (self.work / "settings.json").write_text(json.dumps(settings, indent=1))
        for r in self.rows:
            folder = self.work / self.model_name(r)
            folder.mkdir(parents=True, exist_ok=True)
            for f in ("mlserver_runtime.py", "ort_graph.py"):
                shutil.copy(RUNTIMES / f, folder / f)
            (folder / "model-settings.json").write_text(json.dumps({
                "name": self.model_name(r), "implementation": "mlserver_runtime.OrtRuntime",
                "max_batch_size": max(self.max_batch_size // r, 1), "max_batch_time": self.delay_ms / 1000,
                "parameters": {"uri": spec},
                "inputs": [{"name": self.graph.input, "datatype": "FP32", "shape": [-1, *self.graph.row_shape]}],
                "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, *self.graph.output_row_shapes[o]]}
                            for o in self.graph.outputs]}, indent=1))
        return [py, str(RUNTIMES / "mlserver_start.py"), str(self.work), str(self._model_config())]  # `mlserver start`

    def _model_config(self) -> Path:
        """The graph's Triton ModelConfig, which KServe and MLServer lack and answer from this file
        (runtimes/triton_config.py): perf_analyzer reads it before it sends requests (--load perf_analyzer)."""
        config = self.work / "model_config.bin"
        config.write_bytes(triton_model_config(self.graph, self.max_batch_size))
        return config

    def start(self) -> PeerServer:
        self.work.mkdir(parents=True, exist_ok=True)
        self.grpc_port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PYTHONPATH"] = str(RUNTIMES)
        env["PATH"] = os.pathsep.join([str(CACHE / self.peer / "bin"), env.get("PATH", "")])
        command = self._command(env)
        log = open(self.work / "server.log", "w")  # noqa: SIM115 - kept open while the server runs
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.work,
                                     start_new_session=True)  # its own group: stop() ends it and its children
        deadline = time.monotonic() + self.start_timeout_s
        names = {self.model_name(r) for r in self.rows}
        while not all(ready(self.target, n) for n in names):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = "exited" if self.proc.poll() is not None else f"not ready in {self.start_timeout_s:.0f} s"
                self.stop()
                raise PeerUnavailable(f"{self.peer} {why}: {self.log_tail()}")
            time.sleep(0.5)  # polling a server that is starting
        return self

    def log_tail(self, lines: int = 4) -> str:
        try:
            text = (self.work / "server.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(line.strip()[:300] for line in text[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the peer's process group, SIGKILL after ``grace_s``."""
        if self.proc is None or self.proc.poll() is not None and not _group_alive(self.proc.pid):
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                self.proc.poll()
                time.sleep(0.1)
            if not _group_alive(self.proc.pid):
                break
        self.proc.poll()

    def __enter__(self) -> PeerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True  # (a zombie leader counts too: stop() reaps it with poll())
