"""The server's life: `genserve serve` in a real process, SIGTERM under load, reload by signal, RPC and
polling, a model that fails to load, and an import of the serving code that leaves torch out."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from waiting import until

from genserve.core.manifest import read_manifest, write_manifest
from genserve.core.noise import Noise
from genserve.core.tensors import from_proto, to_proto
from genserve.server.app import BackgroundServer
from genserve.v1 import service_pb2 as pb
from genserve.v1 import service_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_version(repo: Path, name: str, version: int) -> None:
    """Copy the model's version 1 as ``version`` (same graphs, manifest renumbered)."""
    src, dst = repo / name / "1", repo / name / str(version)
    tmp = repo / name / f".{version}.tmp"  # build beside, then rename: a poll never sees half a version
    shutil.copytree(src, tmp)
    manifest = read_manifest(tmp / "manifest.json")
    manifest.version = version
    write_manifest(manifest, tmp / "manifest.json")
    tmp.rename(dst)


def latent(repo: Path, rows: int) -> np.ndarray:
    manifest = read_manifest(repo / "digits-ppca" / "1" / "manifest.json")
    return np.zeros((rows, int(manifest.parameters["latent_dim"])), np.float32)


class ServeProcess:
    """`python -m genserve.server.cli` in a subprocess; reads the ready line for the port (``port`` 0: any)."""

    def __init__(self, repo: Path, *flags: str, log: Path, port: int = 0) -> None:
        self.metrics_port = free_port()
        self.log = log
        cmd = [sys.executable, "-m", "genserve.server.cli", "--repo", str(repo), "--port", str(port),
               "--metrics-port", str(self.metrics_port), "--provider", "cpu", "--workers", "2", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 90
        self.ready = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("genserve: serving"):
                self.ready = line.strip()
                break
        if not self.ready:
            self.proc.kill()
            raise AssertionError(f"server did not become ready:\n{log.read_text()[-3000:]}")
        self.port = int(re.search(r" port=(\d+)", self.ready).group(1))
        self.address = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_serving_code_does_not_import_torch() -> None:
    code = ("import sys, genserve.server.app, genserve.server.cli, genserve.server.servicer; "
            "import genserve.server.engine; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_sigterm_under_load_finishes_every_accepted_request(repo_dir: Path, tmp_path: Path) -> None:
    grace = 6.0
    name = "digits-realnvp" if (repo_dir / "digits-realnvp").is_dir() else "digits-ppca"
    server = ServeProcess(repo_dir, "--grace-s", str(grace), log=tmp_path / "server.log")
    try:
        assert f"port={server.port}" in server.ready and f"{name}:v1" in server.ready
        assert f"metrics_port={server.metrics_port}" in server.ready
        dim = int(read_manifest(repo_dir / name / "1" / "manifest.json").parameters["latent_dim"])
        z = Noise(0).normal(100, dim)  # 50 x 100 rows: about half a second of work for two workers

        async def scenario() -> tuple[list, list, float, list, grpc.StatusCode]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = service_pb2_grpc.GenerativeServiceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
                assert (await watch.read()).status == SERVING
                done_at: list[float] = []

                async def one(i: int) -> pb.DecodeResponse:
                    r = await stub.Decode(pb.DecodeRequest(model=name, z=to_proto(z + i), seed=i), timeout=30)
                    done_at.append(time.monotonic())
                    return r

                calls = [asyncio.ensure_future(one(i)) for i in range(50)]
                # SIGTERM once the server is answering: the first answer is back and the others are in flight.
                await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
                server.proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                statuses = [(await watch.read()).status]
                results = await asyncio.gather(*calls, return_exceptions=True)
                # New calls are served during the lame-duck period (until arrivals pause), then refused: call
                # until one is refused, within a generous deadline.
                late, deadline = grpc.StatusCode.OK, time.monotonic() + 60
                while late == grpc.StatusCode.OK and time.monotonic() < deadline:
                    try:
                        await stub.Decode(pb.DecodeRequest(model=name, z=to_proto(z[:1])), timeout=30)
                    except grpc.aio.AioRpcError as e:
                        late = e.code()
                return results, statuses, sent, done_at, late

        results, statuses, sent, done_at, late = asyncio.run(scenario())
        assert statuses == [NOT_SERVING]
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of 50 accepted requests failed: {failed[0]}"
        assert sum(t > sent for t in done_at) >= 1, "nothing was running at SIGTERM: the test is void"
        for i, r in enumerate(results):
            assert from_proto(r.x).shape == (100, 8, 8), i
        assert late == grpc.StatusCode.UNAVAILABLE  # new requests are refused once draining began
        server.proc.wait(timeout=120)  # a hang guard only; how fast it exits is not the point
        log = (tmp_path / "server.log").read_text()
        assert server.proc.returncode == 0, log[-2000:]
        # Within the grace period: every accepted request succeeded above (past it they are cancelled), and the
        # engine stopped in time (the server warns otherwise); no wall-clock bound that a busy machine breaks.
        assert "did not stop within the grace period" not in log, log[-2000:]
    finally:
        server.close()


def test_sighup_reloads_the_repository(repo_copy: Path, tmp_path: Path) -> None:
    server = ServeProcess(repo_copy, log=tmp_path / "server.log")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GenerativeServiceStub(channel)
            assert stub.GetModel(pb.GetModelRequest(model="digits-ppca")).version == 1
            add_version(repo_copy, "digits-ppca", 2)
            server.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while stub.GetModel(pb.GetModelRequest(model="digits-ppca")).version != 2:
                assert time.monotonic() < deadline, "SIGHUP did not load version 2"
                time.sleep(0.1)
            got = stub.Sample(pb.SampleRequest(model="digits-ppca", n=2, seed=3))
            assert got.model_version == 2
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=15) == 0
    finally:
        server.close()


def test_reload_rpc_picks_up_a_new_version_without_failing_requests_in_flight(repo_copy: Path) -> None:
    from genserve.server.config import ServerConfig

    (repo_copy / "digits-ppca" / "config.json").write_text('{"max_queue_delay_ms": 50}')
    cfg = ServerConfig(repo=repo_copy, port=0, metrics_port=0, provider="cpu", workers=2)
    z = latent(repo_copy, 1)
    with BackgroundServer(cfg) as srv:
        async def scenario() -> tuple[list, pb.ReloadResponse, list]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
                stub = service_pb2_grpc.GenerativeServiceStub(channel)
                before = [stub.Decode(pb.DecodeRequest(model="digits-ppca", z=to_proto(z), seed=i),
                                      timeout=30) for i in range(30)]
                await until(lambda: srv.server.servicer.rows.held > 0)  # requests in flight at the reload
                add_version(repo_copy, "digits-ppca", 2)
                reload = stub.ReloadRepository(pb.ReloadRequest(), timeout=60)
                during = [stub.Decode(pb.DecodeRequest(model="digits-ppca", z=to_proto(z), seed=i),
                                      timeout=30) for i in range(30)]
                results = await asyncio.gather(*before, *during, return_exceptions=True)
                return results, await reload, [await stub.GetModel(pb.GetModelRequest(model="digits-ppca"))]

        results, reloaded, (info,) = asyncio.run(scenario())
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} requests in flight failed during the reload: {failed[0]}"
        assert {r.model_version for r in results} <= {1, 2}
        assert info.version == info.default_version == 2
        summary = next(m for m in reloaded.models if m.name == "digits-ppca")
        assert summary.default_version == 2 and 2 in summary.versions
        assert not reloaded.errors
        # Both versions give the same numbers (same graphs): the answer is the version's, not the reload's.
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = service_pb2_grpc.GenerativeServiceStub(channel)
            a = stub.Decode(pb.DecodeRequest(model="digits-ppca", z=to_proto(z), seed=1))
            assert a.model_version == 2
            np.testing.assert_array_equal(from_proto(a.x), from_proto(results[0].x))


