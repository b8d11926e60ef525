"""The engine interface every face calls (gRPC, OIP, HTTP, in-process): typed requests, results and a Protocol.

A face resolves the model a request names once, with ``Engine.resolve`` (NotFound / NotReady / Unsupported say
what exists), builds one of the request dataclasses around the resolved ``LoadedModel`` and awaits the
engine's operation; the engine checks the request against the server's limits in one place (``admit``) and
runs the family program on that version, so the version a face described is the version that answers.
Results are named tuples: typed fields, and they still unpack as ``x, latents, version = ...``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, Protocol

import numpy as np

from genserve.server.metrics import Metrics
from genserve.server.repository import LoadedModel

OPERATIONS = ("sample", "log_likelihood", "encode", "decode")
"""Engine operation names, as the manifest's capabilities list them."""
METHOD = {"sample": "Sample", "log_likelihood": "LogLikelihood", "encode": "Encode", "decode": "Decode"}
"""Engine operation -> its RPC name in genserve.v1 (also the ``method`` metrics label)."""


# ---- requests ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleRequest:
    """Draw ``n`` samples from ``model`` with the noise of ``seed`` (0..2**63-1)."""

    model: LoadedModel
    n: int
    seed: int
    temperature: float | None = None
    """None: the model's own (its manifest's ``temperature``, else 1)."""
    langevin_steps: int | None = None
    """Energy models only; None: the program's default."""
    langevin_step_size: float | None = None
    """Energy models only; None: the program's default."""
    return_latents: bool = False

    operation = "sample"


@dataclass(frozen=True)
class LikelihoodRequest:
    """Score the rows of ``x`` (N, *data shape), raw data units."""

    model: LoadedModel
    x: np.ndarray
    seed: int
    importance_samples: int | None = None
    """VAE only: K of the importance-weighted bound; None: the program's default."""
    scores: tuple[str, ...] = ()
    """Score kinds to compute beside log_prob (the manifest's ``score_kinds``), by name."""
    percentile: bool = False
    """Also the percentile of log_prob and of each requested kind among the manifest's calibration."""
    per_dimension: bool = False
    """Also the per-dimension terms of -log p(x), where the family has them."""
    draws: int | None = None
    """Flows and pPCA on discrete data: dequantisation draws of the bound; None: the manifest's default."""

    operation = "log_likelihood"


@dataclass(frozen=True)
class EncodeRequest:
    """Latent codes of the rows of ``x``: the posterior mean, or a draw with ``sample``."""

    model: LoadedModel
    x: np.ndarray
    seed: int
    sample: bool = False

    operation = "encode"


@dataclass(frozen=True)
class DecodeRequest:
    """Data rows of the latent codes ``z`` (N, latent): the mean of p(x|z), or a draw with ``sample``."""

    model: LoadedModel
    z: np.ndarray
    seed: int
    sample: bool = False

    operation = "decode"


Request = SampleRequest | LikelihoodRequest | EncodeRequest | DecodeRequest


# ---- results ----------------------------------------------------------------------------------------------

class SampleResult(NamedTuple):
    x: np.ndarray
    """(n, *shape) float32 in the data domain."""
    latents: np.ndarray | None
    """(n, q) float32 when asked for and the family has latents."""
    version: int


class _Likelihood(NamedTuple):
    log_prob: np.ndarray
    """(N,) float64, nats."""
    bits_per_dim: np.ndarray | None
    """(N,) float64; None for unnormalized models."""
    kind: str
    """exact, lower_bound or unnormalized."""
    version: int


class LikelihoodResult(_Likelihood):
    """log_prob, bits_per_dim, kind, version (it unpacks as those four), and what the request asked for
    beside them as attributes: ``scores`` and ``percentiles`` (by name, each (N,) float64; empty when not
    asked for; percentiles in [0, 100], low = anomalous) and ``per_dimension`` ((N, *shape) float64 nats of
    -log p per dimension, or None)."""

    scores: Mapping[str, np.ndarray] = MappingProxyType({})
    percentiles: Mapping[str, np.ndarray] = MappingProxyType({})
    per_dimension: np.ndarray | None = None

    def __new__(cls, log_prob: np.ndarray, bits_per_dim: np.ndarray | None, kind: str, version: int,
                scores: dict[str, np.ndarray] | None = None, percentiles: dict[str, np.ndarray] | None = None,
                per_dimension: np.ndarray | None = None) -> LikelihoodResult:
        self = super().__new__(cls, log_prob, bits_per_dim, kind, version)
        if scores or percentiles or per_dimension is not None:  # the plain answer keeps the class's empty ones
            self.scores = scores or {}
            self.percentiles = percentiles or {}
            self.per_dimension = per_dimension
        return self


