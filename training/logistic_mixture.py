"""Discretised logistic mixtures: a distribution over ordered integer levels that knows level 7 is next to level 8.

A categorical over 17 levels gives every level its own free logit, so with 1000 training digits a rare level at
a pixel gets what little evidence it has and nothing from its neighbours. PixelCNN++ (Salimans et al., 2017)
puts a mixture of K logistics on the levels scaled to [-1, 1] and gives each level the mass of its bin: nearby
levels share probability, and 3K numbers describe the conditional instead of one per level.

``level_log_probs`` turns the 3K raw parameters into the log-probabilities of every level, so an AR model's
conditionals stay "logits over levels" (the autoregressive family's contract): export, the served program and
sampling are unchanged. The result is renormalised with a log-softmax, so it is an exact distribution over
the levels even where a bin's mass had to be approximated in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_LOG_SCALE = -7.0  # floor on the logistics' log-scales: bins far narrower than a level add nothing but overflow
TINY_MASS = 1e-5  # below this a bin's mass is taken as density x width (the CDF difference loses its digits)


def level_log_probs(params: Tensor, levels: int) -> Tensor:
    """(..., 3K) raw parameters (mixture logits, means, log-scales, K each) -> (..., levels) log p(level).

    Level k sits at 2k / (levels - 1) - 1; its bin is that +- 1 / (levels - 1), the outermost bins reach to
    -inf and +inf so that the levels' masses sum to one.
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
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the lowest level's mass
    log_sf_minus = -F.softplus(minus)  # log (1 - sigmoid(minus)): the highest level's mass
    delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = inv_s * x
    log_density_mid = mid - log_s.unsqueeze(-1) - 2.0 * F.softplus(mid) + math.log(2 * half)
    inner = torch.where(delta > TINY_MASS, torch.log(torch.clamp(delta, min=1e-12)), log_density_mid)
    logp = torch.cat([log_cdf_plus[..., :1], inner[..., 1:-1], log_sf_minus[..., -1:]], dim=-1)
    mixed = torch.logsumexp(F.log_softmax(logit_w, dim=-1).unsqueeze(-1) + logp, dim=-2)
    return F.log_softmax(mixed, dim=-1)
