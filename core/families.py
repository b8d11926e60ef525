"""The one table of model families, shared by training, export and the server (no torch, no onnxruntime).

Each row is the lecture's summary of a group of deep generative models (../shared lecture; DESIGN.md) plus
what genserve serves for it: the operations, what LogLikelihood returns, and the defaults of the program
parameters written into the manifest. Training declares its models' families from it, export's contracts
(export/contract.py) add the PyTorch methods a module provides, the server's programs are keyed by it.

Example:
    >>> FAMILIES["flow"].operations
    ('sample', 'log_likelihood', 'encode', 'decode')
    >>> FAMILIES["implicit"].likelihood_kind
    'none'
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Capabilities:
    """One row of the lecture's summary table of deep generative models."""

    group: str  # "autoregressive", "flow-based", "implicit", "prescribed", "energy-based"
    training: str  # "stable" / "unstable"
    likelihood: str  # "exact" / "approximate" / "no" / "unnormalized"
    sampling: str  # "fast" / "slow" / "fast/slow"
    compression: str  # "lossless" / "lossy" / "no" / "rather not"
    representation: bool


@dataclass(frozen=True)
class FamilyInfo:
    """A family: what it serves, what its likelihood is, its capability row and its program's parameters."""

    name: str
    summary: str
    operations: tuple[str, ...]
    likelihood_kind: str
    """exact, lower_bound, unnormalized or none (discrete data make flows and pPCA a lower bound)."""
    capabilities: Capabilities
    parameters: dict[str, float] = field(default_factory=dict)
    """Program parameters with their defaults; a model overrides them (``program_parameters()``)."""


FAMILIES: dict[str, FamilyInfo] = {f.name: f for f in (
    FamilyInfo("autoregressive", "p(x) = prod_i p(x_i | x_<i) over the row-major order of the D values",
               ("sample", "log_likelihood"), "exact",
               Capabilities("autoregressive", "stable", "exact", "slow", "lossless", False)),
    FamilyInfo("flow", "an invertible f with z = f(x) ~ N(0, I_D): log p(x) = log N(f(x)) + log|det df/dx|",
               ("sample", "log_likelihood", "encode", "decode"), "exact",
               Capabilities("flow-based", "stable", "exact", "fast", "lossless", True), {"dequant_draws": 16}),
    FamilyInfo("latent_variable", "p(x) = int p(x|z) N(z; 0, I) dz with a Gaussian encoder q(z|x); likelihood "
               "is the importance-weighted bound with K samples",
               ("sample", "log_likelihood", "encode", "decode"), "lower_bound",
               Capabilities("prescribed", "stable", "approximate", "fast", "lossy", True),
               {"importance_samples": 100, "iw_rows": 4096}),
    FamilyInfo("linear_gaussian", "pPCA: x = W z + mu + sigma eps, z ~ N(0, I_q); exact Gaussian likelihood",
               ("sample", "log_likelihood", "encode", "decode"), "exact",
               Capabilities("prescribed", "stable", "approximate", "fast", "lossy", True), {"dequant_draws": 16}),
    FamilyInfo("implicit", "x = G(z), z ~ N(0, I): samples without a likelihood (GAN)", ("sample", "decode"),
               "none", Capabilities("implicit", "unstable", "no", "fast", "no", False)),
    FamilyInfo("energy", "p(x) proportional to exp(-E(x)); sampling by Langevin dynamics on dE/dx",
               ("sample", "log_likelihood"), "unnormalized",
               Capabilities("energy-based", "stable", "unnormalized", "slow", "rather not", True),
               {"langevin_steps": 100, "langevin_step_size": 0.01, "langevin_noise": 1.0, "box": 4.0}),
)}