class EncodeResult(NamedTuple):
    z: np.ndarray
    """(N, q) float32."""
    version: int


class DecodeResult(NamedTuple):
    x: np.ndarray
    """(N, *shape) float32 in the data domain."""
    version: int


# ---- what the engine lists --------------------------------------------------------------------------------

@dataclass
class ModelStatus:
    """One model as listed: its loaded versions, default, what it can do, and its state."""

    name: str
    versions: list[int]
    """Loaded (serving) versions, ascending."""
    default_version: int
    """What version 0 resolves to: the highest loaded version; 0 when none is loaded."""
    family: str
    model: str
    operations: list[str]
    """Operation names of the default version: sample, log_likelihood, encode, decode."""
    state: str
    """READY (some version serves), FAILED (none could be loaded), LOADING, UNAVAILABLE (in the repository,
    not loaded: explicit model control)."""
    message: str = ""
    """Why the model failed, or which versions failed to load."""


@dataclass
class LoadError:
    """A version that failed to load (version 0: the model as a whole)."""

    model: str
    version: int
    message: str


@dataclass
class ReloadResult:
    """What a reload did: every model afterwards and the versions that failed to load."""

    models: list[ModelStatus]
    errors: list[LoadError] = field(default_factory=list)
    loaded: list[tuple[str, int]] = field(default_factory=list)
    unloaded: list[tuple[str, int]] = field(default_factory=list)


class QueueWaits(NamedTuple):
    """Submissions that waited in a model's batch queues and their total wait, ns (all versions)."""

    count: int
    ns: int


# ---- the interface ----------------------------------------------------------------------------------------

class ModelControl(Protocol):
    """Repository changes a face may ask for: the engine's own, or the app's (which also refreshes health)."""

    async def reload(self) -> ReloadResult: ...

    async def load_model(self, name: str) -> ModelStatus: ...

    async def unload_model(self, name: str) -> ModelStatus: ...

    def ready(self, name: str | None = None) -> bool:
        """The engine's readiness; the app's also needs every other process of ``--processes N`` ready."""
        ...


class EngineInterface(Protocol):
    """What a face may call; server/engine.py's Engine implements it, tests may wrap or fake it."""

    metrics: Metrics | None
    """The Prometheus metrics the engine records into (the app serves them); None: none kept."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def reload(self) -> ReloadResult: ...

    async def load_model(self, name: str) -> ModelStatus:
        """Load or reload one model (explicit model control; an EngineError with code FAILED_PRECONDITION
        otherwise, or when no version of it loads)."""
        ...

    async def unload_model(self, name: str) -> ModelStatus:
        """Unload one model (explicit model control); its versions stop after their requests in flight."""
        ...

    def list_models(self) -> list[ModelStatus]: ...

    def get_model(self, name: str, version: int = 0) -> LoadedModel:
        """The loaded version (0: the default, the highest); NotFound / NotReady otherwise."""
        ...

    def resolve(self, name: str, version: int, operation: str) -> LoadedModel:
        """``get_model`` that also checks the version has ``operation`` (Unsupported naming what it can do)."""
        ...

    def ready(self, name: str | None = None) -> bool: ...

    def admit(self, request: Request) -> None:
        """Check the request against the server's limits (InvalidInput naming the field); operations call it."""
        ...

    def queue_waits(self, model: str) -> QueueWaits: ...

    async def sample(self, request: SampleRequest) -> SampleResult: ...

    async def log_likelihood(self, request: LikelihoodRequest) -> LikelihoodResult: ...

    async def encode(self, request: EncodeRequest) -> EncodeResult: ...

    async def decode(self, request: DecodeRequest) -> DecodeResult: ...
