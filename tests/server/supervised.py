"""`genserve serve --processes N` in a subprocess for tests: the supervisor, its workers, its port and metrics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from ports import free_port


class Supervised:
    """`python -m genserve.server.cli --processes 2` in a subprocess, ready once every worker is."""

    def __init__(self, repo: Path, log: Path, *flags: str, processes: int = 2) -> None:
        self.metrics_port = free_port()
        cmd = [sys.executable, "-m", "genserve.server.cli", "--repo", str(repo), "--port", "0", "--processes",
               str(processes), "--metrics-port", str(self.metrics_port), "--provider", "cpu", "--workers", "2",
               "--grace-s", "8", *flags]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.ready = self.proc.stdout.readline().strip()  # the supervisor prints it once both workers are ready
        if not self.ready.startswith("genserve: serving"):
            self.proc.kill()
            raise AssertionError(f"server did not become ready:\n{log.read_text()[-3000:]}")
        self.port = int(re.search(r" port=(\d+)", self.ready).group(1))
        self.target = f"127.0.0.1:{self.port}"

    def __enter__(self) -> Supervised:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def workers(self) -> list[int]:
        """Process ids of the worker processes (the supervisor's children)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(c) for c in children if "spawn_main" in _cmdline(int(c))]  # not the resource tracker

    def connections(self, pid: int) -> int:
        """Established TCP connections on the server port held by process ``pid``."""
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        count = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == self.port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
        return count

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            return r.read().decode()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""
