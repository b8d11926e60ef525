"""`benchmarks.request_cost`'s load generator and CPU reading: its clients spread over ``--connections`` TCP
connections, and the server's CPU is read over its whole process tree (``--processes N``'s workers)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the repository, not an installed package

from benchmarks import request_cost  # noqa: E402


def _serve_and_load(infer: Any, clients: int, connections: int) -> tuple[grpc.Server, Any, Any]:
    """A gRPC server answering OIP ModelInfer with ``infer``, and request_cost's load generator (not yet
    started) aimed at it: (server, the parent's end of the pipe, the process)."""
    service, method = request_cost.OIP_INFER.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(infer)})
    server = grpc.server(futures.ThreadPoolExecutor(8), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=request_cost._client, daemon=True,
                       args=(f"127.0.0.1:{port}", request_cost.OIP_INFER, b"request", clients, there, connections))
    return server, here, proc


def test_the_load_generator_deals_its_clients_over_its_connections() -> None:
    peers: set[str] = set()
    answered = [0]
    lock = threading.Lock()

    def infer(request: bytes, context: grpc.ServicerContext) -> bytes:
        with lock:
            peers.add(context.peer())
            answered[0] += 1
        return b"answer"

    server, here, proc = _serve_and_load(infer, clients=6, connections=3)
    try:
        proc.start()
        assert here.poll(120) and here.recv() == "ready"
        here.send("mark")
        first, _ = here.recv()
        deadline = time.monotonic() + 120
        while True:  # until some answers came after the mark (a condition, not a sleep)
            assert time.monotonic() < deadline, "no answers within 120 s"
            here.send("mark")
            done, latencies = here.recv()
            if done > first and latencies:
                break
        here.send("stop")
        assert here.recv() >= done
        proc.join(60)
    finally:
        server.stop(None)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0 and answered[0] >= done
    assert len(peers) == 3  # six clients over three connections: three client ports


def test_server_cpu_covers_the_process_and_its_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        per_pid, threads = request_cost.server_cpu(os.getpid())
        assert {os.getpid(), child.pid} <= set(per_pid)
        assert f"main/{child.pid}/{child.pid}" in threads  # every process's own thread is "main"
        assert all(value >= 0 for value in per_pid.values())
    finally:
        child.communicate(b"")


def test_a_tree_is_what_the_server_imports_even_from_this_checkouts_root(tmp_path: Path) -> None:
    """``--tree`` / ``--baseline``: ``python -m`` puts the working directory (this checkout's ``genserve/`` links,
    when run from its root) before PYTHONPATH, which served this checkout on both sides of an A/B; the tree must
    win, and a folder that is no checkout of genserve is refused before anything starts."""
    from benchmarks.serverproc import ServerProcess

    root = ROOT
    tree = tmp_path / "tree"
    (tree / "genserve" / "server").mkdir(parents=True)
    (tree / "genserve" / "__init__.py").write_text("")
    (tree / "genserve" / "server" / "__init__.py").write_text("")
    here = os.getcwd()
    os.chdir(root)
    try:
        assert ServerProcess(root / "quickstart", tree=tree).served_from() == tree / "genserve" / "server"
        assert ServerProcess(root / "quickstart").served_from().resolve() == (root / "server").resolve()
        with pytest.raises(RuntimeError, match="is .* a checkout of genserve"):
            ServerProcess(root / "quickstart", tree=tmp_path / "empty").start()
    finally:
        os.chdir(here)


def test_a_load_generator_that_fails_is_an_error_not_a_wait() -> None:
    """A server that refuses the request (here: UNAVAILABLE, as a server whose model failed to load answers)
    ends the measurement with the server's message; the parent used to wait for the child's answer for good."""

    def infer(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.UNAVAILABLE, "model 'm' has no version that loaded")

    server, here, proc = _serve_and_load(infer, clients=2, connections=1)
    try:
        proc.start()
        with pytest.raises(RuntimeError, match="load generator failed: .*no version that loaded"):
            request_cost._receive(here, proc)
        proc.join(60)
        assert proc.exitcode == 0  # it said what went wrong, then ended
        with pytest.raises(RuntimeError, match="exited .* without an answer"):
            request_cost._receive(here, proc)
    finally:
        server.stop(None)
        if proc.is_alive():
            proc.kill()
