"""`genserve serve --processes N` in a subprocess for tests: the supervisor, its workers, its port and metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ports import free_port

from genserve.server.config import ServerConfig


class Supervised:
    """`python -m genserve.server.cli --processes 2` in a subprocess, ready once every worker is."""

    def __init__(self, repo: Path, log: Path, *flags: str, processes: int = 2, config: Path | None = None) -> None:
        """With ``config`` (a TOML file of settings, see ``from_config``) only ``--processes`` and ``flags`` are
        added to it; without, the defaults of these tests (free ports, CPU, 2 threads, 8 s grace) are."""
        if config is None:
            self.metrics_port = free_port()
            cmd = [sys.executable, "-m", "genserve.server.cli", "--repo", str(repo), "--port", "0", "--processes",
                   str(processes), "--metrics-port", str(self.metrics_port), "--provider", "cpu", "--workers", "2",
                   "--grace-s", "8", *flags]
        else:
            cmd = [sys.executable, "-m", "genserve.server.cli", "--config", str(config), "--processes",
                   str(processes), *flags]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.ready = self.proc.stdout.readline().strip()  # the supervisor prints it once both workers are ready
        if not self.ready.startswith("genserve: serving"):
            self.proc.kill()
            raise AssertionError(f"server did not become ready:\n{log.read_text()[-3000:]}")
        self.port = int(re.search(r" port=(\d+)", self.ready).group(1))
        self.http_port = int(re.search(r" http_port=(\d+)", self.ready).group(1))
        self.metrics_port = int(re.search(r" metrics_port=(\d+)", self.ready).group(1))
        self.target = f"127.0.0.1:{self.port}"

    @classmethod
    def from_config(cls, cfg: ServerConfig, log: Path, *flags: str, processes: int = 2) -> Supervised:
        """The server ``cfg`` describes (every setting, auth and TLS included) as ``processes`` processes: the
        settings go through a TOML file beside ``log``, as `genserve serve --config` reads them."""
        config = log.with_suffix(".toml")
        config.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in cfg.to_dict().items()
                                  if value is not None and key != "processes"))
        return cls(cfg.repo, log, "--log-format", "json", *flags, processes=processes, config=config)

    def log_size(self) -> int:
        """Bytes of the server's log so far: pass it to ``errors_logged`` to see only what came after."""
        return self.log.stat().st_size

    def errors_logged(self, since: int = 0) -> list[str]:
        """Records at ERROR or above that the supervisor and its workers logged after byte ``since`` (with
        ``from_config``, whose servers log JSON lines), and any line that is not a record (a crash's traceback)."""
        with self.log.open("rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").splitlines()
        errors = []
        for line in filter(None, lines):
            try:
                record = json.loads(line)
            except ValueError:
                errors.append(line)
                continue
            if record.get("level") in ("ERROR", "CRITICAL"):
                errors.append(f"{record.get('logger')}: {record.get('message')}")
        return errors

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

    def metric(self, name: str) -> float:
        """The sum of the samples called ``name`` on the one /metrics of every worker."""
        from prometheus_client.parser import text_string_to_metric_families

        return sum(s.value for family in text_string_to_metric_families(self.metrics()) for s in family.samples
                   if s.name == name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@contextmanager
def serving(cfg: ServerConfig, processes: int, log: Path, *flags: str) -> Iterator[Any]:
    """``cfg`` served in this process (a BackgroundServer) or as `genserve serve --processes N` (a Supervised,
    with ``flags`` such as ``--log-level DEBUG``), for modules whose tests run against both (issue 17): both
    have ``port``, ``http_port`` and ``metrics_port``."""
    if processes == 1:
        from genserve.server.app import BackgroundServer

        with BackgroundServer(cfg) as srv:
            yield srv
    else:
        with Supervised.from_config(cfg, log, *flags, processes=processes) as srv:
            yield srv


def _toml(value: object) -> str:
    """A TOML value of a ServerConfig setting (strings, paths, numbers, flags)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string of printable text is a TOML basic string


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""
