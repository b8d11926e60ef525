"""arrnn's row-buffer window (``window``) and discretised-logistic head (``logistic``): a normalised likelihood,
the GRU input reading exactly the last W values, steps that reproduce the one-pass conditionals, and export."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.export.contract import bind
from genserve.export.repository import export_model, serving_program
from genserve.export.torch_runner import TorchRunner
from genserve.server.programs.base import run_sync
from genserve.training.arrnn import RecurrentAR
from genserve.training.checkpoint import load_checkpoint, save_checkpoint
from genserve.training.data import load_dataset

WINDOW = {"hidden": 8, "layers": 2, "embed": 4, "dropout": 0.1, "above": True, "window": True}
VARIANTS = {
    "window": WINDOW,
    "logistic": {"hidden": 8, "layers": 2, "embed": 4, "dropout": 0.1, "above": True, "logistic": 3},
    "window-logistic-shift": {**WINDOW, "logistic": 3, "shift_aug": 0.5, "ema": 0.9},
}
IMAGE2X3 = DataSpec("tiny", (2, 3), "discrete", levels=3)  # width 3: the window adds x_{t-2}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make(variant: str, spec: DataSpec, scramble: float = 0.5) -> RecurrentAR:
    torch.manual_seed(0)
    m = RecurrentAR(spec, **VARIANTS[variant])
    with torch.no_grad():  # far from initialisation, so that no check passes by accident
        for p in m.parameters():
            p.add_(scramble * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_probabilities_of_every_configuration_sum_to_one(variant: str) -> None:
    m = make(variant, IMAGE2X3)
    x = torch.tensor(list(itertools.product(range(3), repeat=6)), dtype=torch.float32).reshape(-1, 2, 3)
    with torch.no_grad():
        p = m.log_prob(x, Noise(0)).double().exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert p.max() < 0.5


def test_the_gru_input_reads_exactly_the_last_row_of_values() -> None:
    spec = load_dataset("digits").spec
    m = make("window", spec, scramble=0.2)
    W, D = m.width, spec.dim
    seen: list[torch.Tensor] = []
    m.gru.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    x = torch.randint(0, spec.levels, (1, D)).float()
    y = x.repeat(D, 1)
    y[torch.arange(D), torch.arange(D)] = (x[0] + 5) % spec.levels  # row j changes pixel j only
    with torch.no_grad():
        m.conditionals(torch.cat([x, y]).reshape(D + 1, 8, 8))
    inp = seen[0]
    changed = (inp[1:] - inp[:1]).abs().amax(-1) > 0  # (j, t): did changing x_j change the input of step t?
    for j in range(D):
        want = torch.zeros(D, dtype=torch.bool)
        want[j + 1:j + 1 + W] = True  # x_{t-1} .. x_{t-W}: the window, nothing older, nothing later
        assert torch.equal(changed[j], want), f"x_{j} reaches the inputs of steps {changed[j].nonzero().flatten()}"


def test_window_needs_the_row_buffer_and_logistic_discrete_data() -> None:
    with pytest.raises(ValueError, match="above"):
        RecurrentAR(load_dataset("digits").spec, window=True)
    with pytest.raises(ValueError, match="logistic"):
        RecurrentAR(DataSpec("toy", (2,), "continuous", mean=(0.0, 0.0), std=(1.0, 1.0)), logistic=2)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_steps_reproduce_the_one_pass_conditionals(variant: str) -> None:
    data = load_dataset("digits")
    m = make(variant, data.spec, scramble=0.2)
    x = torch.as_tensor(data.test[:6]).reshape(6, -1)
    h, steps = torch.zeros(6, m.state_size), []
    with torch.no_grad():
        for t, prev in enumerate(torch.cat([torch.zeros(6, 1), x[:, :-1]], dim=1).T):  # x_{t-1}, 0 at t = 0
            logits, h = m.step(prev.unsqueeze(1), h, torch.full((6, 1), float(t)))
            steps.append(logits)
        torch.testing.assert_close(torch.stack(steps, dim=1), m.conditionals(x)[0], atol=1e-5, rtol=0)
    assert m.state_size == 2 * 8 + 8  # the window reads the buffer ``above`` keeps: no new state


def test_training_lowers_the_loss_and_checkpoints_round_trip(tmp_path) -> None:
    # DropConnect, shift augmentation and the EMA all in play; eval mode scores with the averaged weights
    data = load_dataset("digits")
    torch.manual_seed(0)
    m = RecurrentAR(data.spec, **{**VARIANTS["window-logistic-shift"], "dropout": 0.0, "weight_drop": 0.2})
    x = torch.as_tensor(data.train[:32])
    opts = m.make_optimizers(lr=1e-2, weight_decay=0.0)
    nll = [float(m.eval().validation_loss(x))]
    for _ in range(2):
        m.train()
        for _ in range(5):
            m.training_step(x, opts, grad_clip=5.0)
        nll.append(float(m.eval().validation_loss(x)))
    assert nll[2] < nll[1] < nll[0] - 5.0, nll
    save_checkpoint(tmp_path / "m.pt", m)
    back, _ = load_checkpoint(tmp_path / "m.pt")
    torch.testing.assert_close(back.log_prob(x), m.log_prob(x).detach())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_served_program_matches_torch(variant: str) -> None:
    data = load_dataset("digits")
    m = make(variant, data.spec, scramble=0.3)
    bound = bind(m, m.family, data.spec)
    program, runner = serving_program(bound), TorchRunner(bound.graphs)
    x = data.test[:20]
    got = run_sync(program.log_likelihood(runner, x, Noise(0)))
    with torch.no_grad():
        want = m.log_prob(torch.as_tensor(x), Noise(0)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    stepped = run_sync(program.sample(runner, 5, Noise(3), temperature=0.8)).x
    np.testing.assert_array_equal(stepped, m.sample(5, Noise(3), temperature=0.8).numpy())
    np.testing.assert_array_equal(stepped, run_sync(program.sample(runner, 5, Noise(3), temperature=0.8,
                                                                   recompute=True)).x)


def test_onnx_export_passes_its_parity_checks(tmp_path) -> None:
    # export_model exports logits and step, compares them with PyTorch at several batch sizes and runs the
    # serving program over ONNX Runtime against the model; any mismatch raises
    data = load_dataset("digits")
    m = make("window-logistic-shift", data.spec, scramble=0.3)
    vdir = export_model(m, m.family, data.spec, tmp_path, name="digits-arrnn-window", data=data.test[:64],
                        reference=m, log=lambda s: None)
    assert {p.name for p in vdir.iterdir()} >= {"logits.onnx", "step.onnx"}
