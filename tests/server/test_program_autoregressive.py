"""The autoregressive serving programs over the export graphs agree with the PyTorch models exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.export.contract import bind
from genserve.export.repository import serving_program
from genserve.export.torch_runner import TorchRunner
from genserve.server.programs import program_class
from genserve.server.programs.autoregressive import AutoregressiveProgram
from genserve.server.programs.base import run_sync
from genserve.training.arcnn import CausalConvAR
from genserve.training.arrnn import RecurrentAR
from genserve.training.data import load_dataset

ARCH = {
    "arcnn": (CausalConvAR, {"channels": 16, "layers": 2, "components": 4}),
    "arrnn": (RecurrentAR, {"hidden": 16, "layers": 2, "embed": 8, "components": 4}),
    "arrnn-above": (RecurrentAR, {"hidden": 16, "layers": 2, "embed": 8, "above": True}),  # images only
}
IMAGE_MODELS = sorted(ARCH)
TABULAR_MODELS = ["arcnn", "arrnn"]
TOY = DataSpec("toy", (3,), "continuous", mean=(0.5, -0.25, 3.0), std=(2.0, 0.5, 1.5))


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def setup(model: str, spec: DataSpec):
    cls, arch = ARCH[model]
    torch.manual_seed(0)
    m = cls(spec, **arch)
    with torch.no_grad():  # sharper, non-uniform conditionals than at initialisation
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m.eval()
    bound = bind(m, m.family, spec)
    return m, serving_program(bound), TorchRunner(bound.graphs)


def test_both_models_are_served_by_the_family_program() -> None:
    assert program_class("autoregressive") is AutoregressiveProgram


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_log_likelihood_matches_torch(model: str, digits) -> None:
    m, program, runner = setup(model, digits.spec)
    x = digits.test[:50]
    got = run_sync(program.log_likelihood(runner, x, Noise(0)))
    with torch.no_grad():
        want = m.log_prob(torch.as_tensor(x), Noise(0)).numpy()
    assert got.shape == (50,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert runner.calls == {"logits": 1}  # exact likelihood in one pass


@pytest.mark.parametrize("model", TABULAR_MODELS)
def test_continuous_log_likelihood_matches_torch(model: str) -> None:
    m, program, runner = setup(model, TOY)
    x = np.random.default_rng(0).normal(TOY.mean, TOY.std, size=(40, 3)).astype(np.float32)
    got = run_sync(program.log_likelihood(runner, x, Noise(0)))
    with torch.no_grad():
        want = m.log_prob(torch.as_tensor(x), Noise(0)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_samples_are_identical_to_torch(model: str, temperature: float, digits) -> None:
    m, program, runner = setup(model, digits.spec)
    got = run_sync(program.sample(runner, 6, Noise(42), temperature=temperature))
    want = m.sample(6, Noise(42), temperature=temperature).numpy()
    assert got.x.shape == (6, 8, 8) and got.latents is None
    np.testing.assert_array_equal(got.x, want)
    # the RNN carries its state through D step calls; the CNN re-reads the prefix with D logits calls
    assert runner.calls == ({"logits": 64} if model == "arcnn" else {"step": 64})


@pytest.mark.parametrize("model", TABULAR_MODELS)
def test_continuous_samples_match_torch(model: str) -> None:
    m, program, runner = setup(model, TOY)
    got = run_sync(program.sample(runner, 50, Noise(7), temperature=0.8)).x
    want = m.sample(50, Noise(7), temperature=0.8).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["arrnn", "arrnn-above"])
def test_rnn_step_sampling_equals_prefix_recomputation(model: str, digits) -> None:
    _, program, runner = setup(model, digits.spec)
    stepped = run_sync(program.sample(runner, 5, Noise(3))).x
    recomputed = run_sync(program.sample(runner, 5, Noise(3), recompute=True)).x
    np.testing.assert_array_equal(stepped, recomputed)
    assert runner.calls == {"step": 64, "logits": 64}


def test_initial_state_shape_comes_from_the_step_graph(digits) -> None:
    m, program, runner = setup("arrnn-above", digits.spec)
    assert program.state_shapes() == {"h": (40,)}  # 2 x 16 GRU units, then a row buffer of 8
    without_step = AutoregressiveProgram(digits.spec, {}, {k: v for k, v in program.graphs.items() if k != "step"})
    runner.calls.clear()
    run_sync(without_step.sample(runner, 1, Noise(0)))
    assert runner.calls == {"logits": 64}  # no step graph: every step re-reads the prefix
