"""The RealNVP and VAE serving programs over TorchRunner give the PyTorch models' numbers and samples."""

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
from genserve.server.programs.vae import VAEProgram
from genserve.training.realnvp import RealNVP
from genserve.training.vae import VAE

torch.set_num_threads(1)

DIGITS = DataSpec("digits", (8, 8), "discrete", levels=17)
MOONS = DataSpec("moons", (2,), "continuous", mean=(0.5, 0.25), std=(0.87, 0.5))


def perturbed(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Non-trivial weights (zero-initialised output layers would hide mistakes) and batch-norm statistics."""
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


def data(spec: DataSpec, n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    if spec.discrete:
        return rng.integers(0, spec.levels, (n, *spec.shape)).astype(np.float32)
    return (rng.standard_normal((n, *spec.shape)) * np.asarray(spec.std) + np.asarray(spec.mean)).astype(np.float32)


MODELS = [
    pytest.param(lambda: RealNVP(DIGITS, coupling_layers=4, hidden=32), id="realnvp-digits"),
    pytest.param(lambda: RealNVP(DIGITS, coupling_layers=2, hidden=4, net="cnn", norm="actnorm"), id="realnvp-cnn"),
    pytest.param(lambda: RealNVP(MOONS, coupling_layers=4, hidden=16), id="realnvp-moons"),
    pytest.param(lambda: VAE(DIGITS, latent_dim=4, hidden=32), id="vae-digits"),
    pytest.param(lambda: VAE(DIGITS, latent_dim=4, hidden=32, logit_rank=3), id="vae-digits-low-rank-logits"),
    pytest.param(lambda: VAE(MOONS, latent_dim=2, hidden=16), id="vae-moons"),
]


@pytest.fixture(params=MODELS)
def pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, object, TorchRunner]:
    torch.manual_seed(0)
    model = perturbed(request.param())
    bound = bind(model, model.family, model.spec)
    return model, serving_program(bound), TorchRunner(bound.graphs)


def test_same_samples_for_the_same_seed(pair: tuple) -> None:
    model, program, runner = pair
    for temperature in (1.0, 0.7):
        with torch.no_grad():
            expected = model.sample(9, Noise(11), temperature=temperature).numpy()
        got = run_sync(program.sample(runner, 9, Noise(11), temperature=temperature))
        np.testing.assert_array_equal(got.x, expected)
        assert got.x.shape == (9, *model.spec.shape) and got.latents is not None


def test_log_likelihood_matches(pair: tuple) -> None:
    model, program, runner = pair
    x = data(model.spec, 13)
    options = {"importance_samples": 40} if model.name == "vae" else {"draws": 3}
    with torch.no_grad():
        expected = model.log_prob(torch.from_numpy(x), Noise(5), **options).numpy()
    got = run_sync(program.log_likelihood(runner, x, Noise(5), **options))
    assert got.shape == (13,)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_default_options_match(pair: tuple) -> None:
    """The manifest parameters carry the model's defaults (dequantisation draws, importance samples)."""
    model, program, runner = pair
    x = data(model.spec, 3)
    with torch.no_grad():
        expected = model.log_prob(torch.from_numpy(x), Noise(6)).numpy()
    np.testing.assert_allclose(run_sync(program.log_likelihood(runner, x, Noise(6))), expected, atol=1e-4, rtol=0)


def test_encode_decode_match(pair: tuple) -> None:
    model, program, runner = pair
    x = data(model.spec, 6)
    with torch.no_grad():
        z = model.encode(torch.from_numpy(x)).numpy()
        x_back = model.decode(torch.from_numpy(z)).numpy()
    got_z = run_sync(program.encode(runner, x, Noise(0)))
    np.testing.assert_allclose(got_z, z, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(run_sync(program.decode(runner, z, Noise(0))), x_back)
    if model.name == "realnvp" and model.spec.discrete:
        np.testing.assert_array_equal(x_back, x)  # lossless: the cell centre maps back into its cell


def test_importance_samples_are_chunked_like_one_draw() -> None:
    """The program may score K samples in several chunks; the draws, and so the bound, do not change."""
    model = perturbed(VAE(DIGITS, latent_dim=3, hidden=16))
    bound = bind(model, model.family, DIGITS)
    runner = TorchRunner(bound.graphs)
    x = data(DIGITS, 5)
    params = bound.program_parameters()
    whole = run_sync(VAEProgram(DIGITS, params).log_likelihood(runner, x, Noise(2), importance_samples=30))
    runner.calls.clear()
    chunked = VAEProgram(DIGITS, {**params, "iw_rows": 5 * 7})  # 7 samples per chunk
    got = run_sync(chunked.log_likelihood(runner, x, Noise(2), importance_samples=30))
    assert runner.calls["log_weights"] == 5  # 7 + 7 + 7 + 7 + 2
    np.testing.assert_allclose(got, whole, atol=1e-5, rtol=0)


def test_vae_encode_and_decode_draw_from_their_distributions(pair: tuple) -> None:
    """sample=True: z = mu + exp(logvar / 2) * eps from q(z|x), and x from p(x|z) (categorical by inverse CDF
    on digits, mean + std * eps on rows), in the documented noise order; the flows draw nothing."""
    model, program, runner = pair
    if model.name != "vae":
        assert program.sampled == ()
        return
    assert program.sampled == ("encode", "decode")
    x = data(model.spec, 200)
    with torch.no_grad():
        mu, logvar = (t.numpy() for t in model.encoder(torch.from_numpy(x)))
    eps = Noise(4).normal(*mu.shape)
    z = run_sync(program.encode(runner, x, Noise(4), sample=True))
    np.testing.assert_allclose(z, mu + np.exp(0.5 * logvar) * eps, atol=1e-5, rtol=0)
    assert not np.allclose(z, mu)
    x_drawn = run_sync(program.decode(runner, mu, Noise(8), sample=True))
    assert x_drawn.shape == x.shape and np.array_equal(x_drawn, run_sync(program.decode(runner, mu, Noise(8),
                                                                                         sample=True)))
    with torch.no_grad():
        out = model.decoder(torch.from_numpy(mu))
    if model.spec.discrete:
        probs = torch.softmax(out, -1).numpy().reshape(len(mu), -1, model.spec.levels)
        drawn = x_drawn.reshape(len(mu), -1).astype(int)
        assert ((drawn >= 0) & (drawn < model.spec.levels)).all()
        # every drawn level had probability > 0, and the draws follow the probabilities on average
        assert (np.take_along_axis(probs, drawn[..., None], -1) > 0).all()
        expected_mean = (probs * np.arange(model.spec.levels)).sum(-1).mean()
        assert abs(drawn.mean() - expected_mean) < 0.1 * model.spec.levels
    else:
        mean, std = (t.numpy() for t in out)
        np.testing.assert_allclose(x_drawn, mean + std * Noise(8).normal(*mean.shape), atol=1e-5, rtol=0)
