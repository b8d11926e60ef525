"""Discretised logistic mixtures: a distribution over ordered integer levels that knows level 7 is next to level 8.

A categorical over 17 levels gives every level its own free logit, so with 1000 training digits a rare level at
a pixel gets what little evidence it has and nothing from its neighbours. PixelCNN++ (Salimans et al., 2017)
puts a mixture of K logistics on the levels scaled to [-1, 1] and gives each level the mass of its bin: nearby
levels share probability, and 3K numbers describe the conditional instead of one per level.

``level_log_probs`` turns the 3K raw parameters into the log-probabilities of every level, so an AR model's
conditionals stay "logits over levels" (the autoregressive family's contract): export, the served program and
sampling are unchanged. The result is renormalised with a log-softmax, so rounding cannot leave it a little off
a distribution over the levels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_LOG_SCALE = -7.0  # floor on the logistics' log-scales: bins far narrower than a level add nothing but overflow


def _softplus(x: Tensor) -> Tensor:
    """log(1 + e^x) without overflow for any x, from elementary operations that export to ONNX as they are."""
    return torch.relu(x) + torch.log1p(torch.exp(-torch.abs(x)))


def level_log_probs(params: Tensor, levels: int) -> Tensor:
    """(..., 3K) raw parameters (mixture logits, means, log-scales, K each) -> (..., levels) log p(level).

    Level k sits at 2k / (levels - 1) - 1; its bin is that +- 1 / (levels - 1), the outermost bins reach to
    -inf and +inf so that the levels' masses sum to one. A bin's mass sigmoid(b) - sigmoid(a) is taken in log
    space as b + log(1 - e^(a - b)) - softplus(a) - softplus(b): the plain difference of two sigmoids near 1
    loses its digits in float32, and ONNX Runtime's sigmoid differs from PyTorch's in the last one, which the log
    of a tiny difference magnified past export's parity tolerance.
    """
    k = params.shape[-1] // 3
    if k < 1 or params.shape[-1] != 3 * k:
        raise ValueError(f"a logistic mixture needs 3K parameters per position, got {params.shape[-1]}")
    logit_w, mean, log_s = params[..., :k], params[..., k:2 * k], params[..., 2 * k:]
    log_s = torch.clamp(log_s, min=MIN_LOG_SCALE)
    half = 1.0 / (levels - 1)
    centres = torch.linspace(-1.0, 1.0, levels, dtype=params.dtype)
    x = centres - mean.unsqueeze(-1)  # (..., K, levels)
    inv_s = torch.exp(-log_s).unsqueeze(-1)
    plus, minus = inv_s * (x + half), inv_s * (x - half)
    sp_plus, sp_minus = _softplus(plus), _softplus(minus)
    width = 2.0 * half * inv_s  # b - a, the bin's width in the logistic's units
    log_gap = torch.log(-torch.expm1(-width))  # log(1 - e^(a - b))
    inner = plus + log_gap - sp_minus - sp_plus
    # lowest level: log sigmoid(plus); highest: log(1 - sigmoid(minus))
    logp = torch.cat([plus[..., :1] - sp_plus[..., :1], inner[..., 1:-1], -sp_minus[..., -1:]], dim=-1)
    mixed = torch.logsumexp(F.log_softmax(logit_w, dim=-1).unsqueeze(-1) + logp, dim=-2)
    return F.log_softmax(mixed, dim=-1)
