"""The family contracts refuse modules that break them, with a message naming what is wrong, writing nothing.

Each case is a module a user could plausibly write with one mistake; the checks are those of export.contract.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from genserve.core.spec import DataSpec
from genserve.export.contract import FAMILIES, ContractError, bind
from genserve.export.repository import export_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from user_models import ConvVAE, TransformerAR  # noqa: E402

BIN16 = DataSpec("binary16", (16, 16), "discrete", levels=2)
DIGITS = DataSpec("digits", (8, 8), "discrete", levels=17)
PLANE = DataSpec("plane", (2,), "continuous")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class AffineFlow(nn.Module):
    """z = (x - b) * exp(s): a one-layer flow with an exact inverse; ``lie`` breaks one part of it."""

    def __init__(self, dim: int = 2, lie: str = "") -> None:
        super().__init__()
        self.s = nn.Parameter(0.3 * torch.randn(dim))
        self.b = nn.Parameter(torch.randn(dim))
        self.lie = lie

    def transform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = (x - self.b) * torch.exp(self.s)
        log_prob = -0.5 * (z ** 2).sum(-1) - 0.5 * x.shape[1] * np.log(2 * np.pi) + self.s.sum()
        if self.lie == "logdet":
            log_prob = log_prob + 0.5
        if self.lie == "shape":
            z = z[:, :1]
        return z, log_prob

    def inverse(self, z: Tensor) -> Tensor:
        x = z * torch.exp(-self.s) + self.b
        return x * 1.01 if self.lie == "inverse" else x


def test_a_correct_module_binds_with_its_family_graphs() -> None:
    bound = bind(AffineFlow(), "flow", PLANE)
    assert set(bound.graphs) == {"forward", "inverse"}
    assert bound.operations == FAMILIES["flow"].operations and bound.likelihood_kind == "exact"


@pytest.mark.parametrize(("lie", "message"), [
    ("logdet", "disagrees with log N(z; 0, I) + log|det dz/dx|"),
    ("inverse", "inverse(z) does not invert transform"),
    ("shape", "z has shape (4, 1); the contract needs (4, 2)"),
])
def test_flow_contract_violations_are_named(lie: str, message: str) -> None:
    with pytest.raises(ContractError, match=None) as err:
        bind(AffineFlow(lie=lie), "flow", PLANE)
    assert message in str(err.value)


def test_a_missing_method_is_named_with_what_it_must_return() -> None:
    class NoInverse(AffineFlow):
        inverse = None

    with pytest.raises(ContractError, match="neither inverse"):
        bind(NoInverse(), "flow", PLANE)
    with pytest.raises(ContractError, match=r"does not provide transform\(x\)"):
        bind(nn.Linear(2, 2), "flow", PLANE)
    with pytest.raises(ContractError, match="unknown family 'diffusion'"):
        bind(AffineFlow(), "diffusion", PLANE)


def test_an_autoregressive_model_that_sees_the_future_fails_the_perturbation_check() -> None:
    class Peeking(TransformerAR):
        def conditionals(self, x: Tensor) -> Tensor:  # adds x_{i+1} to the logits of position i
            out = super().conditionals(x)
            nxt = torch.roll(x.reshape(len(x), -1), -1, dims=1)
            return out + 0.1 * nxt.unsqueeze(-1)

    with pytest.raises(ContractError, match="is not autoregressive: the conditional at position 0 changes"):
        bind(Peeking(DIGITS.dim, DIGITS.levels), "autoregressive", DIGITS)


def test_a_step_graph_that_disagrees_with_the_full_pass_is_refused() -> None:
    class Forgetful(TransformerAR):
        def step(self, x_prev: Tensor, cache: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            return super().step(x_prev, torch.zeros_like(cache), t)  # drops the key/value cache

    with pytest.raises(ContractError, match=r"step at position 1 disagrees with conditionals\(x\)\[:, 1\]"):
        bind(Forgetful(DIGITS.dim, DIGITS.levels), "autoregressive", DIGITS)


def test_randomness_inside_a_graph_is_refused() -> None:
    class NoisyDecoder(ConvVAE):
        def decoder(self, z: Tensor) -> Tensor:
            return super().decoder(z + 0.1 * torch.randn_like(z))

    with pytest.raises(ContractError, match="randomness|random numbers inside"):
        bind(NoisyDecoder(), "latent_variable", BIN16)


def test_wrong_output_shapes_and_a_spec_that_does_not_fit_are_named() -> None:
    class WideEncoder(ConvVAE):
        def encoder(self, x: Tensor) -> tuple[Tensor, Tensor]:
            mu, logvar = super().encoder(x)
            return torch.cat([mu, mu[:, :1]], 1), logvar

    with pytest.raises(ContractError, match=r"encoder\(x\) mu has shape \(4, 9\); the contract needs \(4, 8\)"):
        bind(WideEncoder(), "latent_variable", BIN16)
    with pytest.raises(ContractError, match=r"failed on inputs of shapes \(4, 8, 8\).*does the spec match"):
        bind(ConvVAE(size=16), "latent_variable", DIGITS)


def test_an_energy_gradient_that_is_not_the_gradient_is_refused() -> None:
    class Quadratic(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.a, self.scale = nn.Parameter(torch.ones(2)), scale

        def energy(self, x: Tensor) -> Tensor:
            return 0.5 * (self.a * x ** 2).sum(-1)

        def energy_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.energy(x), self.scale * self.a * x

    bind(Quadratic(1.0), "energy", PLANE)
    with pytest.raises(ContractError, match="energy_grad's gradient disagrees with autograd"):
        bind(Quadratic(2.0), "energy", PLANE)


def test_a_refused_module_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ContractError):
        export_model(AffineFlow(lie="logdet"), "flow", PLANE, tmp_path / "repo", name="bad")
    assert not (tmp_path / "repo" / "bad").exists()
    with pytest.raises(ValueError, match="export data row 0"):
        export_model(AffineFlow(), "flow", PLANE, tmp_path / "repo", name="bad", data=np.full((3, 2), np.nan))
    assert not (tmp_path / "repo" / "bad").exists()
