"""The mathematics of RealNVP and the VAE: exact inverses, log-determinants, normalisation and likelihood bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.training.data import load_dataset
from genserve.training.realnvp import RealNVP
from genserve.training.vae import VAE

torch.set_num_threads(1)

DIGITS = DataSpec("digits", (8, 8), "discrete", levels=17)
MOONS = DataSpec("moons", (2,), "continuous", mean=(0.5, 0.25), std=(0.87, 0.5))


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.as_tensor(load_dataset("digits").train)


def perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random non-zero weights everywhere (zero-initialised last layers would make every coupling the identity)
    and non-trivial batch-norm running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(torch.exp(0.3 * torch.randn(b.shape, generator=g)))
    return model


def few_steps_lower_loss(model: torch.nn.Module, x: torch.Tensor, steps: int = 30) -> tuple[float, float]:
    """Train-mode loss on a fixed batch (fixed torch seed for its own noise) before and after ``steps`` steps."""
    def loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return float(model.loss(x))

    model.train()
    before = loss()
    opts = model.make_optimizers(1e-3, 0.0)
    for _ in range(steps):
        model.training_step(x, opts, grad_clip=10.0)
    return before, loss()


# ---- RealNVP --------------------------------------------------------------------------------------------
FLOWS = [
    pytest.param(DIGITS, {"net": "mlp", "norm": "batchnorm"}, id="digits-mlp-batchnorm"),
    pytest.param(DIGITS, {"net": "cnn", "norm": "actnorm", "hidden": 8}, id="digits-cnn-actnorm"),
    pytest.param(MOONS, {"norm": "batchnorm"}, id="moons-batchnorm"),
]


def make_flow(spec: DataSpec, arch: dict) -> RealNVP:
    return RealNVP(spec, coupling_layers=4, **{"hidden": 32, **arch})


@pytest.mark.parametrize(("spec", "arch"), FLOWS)
def test_flow_inverse_recovers_input(spec: DataSpec, arch: dict) -> None:
    m = perturbed(make_flow(spec, arch)).eval()
    y = torch.rand(16, spec.dim) * (spec.levels or 1) + (0 if spec.discrete else -0.5)
    t, _ = m.preprocess(y)
    z, _ = m.flow_forward(t)
    assert (z - t).abs().max() > 0.1  # the flow is not the identity
    torch.testing.assert_close(m.flow_inverse(z), t, atol=1e-4, rtol=1e-4)
    if spec.discrete:  # the cell centre round-trips through encode/decode to the same integers
        x = torch.randint(0, spec.levels, (16, *spec.shape)).float()
        assert torch.equal(m.decode(m.encode(x)), x)
    else:
        torch.testing.assert_close(m.inverse(m.transform(y)[0]), y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(("spec", "arch"), FLOWS)
def test_flow_log_density_matches_autograd_jacobian(spec: DataSpec, arch: dict, mode: str) -> None:
    """log p(y) = log N(f(y); 0, I) + log|det df/dy|, with the determinant taken from autograd, preprocessing
    (logit or normalisation) included. In training mode batch norm uses batch statistics, which couple the
    examples of a batch; its log-det treats them as constants, so the train-mode check uses act-norm."""
    if mode == "train" and arch.get("norm") == "batchnorm":
        arch = {**arch, "norm": "actnorm"}
    m = perturbed(make_flow(spec, arch))
    m.train(mode == "train")
    for c in m.couplings:  # dropout would make the map random; the Jacobian needs a fixed function
        c.net.apply(lambda mod: setattr(mod, "p", 0.0) if isinstance(mod, torch.nn.Dropout) else None)
    m = m.double()
    y = torch.rand(3, spec.dim, dtype=torch.float64) * (spec.levels or 1)

    def f(row: torch.Tensor) -> torch.Tensor:
        return m.flow_forward(m.preprocess(row.unsqueeze(0))[0])[0].squeeze(0)

    for row in y:
        jac = torch.autograd.functional.jacobian(f, row)
        _, logabsdet = torch.linalg.slogdet(jac)
        z = f(row)
        expected = -0.5 * (z.pow(2).sum() + spec.dim * math.log(2 * math.pi)) + logabsdet
        x, u = (torch.floor(row), row - torch.floor(row)) if spec.discrete else (row, None)
        got = m.transform(x.unsqueeze(0).reshape(1, *spec.shape),
                              None if u is None else u.unsqueeze(0))[1]
        assert abs(float(got.detach()) - float(expected.detach())) < 1e-6


def grid_integral(m: RealNVP, lo: float, hi: float, n: int, discrete: bool) -> float:
    """Midpoint-rule integral of exp(log p) over the square [lo, hi]^2 (raw units, dequantised for discrete)."""
    step = (hi - lo) / n
    g = lo + step * (torch.arange(n, dtype=torch.float32) + 0.5)
    pts = torch.cartesian_prod(g, g)
    with torch.no_grad():
        if discrete:  # x = 0 and u = y is the same dequantised point y
            logp = m.transform(torch.zeros_like(pts), pts)[1]
        else:
            logp = m.transform(pts)[1]
    return float(torch.exp(logp.double()).sum()) * step**2


def test_flow_density_integrates_to_one_on_moons() -> None:
    data = load_dataset("moons", seed=0)
    m = perturbed(RealNVP(data.spec, coupling_layers=6, hidden=32), scale=0.1).eval()
    assert abs(grid_integral(m, -8.0, 8.0, 400, discrete=False) - 1.0) < 0.01


def test_flow_discrete_density_and_bound() -> None:
    """On a tiny discrete domain (2 values of 3 levels): the density of the dequantised y integrates to 1 over
    the support of the logit preprocessing, and the dequantisation bound exp(E_u log p(x+u)) is at most the
    cell's probability, so over all 9 integer configurations it sums to at most the mass on [0, 3)^2 <= 1."""
    spec = DataSpec("tiny", (2,), "discrete", levels=3)
    m = perturbed(RealNVP(spec, coupling_layers=4, hidden=16), scale=0.05).eval()
    edge = m.logit_alpha / ((1 - 2 * m.logit_alpha) / spec.levels)  # logit support: (-edge, levels + edge)
    assert abs(grid_integral(m, -edge, spec.levels + edge, 400, discrete=True) - 1.0) < 0.01
    inside = grid_integral(m, 0.0, spec.levels, 300, discrete=True)
    x = torch.tensor([[a, b] for a in range(3) for b in range(3)], dtype=torch.float32)
    with torch.no_grad():
        bound = m.log_prob(x, Noise(0), draws=256)
    total = float(torch.exp(bound.double()).sum())
    assert 0.5 < total <= inside < 1.0


