"""Triton's own load generator, ``perf_analyzer`` (C++), as the peers benchmark's load: ``--load perf_analyzer``.

The Python load generator (``oipload``) spends 100 to 150 us of CPU per request, a quarter of this 2-core
machine at a few thousand requests/s; perf_analyzer spends about half of that. It speaks the Open Inference
Protocol as Triton does, reading the model's configuration (``ModelConfig``) and statistics first. genserve and
Triton (PyTriton) answer those RPCs; MLServer and KServe lack them, so the benchmark starts them with a handler
that answers them from a fixed config of the graph (runtimes/triton_config.py), their ``ModelInfer`` untouched.

Where it comes from: the last ``tritonclient`` wheels that carry the binary (2.41.0, manylinux), installed into
their own virtualenv under ``~/.cache/genserve-bench/venvs/perf_analyzer`` with CUDA's runtime library from
PyPI (the binary links it; no GPU is used). The binary also needs ``libb64.so.0d`` from the system (Debian and
Ubuntu: ``apt-get install libb64-0d``); without it the benchmark says so and stops.

One measurement is one perf_analyzer run at one concurrency: its own windows of ``window_s`` (time_windows
mode, stable within 20% over three windows, at most ten windows: a busy 2-core machine seldom holds its
default 10%), requests/s and p50/p99 from its CSV. The server's CPU is read over the whole run (setup and every
window), the load generator's from its rusage.
"""

from __future__ import annotations

import csv
import os
import re
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.peers.launch import PeerUnavailable, venv

PINS = ["tritonclient==2.41.0", "nvidia-cuda-runtime-cu12==12.9.79"]
"""tritonclient 2.41.0 is among the last wheels with the perf_analyzer binary in it."""


def binary(log: Any = None) -> tuple[Path, dict[str, str]]:
    """perf_analyzer's path and the environment it runs in; PeerUnavailable (with the fix) when it cannot run."""
    path = venv("perf_analyzer", log, pins=PINS)
    exe = path / "bin" / "perf_analyzer"
    if not exe.exists():
        raise PeerUnavailable(f"{exe} is missing: the tritonclient wheel installed has no perf_analyzer binary")
    libs = sorted(str(p.parent) for p in path.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib/libcudart.so*"))
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in (*libs[:1], os.environ.get("LD_LIBRARY_PATH"))
                                                            if p)}  # no empty entry: that would search the cwd
    missing = [line.split()[0] for line in subprocess.run(["ldd", str(exe)], capture_output=True, text=True,
                                                         env=env).stdout.splitlines() if "not found" in line]
    if missing:
        hint = " (Debian/Ubuntu: apt-get install libb64-0d)" if any("libb64" in m for m in missing) else ""
        raise PeerUnavailable(f"perf_analyzer cannot load {', '.join(missing)}{hint}")
    return exe, env


@dataclass
class Measured:
    """One perf_analyzer run: what ``benchmarks.peers`` reads from a measurement."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    loadgen_cpu_s: float
    seconds: float
    errors: dict[str, int] = field(default_factory=dict)
    empty_answers: int = 0

    def percentile_ms(self, p: float) -> float:
        return {50: self.p50_ms, 99: self.p99_ms}[int(p)]


def command(exe: Path, target: str, model: str, input_name: str, rows: int, row_shape: list[int], clients: int,
            window_s: float, csv_path: Path) -> list[str]:
    """The perf_analyzer command of one cell: ``clients`` synchronous clients sending ``rows`` rows of zeros."""
    return [str(exe), "-m", model, "-u", target, "-i", "grpc", "-b", str(rows),
            "--shape", f"{input_name}:{','.join(map(str, row_shape))}", "--input-data", "zero",
            "--concurrency-range", f"{clients}:{clients}", "-p", str(int(window_s * 1000)), "--max-trials", "10",
            "-s", "20", "-f", str(csv_path)]


def parse_csv(text: str, rows: int) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) from perf_analyzer's CSV (inferences count rows; latencies are in us)."""
    row = next(csv.DictReader(text.splitlines()))
    return float(row["Inferences/Second"]) / rows, float(row["p50 latency"]) / 1e3, float(row["p99 latency"]) / 1e3


class PerfAnalyzerLoad:
    """``measure()`` runs perf_analyzer once against a server, with the cell of a serialised ModelInferRequest."""

    def __init__(self, log: Any = None) -> None:
        self.exe, self.env = binary(log)

    def pids(self) -> list[int]:
        return []  # the load generator's CPU comes with each measurement (its rusage)

    def measure(self, target: str, payload: bytes, clients: int, warmup_s: float, window_s: float,
                timeout_s: float = 60.0, at_edges: Any = None) -> Measured:
        """One run; ``at_edges(0)`` as perf_analyzer starts and ``at_edges(1)`` once it has finished."""
        from genserve.oip import grpc_service_pb2 as pb

        request = pb.ModelInferRequest.FromString(payload)
        tensor = request.inputs[0]
        rows, row_shape = int(tensor.shape[0]), [int(d) for d in tensor.shape[1:]]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cell.csv"
            cmd = command(self.exe, target, request.model_name, tensor.name, rows, row_shape, clients, window_s, out)
            t0, before = time.monotonic(), _children_cpu_s()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, text=True)
            if at_edges is not None:
                at_edges(0)
            try:
                output, _ = proc.communicate(timeout=max(timeout_s, 12 * window_s + 30))
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            if at_edges is not None:
                at_edges(1)
            seconds = time.monotonic() - t0
            cpu = _children_cpu_s() - before  # perf_analyzer's, reaped by communicate()
            if proc.returncode != 0 or not out.exists():
                errors = [line.strip() for line in output.splitlines() if "error" in line.lower()]
                reason = (errors or output.strip().splitlines()[-1:] or [f"exit {proc.returncode}"])[0][:200]
                return Measured(float("nan"), float("nan"), float("nan"), 0, cpu, seconds, {reason: 1})
            rps, p50, p99 = parse_csv(out.read_text(), rows)
        counted = re.findall(r"Request count: (\d+)", output)  # the last window's, as the CSV's figures are
        return Measured(rps, p50, p99, int(counted[-1]) if counted else int(rps * window_s), cpu, seconds)


def _children_cpu_s() -> float:
    """CPU seconds of this process's children that have been reaped (perf_analyzer's runs among them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
