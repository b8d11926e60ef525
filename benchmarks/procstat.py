"""CPU accounting from /proc (no psutil): per-process and per-thread CPU seconds, machine busy time, machine facts.

Linux only. Times are in CPU seconds (``utime + stime`` ticks / CLK_TCK); a utilisation of 1.0 is one core kept
busy for the whole wall-clock interval, so a process can exceed 1.0 with several busy threads.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(path: Path) -> tuple[str, list[str]] | None:
    """(comm, fields after comm) of a /proc/.../stat file; None when the process or thread is gone."""
    try:
        text = path.read_text()
    except OSError:
        return None
    # comm is in parentheses and may hold spaces or ')' itself: split at the last ')'.
    left, right = text.find("("), text.rfind(")")
    return text[left + 1:right], text[right + 2:].split()


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by process ``pid``, all its threads; None when it is gone."""
    parsed = _stat_fields(Path(f"/proc/{pid}/stat"))
    if parsed is None:
        return None
    rest = parsed[1]
    return (int(rest[11]) + int(rest[12])) / TICK  # fields 14 and 15 of stat(5): utime, stime


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``, keyed ``"<comm>/<tid>"`` (comm is the thread's name); the main thread
    (tid = pid, which runs the server's asyncio event loop and gRPC's Python side) is keyed ``"main/<tid>"``."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        parsed = _stat_fields(Path(f"/proc/{pid}/task/{tid}/stat"))
        if parsed is not None:
            comm, rest = parsed
            out[f"{'main' if int(tid) == pid else comm}/{tid}"] = (int(rest[11]) + int(rest[12])) / TICK
    return out


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from the ``cpu`` line of /proc/stat.

    Busy excludes idle and iowait; steal counts as busy (another tenant used the core).
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - idle) / TICK, total / TICK


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    with open("/proc/loadavg") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)


@dataclass
class CpuSnapshot:
    """CPU counters at one instant: machine, and each watched process (with its threads when asked)."""

    t: float
    machine_busy_s: float
    machine_total_s: float
    processes: dict[str, float | None]
    threads: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def take(cls, pids: dict[str, int], thread_pids: tuple[str, ...] = ()) -> CpuSnapshot:
        """Counters of the ``pids`` (label -> pid); per-thread counters of the labels in ``thread_pids``."""
        busy, total = machine_cpu_s()
        return cls(t=time.monotonic(), machine_busy_s=busy, machine_total_s=total,
                   processes={k: process_cpu_s(p) for k, p in pids.items()},
                   threads={k: thread_cpu_s(pids[k]) for k in thread_pids if k in pids})


def utilisation(a: CpuSnapshot, b: CpuSnapshot) -> dict:
    """Cores used between two snapshots: machine busy (all processes), each process, the busiest threads."""
    wall = max(b.t - a.t, 1e-9)
    cores = os.cpu_count() or 1
    # /proc/stat counts every CPU, so its delta over ``cores`` is wall time in ticks; busy/total is a share.
    machine_share = (b.machine_busy_s - a.machine_busy_s) / max(b.machine_total_s - a.machine_total_s, 1e-9)
    procs = {}
    for k, v in b.processes.items():
        v0 = a.processes.get(k)
        procs[k] = None if v is None or v0 is None else (v - v0) / wall
    threads = {}
    for k, after in b.threads.items():
        before = a.threads.get(k, {})
        per = {name: (s - before.get(name, s)) / wall for name, s in after.items()}
        threads[k] = dict(sorted(per.items(), key=lambda kv: -kv[1])[:6])
    return {"wall_s": wall, "cores": cores, "machine_busy_cores": machine_share * cores,
            "processes_cores": procs, "top_threads_cores": threads}


def machine_info() -> dict:
    """The machine as the benchmark saw it: CPU model, cores, memory, OS, Python, load averages."""
    model, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "fma") if f in flags.split()]
    return {"cpu_model": model, "cores": os.cpu_count(), "simd": simd, "memory_gib": mem_gib,
            "os": platform.platform(), "python": platform.python_version(), "loadavg": loadavg()}