def test_flow_training_lowers_loss(digits: torch.Tensor) -> None:
    torch.manual_seed(0)
    before, after = few_steps_lower_loss(RealNVP(DIGITS, coupling_layers=4, hidden=64), digits[:128])
    assert after < before - 5.0


def test_flow_sample_and_likelihood_kind() -> None:
    m = RealNVP(DIGITS, coupling_layers=2, hidden=16).eval()
    x = m.sample(5, Noise(1))
    assert x.shape == (5, 8, 8) and torch.equal(x, x.round()) and x.min() >= 0 and x.max() <= 16
    assert m.likelihood_kind == "lower_bound" and RealNVP(MOONS).likelihood_kind == "exact"
    with pytest.raises(ValueError, match="norm"):
        RealNVP(DIGITS, norm="layernorm")


# ---- VAE --------------------------------------------------------------------------------------------------
def test_vae_importance_weighted_bound_exceeds_elbo_and_rises_with_k(digits: torch.Tensor) -> None:
    torch.manual_seed(0)
    m = VAE(DIGITS, latent_dim=8, hidden=64)
    few_steps_lower_loss(m, digits[:256], steps=50)
    m.eval()
    x = digits[:200]
    with torch.no_grad():
        rec, kl = zip(*(m.elbo_terms(x) for _ in range(200)), strict=True)
        elbo = float((torch.stack(rec).mean(0) - kl[0]).mean())
        iw = {k: float(m.log_prob(x, Noise(5), importance_samples=k).mean()) for k in (1, 10, 100)}
    assert abs(iw[1] - elbo) < 1.0  # K = 1 is an unbiased estimate of the ELBO
    assert iw[1] < iw[10] < iw[100]
    assert iw[100] > elbo + 1.0


def test_vae_importance_weighted_bound_approaches_quadrature(digits: torch.Tensor) -> None:
    """With a 1-D latent log p(x) = log int p(x|z) p(z) dz by quadrature; the bound closes in on it as K grows."""
    torch.manual_seed(0)
    m = VAE(DIGITS, latent_dim=1, hidden=32)
    few_steps_lower_loss(m, digits[:256], steps=50)
    m.eval()
    x = digits[:20]
    z = torch.linspace(-8, 8, 4001).unsqueeze(1)
    with torch.no_grad():
        logpz = -0.5 * (z.squeeze(1) ** 2 + math.log(2 * math.pi))
        exact = torch.stack([
            torch.logsumexp(m.log_likelihood_given_z(row.expand(len(z), 8, 8), z) + logpz, 0) + math.log(16 / 4000)
            for row in x
        ])
        gap = {k: exact - m.log_prob(x, Noise(2), importance_samples=k) for k in (1, 10, 2000)}
    assert float(gap[1].mean()) > 1.0  # the ELBO (K = 1) sits clearly below log p(x)
    assert float(gap[1].mean()) > float(gap[10].mean()) > float(gap[2000].mean())
    assert abs(float(gap[2000].mean())) < 0.05 and float(gap[2000].min()) > -0.2  # converged, up to MC noise


@pytest.mark.parametrize("train_samples", [1, 5])
def test_vae_training_lowers_loss(digits: torch.Tensor, train_samples: int) -> None:
    torch.manual_seed(0)
    m = VAE(DIGITS, latent_dim=8, hidden=64, train_samples=train_samples)
    before, after = few_steps_lower_loss(m, digits[:128])
    assert after < before - 20.0


def test_vae_continuous_sample_encode_decode() -> None:
    m = perturbed(VAE(MOONS, latent_dim=2, hidden=16)).eval()
    x = m.sample(7, Noise(3))
    assert x.shape == (7, 2) and torch.isfinite(x).all()
    z = m.encode(x)
    assert z.shape == (7, 2)
    assert m.decode(z).shape == (7, 2)
    with torch.no_grad():
        lp = m.log_prob(x, Noise(0), importance_samples=50)
    assert lp.shape == (7,) and torch.isfinite(lp).all()


def test_vae_sample_is_in_levels_and_decode_is_argmax() -> None:
    m = perturbed(VAE(DIGITS, latent_dim=4, hidden=16), scale=0.3).eval()
    x = m.sample(6, Noise(4))
    assert x.shape == (6, 8, 8) and torch.equal(x, x.round()) and x.min() >= 0 and x.max() <= 16
    z = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32))
    assert torch.equal(m.decode(z), m.decoder(z).argmax(-1).float().reshape(3, 8, 8))
