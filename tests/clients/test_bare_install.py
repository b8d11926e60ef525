"""The client installs and works without torch or onnxruntime: a fresh virtualenv with the base install only.

``pip install <repo>`` (no extras: numpy, grpcio, protobuf, tqdm) into a new venv, then, in that venv, import
the client, run `genserve --help`, and talk to the real server running in this test process: list models,
sample, score a file and check health (grpcio-health-checking is absent there, so health goes through the
client's own two-message codec).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import importlib.util, json, sys
import numpy as np
from genserve.clients.client import Client
forbidden = [m for m in ("torch", "onnxruntime", "onnx", "grpc_health", "sklearn") if importlib.util.find_spec(m)]
with Client(sys.argv[1]) as c:
    names = [m.name for m in c.models()]
    x = c.sample("moons-ppca", 5, seed=1)
    scores = c.score_stream("moons-ppca", sys.argv[2], chunk_size=100, progress=False)
    health = c.health("moons-ppca")
print(json.dumps({"installed": forbidden, "loaded": [m for m in ("torch", "onnxruntime") if m in sys.modules],
                  "names": names, "x": x.tolist(), "scores": scores.log_prob.tolist(), "health": health}))
"""


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv (no system site-packages) with `pip install <repo>` and nothing else."""
    home = tmp_path_factory.mktemp("bare")
    venv.EnvBuilder(with_pip=True, clear=True).create(home / "venv")
    python = home / "venv" / "bin" / "python"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(ROOT)], capture_output=True,
                            text=True, env=env, timeout=540)
    if result.returncode != 0:
        pytest.fail(f"pip install of the base package failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return home / "venv" / "bin"


@pytest.mark.slow  # 60-150 s, mostly pip building and installing; runs in the default `pytest` (and CI) anyway
def test_client_installs_and_runs_without_torch_or_onnxruntime(bare_venv: Path, target: str, client,
                                                                tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(0.5, 0.7, size=(250, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run([str(bare_venv / "python"), "-c", SCRIPT, target, str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["installed"] == [] and got["loaded"] == []
    assert "moons-ppca" in got["names"] and got["health"] == "SERVING"
    assert np.array_equal(np.asarray(got["x"], dtype=np.float32), client.sample("moons-ppca", 5, seed=1))
    assert np.allclose(got["scores"], client.log_likelihood("moons-ppca", x).log_prob, rtol=0, atol=0)

    # the console script: help lists the client commands; the stations that need extras stay out of the way
    help_run = subprocess.run([str(bare_venv / "genserve"), "--help"], capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0, help_run.stderr[-2000:]
    for command in ("models", "info", "sample", "score", "encode", "decode"):
        assert command in help_run.stdout
    cli = subprocess.run([str(bare_venv / "genserve"), "sample", "moons-ppca", "-n", "7", "--seed", "2",
                          "--out", str(tmp_path / "s.npy"), "--server", target, "--quiet"],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "s.npy"), client.sample("moons-ppca", 7, seed=2))
    assert sys.prefix != str(bare_venv.parent)  # the test itself ran in the dev environment
