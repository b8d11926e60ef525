"""Distribution augmentation over the square's dihedral group (training.augment.DIHEDRAL, arrnn's
``dihedral_aug``): the transforms are the group, the symmetry is a zero-initialised conditioning input used only in
training, the identity everywhere else (steps, serving, export), and the option off leaves the model as it was."""

from __future__ import annotations

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
from genserve.training.augment import DIHEDRAL, dihedral_images, dihedral_positions, random_dihedral
from genserve.training.data import load_dataset

TINY = {"hidden": 8, "layers": 2, "embed": 4, "dropout": 0.1, "above": True}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def scrambled(m: RecurrentAR, scale: float = 0.3) -> RecurrentAR:
    with torch.no_grad():  # far from initialisation (conditioning included), so no check passes by accident
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    return m.eval()


def test_the_transforms_are_the_dihedral_group_of_the_square() -> None:
    n = 5
    perms = dihedral_positions(n)
    assert perms.shape == (8, n * n) and DIHEDRAL[0] == "identity"
    assert torch.equal(perms[0], torch.arange(n * n))
    for row in perms:  # bijections of the pixels
        assert torch.equal(row.sort().values, torch.arange(n * n))
    as_tuples = {tuple(r.tolist()) for r in perms}
    assert len(as_tuples) == 8
    for a in perms:  # closed under composition, and every element has its inverse in the set
        for b in perms:
            assert tuple(a[b].tolist()) in as_tuples
        assert tuple(torch.argsort(a).tolist()) in as_tuples
    img = torch.arange(n * n).reshape(n, n)
    named = dict(zip(DIHEDRAL, (_.reshape(n, n) for _ in perms), strict=True))
    assert torch.equal(named["rot90"], torch.rot90(img, 1)) and torch.equal(named["rot270"], torch.rot90(img, -1))
    assert torch.equal(named["flip_h"], img.flip(1)) and torch.equal(named["flip_v"], img.flip(0))
    assert torch.equal(named["transpose"], img.T) and torch.equal(named["anti_transpose"], torch.rot90(img, 2).T)


def test_images_are_turned_whole_pixels_at_a_time() -> None:
    x = torch.arange(2 * 3 * 3 * 2, dtype=torch.float32).reshape(2, 3, 3, 2).repeat(4, 1, 1, 1)  # channels-last
    g = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    out = dihedral_images(x, g)
    perms = dihedral_positions(3)
    for b in range(8):
        want = x[b].reshape(9, 2)[perms[g[b]]].reshape(3, 3, 2)  # a pixel's channels travel together
        assert torch.equal(out[b], want)
    torch.manual_seed(0)
    k = random_dihedral(10_000, 0.25)
    assert 0.22 < (k > 0).float().mean() < 0.28 and set(k.tolist()) == set(range(8))
    assert not random_dihedral(100, 0.0).any()


def test_the_option_is_refused_off_square_discrete_images() -> None:
    with pytest.raises(ValueError, match="square"):
        RecurrentAR(DataSpec("tiny", (2, 3), "discrete", levels=3), **TINY, dihedral_aug=0.5)
    with pytest.raises(ValueError, match="dihedral_aug turns discrete images"):
        RecurrentAR(DataSpec("toy", (2,), "continuous", mean=(0.0, 0.0), std=(1.0, 1.0)), hidden=8, dihedral_aug=0.5)
    with pytest.raises(ValueError, match="probability"):
        RecurrentAR(load_dataset("digits").spec, **TINY, dihedral_aug=1.5)
    with pytest.raises(ValueError, match="square"):
        dihedral_images(torch.zeros(1, 2, 3), torch.zeros(1, dtype=torch.long))


