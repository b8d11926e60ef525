"""`genserve export --factory`: a module from the user's own package, built, loaded weights-only and exported.

The CLI runs in a subprocess with the user's package on PYTHONPATH, as a user would run it; every bad input
ends in one line on stderr with a non-zero exit and nothing in the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MODULE = '''
import math
import torch
from torch import nn


class Affine(nn.Module):
    """z = (x - b) * exp(s), one affine layer: the smallest flow there is."""

    def __init__(self, spec):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(spec.dim))
        self.b = nn.Parameter(torch.zeros(spec.dim))

    def transform(self, x):
        z = (x - self.b) * torch.exp(self.s)
        return z, -0.5 * (z ** 2).sum(-1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + self.s.sum()

    def inverse(self, z):
        return z * torch.exp(-self.s) + self.b


def build():
    return Affine(type("Spec", (), {"dim": 2})())


def broken(spec):
    raise RuntimeError("the GPU is not here")
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the user's package ``userflows`` and its trained weights (and a pickled whole model)."""
    root = tmp_path_factory.mktemp("user")
    (root / "userflows").mkdir()
    (root / "userflows" / "__init__.py").write_text(MODULE)
    sys.path.insert(0, str(root))
    try:
        import userflows

        m = userflows.build()
        with torch.no_grad():
            m.s.copy_(torch.tensor([0.3, -0.2]))
            m.b.copy_(torch.tensor([0.5, 0.25]))
        torch.save(m.state_dict(), root / "weights.pt")
        torch.save(m, root / "pickled.pt")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("userflows", None)
    (root / "spec.json").write_text(json.dumps({"name": "plane", "shape": [2], "kind": "continuous"}))
    return root


def genserve(user: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(user)}
    return subprocess.run([sys.executable, "-m", "genserve.app.cli", "export", *args], cwd=user, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_factory_module_is_exported_with_its_weights(user: Path, tmp_path: Path) -> None:
    from genserve.core.manifest import read_manifest
    from genserve.export.check import check_repository

    done = genserve(user, "--factory", "userflows:Affine", "--family", "flow", "--spec", "spec.json", "--data",
                    "moons", "--weights", "weights.pt", "--repo", str(tmp_path / "repo"), "--name", "plane-affine")
    assert done.returncode == 0, done.stderr
    m = read_manifest(tmp_path / "repo" / "plane-affine" / "1" / "manifest.json")
    assert (m.family, m.model) == ("flow", "affine") and list(m.data.shape) == [2]
    assert [r.ok for r in check_repository(tmp_path / "repo")] == [True]
    assert "operations over ONNX Runtime" in done.stdout


FLOW = ["--family", "flow", "--spec", "spec.json"]


@pytest.mark.parametrize(("args", "message"), [
    (["--factory", "userflows.nope:Affine", *FLOW], "module 'userflows.nope' does not import"),
    (["--factory", "userflows:Missing", *FLOW], "has no attribute 'Missing'"),
    (["--factory", "userflows", *FLOW], "write it as package.module:callable"),
    (["--factory", "userflows:broken", *FLOW], "calling it raised RuntimeError: the GPU is not here"),
    (["--factory", "userflows:Affine", *FLOW, "--weights", "pickled.pt"], "holds pickled Python objects such as"),
    (["--factory", "userflows:Affine", "--family", "flow", "--data", "digits", "--weights", "weights.pt"],
     "does not fit the module built by the factory"),
    (["--factory", "userflows:build", "--family", "flow", "--data", "digits"], "failed on inputs of shapes (4, 8, 8)"),
    (["--factory", "userflows:Affine", "--family", "diffusion", "--spec", "spec.json"], "unknown family 'diffusion'"),
    (["--factory", "userflows:Affine", "--spec", "spec.json"], "--factory needs --family"),
    (["runs/flow.pt", "--family", "flow"], "--family go with --factory"),
])
def test_bad_factory_inputs_are_one_line_errors_and_write_nothing(user: Path, tmp_path: Path, args: list[str],
                                                                   message: str) -> None:
    done = genserve(user, *args, "--repo", str(tmp_path / "repo"))
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
