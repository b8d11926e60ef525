"""What the client hands back, and the protobuf messages behind it: requests from numpy, answers read back.

Shared by the blocking and the asyncio client (genserve.clients.client), which only differ in how they call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from genserve.clients.channel import GenserveError
from genserve.core.manifest import LIKELIHOOD_NAME, OPERATION_NAME, spec_from_proto
from genserve.core.noise import derived_seed
from genserve.core.spec import DataSpec
from genserve.core.tensors import from_proto, to_proto
from genserve.v1 import manifest_pb2, service_pb2

STATE_NAME = {v: k.removeprefix("MODEL_STATE_") for k, v in service_pb2.ModelState.items()}
HEALTH_NAME = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def chunk_seed(seed: int, offset: int) -> int:
    """The seed score_stream sends with the chunk starting at row ``offset`` (the seed itself for row 0).

    Each chunk gets its own stream of dequantisation / importance noise, reproducible from (seed, offset).
    """
    return derived_seed(seed, offset)


@dataclass(frozen=True)
class ModelSummary:
    """One model as ListModels lists it."""

    name: str
    versions: tuple[int, ...]
    default_version: int
    family: str
    model: str
    operations: tuple[str, ...]
    state: str
    """READY, LOADING or FAILED."""
    message: str
    """Why the model (or one of its versions) failed to load; empty otherwise."""


@dataclass(frozen=True)
class ScoreKindInfo:
    """One score kind a model serves (ModelManifest.score_kinds), with its calibration when it has one."""

    name: str
    description: str
    """What the number means, its units, and how it was fitted."""
    higher_is_normal: bool
    """True when higher means more in-distribution (as for log_prob); its percentile is then the plain one,
    otherwise 100 minus it, so a low percentile is anomalous for every kind."""
    per_batch: bool
    """True when a row's score depends on the other rows of its request (a test over the batch)."""
    calibration_rows: int = 0
    """Rows of in-distribution data its calibration holds; 0: no calibration (no percentiles)."""
    calibration_data: str = ""
    calibration_noise: str = ""
    """How the noise of a stochastic score (a bound) enters the calibration."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def describe(self) -> str:
        """One line for a listing: name, meaning and calibration."""
        where = (f"; calibrated on {self.calibration_rows} rows of {self.calibration_data}"
                 if self.calibration_rows else "; not calibrated")
        sense = "higher = more normal" if self.higher_is_normal else "higher = more anomalous"
        batch = ", per batch" if self.per_batch else ""
        return f"{self.name}: {self.description} ({sense}{batch}{where})"


LOG_PROB_KIND = "log_prob"


def score_kinds(manifest: manifest_pb2.ModelManifest) -> dict[str, ScoreKindInfo]:
    """``log_prob`` (when the model has a likelihood) and the manifest's score kinds, with their calibration."""
    calibration = {c.score: c for c in manifest.calibration}
    kinds = []
    if manifest.capabilities.likelihood not in (manifest_pb2.LIKELIHOOD_KIND_UNSPECIFIED,
                                                manifest_pb2.LIKELIHOOD_KIND_NONE):
        likelihood = LIKELIHOOD_NAME.get(manifest.capabilities.likelihood, "exact")
        kinds.append((LOG_PROB_KIND, f"the model's log-likelihood in nats ({likelihood})", True, False))
    kinds += [(k.name, k.description, k.higher_is_normal, k.per_batch) for k in manifest.score_kinds]
    out = {}
    for name, description, higher, per_batch in kinds:
        c = calibration.get(name)
        out[name] = ScoreKindInfo(name, description, higher, per_batch,
                                  int(c.rows) if c is not None else 0, c.data if c is not None else "",
                                  c.noise if c is not None else "")
    return out