def test_off_by_default_the_model_is_unchanged() -> None:
    spec = load_dataset("digits").spec
    torch.manual_seed(0)
    plain = RecurrentAR(spec, **TINY, shift_aug=0.5)
    torch.manual_seed(0)
    off = RecurrentAR(spec, **TINY, shift_aug=0.5, dihedral_aug=0.0)
    assert "dihedral_aug" not in off.arch and off.arch == plain.arch
    assert off.state_dict().keys() == plain.state_dict().keys()
    x = torch.as_tensor(load_dataset("digits").train[:16])
    for m in (plain, off):
        m.train()
    torch.manual_seed(1)
    a = plain.loss(x)
    torch.manual_seed(1)
    b = off.loss(x)
    assert torch.equal(a, b)  # same draws of the shift augmentation, nothing else drawn


def test_conditioning_starts_as_the_identity_and_operations_use_the_identity() -> None:
    data = load_dataset("digits")
    torch.manual_seed(0)
    m = RecurrentAR(data.spec, **TINY, shift_aug=0.5, dihedral_aug=0.5).eval()
    assert m.arch["dihedral_aug"] == 0.5
    x = torch.as_tensor(data.test[:5])
    g = torch.arange(5) + 3
    with torch.no_grad():  # zero at first: every symmetry (and shift) is told apart only by training
        assert torch.equal(m.conditionals(x)[0], m.conditionals(x, None, g)[0])
        assert torch.equal(m.conditionals(x)[0], m.conditionals(x, g, g)[0])
    scrambled(m)
    zero = torch.zeros(5, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(m.conditionals(x)[0], m.conditionals(x, zero, zero)[0])
        assert not torch.allclose(m.conditionals(x)[0], m.conditionals(x, zero, g)[0])
        h, steps = torch.zeros(5, m.state_size), []  # the step graph uses the identity's conditioning too
        flat = x.reshape(5, -1)
        for t, prev in enumerate(torch.cat([torch.zeros(5, 1), flat[:, :-1]], dim=1).T):
            logits, h = m.step(prev.unsqueeze(1), h, torch.full((5, 1), float(t)))
            steps.append(logits)
        torch.testing.assert_close(torch.stack(steps, dim=1), m.conditionals(x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", ["raster", "transpose"])
def test_the_training_loss_runs_and_teaches_the_symmetries(order: str) -> None:
    data = load_dataset("digits")
    torch.manual_seed(0)
    m = RecurrentAR(data.spec, **TINY, shift_aug=0.5, dihedral_aug=0.5, order=order)
    x = torch.as_tensor(data.train[:32])
    opts = m.make_optimizers(lr=1e-2, weight_decay=0.0)
    before = float(m.eval().validation_loss(x))
    m.train()
    for _ in range(5):
        m.training_step(x, opts, grad_clip=5.0)
    assert float(m.eval().validation_loss(x)) < before - 5.0
    assert m.dihedral_embed[1:].abs().sum() > 0 and m.dihedral_bias[1:].abs().sum() > 0
    # eval mode scores the identity: the loss is -log p(x), no augmentation drawn
    torch.testing.assert_close(m.loss(x), -m.log_prob(x, Noise(0)).mean())


def test_served_program_and_onnx_export_match_torch(tmp_path) -> None:
    data = load_dataset("digits")
    torch.manual_seed(0)
    m = scrambled(RecurrentAR(data.spec, **TINY, shift_aug=0.5, dihedral_aug=0.5))
    bound = bind(m, m.family, data.spec)  # the served program over the model's graphs: the identity's answers
    program, runner = serving_program(bound), TorchRunner(bound.graphs)
    with torch.no_grad():
        np.testing.assert_allclose(run_sync(program.log_likelihood(runner, data.test[:20], Noise(0))),
                                   m.log_prob(torch.as_tensor(data.test[:20]), Noise(0)).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(run_sync(program.sample(runner, 5, Noise(3), temperature=0.8)).x,
                                  m.sample(5, Noise(3), temperature=0.8).numpy())
    vdir = export_model(m, m.family, data.spec, tmp_path, name="digits-arrnn-dihedral", data=data.test[:64],
                        reference=m, log=lambda s: None)  # ONNX parity checks raise on a mismatch
    assert {p.name for p in vdir.iterdir()} >= {"logits.onnx", "step.onnx"}
