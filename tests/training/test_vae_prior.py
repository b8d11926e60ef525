"""The VAE's learned prior (VampPrior), its graphs and served Sample, the logistic decoder and weight averaging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.export.contract import LogWeights, bind
from genserve.export.repository import serving_program
from genserve.export.torch_runner import TorchRunner
from genserve.server.programs.base import run_sync
from genserve.training.base import categorical_from_uniform
from genserve.training.data import load_dataset
from genserve.training.vae import VAE

torch.set_num_threads(1)

DIGITS = DataSpec("digits", (8, 8), "discrete", levels=17)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.as_tensor(load_dataset("digits").train[:32])


def vamp(**arch: object) -> VAE:
    torch.manual_seed(0)
    return VAE(DIGITS, latent_dim=4, hidden=32, prior_components=5, **arch).eval()


def test_vamp_prior_is_the_mixture_of_the_pseudo_inputs_posteriors() -> None:
    m = vamp()
    z = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mu, logvar = m.encoder(torch.sigmoid(m.pseudo_inputs).reshape(5, 8, 8) * 16)
        comp = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z[:, None]).sum(-1)
        want = torch.logsumexp(comp, dim=1) - math.log(5)
        assert torch.allclose(m.log_prior(z), want, atol=1e-4)
        # the draw: component floor(u * C), then mu_c + sigma_c * eps
        eps, u = torch.randn(7, 4), torch.tensor([[0.0], [0.19], [0.2], [0.5], [0.79], [0.81], [0.9999]])
        c = torch.tensor([0, 0, 1, 2, 3, 4, 4])
        assert torch.allclose(m.prior(eps, u), mu[c] + torch.exp(0.5 * logvar[c]) * eps, atol=1e-5)


def test_vamp_prior_density_integrates_to_one_in_one_dimension() -> None:
    torch.manual_seed(0)
    m = VAE(DIGITS, latent_dim=1, hidden=16, prior_components=3).eval()
    z = torch.linspace(-30, 30, 60001).unsqueeze(-1)
    with torch.no_grad():
        mass = float(torch.exp(m.log_prior(z)).sum() * (z[1, 0] - z[0, 0]))
    assert mass == pytest.approx(1.0, abs=1e-3)


def test_standard_prior_has_no_prior_graph_and_the_old_noise_order() -> None:
    torch.manual_seed(0)
    m = VAE(DIGITS, latent_dim=4, hidden=32).eval()
    assert m.prior is None and m.log_prior is None and "prior_components" not in m.arch
    assert set(bind(m, "latent_variable", DIGITS).graphs) == {"encoder", "decoder", "log_weights"}
    noise = Noise(3)
    z = torch.from_numpy(noise.normal(5, 4))
    u = torch.from_numpy(noise.uniform(5, 64))
    with torch.no_grad():
        expected = categorical_from_uniform(m.decoder(z), u)
        assert torch.equal(m.sample(5, Noise(3)).reshape(5, 64), expected)


def test_vamp_log_weights_use_the_learned_prior_and_bind_checks_them(digits: torch.Tensor) -> None:
    m = vamp()
    x = digits[:6]
    eps = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mu, logvar = m.encoder(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        rec = m.log_likelihood_given_z(x, z)
        log_q = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + logvar).sum(-1)
        want = rec + m.log_prior(z) - log_q
        assert torch.allclose(m.log_weights(x, eps), want, atol=1e-4)
        assert torch.allclose(LogWeights(m, DIGITS)(x, eps), want, atol=1e-4)
    graphs = bind(m, "latent_variable", DIGITS).graphs
    assert set(graphs) == {"encoder", "decoder", "log_weights", "prior"}
    assert list(graphs["prior"].inputs) == ["eps", "u"] and graphs["prior"].outputs == ["z"]


def test_served_program_draws_z_through_the_prior_graph_like_the_model(digits: torch.Tensor) -> None:
    m = vamp()
    bound = bind(m, "latent_variable", DIGITS)
    program, runner = serving_program(bound), TorchRunner(bound.graphs)
    served = run_sync(program.sample(runner, 9, Noise(4), temperature=0.8))
    assert runner.calls.get("prior") == 1
    with torch.no_grad():
        assert np.array_equal(served.x, m.sample(9, Noise(4), temperature=0.8).numpy())
        noise = Noise(4)
        eps = torch.from_numpy(noise.normal(9, 4)) * 0.8
        z = m.prior(eps, torch.from_numpy(noise.uniform(9, 1)))
    assert np.allclose(served.latents, z.numpy(), atol=1e-6)
    x = digits[:5]
    served_lp = run_sync(program.log_likelihood(runner, x.numpy(), Noise(5), importance_samples=20))
    assert np.allclose(served_lp, m.log_prob(x, Noise(5), importance_samples=20).detach().numpy(), atol=1e-3)


@pytest.mark.parametrize("train_samples", [1, 4])
def test_vamp_training_lowers_the_loss(digits: torch.Tensor, train_samples: int) -> None:
    m = vamp(train_samples=train_samples).train()

    def loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return float(m.loss(digits))

    before = loss()
    opts = m.make_optimizers(2e-3, 0.0)
    start = m.pseudo_inputs.detach().clone()
    for _ in range(40):
        m.training_step(digits, opts, grad_clip=10.0)
    assert loss() < before - 5
    assert not torch.equal(m.pseudo_inputs.detach(), start)  # the pseudo-inputs learn


def test_logistic_decoder_gives_normalised_level_probabilities() -> None:
    torch.manual_seed(0)
    m = VAE(DIGITS, latent_dim=4, hidden=32, logistic=3).eval()
    with torch.no_grad():
        logits = m.decoder(torch.randn(5, 4))
    assert logits.shape == (5, 64, 17)
    assert torch.allclose(torch.logsumexp(logits, -1), torch.zeros(5, 64), atol=1e-5)
    with pytest.raises(ValueError, match="logistic"):
        VAE(DIGITS, logit_rank=3, logistic=3)


def test_weight_average_answers_in_eval_mode_and_survives_a_state_dict(digits: torch.Tensor) -> None:
    torch.manual_seed(0)
    m = VAE(DIGITS, latent_dim=4, hidden=32, ema=0.9, lr_half_life=5).train()
    opts = m.make_optimizers(1e-2, 0.0)
    for _ in range(20):
        m.training_step(digits, opts, grad_clip=10.0)
    assert opts[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 4, rel=1e-4)
    raw = m.enc[0].weight.detach().clone()
    m.eval()
    avg = m.enc[0].weight.detach().clone()
    assert not torch.equal(raw, avg)
    assert torch.equal(m.ema_enc_0_weight, raw)  # the raw weights wait in the buffers
    m2 = VAE(DIGITS, latent_dim=4, hidden=32, ema=0.9, lr_half_life=5)
    m2.load_state_dict(m.state_dict())
    m2.eval()
    assert torch.equal(m2.enc[0].weight, avg)
    m.train()
    assert torch.equal(m.enc[0].weight, raw)


def test_conv_encoder_and_decoder_keep_the_contract(digits: torch.Tensor) -> None:
    torch.manual_seed(0)
    m = VAE(DIGITS, latent_dim=4, hidden=32, conv=4, logit_rank=3, prior_components=3).eval()
    with torch.no_grad():
        mu, logvar = m.encoder(digits[:5])
        assert mu.shape == logvar.shape == (5, 4)
        assert m.decoder(mu).shape == (5, 64, 17)
        # pixel (i, j) of the decoder's maps is value i * 8 + j of the image
        maps = m.dec[:-1](mu)
        assert torch.equal(m.dec(mu).reshape(5, 64, 3)[:, 8 * 2 + 5], maps[:, :, 2, 5])
    assert set(bind(m, "latent_variable", DIGITS, rows=digits[:8].numpy()).graphs) == {
        "encoder", "decoder", "log_weights", "prior"}
    with pytest.raises(ValueError, match="conv"):
        VAE(DataSpec("odd", (7, 8), "discrete", levels=17), conv=4)


def mog(**arch: object) -> VAE:
    torch.manual_seed(0)
    return VAE(DIGITS, latent_dim=4, hidden=32, prior_gaussians=3, **arch).eval()


def test_gaussian_mixture_prior_is_its_components_mixture_and_draws_by_u() -> None:
    m = mog()
    assert m.arch["prior_gaussians"] == 3 and "prior_components" not in m.arch
    with torch.no_grad():
        m.prior_raw_logvar.copy_(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))
        mu, logvar = m.prior_mu, m.prior_components_params()[1]
        assert not torch.allclose(mu[0], mu[1])  # distinct components from the start
        z = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
        comp = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z[:, None]).sum(-1)
        assert torch.allclose(m.log_prior(z), torch.logsumexp(comp, dim=1) - math.log(3), atol=1e-4)
        eps, u = torch.randn(5, 4), torch.tensor([[0.0], [0.33], [0.34], [0.67], [0.9999]])
        c = torch.tensor([0, 0, 1, 2, 2])
        assert torch.allclose(m.prior(eps, u), mu[c] + torch.exp(0.5 * logvar[c]) * eps, atol=1e-6)
    with pytest.raises(ValueError, match="prior_gaussians"):
        VAE(DIGITS, prior_components=2, prior_gaussians=2)


def test_gaussian_mixture_prior_density_integrates_to_one_in_one_dimension() -> None:
    torch.manual_seed(0)
    m = VAE(DIGITS, latent_dim=1, hidden=16, prior_gaussians=3).eval()
    with torch.no_grad():
        m.prior_raw_logvar.copy_(torch.tensor([[-1.0], [0.5], [2.0]]))
        z = torch.linspace(-40, 40, 80001).unsqueeze(-1)
        mass = float(torch.exp(m.log_prior(z)).sum() * (z[1, 0] - z[0, 0]))
    assert mass == pytest.approx(1.0, abs=1e-3)


def test_gaussian_mixture_prior_is_served_through_the_prior_graph(digits: torch.Tensor) -> None:
    m = mog(conv=4)
    bound = bind(m, "latent_variable", DIGITS, rows=digits[:8].numpy())
    assert set(bound.graphs) == {"encoder", "decoder", "log_weights", "prior"}
    program, runner = serving_program(bound), TorchRunner(bound.graphs)
    served = run_sync(program.sample(runner, 6, Noise(7)))
    assert runner.calls.get("prior") == 1
    with torch.no_grad():
        assert np.array_equal(served.x, m.sample(6, Noise(7)).numpy())
    x = digits[:4]
    served_lp = run_sync(program.log_likelihood(runner, x.numpy(), Noise(2), importance_samples=16))
    assert np.allclose(served_lp, m.log_prob(x, Noise(2), importance_samples=16).detach().numpy(), atol=1e-3)


def test_gaussian_mixture_prior_learns_with_the_importance_weighted_bound(digits: torch.Tensor) -> None:
    m = mog(train_samples=4).train()

    def loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return float(m.loss(digits))

    before, start = loss(), m.prior_mu.detach().clone()
    opts = m.make_optimizers(2e-3, 0.0)
    for _ in range(40):
        m.training_step(digits, opts, grad_clip=10.0)
    assert loss() < before - 5
    assert not torch.equal(m.prior_mu.detach(), start)


def test_dreg_gradient_is_the_importance_weighted_bounds_with_less_variance(digits: torch.Tensor) -> None:
    """arch.dreg: the same loss and decoder gradient; the encoder's gradient agrees in expectation (the mean over
    20000 copies of one image, each with its own draws) and varies far less from draw to draw."""
    def grads(dreg: bool, x: torch.Tensor, seed: int = 1) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        m = VAE(DIGITS, latent_dim=2, hidden=16, train_samples=3, dreg=dreg).train()
        torch.manual_seed(seed)
        loss = m.loss(x)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in m.dec.parameters()], [p.grad.clone()
                                                                                   for p in m.enc.parameters()]

    x = digits[:4]
    (la, dec_a, enc_a), (lb, dec_b, enc_b) = grads(False, x), grads(True, x)
    assert la == pytest.approx(lb, abs=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(dec_a, dec_b, strict=True))
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(enc_a, enc_b, strict=True))
    many = digits[5:6].expand(20000, 8, 8)
    # the encoder's output layer's bias (mu and log-variance of the 2 latents): about (0.04, -0.06, -0.015, 0.01)
    iw = [grads(False, many, seed)[2][-1] for seed in (1, 2)]
    dreg = [grads(True, many, seed)[2][-1] for seed in (1, 2)]
    assert torch.allclose(iw[0], dreg[0], atol=0.01)
    assert (dreg[0] - dreg[1]).abs().max() < 0.2 * (iw[0] - iw[1]).abs().max()
    assert VAE(DIGITS, dreg=True).arch["dreg"] is True and "dreg" not in VAE(DIGITS).arch