@dataclass(frozen=True)
class ModelInfo:
    """One model version in full (GetModel); ``manifest`` is the raw genserve.v1.ModelManifest."""

    name: str
    version: int
    versions: tuple[int, ...]
    default_version: int
    state: str
    family: str
    model: str
    description: str
    spec: DataSpec
    """Shape, domain and levels of one example."""
    operations: tuple[str, ...]
    likelihood: str
    """What log_likelihood returns: exact, lower_bound, unnormalized or none."""
    parameters: dict[str, float]
    test_metrics: dict[str, float]
    serving: dict[str, Any]
    providers: tuple[str, ...]
    manifest: manifest_pb2.ModelManifest = field(repr=False)

    @property
    def score_kinds(self) -> dict[str, ScoreKindInfo]:
        """The score kinds this model serves beside log_prob (``scores=`` names), by name, with their meaning."""
        return score_kinds(self.manifest)

    @property
    def calibrated(self) -> tuple[str, ...]:
        """The scores with a calibration (``percentile=True`` works for them); empty: exported without one."""
        return tuple(c.score for c in self.manifest.calibration)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the manifest as protobuf JSON)."""
        keys = ("name", "version", "versions", "default_version", "state", "family", "model", "description",
                "operations", "likelihood", "parameters", "test_metrics", "serving", "providers")
        out = {k: getattr(self, k) for k in keys}
        out["score_kinds"] = {k: v.to_dict() for k, v in self.score_kinds.items()}
        out["calibrated"] = list(self.calibrated)
        out["data"] = self.spec.to_dict()
        out["manifest"] = json_format.MessageToDict(self.manifest, preserving_proto_field_name=True)
        return out


@dataclass(frozen=True)
class Likelihood:
    """Scores of N examples: ``log_prob`` (N,) float64 nats, ``bits_per_dim`` (N,) or None (unnormalized)."""

    log_prob: np.ndarray
    bits_per_dim: np.ndarray | None
    kind: str
    """exact (log p(x)), lower_bound (ELBO / importance-weighted bound) or unnormalized (-E(x))."""
    version: int
    """The model version that answered."""
    seed: int | None
    """The seed used (for a stream: the seed its chunk seeds derive from; None when the server drew them)."""
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    """The requested score kinds (``scores=``), each (N,) float64, by name (ModelInfo.score_kinds says what
    each means); empty when none were asked for."""
    percentiles: dict[str, np.ndarray] = field(default_factory=dict)
    """With ``percentile=True``: for "log_prob" and each requested kind, (N,) float64 in [0, 100], the row's
    percentile among the model's calibration data, oriented so that low = anomalous; empty otherwise."""
    per_dimension: np.ndarray | None = None
    """With ``per_dimension=True``: (N, *shape) float64 nats, the terms of -log p(x) per dimension (docs/scoring.md
    says what each family gives); None otherwise."""

    def __len__(self) -> int:
        return len(self.log_prob)


def floats(x: Any) -> np.ndarray:
    """Examples and latents travel as float32, the dtype every genserve graph takes."""
    return np.asarray(x, dtype=np.float32)


def sample_request(model: str, n: int, seed: int | None, temperature: float | None,
                   langevin_steps: int | None, langevin_step_size: float | None, return_latents: bool,
                   version: int) -> service_pb2.SampleRequest:
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fields = {"seed": seed, "temperature": temperature, "langevin_steps": langevin_steps,
              "langevin_step_size": langevin_step_size}
    return service_pb2.SampleRequest(model=model, version=version, n=int(n), return_latents=return_latents,
                                     **{k: v for k, v in fields.items() if v is not None})


def score_names(scores: Any) -> list[str]:
    """The ``scores=`` argument as a list of kind names: a name, a comma-separated string or a sequence."""
    if isinstance(scores, str):
        scores = scores.split(",")
    names = [str(s).strip() for s in scores or ()]
    return [s for s in names if s]


def log_likelihood_request(model: str, x: Any, seed: int | None, importance_samples: int | None, version: int,
                           chunk_id: int = 0, *, scores: Any = (), percentile: bool = False,
                           per_dimension: bool = False, draws: int | None = None
                           ) -> service_pb2.LogLikelihoodRequest:
    request = service_pb2.LogLikelihoodRequest(model=model, version=version, x=to_proto(floats(x)),
                                               chunk_id=chunk_id, scores=score_names(scores),
                                               percentile=bool(percentile), per_dimension=bool(per_dimension))
    if seed is not None:
        request.seed = int(seed)
    if importance_samples is not None:
        request.importance_samples = int(importance_samples)
    if draws is not None:
        request.draws = int(draws)
    return request


def encode_request(model: str, x: Any, seed: int | None, sample: bool,
                   version: int) -> service_pb2.EncodeRequest:
    request = service_pb2.EncodeRequest(model=model, version=version, x=to_proto(floats(x)), sample=sample)
    if seed is not None:
        request.seed = int(seed)
    return request


def decode_request(model: str, z: Any, seed: int | None, sample: bool,
                   version: int) -> service_pb2.DecodeRequest:
    request = service_pb2.DecodeRequest(model=model, version=version, z=to_proto(floats(z)), sample=sample)
    if seed is not None:
        request.seed = int(seed)
    return request


def read_likelihood(response: service_pb2.LogLikelihoodResponse, seed: int | None = None) -> Likelihood:
    bpd = from_proto(response.bits_per_dim) if response.HasField("bits_per_dim") else None
    per_dim = from_proto(response.per_dimension).astype(np.float64) if response.HasField("per_dimension") else None
    return Likelihood(from_proto(response.log_prob), bpd, LIKELIHOOD_NAME.get(response.kind, "unspecified"),
                      int(response.model_version), int(response.seed) if seed is None else seed,
                      scores={k: from_proto(v).astype(np.float64) for k, v in response.scores.items()},
                      percentiles={k: from_proto(v).astype(np.float64) for k, v in response.percentiles.items()},
                      per_dimension=per_dim)


