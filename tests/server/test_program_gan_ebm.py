"""The GAN and energy-model serving programs over TorchRunner give the PyTorch models' samples and energies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.export.contract import bind
from genserve.export.repository import serving_program
from genserve.export.torch_runner import TorchRunner
from genserve.server.programs.base import run_sync
from genserve.server.programs.energy import langevin_constants as serving_constants
from genserve.training.ebm import EnergyModel
from genserve.training.ebm import langevin_constants as training_constants
from genserve.training.gan import GAN

torch.set_num_threads(1)

DIGITS = DataSpec("digits", (8, 8), "discrete", levels=17)
MOONS = DataSpec("moons", (2,), "continuous", mean=(0.5, 0.25), std=(0.87, 0.5))


def perturbed(model: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Weights and batch-norm statistics away from their initialisation, so that mistakes show."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(torch.exp(0.3 * torch.randn(b.shape, generator=g)))
    return model.eval()


def rows(spec: DataSpec, n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    if spec.discrete:
        return rng.integers(0, spec.levels, (n, *spec.shape)).astype(np.float32)
    return (rng.standard_normal((n, *spec.shape)) * np.asarray(spec.std) + np.asarray(spec.mean)).astype(np.float32)


def setup(model: torch.nn.Module) -> tuple:
    torch.manual_seed(0)
    model = perturbed(model)
    bound = bind(model, model.family, model.spec)
    return model, serving_program(bound), TorchRunner(bound.graphs)


# ---- GAN ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [DIGITS, MOONS], ids=["digits", "moons"])
def test_gan_program_draws_the_same_samples(spec):
    model, program, runner = setup(GAN(spec, latent_dim=4, hidden=16))
    for temperature in (1.0, 0.6):
        expected = model.sample(11, Noise(3), temperature=temperature).numpy()
        got = run_sync(program.sample(runner, 11, Noise(3), temperature=temperature))
        np.testing.assert_array_equal(got.x, expected)  # same graph, same noise: bit for bit
        np.testing.assert_array_equal(got.latents, Noise(3).normal(11, 4) * np.float32(temperature))
    z = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_sync(program.decode(runner, z, Noise(0))),
                                  model.decode(torch.from_numpy(z)).numpy())
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        run_sync(program.decode(runner, z[:, :3], Noise(0)))
    assert runner.calls == {"generator": 3}


# ---- energy model -------------------------------------------------------------------------------------
def ebm(spec: DataSpec) -> EnergyModel:
    return EnergyModel(spec, hidden=16, depth=2, sample_steps=25, step_size=0.05, noise_scale=0.5, buffer_size=8)


@pytest.mark.parametrize("spec", [DIGITS, MOONS], ids=["digits", "moons"])
def test_energy_program_scores_minus_the_energy(spec):
    model, program, runner = setup(ebm(spec))
    x = rows(spec, 13)
    expected = model.log_prob(torch.from_numpy(x), Noise(0)).numpy()
    got = run_sync(program.log_likelihood(runner, x, Noise(0)))
    assert got.shape == (13,) and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_langevin_constants_are_the_same_in_training_and_serving():
    for spec in (DIGITS, MOONS):
        for args in ((1.0, 0.01, 1.0, 4.0), (0.03, 0.7, 1.5, 2.0)):
            a, b = training_constants(spec, *args), serving_constants(spec, *args)
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
                assert a[k].dtype == np.float32


@pytest.mark.parametrize("spec", [DIGITS, MOONS], ids=["digits", "moons"])
def test_energy_program_runs_the_same_langevin_chain(spec):
    """The program repeats the model's float32 operations in the same order over the same graph, so over
    TorchRunner the chains agree to float32 round-off (1e-5 in raw units bounds 25 steps of it); a rounded
    pixel could differ only if its value lay within that distance of a level boundary k + 1/2, which the
    1e-3 fraction allows and which in practice never happens here (the chains are equal bit for bit)."""
    model, program, runner = setup(ebm(spec))
    for temperature, opts in ((1.0, {}), (0.5, {"langevin_steps": 7, "langevin_step_size": 0.02})):
        expected = model.sample(40, Noise(9), temperature=temperature, **opts).numpy()
        got = run_sync(program.sample(runner, 40, Noise(9), temperature=temperature, **opts)).x
        assert got.shape == (40, *spec.shape)
        if spec.discrete:
            assert np.mean(got != expected) <= 1e-3 and np.abs(got - expected).max() <= 1
        else:
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert runner.calls["energy_grad"] == 25 + 7  # one graph call per Langevin step


def test_energy_program_chain_moves_and_keeps_to_the_box():
    model, program, runner = setup(ebm(MOONS))
    start = run_sync(program.sample(runner, 64, Noise(4), langevin_steps=0)).x
    np.testing.assert_allclose(start, Noise(4).normal(64, 2) * np.float32(MOONS.std) + np.float32(MOONS.mean),
                               atol=1e-6)  # no steps: the documented initial draw, in raw units
    moved = run_sync(program.sample(runner, 64, Noise(4), langevin_steps=30, langevin_step_size=5.0)).x
    assert not np.allclose(moved, start)
    y = (moved - np.asarray(MOONS.mean)) / np.asarray(MOONS.std)
    assert np.abs(y).max() <= model.box + 1e-5  # clipped to the box (in standard deviations)
    with pytest.raises(ValueError, match="langevin_step_size"):
        run_sync(program.sample(runner, 2, Noise(0), langevin_step_size=0.0))
