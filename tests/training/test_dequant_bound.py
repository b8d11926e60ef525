"""The evaluated dequantisation bound (realnvp, pPCA ``log_prob``) is the log-mean-exp of the draws, K = ``draws``.

Served and evaluated numbers are the same arithmetic (tests/server/test_program_dequant.py checks the serving
side, export's parity checks the two against each other).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genserve.core.noise import Noise
from genserve.training.data import load_dataset
from genserve.training.ppca import PPCA
from genserve.training.realnvp import RealNVP


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def models(spec, x: torch.Tensor):
    torch.manual_seed(0)
    flow = RealNVP(spec, coupling_layers=2, hidden=16).eval()
    ppca = PPCA(spec, latent_dim=4)
    ppca.fit_closed_form(x)
    return {"realnvp": (flow, lambda x, u: flow.transform(x, u)[1]), "ppca": (ppca, ppca.log_density)}


@pytest.mark.parametrize("name", ["realnvp", "ppca"])
def test_log_prob_is_the_log_mean_exp_of_its_draws(digits, name: str) -> None:
    x = torch.as_tensor(digits.test[:30])
    model, one_draw = models(digits.spec, torch.as_tensor(digits.train))[name]
    noise = Noise(4)
    with torch.no_grad():
        draws = torch.stack([one_draw(x, torch.from_numpy(noise.uniform(30, 64))) for _ in range(8)]).double()
        got = model.log_prob(x, Noise(4), draws=8).double()
    want = torch.logsumexp(draws, dim=0) - np.log(8)
    assert torch.allclose(got, want, atol=1e-4)
    assert (got >= draws.mean(dim=0) - 1e-4).all()  # never below the mean of the draws (Jensen)
    with torch.no_grad():  # one draw: the log-mean-exp and the mean are the same number
        assert torch.allclose(model.log_prob(x, Noise(4), draws=1).double(), draws[0], atol=1e-4)


def test_the_flow_bound_rises_with_the_number_of_draws(digits) -> None:
    x = torch.as_tensor(digits.test[:50])
    flow, _ = models(digits.spec, torch.as_tensor(digits.train))["realnvp"]
    with torch.no_grad():
        means = [np.mean([flow.log_prob(x, Noise(s), draws=k).mean().item() for s in range(2)]) for k in (1, 4, 16)]
    assert means[0] < means[1] < means[2]