def concat_likelihoods(parts: list[Likelihood], seed: int | None) -> Likelihood:
    """The scores of consecutive chunks as one Likelihood (scores, percentiles and per-dimension terms too)."""
    if not parts:
        raise ValueError("no rows to score")
    bpd = None if parts[0].bits_per_dim is None else np.concatenate([p.bits_per_dim for p in parts])
    per_dim = None if parts[0].per_dimension is None else np.concatenate([p.per_dimension for p in parts])
    return Likelihood(np.concatenate([p.log_prob for p in parts]), bpd, parts[0].kind, parts[0].version, seed,
                      scores={k: np.concatenate([p.scores[k] for p in parts]) for k in parts[0].scores},
                      percentiles={k: np.concatenate([p.percentiles[k] for p in parts]) for k in parts[0].percentiles},
                      per_dimension=per_dim)


def read_stream_chunk(response: service_pb2.LogLikelihoodResponse, seed: int | None, offset: int,
                 rows: int) -> Likelihood:
    """A LogLikelihoodStream answer, checked to answer the chunk of ``rows`` rows sent at row ``offset``."""
    scores = read_likelihood(response, seed)
    if response.chunk_id != offset or len(scores) != rows:
        raise GenserveError(grpc.StatusCode.INTERNAL,
                            f"stream answer out of order: chunk_id {response.chunk_id}, {len(scores)} rows"
                            f" where rows {offset}..{offset + rows} were expected",
                            "LogLikelihoodStream")
    return scores


def read_samples(response: service_pb2.SampleResponse, offset: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(samples, latents or None) of a Sample answer or of the SampleStream chunk expected at ``offset``."""
    if response.offset != offset:
        raise GenserveError(grpc.StatusCode.INTERNAL,
                            f"chunk at row {response.offset} where row {offset} was expected", "SampleStream")
    z = from_proto(response.latents) if response.HasField("latents") else None
    return from_proto(response.samples), z


def concat_samples(parts: list[tuple[int, np.ndarray, np.ndarray | None]], n: int
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    rows = sum(len(p[1]) for p in parts)
    if rows != n:
        raise GenserveError(grpc.StatusCode.INTERNAL, f"stream ended after {rows} of {n} rows",
                            "SampleStream")
    x = np.concatenate([p[1] for p in parts])
    z = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    return x, z


def read_summary(m: service_pb2.ModelSummary) -> ModelSummary:
    return ModelSummary(m.name, tuple(m.versions), m.default_version, m.family, m.model,
                        tuple(OPERATION_NAME.get(op, str(op)) for op in m.operations),
                        STATE_NAME.get(m.state, "UNSPECIFIED"), m.message)


def read_info(r: service_pb2.ModelInfo) -> ModelInfo:
    m = r.manifest
    return ModelInfo(
        name=r.name, version=r.version, versions=tuple(r.versions), default_version=r.default_version,
        state=STATE_NAME.get(r.state, "UNSPECIFIED"), family=m.family, model=m.model,
        description=m.description, spec=spec_from_proto(m.data),
        operations=tuple(OPERATION_NAME.get(op, str(op)) for op in m.operations),
        likelihood=LIKELIHOOD_NAME.get(m.capabilities.likelihood, "unspecified"),
        parameters=dict(m.parameters), test_metrics=dict(m.test_metrics),
        serving=json_format.MessageToDict(r.serving, preserving_proto_field_name=True),
        providers=tuple(r.providers), manifest=m,
    )


# -- standard gRPC health, with or without grpcio-health-checking -------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def health_request_bytes(service: str) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service} in protobuf wire format (field 1, length-delimited)."""
    data = service.encode()
    return (b"\x0a" + _varint(len(data)) + data) if data else b""


def health_status(data: bytes) -> int:
    """The status (field 1, varint) of a HealthCheckResponse in wire format; 0 (UNKNOWN) when absent."""
    if data[:1] != b"\x08":
        return 0
    value, shift = 0, 0
    for byte in data[1:]:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return value


def health_method(channel: Any) -> Any:
    """The Health/Check callable (service name -> status number) on a sync or aio channel.

    grpcio-health-checking's messages when it is installed; otherwise the two one-field messages are written
    by hand, so health works in a bare client install too.
    """
    try:
        from grpc_health.v1 import health_pb2
    except ModuleNotFoundError:
        serialize, deserialize = health_request_bytes, health_status
    else:
        def serialize(service: str) -> bytes:
            return health_pb2.HealthCheckRequest(service=service).SerializeToString()

        def deserialize(data: bytes) -> int:
            return health_pb2.HealthCheckResponse.FromString(data).status
    return channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=serialize,
                               response_deserializer=deserialize)
