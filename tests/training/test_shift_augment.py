"""Distribution augmentation by one-pixel shifts (training.augment): the shifts themselves, the shift as the
models' conditioning input in training, the identity everywhere else, and export unchanged (contract and parity)."""

from __future__ import annotations

import pytest
import torch

from genserve.core.noise import Noise
from genserve.training.augment import SHIFTS, random_shifts, shift_images
from genserve.training.config import build_config
from genserve.training.data import load_dataset

TINY = {"arcnn": {"arch.channels": 8, "arch.layers": 1},
        "arrnn": {"arch.hidden": 16, "arch.layers": 2, "arch.embed": 8, "arch.above": True},
        "vae": {"arch.latent_dim": 4, "arch.hidden": 16, "arch.depth": 1, "arch.logit_rank": 3,
                "arch.train_samples": 2}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shifts_move_content_and_fill_with_background():
    x = torch.arange(1, 17, dtype=torch.float32).reshape(1, 4, 4).repeat(len(SHIFTS), 1, 1)
    out = shift_images(x, torch.arange(len(SHIFTS)))
    assert SHIFTS[0] == (0, 0) and torch.equal(out[0], x[0]) and len(set(SHIFTS)) == 9
    for k, (dy, dx) in enumerate(SHIFTS):
        for i in range(4):
            for j in range(4):
                si, sj = i - dy, j - dx  # the source pixel of (i, j)
                want = x[0, si, sj] if 0 <= si < 4 and 0 <= sj < 4 else 0.0
                assert out[k, i, j] == want, (k, i, j)
    torch.manual_seed(0)
    k = random_shifts(10_000, 0.25)
    assert 0.22 < (k > 0).float().mean() < 0.28 and set(k.tolist()) == set(range(9))
    assert not random_shifts(100, 0.0).any()


@pytest.mark.parametrize("name", ["arcnn", "arrnn", "vae"])
def test_shift_conditioning_trains_and_exports_as_the_identity(name, tmp_path):
    from genserve.export.repository import export_checkpoint
    from genserve.training.checkpoint import load_checkpoint
    from genserve.training.trainer import train

    cfg = build_config(name, "digits", "quick", overrides={**TINY[name], "arch.shift_aug": 0.5, "epochs": 1})
    ckpt = tmp_path / f"{name}.pt"
    train(cfg, ckpt, progress=False)
    model, _ = load_checkpoint(ckpt)
    shift_params = [p for n, p in model.named_parameters() if "shift" in n]
    assert shift_params and all(p[1:].abs().sum() > 0 for p in shift_params)  # the real shifts were learned
    x = torch.as_tensor(load_dataset("digits").test[:5])
    if name == "vae":  # operations use the identity's conditioning: the same as asking for shift 0
        zero = torch.zeros(5, dtype=torch.long)
        assert torch.equal(model.encoder(x)[0], model.encoder(x, zero)[0])
        z = torch.randn(5, 4)
        assert torch.equal(model.decoder(z), model.decoder(z, zero))
        assert not torch.allclose(model.decoder(z), model.decoder(z, zero + 3))
    else:
        zero = torch.zeros(5, dtype=torch.long)
        assert torch.equal(model.conditionals(x)[0], model.conditionals(x, zero)[0])
        assert not torch.allclose(model.conditionals(x)[0], model.conditionals(x, zero + 3)[0])
        assert torch.isfinite(model.log_prob(x, Noise(0))).all()
    export_checkpoint(ckpt, tmp_path / "repo", log=lambda s: None)  # contract checks and ONNX parity


@pytest.mark.parametrize("name", ["arcnn", "vae"])
def test_shift_aug_is_refused_off_images(name):
    from genserve.training.trainer import build_model

    cfg = build_config(name, "moons", "quick", overrides={"arch.shift_aug": 0.5})
    with pytest.raises(ValueError, match="shift_aug shifts discrete images"):
        build_model(cfg, load_dataset("moons").spec)
