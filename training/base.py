"""The protocol every model family implements, so training, evaluation and export treat them alike."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from genserve.core.families import FAMILIES, Capabilities
from genserve.core.noise import Noise
from genserve.core.spec import DataSpec

OPERATIONS = ("sample", "log_likelihood", "encode", "decode")
LIKELIHOOD_KINDS = ("exact", "lower_bound", "unnormalized", "none")


class GenerativeModel(nn.Module):
    """Base class of the seven models; subclasses declare what they can do and implement it.

    Each subclass also provides the methods of its family contract (docs/contract.md: ``conditionals`` and
    ``step`` for autoregressive models, ``transform``/``inverse`` for flows, ``encoder``/``decoder`` for the VAE,
    ...): export builds the graphs from them exactly as it does for a user's own module.

    Conventions, shared with the export and serving stations:
      * ``x`` is a float tensor of shape (B, *spec.shape) in raw data units: integer levels for discrete
        data, raw values for continuous data (models normalise internally).
      * ``log_prob`` returns log p(x) in nats per example, shape (B,). For discrete data it is the log
        probability of the integer example (exact for AR, a dequantisation bound for continuous densities,
        an importance-weighted bound for the VAE); ``likelihood_kind`` says which.
      * Every random draw comes from a ``Noise`` stream (numpy, seeded) in a documented order, so serving
        reproduces PyTorch samples exactly.
    """

    name: ClassVar[str]
    family: ClassVar[str]  # "autoregressive", "flow", "latent_variable", "implicit", "energy"
    likelihood_kind: ClassVar[str]
    operations: ClassVar[tuple[str, ...]]
    capabilities: ClassVar[Capabilities]
    closed_form: ClassVar[bool] = False  # fitted in one step (pPCA) rather than by gradient descent
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}
    """Training settings per profile (``quick``, ``full``): keys of ``TrainConfig`` plus ``arch`` (the
    constructor's keyword arguments). Tuned for digits; ``tabular_profiles`` overrides them for real rows."""
    tabular_profiles: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A model's family is one of the shared table's (core.families), so export and serving know it."""
        super().__init_subclass__(**kwargs)
        family = cls.__dict__.get("family")
        if family is not None and family not in FAMILIES:
            raise TypeError(f"{cls.__name__}.family = {family!r} is not a family genserve serves; use one of "
                            f"{', '.join(FAMILIES)}")

    def __init__(self, spec: DataSpec, **arch: Any) -> None:
        super().__init__()
        self.spec = spec
        self.arch = dict(arch)  # stored in checkpoints to rebuild the model

    # ---- training -------------------------------------------------------------------------------
    def loss(self, x: Tensor) -> Tensor:
        """Scalar training loss for a batch (per-example average, nats)."""
        raise NotImplementedError

    def make_optimizers(self, lr: float, weight_decay: float) -> list[torch.optim.Optimizer]:
        return [torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)]

    def training_step(self, x: Tensor, optimizers: list[torch.optim.Optimizer], grad_clip: float) -> dict[str, float]:
        """One optimisation step; families with several players (GAN) or samplers (EBM) override it."""
        (opt,) = optimizers
        opt.zero_grad(set_to_none=True)
        loss = self.loss(x)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(self.parameters(), grad_clip)
        opt.step()
        return {"loss": float(loss.detach())}

    def fit_closed_form(self, x: Tensor) -> None:
        """Fit in one step from the whole training split (only where ``closed_form``)."""
        raise NotImplementedError

    @torch.no_grad()
    def validation_loss(self, x: Tensor) -> float:
        """Criterion for early stopping, lower is better (default: NLL in nats per example)."""
        if "log_likelihood" in self.operations:
            return float(-self.log_prob(x, Noise(0)).mean())
        return float(self.loss(x))

    # ---- operations -------------------------------------------------------------------------------
    def log_prob(self, x: Tensor, noise: Noise, **options: Any) -> Tensor:
        """log p(x) in nats, shape (B,); see the class docstring for what it means per family."""
        raise self._unsupported("log_likelihood")

    def sample(self, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> Tensor:
        """n examples in the data domain, shape (n, *spec.shape)."""
        raise self._unsupported("sample")

    def encode(self, x: Tensor, noise: Noise | None = None) -> Tensor:
        """Latent representation z of x, shape (B, latent_dim)."""
        raise self._unsupported("encode")

    def decode(self, z: Tensor, noise: Noise | None = None) -> Tensor:
        """Example(s) in the data domain for latents z, shape (B, *spec.shape)."""
        raise self._unsupported("decode")

    def program_parameters(self) -> dict[str, float]:
        """Defaults of the family program's options for this model (e.g. ``importance_samples``), overriding the
        family contract's; the graphs themselves come from the contract methods (docs/contract.md)."""
        return {}

    def _unsupported(self, op: str) -> NotImplementedError:
        return NotImplementedError(f"{self.name} ({self.family}) has no {op}; it supports {', '.join(self.operations)}")

    # ---- helpers shared by families ---------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.spec.dim

    def flat(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    def unflat(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.spec.shape)

    def normalise(self, x: Tensor) -> tuple[Tensor, float]:
        """Continuous data to zero mean / unit variance; returns (y, log|dy/dx| summed over features)."""
        mean = torch.tensor(self.spec.mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(self.spec.std, dtype=x.dtype, device=x.device)
        return (self.flat(x) - mean) / std, -float(np.log(np.asarray(self.spec.std)).sum())

    def denormalise(self, y: Tensor) -> Tensor:
        mean = torch.tensor(self.spec.mean, dtype=y.dtype, device=y.device)
        std = torch.tensor(self.spec.std, dtype=y.dtype, device=y.device)
        return self.unflat(y * std + mean)

    def postprocess(self, x: Tensor) -> Tensor:
        """Model output to the data domain: discrete values rounded and clipped to the levels."""
        if self.spec.discrete:
            return torch.clamp(torch.round(x), 0, self.spec.levels - 1)
        return x


def categorical_from_uniform(logits: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF categorical draw, identical to ``genserve.core.noise.categorical_from_uniform``."""
    cdf = torch.cumsum(torch.softmax(logits, dim=-1).double(), dim=-1)
    idx = (cdf < u.double().unsqueeze(-1)).sum(dim=-1)
    return torch.clamp(idx, max=logits.shape[-1] - 1).to(logits.dtype)


def bits_per_dim(nll_nats: float, dim: int) -> float:
    """Nats per example to bits per dimension."""
    return nll_nats / (dim * math.log(2))


LOG2PI = math.log(2 * math.pi)


@dataclass
class GraphDef:
    """A deterministic graph for export: ``module(*inputs) -> tuple(outputs)``, batch axis 0 dynamic.

    ``inputs`` maps input names to example tensors (batch >= 2, float32); ``outputs`` names the results.
    The serving programs call graphs by these names, so they are part of the model's contract.
    """

    module: nn.Module
    inputs: dict[str, Tensor]
    outputs: list[str]


class Lambda(nn.Module):
    """Wrap a bound method as a module so it can be exported as its own graph."""

    def __init__(self, owner: nn.Module, fn: Any) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *args: Tensor) -> Any:
        return self.fn(*args)
