"""The discretised logistic mixture head (training.logistic_mixture, ``arch.logistic`` of arcnn) and arcnn's gated
blocks (``arch.gated``): the level masses are the logistic CDF's bins, neighbouring levels share mass, gated blocks
keep the conditionals causal (colour channels too), and arcnn with both trains and exports unchanged."""

from __future__ import annotations

import pytest
import torch

from genserve.core.spec import DataSpec
from genserve.training.arcnn import CausalConvAR
from genserve.training.config import build_config
from genserve.training.data import load_dataset
from genserve.training.logistic_mixture import level_log_probs


def _bins(mean: float, scale: float, levels: int) -> torch.Tensor:
    """The masses of one logistic's bins, straight from its CDF in float64 (outer bins open to +-inf)."""
    edges = torch.linspace(-1.0, 1.0, levels, dtype=torch.float64)[:-1] + 1.0 / (levels - 1)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.sigmoid((edges - mean) / scale),
                     torch.ones(1, dtype=torch.float64)])
    return cdf[1:] - cdf[:-1]


def test_masses_are_the_logistic_cdf_bins_mixed_by_weight():
    levels, means, scales = 17, [-0.9, 0.1, 0.55], [0.05, 0.3, 0.02]
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    params = torch.tensor([*w.log().tolist(), *means, *torch.tensor(scales, dtype=torch.float64).log().tolist()],
                          dtype=torch.float64)
    got = level_log_probs(params, levels).exp()
    want = sum(wk * _bins(m, s, levels) for wk, m, s in zip(w, means, scales, strict=True))
    # exact up to the bins under TINY_MASS, which are taken as density x width (and then renormalised)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert abs(float(got.sum()) - 1.0) < 1e-12
    wide = torch.tensor([0.0, 0.3, -1.0], dtype=torch.float64)  # no bin under TINY_MASS: exact
    assert torch.allclose(level_log_probs(wide, levels).exp(), _bins(0.3, float(torch.e ** -1), levels), atol=1e-12)


def test_float32_masses_keep_their_digits_where_both_bin_edges_are_far_in_a_tail():
    """Bins deep in a narrow logistic's upper tail: sigmoid(b) - sigmoid(a) of two numbers near 1 loses every digit
    in float32 (the first formula did, and ONNX Runtime then disagreed with PyTorch by 0.01 nats); the log-space
    form agrees with float64 to float32 rounding."""
    means = torch.tensor([-0.95, -0.5, 0.0, 0.6])
    log_s = torch.tensor([-3.0, -4.0, -2.5, -3.5])
    p64 = torch.cat([torch.zeros(4, 1), means[:, None], log_s[:, None]], dim=-1).double()
    want = level_log_probs(p64, 17)
    got = level_log_probs(p64.float(), 17)
    assert torch.isfinite(got).all() and (want < -20).any()  # some bins far in the tails
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5), (got.double() - want).abs().max()


def test_neighbouring_levels_share_mass_and_extreme_parameters_stay_finite():
    # one narrow logistic on level 7 (of 17): mass falls off with the distance from 7 on both sides
    params = torch.tensor([0.0, 7 * 2 / 16 - 1, -2.5])
    p = level_log_probs(params, 17).exp()
    assert int(p.argmax()) == 7
    assert all(p[7 - d] > p[7 - d - 1] and p[7 + d] > p[7 + d + 1] for d in range(5))
    wild = torch.tensor([[30.0, -30.0, 5.0, -5.0, -20.0, 40.0], [0.0, 0.0, 0.9, 3.0, 0.0, 0.0]])
    out = level_log_probs(wild, 17)
    assert torch.isfinite(out).all() and torch.allclose(out.exp().sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="3K parameters"):
        level_log_probs(torch.zeros(3, 7), 17)


def test_arcnn_with_the_head_trains_and_exports_as_an_autoregressive_model(tmp_path):
    from genserve.export.repository import export_checkpoint
    from genserve.training.checkpoint import load_checkpoint
    from genserve.training.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = {"arch.channels": 8, "arch.layers": 1, "arch.logistic": 3, "arch.shift_aug": 0.5,
                     "arch.gated": True, "epochs": 1}
        ckpt = tmp_path / "arcnn.pt"
        train(build_config("arcnn", "digits", "quick", overrides=overrides), ckpt, progress=False)
        model, _ = load_checkpoint(ckpt)
        assert model.out.conv.out_channels == 9  # 3 weights, 3 means, 3 log-scales per pixel
        assert model.blocks[0].conv1.conv.out_channels == 16  # the gate's two maps per feature map
        x = torch.as_tensor(load_dataset("digits").test[:5])
        logits = model.conditionals(x)[0]
        assert logits.shape == (5, 64, 17) and torch.allclose(logits.exp().sum(-1), torch.ones(5, 64))
        # export's contract checks (causality, shapes) and ONNX parity pass with the head
        export_checkpoint(ckpt, tmp_path / "repo", log=lambda s: None)
    finally:
        torch.set_num_threads(threads)


def test_the_head_is_refused_for_continuous_data():
    from genserve.training.trainer import build_model

    cfg = build_config("arcnn", "moons", "quick", overrides={"arch.logistic": 4})
    with pytest.raises(ValueError, match="logistic is a number of mixture components"):
        build_model(cfg, load_dataset("moons").spec)


@pytest.mark.parametrize("shape", [(4, 4), (3, 3, 3)])
def test_gated_blocks_keep_the_conditionals_causal(shape):
    """Changing value j may change only the conditionals of positions after j (raster order, then channel)."""
    torch.manual_seed(0)
    spec = DataSpec("tiny", shape, "discrete", levels=5)
    m = CausalConvAR(spec, channels=6, layers=2, dropout=0.0, logistic=2, gated=True).eval()
    with torch.no_grad():
        for p in m.parameters():  # away from the zero-initialised biases, so every path carries signal
            p.add_(torch.randn_like(p) * 0.3)
        D = spec.dim
        x = torch.randint(0, 5, (1, D)).float()
        y = x.repeat(D, 1)
        y[torch.arange(D), torch.arange(D)] = (y[torch.arange(D), torch.arange(D)] + 2) % 5  # row j changes x_j
        base = m.conditionals(x.reshape(1, *shape))[0]
        out = m.conditionals(y.reshape(D, *shape))[0]
    changed = (out - base).abs().amax(-1) > 1e-6  # (j changed, position i)
    for j in range(D):
        assert not changed[j, : j + 1].any(), f"changing x_{j} changed conditionals {changed[j, : j + 1].nonzero()}"
    assert changed[:-1, -1].any() and changed[0, 1:].all()  # the later positions do see earlier values


def test_gated_blocks_need_channels_divisible_by_the_colour_channels():
    with pytest.raises(ValueError, match="divisible by the image's 3 channels"):
        CausalConvAR(DataSpec("tiny", (3, 3, 3), "discrete", levels=5), channels=7, layers=1, gated=True)
