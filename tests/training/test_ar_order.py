"""Autoregressive models in other pixel orders (core.orders): exact likelihood under the order, causal in it,
RNN steps in it, and served (log-likelihood, samples, ONNX export) in it as PyTorch computes it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from genserve.core.noise import Noise
from genserve.core.orders import ORDERS, order_name, order_positions
from genserve.core.spec import DataSpec
from genserve.export.contract import ContractError, bind
from genserve.export.repository import export_model, serving_program
from genserve.export.torch_runner import TorchRunner
from genserve.server.programs.base import run_sync
from genserve.training.arcnn import CausalConvAR
from genserve.training.arrnn import RecurrentAR
from genserve.training.checkpoint import load_checkpoint, save_checkpoint
from genserve.training.data import load_dataset

ARCH = {
    "arcnn": (CausalConvAR, {"channels": 8, "layers": 1, "logistic": 2, "gated": True, "shift_aug": 0.5}),
    "arrnn": (RecurrentAR, {"hidden": 8, "layers": 2, "embed": 4, "above": True, "shift_aug": 0.5}),
}
IMAGE2X3 = DataSpec("tiny", (2, 3), "discrete", levels=3)
SQUARE = DataSpec("tiny", (2, 2), "discrete", levels=3)
RGB = DataSpec("tiny", (2, 2, 2), "discrete", levels=2)  # two channels per pixel


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make(model: str, spec: DataSpec, order: str, scramble: float = 0.5, **extra) -> CausalConvAR | RecurrentAR:
    cls, arch = ARCH[model]
    torch.manual_seed(0)
    m = cls(spec, **{**arch, **extra}, order=order)
    with torch.no_grad():  # far from initialisation, so that no check passes by accident
        for p in m.parameters():
            p.add_(scramble * torch.randn_like(p))
    return m.eval()


def test_order_positions() -> None:
    assert order_positions((2, 3), "raster").tolist() == [0, 1, 2, 3, 4, 5]
    assert order_positions((2, 3), "flip_h").tolist() == [2, 1, 0, 5, 4, 3]
    assert order_positions((2, 3), "flip_v").tolist() == [3, 4, 5, 0, 1, 2]
    assert order_positions((2, 3), "rot180").tolist() == [5, 4, 3, 2, 1, 0]
    assert order_positions((2, 2), "transpose").tolist() == [0, 2, 1, 3]
    # channels of a pixel stay in turn: (H, W, C) = (2, 2, 2), pixel (0, 1) holds positions 2, 3
    assert order_positions((2, 2, 2), "transpose").tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    with pytest.raises(ValueError, match="square"):
        order_positions((2, 3), "transpose")
    with pytest.raises(ValueError, match="images"):
        order_positions((5,), "flip_h")
    with pytest.raises(ValueError, match="one of"):
        order_positions((2, 2), "spiral")
    assert order_name({}) == "raster" and order_name({"order": 4.0}) == "rot180"
    with pytest.raises(ValueError, match="order"):
        order_name({"order": 9.0})


def test_orders_are_checked_by_the_models() -> None:
    with pytest.raises(ValueError, match="square"):
        CausalConvAR(IMAGE2X3, channels=4, layers=1, order="transpose")
    with pytest.raises(ValueError, match="one of"):
        RecurrentAR(SQUARE, hidden=4, order="diagonal")
    rows = DataSpec("toy", (2,), "continuous", mean=(0.0, 1.0), std=(1.0, 2.0))
    with pytest.raises(ValueError, match="images"):
        RecurrentAR(rows, hidden=4, order="flip_h")


CASES = [(model, spec, order) for model in sorted(ARCH) for spec, orders in
         (("image2x3", ("flip_h", "flip_v", "rot180")), ("square", ("transpose",)), ("rgb", ("rot180", "transpose")))
         for order in orders]
SPECS = {"image2x3": IMAGE2X3, "square": SQUARE, "rgb": RGB}


@pytest.mark.parametrize("model, spec_name, order", CASES)
def test_probabilities_sum_to_one_and_the_order_is_causal(model: str, spec_name: str, order: str) -> None:
    spec = SPECS[spec_name]
    m = make(model, spec, order)
    grid = torch.tensor(list(itertools.product(range(spec.levels), repeat=spec.dim)), dtype=torch.float32)
    with torch.no_grad():
        lp = m.log_prob(grid.reshape(-1, *spec.shape))
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-5)
    # the conditional of step t (natural position positions[t]) sees exactly the steps before it
    pos = m.positions
    assert pos == order_positions(spec.shape, order).tolist() and pos != list(range(spec.dim))
    x = grid[-7:-3]
    with torch.no_grad():
        base = m.conditionals(x.reshape(-1, *spec.shape))[0]
        for t in range(spec.dim):
            x2 = x.clone()
            x2[:, pos[t]] = (x2[:, pos[t]] + 1) % spec.levels
            out = m.conditionals(x2.reshape(-1, *spec.shape))[0]
            changed = (out - base).abs().amax(dim=(0, 2)) > 1e-6
            assert not changed[pos[:t + 1]].any()
            assert t == spec.dim - 1 or changed[pos[t + 1:]].any()  # later steps read it


@pytest.mark.parametrize("order", ["flip_v", "rot180"])
def test_rnn_steps_follow_the_order(order: str) -> None:
    m = make("arrnn", IMAGE2X3, order)
    x = torch.randint(0, 3, (5, 2, 3)).float()
    flat = x.reshape(5, -1)
    with torch.no_grad():
        want = m.conditionals(x)[0]
        h, prev = torch.zeros(5, m.state_size), torch.zeros(5, 1)
        for t, i in enumerate(m.positions):
            got, h = m.step(prev, h, torch.full((5, 1), float(t)))
            torch.testing.assert_close(got, want[:, i], atol=1e-5, rtol=0)
            prev = flat[:, i:i + 1]


def test_raster_is_the_model_as_before(tmp_path) -> None:
    """order=raster changes nothing: same arch dict, no program parameter, same numbers as the default."""
    a = make("arcnn", IMAGE2X3, "raster")
    cls, arch = ARCH["arcnn"]
    torch.manual_seed(0)
    b = cls(IMAGE2X3, **arch)  # no order argument at all
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.5 * torch.randn_like(p))
    b.eval()
    assert a.arch == b.arch and "order" not in a.arch and a.program_parameters() == {}
    assert a.state_dict().keys() == b.state_dict().keys()
    m = make("arcnn", IMAGE2X3, "rot180")
    assert m.arch["order"] == "rot180" and m.program_parameters() == {"order": float(ORDERS.index("rot180"))}
    x = torch.randint(0, 3, (4, 2, 3)).float()
    with torch.no_grad():
        torch.testing.assert_close(a.log_prob(x), b.log_prob(x), atol=0, rtol=0)
    save_checkpoint(tmp_path / "m.pt", m)
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.order == "rot180"
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(x), m.log_prob(x), atol=0, rtol=0)


def test_training_with_shift_augmentation_in_another_order() -> None:
    m = make("arcnn", SQUARE, "transpose").train()
    x = torch.randint(0, 3, (8, 2, 2)).float()
    opt = m.make_optimizers(1e-2, 0.0)[0]
    loss = m.loss(x)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("model", sorted(ARCH))
@pytest.mark.parametrize("order", ["transpose", "rot180"])
def test_served_likelihood_and_samples_equal_torch(model: str, order: str) -> None:
    digits = load_dataset("digits")
    m = make(model, digits.spec, order, scramble=0.3)
    bound = bind(m, m.family, digits.spec)
    program, runner = serving_program(bound), TorchRunner(bound.graphs)
    assert program.order == order and program.positions == m.positions
    x = digits.test[:20]
    got = run_sync(program.log_likelihood(runner, x, Noise(0)))
    with torch.no_grad():
        want = m.log_prob(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    runner.calls.clear()
    sampled = run_sync(program.sample(runner, 4, Noise(42), temperature=0.8)).x
    np.testing.assert_array_equal(sampled, m.sample(4, Noise(42), temperature=0.8).numpy())
    assert runner.calls == ({"logits": 64} if model == "arcnn" else {"step": 64})
    if model == "arrnn":  # the step graph and prefix re-reading draw the same positions in the same order
        again = run_sync(program.sample(runner, 4, Noise(42), temperature=0.8, recompute=True)).x
        np.testing.assert_array_equal(again, sampled)


def test_contract_check_uses_the_recorded_order() -> None:
    """A model that is causal in rot180 fails the check when its parameters claim raster, and passes with rot180."""
    m = make("arcnn", IMAGE2X3, "rot180")
    bind(m, m.family, IMAGE2X3)
    m.program_parameters = lambda: {}  # type: ignore[method-assign]
    with pytest.raises(ContractError, match="not autoregressive"):
        bind(m, m.family, IMAGE2X3)


@pytest.mark.parametrize("model", sorted(ARCH))
def test_onnx_export_parity_in_another_order(model: str, tmp_path) -> None:
    # export_model exports the graphs, compares them with PyTorch at several batch sizes and runs the serving
    # program over ONNX Runtime against the model (log-likelihood and samples); any mismatch raises
    data = load_dataset("digits")
    m = make(model, data.spec, "flip_h", scramble=0.3)
    vdir = export_model(m, m.family, data.spec, tmp_path, name=f"digits-{model}-flip", data=data.test[:64],
                        reference=m, log=lambda s: None)
    manifest = (vdir / "manifest.json").read_text()
    assert '"order": 2.0' in manifest
