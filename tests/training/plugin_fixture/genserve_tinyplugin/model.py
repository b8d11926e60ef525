"""TinyFlow: normalisation and a few affine couplings over continuous rows, written as a user would.

It subclasses genserve's GenerativeModel (training: ``loss`` and ``profiles``) and provides the flow contract
(``transform``, ``inverse``; docs/contract.md) plus the PyTorch operations that evaluation uses and that export
compares the served ones with (``log_prob``, ``sample``, ``encode``, ``decode``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.training.base import Capabilities, GenerativeModel

LOG2PI = math.log(2 * math.pi)


class Coupling(nn.Module):
    """y_b = x_b * exp(s(x_a)) + t(x_a) on the features outside ``mask``; log|det| = sum s."""

    def __init__(self, mask: Tensor, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        d = mask.numel()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 2 * d))

    def _st(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(xa).chunk(2, dim=-1)
        keep = 1 - self.mask
        return torch.tanh(s) * keep, t * keep

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._st(x * self.mask)
        return x * torch.exp(s) + t, s.sum(-1)

    def inverse(self, y: Tensor) -> Tensor:
        s, t = self._st(y * self.mask)
        return (y - t) * torch.exp(-s)


class TinyFlow(GenerativeModel):
    """Affine couplings over normalised continuous rows (D >= 2)."""

    name = "tinyflow"
    family = "flow"
    likelihood_kind = "exact"
    operations = ("sample", "log_likelihood", "encode", "decode")
    capabilities = Capabilities("flow-based", "stable", "exact", "fast", "lossless", True)
    profiles = {"quick": {"epochs": 3, "batch_size": 128, "lr": 3e-3, "patience": 5,
                          "arch": {"layers": 2, "hidden": 16}}}

    def __init__(self, spec: DataSpec, layers: int = 2, hidden: int = 16) -> None:
        super().__init__(spec, layers=layers, hidden=hidden)
        if spec.discrete or spec.dim < 2:
            raise ValueError("TinyFlow models continuous rows of at least 2 features")
        masks = [(torch.arange(spec.dim) % 2 == k % 2).float() for k in range(layers)]
        self.couplings = nn.ModuleList(Coupling(m, hidden) for m in masks)

    # ---- the flow contract ----------------------------------------------------------------------
    def transform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, log p(x)) in raw units: z (B, D), nats (B,)."""
        h, log_jac = self.normalise(x)
        logdet = torch.full((x.shape[0],), log_jac, dtype=x.dtype)
        for c in self.couplings:
            h, ld = c(h)
            logdet = logdet + ld
        return h, -0.5 * (h.pow(2).sum(-1) + self.dim * LOG2PI) + logdet

    def inverse(self, z: Tensor) -> Tensor:
        for c in reversed(self.couplings):
            z = c.inverse(z)
        return self.denormalise(z)

    # ---- training ---------------------------------------------------------------------------------
    def loss(self, x: Tensor) -> Tensor:
        return -self.transform(x)[1].mean()

    # ---- operations (PyTorch reference; the same noise order as genserve's flow program) ------------
    def log_prob(self, x: Tensor, noise: Noise, **options: Any) -> Tensor:
        return self.transform(x)[1]

    def sample(self, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> Tensor:
        z = torch.from_numpy(noise.normal(n, self.dim)).float() * temperature
        return self.inverse(z)

    def encode(self, x: Tensor, noise: Noise | None = None) -> Tensor:
        return self.transform(x)[0]

    def decode(self, z: Tensor, noise: Noise | None = None) -> Tensor:
        return self.inverse(z)
