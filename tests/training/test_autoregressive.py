"""The two autoregressive models: normalised exact likelihoods, causality, sampling law, training, RNN steps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.training.arcnn import CausalConvAR
from genserve.training.arrnn import RecurrentAR
from genserve.training.checkpoint import load_checkpoint, save_checkpoint
from genserve.training.data import load_dataset

SMALL = {
    "arcnn": (CausalConvAR, {"channels": 8, "layers": 2, "dropout": 0.1, "components": 3}),
    "arrnn": (RecurrentAR, {"hidden": 8, "layers": 2, "embed": 4, "dropout": 0.1, "weight_drop": 0.2,
                            "components": 3}),
}
# discrete variants: the RNN that also reads the pixel above from a row buffer in its state
VARIANTS = {**SMALL, "arrnn-above": (RecurrentAR, {"hidden": 8, "layers": 2, "embed": 4, "dropout": 0.1,
                                                    "input_drop": 0.2, "above": True})}
TINY = {
    "row3": DataSpec("tiny", (3,), "discrete", levels=3),
    "image2x2": DataSpec("tiny", (2, 2), "discrete", levels=3),
}
MOONS_LIKE = DataSpec("toy", (2,), "continuous", mean=(0.5, -0.25), std=(2.0, 0.5))


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make(model: str, spec: DataSpec, scramble: float = 0.5, seed: int = 0) -> CausalConvAR | RecurrentAR:
    """A small model in eval mode whose weights are pushed away from initialisation, so that every
    conditional is far from uniform and the checks below are not passed by accident."""
    cls, arch = VARIANTS[model]
    torch.manual_seed(seed)
    m = cls(spec, **arch)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scramble * torch.randn_like(p))
    return m.eval()


def all_configurations(spec: DataSpec) -> torch.Tensor:
    grid = list(itertools.product(range(spec.levels), repeat=spec.dim))
    return torch.tensor(grid, dtype=torch.float32).reshape(-1, *spec.shape)


# The pixel above exists for images only: arrnn-above takes the image domains (and refuses rows, tested below).
CONFIGURATION_CASES = [(model, name) for model in sorted(VARIANTS) for name in sorted(TINY)
                       if model != "arrnn-above" or TINY[name].is_image]


@pytest.mark.parametrize("model, spec_name", CONFIGURATION_CASES)
def test_probabilities_of_every_configuration_sum_to_one(model: str, spec_name: str) -> None:
    spec = TINY[spec_name]
    m = make(model, spec)
    x = all_configurations(spec)  # 27 or 81 configurations
    with torch.no_grad():
        p = m.log_prob(x, Noise(0)).double().exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert p.max() < 0.9, "scrambled weights should give a spread-out distribution"


def test_the_pixel_above_is_refused_for_rows() -> None:
    rows = next(spec for spec in TINY.values() if not spec.is_image)
    with pytest.raises(ValueError, match="above"):
        make("arrnn-above", rows)


@pytest.mark.parametrize("model", sorted(SMALL))
def test_continuous_density_integrates_to_one_in_raw_units(model: str) -> None:
    # A Riemann sum over the raw plane: only right if the normalisation's Jacobian (1 / prod std) is included.
    m = make(model, MOONS_LIKE, scramble=0.1)
    a = torch.linspace(0.5 - 8 * 2.0, 0.5 + 8 * 2.0, 501)
    b = torch.linspace(-0.25 - 8 * 0.5, -0.25 + 8 * 0.5, 501)
    xa, xb = torch.meshgrid(a, b, indexing="ij")
    x = torch.stack([xa.reshape(-1), xb.reshape(-1)], dim=1)
    with torch.no_grad():
        p = m.log_prob(x, Noise(0)).double().exp()
    cell = float((a[1] - a[0]) * (b[1] - b[0]))
    assert (p.sum() * cell).item() == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("model", sorted(VARIANTS))
def test_conditionals_are_causal_and_see_the_whole_prefix(model: str) -> None:
    spec = load_dataset("digits").spec
    m = make(model, spec, scramble=0.2)
    D = spec.dim
    x = torch.randint(0, spec.levels, (1, D)).float()
    y = x.repeat(D, 1)
    y[torch.arange(D), torch.arange(D)] = (x[0] + 5) % spec.levels  # row j changes pixel j only
    with torch.no_grad():  # one batch, so that every row is computed alike and "unchanged" means bit-equal
        out = m.conditionals(torch.cat([x, y]).reshape(D + 1, 8, 8))[0]
    changed = (out[1:] - out[:1]).abs().amax(-1) > 0  # (j, i): did changing x_j change p(x_i | x_<i)?
    for j in range(D):
        assert not changed[j, : j + 1].any(), f"changing x_{j} changed conditionals {changed[j, : j + 1].nonzero()}"
        if j < D - 1:
            assert changed[j, j + 1], f"p(x_{j + 1} | x_<{j + 1}) ignores x_{j}"
        if model == "arcnn" and j < D - 1:  # no blind spot: the last pixel sees every earlier pixel
            assert changed[j, D - 1], f"p(x_{D - 1} | x_<{D - 1}) ignores x_{j}"


@pytest.mark.parametrize("model", sorted(SMALL))
def test_sampling_follows_the_model_distribution(model: str) -> None:
    spec = TINY["row3"]
    m = make(model, spec)
    x = all_configurations(spec)
    with torch.no_grad():
        p = m.log_prob(x, Noise(0)).double().exp().numpy()
    n = 20000
    s = m.sample(n, Noise(3)).numpy().astype(int)
    counts = np.bincount(s[:, 0] * 9 + s[:, 1] * 3 + s[:, 2], minlength=27)
    # every frequency within 5 standard errors of its probability
    assert np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-4)


@pytest.mark.parametrize("model", sorted(VARIANTS))
def test_sampling_is_reproducible_and_in_the_domain(model: str) -> None:
    spec = load_dataset("digits").spec
    m = make(model, spec, scramble=0.0)
    a, b = m.sample(5, Noise(11)), m.sample(5, Noise(11))
    assert a.shape == (5, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, m.sample(5, Noise(12)))
    assert a.min() >= 0 and a.max() <= 16 and torch.equal(a, a.round())
    # temperature -> 0 is greedy decoding: every pixel the argmax of its conditional given the prefix
    g = m.sample(3, Noise(1), temperature=1e-4)
    with torch.no_grad():
        best = m.conditionals(g)[0].argmax(-1).float()
    assert torch.equal(best, g.reshape(3, -1))


@pytest.mark.parametrize("model", sorted(SMALL))
def test_continuous_sampling_moments(model: str) -> None:
    # With one mixture component and zeroed weights, every conditional is N(0, 1) in normalised units.
    cls, arch = SMALL[model]
    m = cls(MOONS_LIKE, **{**arch, "components": 1}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    x = m.sample(20000, Noise(5)).numpy()
    np.testing.assert_allclose(x.mean(0), MOONS_LIKE.mean, atol=0.05)
    np.testing.assert_allclose(x.std(0), MOONS_LIKE.std, rtol=0.03)


@pytest.mark.parametrize("model", sorted(VARIANTS))
def test_a_few_training_steps_lower_the_loss(model: str) -> None:
    data = load_dataset("digits")
    cls, arch = VARIANTS[model]
    torch.manual_seed(0)
    m = cls(data.spec, **{**arch, "dropout": 0.0})
    x = torch.as_tensor(data.train[:32])
    opts = m.make_optimizers(lr=1e-2, weight_decay=0.0)
    m.eval()
    before = m.validation_loss(x)
    m.train()
    for _ in range(10):
        m.training_step(x, opts, grad_clip=5.0)
    m.eval()
    assert m.validation_loss(x) < before - 5.0  # nats per image
    assert float(m(x).detach()) == pytest.approx(float(m.loss(x).detach()))  # forward is the loss (DDP)


@pytest.mark.parametrize("model", ["arrnn", "arrnn-above"])
def test_rnn_steps_reproduce_the_one_pass_conditionals(model: str) -> None:
    data = load_dataset("digits")
    m = make(model, data.spec, scramble=0.2)
    x = torch.as_tensor(data.test[:6]).reshape(6, -1)
    with torch.no_grad():
        full = m.conditionals(x)[0]
        h, prev = torch.zeros(6, m.state_size), torch.zeros(6, 1)
        for t in range(m.dim):
            logits, h = m.step(prev, h, torch.full((6, 1), float(t)))
            torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0)
            prev = x[:, t:t + 1]


def test_checkpoint_round_trip(tmp_path) -> None:
    data = load_dataset("digits")
    for name in SMALL:
        m = make(name, data.spec, scramble=0.1)
        save_checkpoint(tmp_path / f"{name}.pt", m)
        back, _ = load_checkpoint(tmp_path / f"{name}.pt")
        x = torch.as_tensor(data.test[:4])
        with torch.no_grad():
            torch.testing.assert_close(back.log_prob(x, Noise(0)), m.log_prob(x, Noise(0)))


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="kernel must be odd"):
        CausalConvAR(TINY["row3"], kernel=4)
    with pytest.raises(ValueError, match="mean/std"):
        RecurrentAR(DataSpec("toy", (2,), "continuous"))
    with pytest.raises(ValueError, match="discrete images"):
        RecurrentAR(TINY["row3"], above=True)


def test_learning_rate_half_life_survives_resume() -> None:
    spec = TINY["row3"]
    m = RecurrentAR(spec, hidden=4, embed=2, lr_half_life=2)
    (opt,) = m.make_optimizers(lr=0.1, weight_decay=0.0)
    x = torch.zeros(4, 3)
    for _ in range(4):
        m.training_step(x, [opt], grad_clip=0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 4)  # two half-lives
    (again,) = m.make_optimizers(lr=0.1, weight_decay=0.0)
    again.load_state_dict(opt.state_dict())
    for _ in range(20):
        m.training_step(x, [again], grad_clip=0.0)
    assert again.param_groups[0]["lr"] == pytest.approx(0.1 / 20)  # decays on from the resumed value to its floor


@pytest.mark.parametrize("model", sorted(SMALL))
def test_weight_average_is_used_in_eval_mode_and_survives_checkpoints(model: str, tmp_path) -> None:
    data = load_dataset("digits")
    cls, arch = SMALL[model]
    torch.manual_seed(0)
    m = cls(data.spec, **{**arch, "ema": 0.5})
    x = torch.as_tensor(data.train[:16])
    (opt,) = m.make_optimizers(lr=1e-2, weight_decay=0.0)
    m.train()
    name = "position_bias"
    average = m.position_bias.detach().clone()
    for n in range(3):
        m.training_step(x, [opt], grad_clip=0.0)
        decay = min(0.5, (1 + n) / (10 + n))
        average = decay * average + (1 - decay) * m.position_bias.detach()
    raw = m.position_bias.detach().clone()
    m.eval()  # eval mode answers with the average; the raw weights wait in the buffers
    torch.testing.assert_close(m.position_bias.detach(), average)
    torch.testing.assert_close(m.state_dict()[f"ema_{name}"], raw)
    lp = m.log_prob(x).detach()
    save_checkpoint(tmp_path / "m.pt", m)
    back, _ = load_checkpoint(tmp_path / "m.pt")  # loads in eval mode: the averaged weights
    torch.testing.assert_close(back.log_prob(x).detach(), lp)
    m.train()  # training goes on from the raw weights
    torch.testing.assert_close(m.position_bias.detach(), raw)
