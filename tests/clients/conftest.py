"""Client fixtures: the real genserve server on a free loopback port over the shared test repository.

The repository fixtures (``repo_dir``: ``digits-<model>`` for every family that exports, and ``moons-ppca``)
belong to the serving station's tests/server/conftest.py; they are loaded from that file here rather than
copied, so both stations test against the same models and share its on-disk cache.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _server_fixtures():
    spec = importlib.util.spec_from_file_location("genserve_tests_server_fixtures",
                                                  ROOT / "tests" / "server" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


repo_dir = _server_fixtures().repo_dir  # session fixture: the shared, cached test repository


def make_config(repo: Path, port: int = 0):
    """Loopback, CPU, small batching window: the settings of the serving station's ``engine_config``."""
    from genserve.server.config import ServerConfig

    return ServerConfig(repo=repo, host="127.0.0.1", port=port, metrics_port=0, provider="cpu",
                        intra_op_threads=1, inter_op_threads=1, max_batch_size=64, max_queue_delay_ms=2.0,
                        max_queue_size=4096, workers=2, grace_s=2.0)


def find_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server_config():
    """``server_config(repo, port=0)``: a ServerConfig for a test server over ``repo``."""
    return make_config


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: a loopback port nothing listens on (yet)."""
    return find_free_port


@pytest.fixture(scope="session")
def server(repo_dir: Path) -> Iterator:
    """A running genserve server (genserve.server.app.BackgroundServer) over the whole test repository."""
    from genserve.server.app import BackgroundServer

    with BackgroundServer(make_config(repo_dir)) as srv:
        yield srv


@pytest.fixture(scope="session")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
def client(target: str) -> Iterator:
    from genserve.clients.client import Client

    with Client(target) as c:
        yield c


@pytest.fixture(scope="session")
def small_repo(repo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with moons-ppca alone: a server over it starts in a fraction of a second."""
    repo = tmp_path_factory.mktemp("small") / "repo"
    shutil.copytree(repo_dir / "moons-ppca", repo / "moons-ppca")
    return repo


@pytest.fixture
def private_target(small_repo: Path) -> Iterator[str]:
    """A server of its own (moons-ppca only) for tests that abandon streams, so no other test shares it."""
    from genserve.server.app import BackgroundServer

    with BackgroundServer(make_config(small_repo)) as srv:
        yield f"127.0.0.1:{srv.port}"
