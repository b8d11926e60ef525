"""A genserve server in its own process for a benchmark, and repository copies with chosen batching settings.

A model's ``config.json`` (and the serving block of its manifest) override the server's flags, so batching
on vs off is set by writing ``config.json`` in a private copy of the repository, never by flags alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

READY = re.compile(r"genserve: serving .* port=(\d+) .*metrics_port=(\d+)")


def free_port() -> int:
    """A loopback port that was free a moment ago (for the metrics endpoint, which cannot take port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_variant(src: str | Path, dst: str | Path, serving: dict[str, Any] | None = None,
                 models: list[str] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """Copy ``src`` (only ``models`` when given) to ``dst`` with ``serving`` written into each config.json.

    ``serving`` holds ServingConfig keys (``max_batch_size``, ``max_queue_delay_ms``, ``instances`` ...); they
    are merged over the model's existing config.json, which outranks the manifest and the server flags. The keys
    in ``drop`` are removed from it, so that the server's flags (or the manifest) decide them.
    """
    src, dst = Path(src), Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    names = models or sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in names:
        if not (src / name).is_dir():
            raise ValueError(f"model {name!r} is not in {src} (have: {', '.join(sorted(os.listdir(src)))})")
        shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns(".*"))
        config = dst / name / "config.json"
        current = json.loads(config.read_text()) if config.exists() else {}
        merged = {k: v for k, v in {**current, **(serving or {})}.items() if k not in drop}
        config.write_text(json.dumps(merged, indent=2) + "\n")
    return dst


def per_model_flags(flags: dict[str, Any] | Iterable[str]) -> tuple[str, ...]:
    """The per-model settings (ServingConfig keys) that these `genserve serve` flags set: a repository copy's
    config.json must not hold them, since it outranks the flags (``repo_variant(drop=...)``)."""
    from genserve.server.cli import FLAGS
    from genserve.v1 import manifest_pb2 as pb

    per_model = {f.name for f in pb.ServingConfig.DESCRIPTOR.fields}
    setting = {flag: name for flag, name, *_ in FLAGS}
    names = {setting.get(flag, setting.get("--" + flag.removeprefix("--no-"))) for flag in flags}
    return tuple(sorted(names & per_model))


class ServerProcess:
    """``genserve serve`` as a child process on free loopback ports; ``with ServerProcess(repo) as s: s.target``.

    ``flags`` are extra ``genserve serve`` flags (e.g. ``{"--threads": 1, "--workers": 4}``). The server's
    stderr is kept (its last lines appear in the error when it fails to start). ``tree``: serve genserve from
    this checkout of its source (e.g. a ``git worktree`` of an older commit) instead of the installed one;
    ``start`` checks that the server really imports it from there (``served_from``).
    """

    def __init__(self, repo: str | Path, flags: dict[str, Any] | None = None, start_timeout_s: float = 180.0,
                 log_level: str = "WARNING", tree: str | Path | None = None) -> None:
        self.repo = Path(repo).resolve()
        self.tree = None if tree is None else Path(tree).resolve()
        self.flags = dict(flags or {})
        self.start_timeout_s = start_timeout_s
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.metrics_port = 0
        self._stderr: deque[str] = deque(maxlen=40)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "genserve.server.cli", "--repo", str(self.repo), "--host", "127.0.0.1",
               "--port", "0", "--metrics-port", str(free_port()), "--log-level", self.log_level]
        if "--provider" not in self.flags:  # CPU unless asked: "auto" would pick a GPU where one loads
            cmd += ["--provider", "cpu"]
        for flag, value in self.flags.items():
            cmd += [flag] if value is None else [flag, str(value)]  # None: a switch such as --no-warmup
        return cmd

    def env(self) -> dict[str, str] | None:
        """The server's environment: this process's, or with ``tree`` first on the import path. ``python -m``
        puts the working directory first (this checkout's ``genserve/`` links, when run from its root), so
        PYTHONSAFEPATH leaves it out and the tree's links come before the working directory and the install."""
        if self.tree is None:
            return None
        return {**os.environ, "PYTHONPATH": str(self.tree), "PYTHONSAFEPATH": "1"}

    def served_from(self) -> Path:
        """The folder that ``genserve.server`` is imported from in the server's environment."""
        out = subprocess.run([sys.executable, "-c", "import genserve.server as s; print(s.__path__[0])"],
                             env=self.env(), capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())

    def start(self) -> ServerProcess:
        if self.tree is not None:
            where = self.served_from()
            if not where.resolve().is_relative_to(self.tree):  # the tree's genserve/ links lead into it
                raise RuntimeError(f"asked to serve genserve from {self.tree}, but the server would import "
                                   f"{where}: is {self.tree} a checkout of genserve with its genserve/ links?")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     bufsize=1, env=self.env())
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        ready: list[str] = []
        reader = threading.Thread(target=self._wait_ready, args=(ready,), daemon=True)
        reader.start()
        reader.join(self.start_timeout_s)
        if not ready:
            self.stop()
            raise RuntimeError(f"the server did not become ready within {self.start_timeout_s:.0f} s: "
                               + " | ".join(self._stderr))
        m = READY.search(ready[0])
        assert m is not None
        self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
        return self

    def _wait_ready(self, out: list[str]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if READY.search(line):
                out.append(line)
                break
        # Keep reading so that a chatty server never blocks on a full stdout pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip())

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM (the server drains), then SIGKILL after ``grace_s``; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