def test_polling_reload_and_a_model_that_fails_to_load(repo_copy: Path) -> None:
    from genserve.server.config import ServerConfig

    broken = repo_copy / "broken"
    shutil.copytree(repo_copy / "digits-ppca", broken)
    manifest = read_manifest(broken / "1" / "manifest.json")
    manifest.name = "broken"
    write_manifest(manifest, broken / "1" / "manifest.json")
    graph = broken / "1" / manifest.graphs[0].file
    graph.write_bytes(b"not an onnx file")  # sha256 mismatch / unreadable graph
    cfg = ServerConfig(repo=repo_copy, port=0, metrics_port=0, provider="cpu", model_control="poll", poll_s=0.2,
                       workers=2)
    with BackgroundServer(cfg) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = service_pb2_grpc.GenerativeServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert listed["broken"].state == pb.MODEL_STATE_FAILED
        assert listed["broken"].message, "a failed model must say why"
        assert listed["digits-ppca"].state == pb.MODEL_STATE_READY
        check = lambda name: health.Check(health_pb2.HealthCheckRequest(service=name)).status  # noqa: E731
        assert check("") == SERVING and check("digits-ppca") == SERVING
        assert check("broken") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Sample(pb.SampleRequest(model="broken", n=1))
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)
        assert stub.Sample(pb.SampleRequest(model="digits-ppca", n=1)).model_version == 1

        add_version(repo_copy, "digits-ppca", 2)
        deadline = time.monotonic() + 20
        while stub.GetModel(pb.GetModelRequest(model="digits-ppca")).version != 2:
            assert time.monotonic() < deadline, "polling did not load version 2"
            time.sleep(0.1)
        # Fix the broken model: the next poll loads it and its health turns SERVING.
        shutil.copy(repo_copy / "digits-ppca" / "1" / manifest.graphs[0].file, graph)
        deadline = time.monotonic() + 20
        while check("broken") != SERVING:
            assert time.monotonic() < deadline, "the repaired model never became SERVING"
            time.sleep(0.1)
        assert stub.Sample(pb.SampleRequest(model="broken", n=1)).model_version == 1


def test_serve_flags_override_the_config_file(tmp_path: Path) -> None:
    import argparse

    from genserve.server import cli

    toml = tmp_path / "server.toml"
    toml.write_text(f'repo = "{tmp_path}"\nport = 9000\nmax_batch_size = 16\ngrace_s = 3\n')
    parser = argparse.ArgumentParser()
    cli._arguments(parser)
    flags = ["--config", str(toml), "--port", "0", "--max-queue-delay-ms", "7", "--threads", "2",
             "--provider", "cpu"]
    cfg = cli.build_config(parser.parse_args(flags))
    assert (cfg.repo, cfg.port, cfg.max_batch_size, cfg.grace_s) == (tmp_path, 0, 16, 3.0)
    assert (cfg.max_queue_delay_ms, cfg.intra_op_threads, cfg.provider) == (7.0, 2, "cpu")
    with pytest.raises(ValueError, match="repo"):
        cli.build_config(parser.parse_args(["--port", "1"]))
    with pytest.raises(ValueError, match="provider"):
        cli.build_config(parser.parse_args(["--repo", str(tmp_path), "--provider", "tpu"]))
    toml.write_text('repo = "x"\nportt = 1\n')
    with pytest.raises(ValueError, match="portt"):
        cli.build_config(parser.parse_args(["--config", str(toml)]))
