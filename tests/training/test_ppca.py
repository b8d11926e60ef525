"""pPCA: the closed-form maximum-likelihood fit and its exact Gaussian log-likelihood, checked against scipy."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import multivariate_normal

from genserve.core.noise import Noise
from genserve.training.data import load_dataset
from genserve.training.ppca import PPCA


def test_log_likelihood_equals_scipy_multivariate_normal():
    data = load_dataset("gmm", seed=0)
    m = PPCA(data.spec, latent_dim=1)
    m.fit_closed_form(torch.as_tensor(data.train))
    W, mu, s2 = m.W.double().numpy(), m.mu.double().numpy(), float(torch.exp(m.log_sigma2))
    mean, std = np.array(data.spec.mean), np.array(data.spec.std)
    # model space is normalised: p(x) = N((x-mean)/std; mu, C) / prod(std)
    cov = W @ W.T + s2 * np.eye(2)
    ref = multivariate_normal(mu, cov).logpdf((data.test - mean) / std) - np.log(std).sum()
    np.testing.assert_allclose(m.log_prob(torch.as_tensor(data.test), Noise(0)).numpy(), ref, atol=1e-4)


def test_fit_is_the_maximum_likelihood_solution():
    data = load_dataset("digits")
    x = torch.as_tensor(data.train)
    m = PPCA(data.spec, latent_dim=8)
    m.fit_closed_form(x)
    best = m.log_density(x, torch.full((1000, 64), 0.5)).mean()
    # Perturbing W or sigma away from the closed form lowers the training likelihood.
    for scale in (0.9, 1.1):
        p = PPCA(data.spec, latent_dim=8)
        p.fit_closed_form(x)
        W = p.W * scale
        C = W @ W.T + torch.exp(p.log_sigma2) * torch.eye(64)
        p.precision.copy_(torch.linalg.inv(C))
        p.logdet.copy_(torch.linalg.slogdet(C)[1])
        assert p.log_density(x, torch.full((1000, 64), 0.5)).mean() < best


def test_encode_decode_recovers_the_principal_subspace():
    data = load_dataset("digits")
    m = PPCA(data.spec, latent_dim=40)
    m.fit_closed_form(torch.as_tensor(data.train))
    x = torch.as_tensor(data.test[:50])
    recon = m.generate(m.encode(x), torch.zeros(50, 64))
    assert float(((recon - x) ** 2).mean()) < 0.25 * float(((x - x.mean()) ** 2).mean())
