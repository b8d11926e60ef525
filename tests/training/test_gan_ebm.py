"""GAN and energy model: the pieces that make them work, checked against mathematics rather than shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.training.data import load_dataset
from genserve.training.ebm import EnergyModel, langevin, langevin_constants
from genserve.training.gan import GAN, energy_distance, frechet_distance

torch.set_num_threads(1)

DIGITS = load_dataset("digits")
ROWS = DataSpec("rows", (3,), "continuous", mean=(1.0, -2.0, 0.5), std=(2.0, 0.5, 1.0))
UNIT = DataSpec("unit", (2,), "continuous", mean=(0.0, 0.0), std=(1.0, 1.0))


# ---- Frechet distance ---------------------------------------------------------------------------------
def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((300, 5)) * 2 + 1
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_energy_distance_is_a_distance_between_distributions():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 2))
    assert energy_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    # two point masses d apart: 2 |a - b| - 0 - 0
    assert energy_distance(np.zeros((5, 3)), np.full((7, 3), 2.0)) == pytest.approx(2 * 2.0 * math.sqrt(3))
    # same mean and covariance, different shape: the Frechet distance is blind to it, the energy distance is not
    b = rng.choice([-1.0, 1.0], size=(3000, 2))
    c = rng.standard_normal((3000, 2))
    baseline = energy_distance(c, rng.standard_normal((3000, 2)))  # two samples of one distribution
    assert frechet_distance(b, c) < 0.05 and energy_distance(b, c) > 5 * baseline


# ---- GAN ----------------------------------------------------------------------------------------------
def gan(spec: DataSpec = DIGITS.spec, **kw) -> GAN:
    torch.manual_seed(0)
    return GAN(spec, **{"latent_dim": 8, "hidden": 32, **kw})


def test_gan_has_batchnorm_in_g_and_dropout_in_d_inactive_in_eval_mode():
    m = gan(dropout=0.5)
    assert any(isinstance(mod, nn.BatchNorm1d) for mod in m.G.modules())
    assert any(isinstance(mod, nn.Dropout) for mod in m.D.modules())
    z, x = torch.randn(16, 8), torch.rand(16, 64)
    m.train()
    with torch.no_grad():
        assert not torch.equal(m.D(x), m.D(x))  # dropout draws new masks
        assert not torch.allclose(m.G(z)[:4], m.G(z[:4]))  # batch statistics depend on the batch
        m.eval()
        assert torch.equal(m.D(x), m.D(x))
        assert torch.allclose(m.G(z)[:4], m.G(z[:4]), atol=1e-6)  # running statistics: rows independent
        assert torch.equal(m.generate(z), m.generate(z))


def test_gan_discriminator_loss_falls_in_a_few_d_steps():
    m = gan()
    x = torch.as_tensor(DIGITS.train[:64])
    _, opt_d = m.make_optimizers(2e-3, 0.0)

    def loss_d() -> float:
        torch.manual_seed(1)  # the same generated batch each time
        m.D.eval()
        with torch.no_grad():
            return float(m(x, mode="d_loss"))

    before = loss_d()
    assert before == pytest.approx(2 * math.log(2), abs=0.15)  # an untrained D guesses
    m.train()
    for _ in range(10):
        opt_d.zero_grad()
        m(x, mode="d_loss").backward()
        opt_d.step()
    assert loss_d() < before - 0.3


def test_gan_training_step_moves_both_players_and_the_average():
    m = gan()
    opts = m.make_optimizers(1e-3, 0.0)
    g0, d0, e0 = (torch.cat([p.detach().flatten() for p in mod.parameters()]) for mod in (m.G, m.D, m.G_ema))
    logs = m.train().training_step(torch.as_tensor(DIGITS.train[:32]), opts, grad_clip=1.0)
    assert set(logs) == {"loss", "loss_d", "loss_g"} and all(np.isfinite(v) for v in logs.values())
    g1, d1, e1 = (torch.cat([p.detach().flatten() for p in mod.parameters()]) for mod in (m.G, m.D, m.G_ema))
    assert not torch.equal(g0, g1) and not torch.equal(d0, d1)
    # the average moves 1 - decay of the way towards the new weights; the decay warms up as (1 + t) / (10 + t)
    assert torch.allclose(e1, e0 + 0.9 * (g1 - e0), atol=1e-6)
    m.ema_updates.fill_(10**5)  # warmed up: (1 + t) / (10 + t) > ema
    m.training_step(torch.as_tensor(DIGITS.train[:32]), opts, grad_clip=1.0)
    g2, e2 = (torch.cat([p.detach().flatten() for p in mod.parameters()]) for mod in (m.G, m.G_ema))
    assert torch.allclose(e2, e1 + (1 - m.ema) * (g2 - e1), atol=1e-7)
    with pytest.raises(ValueError, match="mode"):
        m(torch.as_tensor(DIGITS.train[:2]), mode="both")


def test_gan_samples_follow_the_documented_noise_order():
    m = gan().eval()
    s = m.sample(5, Noise(4), temperature=0.5)
    z = torch.from_numpy(Noise(4).normal(5, 8)) * 0.5
    assert torch.equal(s, m.decode(z))
    raw = m.generate(z)
    assert raw.min() >= 0 and raw.max() <= 16 and not torch.equal(raw, raw.round())  # sigmoid in data units
    DIGITS.spec.check(s.numpy())


def test_gan_on_rows_generates_in_raw_units():
    m = gan(ROWS).eval()
    x = m.generate(torch.randn(4000, 8))
    # G's output is denormalised: shifting G's last bias by one moves samples by one standard deviation
    with torch.no_grad():
        m.G_ema[-1].bias += 1.0
    shift = (m.generate(torch.randn(4000, 8)) - x).mean(0)
    assert torch.allclose(shift, torch.tensor(ROWS.std) * 1.0, atol=0.15)


def test_gan_validation_loss_is_the_frechet_distance_of_its_samples():
    m = gan().eval()
    val = torch.as_tensor(DIGITS.val)
    s = m.sample(m.val_samples, Noise(0))
    assert m.validation_loss(val) == pytest.approx(frechet_distance(val.numpy(), s.numpy()))


# ---- energy model ---------------------------------------------------------------------------------------
def ebm(spec: DataSpec = DIGITS.spec, **kw) -> EnergyModel:
    torch.manual_seed(0)
    m = EnergyModel(spec, **{"hidden": 32, "depth": 2, "buffer_size": 256, **kw})
    with torch.no_grad():  # larger weights than at initialisation: gradients far from zero, curvature visible
        for p in m.parameters():
            p.mul_(3.0)
    return m


@pytest.mark.parametrize("spec", [DIGITS.spec, ROWS], ids=["digits", "rows"])
def test_hand_written_energy_gradient_equals_autograd(spec):
    m = ebm(spec, depth=3)
    x = (torch.rand(9, *spec.shape) * 17 - 0.5) if spec.discrete else torch.randn(9, *spec.shape) * 2
    x.requires_grad_(True)
    e_auto = m.energy(x)
    (g_auto,) = torch.autograd.grad(e_auto.sum(), x)
    e, g = m.energy_grad(x)
    assert g.shape == x.shape and e.shape == (9,)
    assert torch.allclose(e, e_auto, atol=1e-6)
    assert (g - g_auto).abs().max() <= 1e-5 * max(1.0, float(g_auto.abs().max()))
    assert float(g_auto.abs().max()) > 1e-3  # not trivially zero
    m64 = m.double()  # in float64 the two agree to round-off
    x64 = x.detach().double().requires_grad_(True)
    (ga64,) = torch.autograd.grad(m64.energy(x64).sum(), x64)
    assert torch.allclose(m64.energy_grad(x64)[1], ga64, atol=1e-12)


def test_log_prob_is_minus_the_energy_in_raw_units():
    m = ebm()
    x = torch.as_tensor(DIGITS.test[:6])
    y = (x.reshape(6, -1) + 0.5) / 17  # integer images at the centres of their cells
    assert torch.allclose(m.log_prob(x, Noise(0)), -(m.energy_y(y) + 64 * math.log(17)), atol=1e-4)
    r = ebm(ROWS)
    x = torch.randn(5, 3)
    y = (x - torch.tensor(ROWS.mean)) / torch.tensor(ROWS.std)
    assert torch.allclose(r.log_prob(x), -(r.energy_y(y) + math.log(2.0 * 0.5 * 1.0)), atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_langevin_samples_a_known_quadratic_energy(temperature):
    """E(x) = |x - m|^2 / (2 s^2): Langevin with step eta and noise scale T has mean m and, for this discrete-
    time chain, variance T^2 s^2 / (1 - eta / (2 s^2)) exactly (an AR(1) process); 4000 chains, 400 steps."""
    m_, s, eta = torch.tensor([1.0, -0.5]), 0.5, 0.01
    c = {k: torch.from_numpy(v) for k, v in langevin_constants(UNIT, eta, 1.0, temperature, box=20.0).items()}
    noise = Noise(0)
    x0 = torch.from_numpy(noise.normal(4000, 2))
    x = langevin(lambda v: (v - m_) / s**2, x0, 400, c, noise)
    var = temperature**2 * s**2 / (1 - eta / (2 * s**2))
    assert torch.allclose(x.mean(0), m_, atol=4 * math.sqrt(var / 4000))
    assert torch.allclose(x.var(0), torch.tensor([var, var]), rtol=0.08)  # sampling error of a variance ~2.2%


def test_langevin_step_in_raw_units_is_the_model_space_step():
    """Raw units: x <- x - eta a^2 dE/dx + a sqrt(2 eta) tau eps is the model-space step mapped by x = a y + b."""
    m = ebm(ROWS, box=50.0)
    c = {k: torch.from_numpy(v) for k, v in langevin_constants(ROWS, 0.3, 0.7, 1.0, 50.0).items()}
    y = torch.randn(5, 3)
    x = y * c["a"] + c["b"]
    x1 = langevin(lambda v: m.energy_grad(v)[1], x, 1, c, Noise(2))
    eps = torch.from_numpy(Noise(2).normal(5, 3))
    y1 = y - 0.3 * m.energy_grad_y(y)[1] + math.sqrt(2 * 0.3) * 0.7 * eps
    assert torch.allclose(x1, y1 * c["a"] + c["b"], atol=1e-5)


def test_ebm_sampling_noise_order_and_data_domain():
    m = ebm().eval()
    u = Noise(5).uniform(4, 64)
    # no steps: the initial uniform draw in model space, mapped to levels and rounded
    s0 = m.sample(4, Noise(5), langevin_steps=0)
    assert torch.equal(s0, m.postprocess(torch.from_numpy(u * 17 - 0.5).reshape(4, 8, 8)))
    s = m.sample(4, Noise(5), langevin_steps=20)
    DIGITS.spec.check(s.numpy())
    assert torch.equal(s, m.sample(4, Noise(5), langevin_steps=20)) and not torch.equal(s, s0)


def test_contrastive_divergence_lowers_data_energy_relative_to_noise():
    torch.manual_seed(0)
    m = EnergyModel(DIGITS.spec, hidden=64, depth=2, train_steps=10, buffer_size=512)
    x = torch.as_tensor(DIGITS.train[:256])
    noise = torch.rand(256, 64)

    def gap() -> float:  # mean energy of data minus that of uniform noise in model space
        with torch.no_grad():
            return float(m.energy_y((x.reshape(256, -1) + 0.5) / 17).mean() - m.energy_y(noise).mean())

    before = gap()
    opts = m.make_optimizers(1e-3, 0.0)
    m.train()
    replay0 = m.replay.clone()
    for i in range(30):
        logs = m.training_step(x[(i * 64) % 256:][:64], opts, grad_clip=0.0)
    assert set(logs) >= {"loss", "e_data", "e_model"} and all(np.isfinite(v) for v in logs.values())
    assert gap() < before - 0.1
    assert not torch.equal(replay0, m.replay)  # chains were advanced and written back
    assert m.replay.min() >= 0 and m.replay.max() <= 1  # digits' chains stay in the unit box


def test_replay_buffer_travels_with_the_weights():
    m = ebm()
    assert "replay" in m.state_dict() and m.replay.shape == (256, 64)
    assert "scale" not in m.state_dict()  # derived from the spec, not saved
