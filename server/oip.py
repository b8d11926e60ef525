"""The Open Inference Protocol (KServe v2) gRPC endpoint, with Triton's ModelConfig and ModelStatistics.

``inference.GRPCInferenceService`` runs on the same grpc.aio server as genserve's own API, over the same engine,
so tritonclient, KServe's clients and Triton's tools call genserve unchanged (protos/genserve/oip).

Models. Each operation of each model is an addressable model named ``<model>.<operation>``: for ``digits-vae``
that is ``digits-vae.sample``, ``digits-vae.log_likelihood``, ``digits-vae.encode`` and ``digits-vae.decode``
(only the operations the model's manifest lists). Versions are decimal strings; "" (or "0") is the default,
the highest loaded version. Model names may contain dots: the operation is what follows the last one.

Tensors (ModelMetadata gives the exact shapes; -1 is the batch axis, any size):

=================== ================================================= ==========================================
operation           inputs                                            outputs
=================== ================================================= ==========================================
sample              N INT64 [1] (or the request parameter ``n``)      samples FP32 [-1, *data], latents FP32 [-1, q]
log_likelihood      x FP32 [-1, *data]                                log_prob FP64 [-1], bits_per_dim FP64 [-1]
encode              x FP32 [-1, *data]                                z FP32 [-1, q]
decode              z FP32 [-1, q]                                    x FP32 [-1, *data]
=================== ================================================= ==========================================

``latents`` is listed for models with a latent size (``latent_dim``); ``bits_per_dim`` is left out for
unnormalised models. ``x`` is in raw data units (integer levels 0..16 for digits); inputs of any integer or
floating datatype are accepted and converted to float32 exactly as genserve's own API does, so the results are
the same numbers. Inputs travel as typed ``contents`` or as ``raw_input_contents`` (little-endian, row-major);
outputs always as ``raw_output_contents``. No requested outputs: every output; otherwise the ones asked for.

Request parameters (the request's ``parameters`` map): ``seed`` (int, 0..2**63-1; drawn when unset and
returned as the response parameter ``seed``); sample: ``n``, ``temperature``, ``langevin_steps``,
``langevin_step_size`` (energy models), ``return_latents`` (bool); log_likelihood: ``importance_samples``
(VAE); encode/decode: ``sample`` (bool: draw from q(z|x) / p(x|z) instead of the mean); ``timeout``
(microseconds, Triton's) bounds the request like a gRPC deadline. Unknown parameters are refused, so a typo
does not silently fall back to a default. log_likelihood answers the response parameter ``likelihood_kind``
(exact, lower_bound, unnormalized).

Errors are gRPC statuses with the engine's messages: NOT_FOUND (no such model, operation or version),
INVALID_ARGUMENT (tensors, datatypes, parameters, data domain), UNAVAILABLE (model not loaded),
RESOURCE_EXHAUSTED (queue full), DEADLINE_EXCEEDED, INTERNAL (a bug; the log has a request id).

Statistics (ModelStatistics, one entry per ``<model>.<operation>`` and version). Request-level figures are the
OIP endpoint's own, in Triton's sense: ``success``/``fail`` (count, total ns from arrival to answer),
``compute_input`` (decoding tensors), ``compute_infer`` (the engine's work for the request, which includes its
waits in the dynamic batcher), ``compute_output`` (encoding tensors), ``inference_count`` (rows: samples drawn
or rows scored/encoded/decoded) and ``last_inference`` (ms since the epoch). Batch-level figures come from the
engine and are shared by every operation of the model, whichever API sent the rows, because the batcher
merges them into the same ONNX Runtime calls: ``execution_count`` is the number of ONNX Runtime calls of the
version's graphs (fewer than the inferences when batching works), and ``queue`` the waits of submissions in
the model's batch queues (Prometheus ``genserve_queue_wait_seconds``, all versions). ``batch_stats``,
``memory_usage`` and ``response_stats`` are left empty.

Descriptor pool: genserve.oip's stubs register their ``inference.*`` descriptors in a pool of their own, so this
module and tritonclient's stubs can live in one process; ``reflection_pool()`` lets server reflection see both.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import descriptor_pool

from genserve.core.manifest import LIKELIHOOD_NAME
from genserve.oip import POOL as OIP_POOL
from genserve.oip import grpc_service_pb2 as pb
from genserve.oip import grpc_service_pb2_grpc as pb_grpc
from genserve.oip import model_config_pb2 as mc
from genserve.server.errors import EngineError, NotFound
from genserve.server.limits import Expired, RowBudget, within

log = logging.getLogger("genserve.server")

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
"""``inference.GRPCInferenceService``."""
OPERATIONS = ("sample", "log_likelihood", "encode", "decode")
METHOD = {"sample": "Sample", "log_likelihood": "LogLikelihood", "encode": "Encode", "decode": "Decode"}
PLATFORM = "genserve"
BACKEND = "onnxruntime"
EXTENSIONS = ("model_configuration", "statistics", "parameters")
"""Protocol extensions served (Triton's names)."""
MAX_SEED = 2**63 - 1
STREAM_WINDOW = 8
"""ModelStreamInfer requests run concurrently ahead of the one being answered (their rows batch together)."""

PARAMETERS = {
    "sample": ("seed", "n", "temperature", "langevin_steps", "langevin_step_size", "return_latents", "timeout"),
    "log_likelihood": ("seed", "importance_samples", "timeout"),
    "encode": ("seed", "sample", "timeout"),
    "decode": ("seed", "sample", "timeout"),
}
"""Request parameters each operation accepts."""
IGNORED_PARAMETERS = ("priority",)
"""Triton request parameters accepted and ignored (genserve has one priority level)."""


@dataclass(frozen=True)
class DType:
    """One OIP datatype: its numpy type (little-endian on the wire), typed-contents field and config enum."""

    numpy: np.dtype
    contents: str | None
    """InferTensorContents field holding its elements; None: only raw bytes carry it."""
    config: int
    """model_config_pb2.DataType value."""


DATATYPES: dict[str, DType] = {
    "BOOL": DType(np.dtype(bool), "bool_contents", mc.TYPE_BOOL),
    "UINT8": DType(np.dtype("<u1"), "uint_contents", mc.TYPE_UINT8),
    "UINT16": DType(np.dtype("<u2"), "uint_contents", mc.TYPE_UINT16),
    "UINT32": DType(np.dtype("<u4"), "uint_contents", mc.TYPE_UINT32),
    "UINT64": DType(np.dtype("<u8"), "uint64_contents", mc.TYPE_UINT64),
    "INT8": DType(np.dtype("<i1"), "int_contents", mc.TYPE_INT8),
    "INT16": DType(np.dtype("<i2"), "int_contents", mc.TYPE_INT16),
    "INT32": DType(np.dtype("<i4"), "int_contents", mc.TYPE_INT32),
    "INT64": DType(np.dtype("<i8"), "int64_contents", mc.TYPE_INT64),
    "FP16": DType(np.dtype("<f2"), None, mc.TYPE_FP16),
    "FP32": DType(np.dtype("<f4"), "fp32_contents", mc.TYPE_FP32),
    "FP64": DType(np.dtype("<f8"), "fp64_contents", mc.TYPE_FP64),
}
CONTENT_FIELDS = tuple(f.name for f in pb.InferTensorContents.DESCRIPTOR.fields)


# ---------------------------------------------------------------------------------------------------------------
# Errors


class OipError(Exception):
    """A request that ends with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> OipError:
    return OipError(grpc.StatusCode.INVALID_ARGUMENT, message)


def failure(error: BaseException, what: str) -> OipError:
    """The status a failed request answers with: its own, the engine error's, or INTERNAL with a request id."""
    if isinstance(error, OipError):
        return error
    if isinstance(error, EngineError):
        return OipError(getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL),
                        str(error) or type(error).__name__)
    rid = uuid.uuid4().hex[:12]
    log.error("request %s: OIP %s failed", rid, what, exc_info=error)
    return OipError(grpc.StatusCode.INTERNAL,
                    f"internal error in {what} ({type(error).__name__}); see request id {rid} in the server log")


# ---------------------------------------------------------------------------------------------------------------
# Models and their tensors


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an OIP model; ``shape`` has the batch axis (-1) first when ``batched``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    batched: bool = True
    optional: bool = False


def oip_name(model: str, operation: str) -> str:
    return f"{model}.{operation}"


def split_name(name: str) -> tuple[str, str]:
    """``digits-vae.encode`` -> (``digits-vae``, ``encode``); OipError NOT_FOUND when not of that form."""
    if not name:
        raise invalid("no model name given; name a model as '<model>.<operation>', e.g. digits-vae.sample "
                      "(RepositoryIndex lists them)")
    model, dot, operation = name.rpartition(".")
    if not dot or not model or operation not in OPERATIONS:
        base = model if dot and model else name
        raise OipError(grpc.StatusCode.NOT_FOUND,
                       f"no model named {name!r}: genserve serves each operation of a model as its own model "
                       f"'<model>.<operation>', the operation one of {', '.join(OPERATIONS)} (e.g. "
                       f"'{base}.sample'); RepositoryIndex lists them")
    return model, operation


def parse_version(version: str) -> int:
    """"" or "0": the default (0); "3": 3; anything else INVALID_ARGUMENT."""
    text = version.strip()
    if not text:
        return 0
    if not text.isdigit() or int(text) > 2**31:
        raise invalid(f"model version {version!r} is not a version number; use '1', '2', ... or '' for the "
                      "default (the highest loaded version)")
    return int(text)


def latent_shape(loaded: Any) -> tuple[int, ...]:
    """Shape of one latent row: (latent_dim,) when the manifest has one, else the data shape (flows)."""
    latent = loaded.manifest.parameters.get("latent_dim")
    return (int(latent),) if latent else tuple(loaded.spec.shape)


def tensor_specs(loaded: Any, operation: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of ``<model>.<operation>`` for a loaded model version."""
    data = tuple(int(d) for d in loaded.spec.shape)
    latent = latent_shape(loaded)
    if operation == "sample":
        outputs = [TensorSpec("samples", "FP32", (-1, *data))]
        if loaded.manifest.parameters.get("latent_dim"):
            outputs.append(TensorSpec("latents", "FP32", (-1, *latent)))
        return [TensorSpec("N", "INT64", (1,), batched=False, optional=True)], outputs
    if operation == "log_likelihood":
        outputs = [TensorSpec("log_prob", "FP64", (-1,))]
        if LIKELIHOOD_NAME.get(loaded.likelihood_kind, "exact") not in ("unnormalized", "none"):
            outputs.append(TensorSpec("bits_per_dim", "FP64", (-1,)))
        return [TensorSpec("x", "FP32", (-1, *data))], outputs
    if operation == "encode":
        return [TensorSpec("x", "FP32", (-1, *data))], [TensorSpec("z", "FP32", (-1, *latent))]
    return [TensorSpec("z", "FP32", (-1, *latent))], [TensorSpec("x", "FP32", (-1, *data))]


# ---------------------------------------------------------------------------------------------------------------
# Tensors and parameters on the wire


def decode_inputs(request: pb.ModelInferRequest, specs: list[TensorSpec], model: str) -> dict[str, np.ndarray]:
    """The request's input tensors as arrays, checked against the model's inputs."""
    known = {s.name: s for s in specs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one "
                      "per input, in the order of `inputs`, or none and use each input's `contents`")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in known:
            raise invalid(f"{model} has no input {tensor.name!r}; its inputs are {', '.join(known)}")
        if tensor.name in out:
            raise invalid(f"input {tensor.name!r} is given twice")
        out[tensor.name] = decode_tensor(tensor, raw[i] if raw else None)
    for s in specs:
        if not s.optional and s.name not in out:
            want = f"{s.datatype} [{', '.join(map(str, s.shape))}]"
            raise invalid(f"{model} needs input {s.name!r} ({want}); the request has "
                          f"{', '.join(out) or 'no inputs'}")
    return out


def decode_tensor(tensor: Any, raw: bytes | None) -> np.ndarray:
    """One InferInputTensor (with its raw bytes, if raw contents are used) as a native-endian array."""
    name = tensor.name
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise invalid(f"input {name!r} has datatype {tensor.datatype!r}; use one of {', '.join(DATATYPES)} "
                      "(FP32 for data and latents)")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise invalid(f"input {name!r} has shape {list(shape)}: a request's dimensions must be >= 0")
    count = math.prod(shape)
    given = [f for f in CONTENT_FIELDS if len(getattr(tensor.contents, f))]
    if raw is not None:
        if given:
            raise invalid(f"input {name!r} has both `contents` and raw_input_contents; send one of them")
        want = count * dtype.numpy.itemsize
        if len(raw) != want:
            raise invalid(f"input {name!r}: raw contents have {len(raw)} bytes, but shape {list(shape)} of "
                          f"{tensor.datatype} needs {want}")
        return np.frombuffer(raw, dtype=dtype.numpy).reshape(shape).astype(dtype.numpy.newbyteorder("="))
    if dtype.contents is None:
        raise invalid(f"input {name!r} is {tensor.datatype}, which has no typed contents field; send it in "
                      "raw_input_contents")
    wrong = [f for f in given if f != dtype.contents]
    if wrong:
        raise invalid(f"input {name!r} is {tensor.datatype}: put its elements in contents.{dtype.contents}, "
                      f"not {', '.join(wrong)}")
    values = getattr(tensor.contents, dtype.contents)
    if len(values) != count:
        raise invalid(f"input {name!r}: contents.{dtype.contents} has {len(values)} elements, but shape "
                      f"{list(shape)} needs {count}")
    wide = np.asarray(values)
    array = wide.astype(dtype.numpy.newbyteorder("="))
    if wide.dtype.kind in "iu" and not np.array_equal(array, wide):
        raise invalid(f"input {name!r}: contents.{dtype.contents} has values outside the range of "
                      f"{tensor.datatype}")
    return array.reshape(shape)


def encode_output(name: str, datatype: str, array: np.ndarray) -> tuple[pb.ModelInferResponse.InferOutputTensor,
                                                                           bytes]:
    """An output tensor's metadata and its raw bytes (little-endian, row-major)."""
    wire = np.ascontiguousarray(np.asarray(array).astype(DATATYPES[datatype].numpy, copy=False))
    meta = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(wire.shape))
    return meta, wire.tobytes()


def parameter_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


class Params:
    """The request's parameters, read with type checks; parameters the operation does not take are refused."""

    def __init__(self, request: pb.ModelInferRequest, operation: str, model: str) -> None:
        self.values = {k: parameter_value(v) for k, v in request.parameters.items()}
        allowed = PARAMETERS[operation]
        unknown = sorted(k for k in self.values if k not in allowed and k not in IGNORED_PARAMETERS)
        if unknown:
            raise invalid(f"{model} does not take the request parameter(s) {', '.join(map(repr, unknown))}; "
                          f"it takes: {', '.join(allowed)}")

    def integer(self, key: str) -> int | None:
        value = self.values.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"parameter {key!r} must be an integer (int64_param), got {value!r}")
        return int(value)

    def number(self, key: str) -> float | None:
        value = self.values.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(f"parameter {key!r} must be a number (double_param or int64_param), got {value!r}")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.values.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise invalid(f"parameter {key!r} must be a bool (bool_param), got {value!r}")
        return value

    def seed(self) -> int:
        """The request's seed, or a fresh one; INVALID_ARGUMENT outside 0..2**63-1."""
        seed = self.integer("seed")
        if seed is None:
            return secrets.randbits(63)
        if not 0 <= seed <= MAX_SEED:
            raise invalid(f"parameter 'seed' = {seed}: use 0..2**63-1")
        return seed


# ---------------------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class OpStats:
    """Cumulative figures of one ``<model>.<operation>`` version, as seen by the OIP endpoint."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    inferences: int = 0
    last_ms: int = 0


def duration(count: int, ns: int) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=max(0, int(count)), ns=max(0, int(ns)))


# ---------------------------------------------------------------------------------------------------------------
# The servicer


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over an Engine (server/engine.py's interface).

    ``limits`` is the ServerConfig (``max_message_mb`` bounds a sample's answer; None: 64 MiB;
    ``max_deadline_s`` caps how long one inference may run, as on genserve's own API); ``rows`` is the
    server-wide RowBudget shared with GenerativeService, so that both APIs together hold at most
    ``max_queued_rows`` rows (None: a budget of this servicer's own);
    ``observe(method, model, code, seconds)`` records each finished inference for the Prometheus metrics
    (method ``oip.Sample`` etc.; the app's ``Server._observe``).
    """

    def __init__(self, engine: Any, limits: Any = None,
                 observe: Callable[[str, str, str, float], None] | None = None,
                 rows: RowBudget | None = None) -> None:
        self.engine = engine
        self.max_message_bytes = int(getattr(limits, "max_message_mb", 64)) * 2**20
        self.max_deadline_s = float(getattr(limits, "max_deadline_s", math.inf))
        self.rows = rows if rows is not None else RowBudget(int(getattr(limits, "max_queued_rows", 2**62)))
        self.observe = observe
        self.stats: dict[tuple[str, int, str], OpStats] = {}
        try:
            self.version = importlib.metadata.version("genserve")
        except importlib.metadata.PackageNotFoundError:
            self.version = "unknown"

    # -- plumbing --------------------------------------------------------------------------------------------

    async def _answer(self, context: grpc.aio.ServicerContext, what: str, handler: Callable[[], Awaitable[T]]
                      ) -> T:
        try:
            return await handler()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            error = failure(e, what)
            await context.abort(error.code, error.message)
            raise AssertionError("unreachable") from None  # abort raises

    def _resolve(self, name: str, version: str) -> tuple[Any, str, str]:
        """(loaded model version, model name, operation) of an OIP model name; NOT_FOUND etc. when missing."""
        model, operation = split_name(name)
        try:
            loaded = self.engine.get_model(model, parse_version(version))
        except NotFound as e:
            raise OipError(grpc.StatusCode.NOT_FOUND, f"{name}: {e} (their operations are the OIP models "
                                                      "'<model>.<operation>'; RepositoryIndex lists them)") from None
        if operation not in loaded.operations:
            have = ", ".join(oip_name(model, op) for op in loaded.operations) or "none"
            raise OipError(grpc.StatusCode.NOT_FOUND,
                           f"no model named {name!r}: {model} version {loaded.version} is a {loaded.model} "
                           f"model ({loaded.family}) without a {operation} operation; its models are: {have}")
        return loaded, model, operation

    def _names(self) -> list[tuple[Any, str]]:
        """(model status, operation) of every addressable OIP model, by name."""
        return [(s, op) for s in sorted(self.engine.list_models(), key=lambda s: s.name) for op in s.operations]

    # -- health and metadata ---------------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        # Triton's strict readiness: every model of the repository serves.
        return pb.ServerReadyResponse(ready=bool(self.engine.ready()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        try:
            _, model, _ = self._resolve(request.name, request.version)
        except (OipError, EngineError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=bool(self.engine.ready(model)))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=PLATFORM, version=self.version, extensions=list(EXTENSIONS))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        async def handle() -> pb.ModelMetadataResponse:
            loaded, model, operation = self._resolve(request.name, request.version)
            inputs, outputs = tensor_specs(loaded, operation)
            meta = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=request.name, versions=[str(v) for v in self._versions(model)], platform=PLATFORM,
                inputs=[meta(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in inputs],
                outputs=[meta(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in outputs])

        return await self._answer(context, "ModelMetadata", handle)

    def _versions(self, model: str) -> list[int]:
        status = next((s for s in self.engine.list_models() if s.name == model), None)
        return list(status.versions) if status is not None else []

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ModelConfigResponse:
        async def handle() -> pb.ModelConfigResponse:
            loaded, _, operation = self._resolve(request.name, request.version)
            return pb.ModelConfigResponse(config=model_config(request.name, loaded, operation))

        return await self._answer(context, "ModelConfig", handle)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
                              ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        models = []
        for s in sorted(self.engine.list_models(), key=lambda s: s.name):
            if s.state == "READY":
                models += [index(name=oip_name(s.name, op), version=str(v), state="READY")
                           for op in s.operations for v in s.versions]
            elif not request.ready:  # a model that failed has no operations to list: its folder name stands
                models.append(index(name=s.name, state="UNAVAILABLE" if s.state == "FAILED" else s.state,
                                    reason=s.message))
        return pb.RepositoryIndexResponse(models=models)

    # -- statistics ------------------------------------------------------------------------------------------

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
                              ) -> pb.ModelStatisticsResponse:
        async def handle() -> pb.ModelStatisticsResponse:
            if request.name:
                loaded, model, operation = self._resolve(request.name, request.version)
                versions = [loaded.version] if request.version.strip() not in ("", "0") else self._versions(model)
                targets = [(model, v, operation) for v in versions]
            else:
                if request.version:
                    raise invalid("a statistics request for every model (empty name) cannot name a version")
                targets = [(s.name, v, op) for s, op in self._names() for v in s.versions]
            entries = []
            for model, version, operation in targets:
                try:
                    loaded = self.engine.get_model(model, version)
                except EngineError:
                    continue  # unloaded since it was listed
                entries.append(self._statistics(model, loaded, operation))
            return pb.ModelStatisticsResponse(model_stats=entries)

        return await self._answer(context, "ModelStatistics", handle)

    def _statistics(self, model: str, loaded: Any, operation: str) -> pb.ModelStatistics:
        s = self.stats.get((model, loaded.version, operation), OpStats())
        queue_n, queue_ns = self._queue(model, loaded)
        executions = sum(int(getattr(b, "calls", 0)) for b in getattr(loaded, "batchers", {}).values())
        return pb.ModelStatistics(
            name=oip_name(model, operation), version=str(loaded.version), last_inference=s.last_ms,
            inference_count=s.inferences, execution_count=executions,
            inference_stats=pb.InferStatistics(
                success=duration(s.success, s.success_ns), fail=duration(s.fail, s.fail_ns),
                queue=duration(queue_n, queue_ns), compute_input=duration(s.success, s.input_ns),
                compute_infer=duration(s.success, s.infer_ns), compute_output=duration(s.success, s.output_ns)))

    def _queue(self, model: str, loaded: Any) -> tuple[int, int]:
        """(submissions, total ns waited) in the model's batch queues, from the engine's Prometheus metrics."""
        metrics = getattr(self.engine, "metrics", None)
        if metrics is None:
            return 0, 0
        count = total = 0.0
        for graph in loaded.manifest.graphs:
            labels = {"model": model, "graph": graph.name}
            count += metrics.value("genserve_queue_wait_seconds_count", labels) or 0.0
            total += metrics.value("genserve_queue_wait_seconds_sum", labels) or 0.0
        return int(count), int(round(total * 1e9))

    def _record(self, key: tuple[str, int, str] | None, ok: bool, started: int, rows: int = 0,
                times: tuple[int, int, int] = (0, 0, 0), code: grpc.StatusCode = grpc.StatusCode.OK) -> None:
        """Account one finished inference (``key`` None: the model was not found, nothing to account to)."""
        elapsed = time.perf_counter_ns() - started
        if key is not None:
            s = self.stats.setdefault(key, OpStats())
            if ok:
                s.success += 1
                s.success_ns += elapsed
                s.input_ns += times[0]
                s.infer_ns += times[1]
                s.output_ns += times[2]
                s.inferences += rows
                s.last_ms = time.time_ns() // 1_000_000
            else:
                s.fail += 1
                s.fail_ns += elapsed
        if self.observe is not None:
            model = key[0] if key is not None else "unknown"
            method = f"oip.{METHOD[key[2]]}" if key is not None else "oip.ModelInfer"
            try:
                self.observe(method, model, code.name, elapsed / 1e9)
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                log.exception("metrics: recording an OIP inference failed")

    # -- inference -------------------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, context.time_remaining())
        except asyncio.CancelledError:
            raise
        except OipError as e:
            await context.abort(e.code, e.message)
            raise AssertionError("unreachable") from None

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in order; a failed request answers ``error_message`` and the stream goes
        on (Triton's behaviour). Up to STREAM_WINDOW requests run at once, so their rows batch together."""
        pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def one(req: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(infer_response=await self._infer(req, context.time_remaining()))
            except OipError as e:
                return pb.ModelStreamInferResponse(
                    error_message=e.message,
                    infer_response=pb.ModelInferResponse(model_name=req.model_name, id=req.id))

        async def read() -> None:
            async for req in request_iterator:
                await pending.put(asyncio.ensure_future(one(req)))
            await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                getter = asyncio.ensure_future(pending.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done and reader.exception() is not None:
                    getter.cancel()  # reading the client's stream failed: that ends the stream
                    raise reader.exception()
                task = await getter
                if task is None:
                    break
                yield await task
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()

    async def _infer(self, request: pb.ModelInferRequest, remaining: float | None) -> pb.ModelInferResponse:
        """One inference; OipError with the status on failure (accounted either way)."""
        started = time.perf_counter_ns()
        key = None
        try:
            loaded, model, operation = self._resolve(request.model_name, request.model_version)
            key = (model, loaded.version, operation)
            in_specs, out_specs = tensor_specs(loaded, operation)
            inputs = decode_inputs(request, in_specs, request.model_name)
            params = Params(request, operation, request.model_name)
            wanted = self._wanted_outputs(request, out_specs)
            timeout = params.integer("timeout")
            if timeout is not None:
                if timeout <= 0:
                    raise invalid(f"parameter 'timeout' = {timeout}: give microseconds > 0")
                remaining = timeout / 1e6 if remaining is None else min(remaining, timeout / 1e6)
            seed = params.seed()
            decoded = time.perf_counter_ns()
            call, rows = self._call(loaded, model, operation, inputs, params, seed, wanted)
            try:
                with self.rows.hold(rows):
                    results, version, extra = await self._within(remaining, call, self.max_deadline_s)
            finally:
                call.close()  # never started when the row budget refused it; a no-op once it ran
            inferred = time.perf_counter_ns()
            response = pb.ModelInferResponse(model_name=request.model_name, model_version=str(version),
                                             id=request.id)
            response.parameters["seed"].int64_param = seed
            for k, v in extra.items():
                response.parameters[k].string_param = v
            datatypes = {s.name: s.datatype for s in out_specs}
            for name in wanted:
                if results.get(name) is None:
                    continue  # e.g. latents the family does not produce
                meta, raw = encode_output(name, datatypes[name], results[name])
                response.outputs.append(meta)
                response.raw_output_contents.append(raw)
            key = (model, int(version), operation)
            times = (decoded - started, inferred - decoded, time.perf_counter_ns() - inferred)
            self._record(key, True, started, rows, times)
            return response
        except asyncio.CancelledError:
            self._record(key, False, started, code=grpc.StatusCode.CANCELLED)
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            error = failure(e, f"ModelInfer for {request.model_name!r}")
            self._record(key, False, started, code=error.code)
            raise error from None

    @staticmethod
    def _wanted_outputs(request: pb.ModelInferRequest, specs: list[TensorSpec]) -> list[str]:
        names = [s.name for s in specs]
        wanted = [o.name for o in request.outputs]
        for name in wanted:
            if name not in names:
                raise invalid(f"{request.model_name} has no output {name!r}; its outputs are {', '.join(names)}")
        return wanted or names

    def _call(self, loaded: Any, model: str, operation: str, inputs: dict[str, np.ndarray], params: Params,
              seed: int, wanted: list[str]) -> tuple[Awaitable[tuple[dict[str, Any], int, dict[str, str]]], int]:
        """(the engine call for the operation, rows it produces); the call returns (outputs, version, extra
        string parameters of the response)."""
        version = loaded.version  # the version resolved above, so its checks, metadata and answer agree
        engine = self.engine
        if operation == "sample":
            n = self._sample_n(inputs, params)
            dim = math.prod(loaded.spec.shape) + (math.prod(latent_shape(loaded)) if "latents" in wanted else 0)
            if 4 * n * dim > self.max_message_bytes * 0.95:
                raise invalid(f"N = {n} samples take {4 * n * dim / 2**20:.1f} MiB, above the "
                              f"{self.max_message_bytes // 2**20} MiB message limit; ask for fewer per request")
            return_latents = params.flag("return_latents") or "latents" in wanted

            async def sample() -> tuple[dict[str, Any], int, dict[str, str]]:
                x, z, v = await engine.sample(model, version, n, seed, params.number("temperature"),
                                              params.integer("langevin_steps"), params.number("langevin_step_size"),
                                              return_latents)
                return {"samples": x, "latents": z if return_latents else None}, v, {}

            return sample(), n
        if operation == "log_likelihood":
            x = inputs["x"]

            async def score() -> tuple[dict[str, Any], int, dict[str, str]]:
                lp, bpd, kind, v = await engine.log_likelihood(model, version, x, seed,
                                                               params.integer("importance_samples"))
                return {"log_prob": lp, "bits_per_dim": bpd}, v, {"likelihood_kind": kind}

            return score(), _rows(x)
        if operation == "encode":
            x = inputs["x"]

            async def encode() -> tuple[dict[str, Any], int, dict[str, str]]:
                z, v = await engine.encode(model, version, x, seed, params.flag("sample"))
                return {"z": z}, v, {}

            return encode(), _rows(x)
        z = inputs["z"]

        async def decode() -> tuple[dict[str, Any], int, dict[str, str]]:
            x, v = await engine.decode(model, version, z, seed, params.flag("sample"))
            return {"x": x}, v, {}

        return decode(), _rows(z)

    @staticmethod
    def _sample_n(inputs: dict[str, np.ndarray], params: Params) -> int:
        n_param = params.integer("n")
        if "N" in inputs:
            if n_param is not None:
                raise invalid("give the number of samples once: the input 'N' or the parameter 'n', not both")
            n = inputs["N"]
            if n.size != 1 or n.dtype.kind not in "iu":
                raise invalid(f"input 'N' must hold one integer (INT64, shape [1]); got {n.dtype} of shape "
                              f"{list(n.shape)}")
            return int(n.reshape(-1)[0])
        if n_param is None:
            raise invalid("sample needs the number of samples: the input 'N' (INT64, shape [1]) or the request "
                          "parameter 'n'")
        return n_param

    @staticmethod
    async def _within(remaining: float | None, work: Awaitable[T], ceiling: float = math.inf) -> T:
        """Await ``work`` within the deadline, capped at the server's ``ceiling`` (max_deadline_s); a passed
        deadline cancels it (its queued rows drop)."""
        try:
            return await within(work, remaining, ceiling)
        except Expired as e:
            if e.capped:
                raise OipError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"the inference ran past this server's deadline ceiling of {ceiling:g} s "
                               "(max_deadline_s); send less per request") from None
            raise OipError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           "the deadline (or the 'timeout' parameter) passed before the answer was ready; "
                           "allow more time or send less") from None


def _rows(a: np.ndarray) -> int:
    return int(a.shape[0]) if a.ndim else 1


# ---------------------------------------------------------------------------------------------------------------
# ModelConfig


def model_config(name: str, loaded: Any, operation: str) -> mc.ModelConfig:
    """Triton's ModelConfig of ``<model>.<operation>`` for a loaded version.

    Sampling has no batch axis in its inputs (it takes a count), so its max_batch_size is 0 and its dims are
    full shapes; the other operations batch rows: max_batch_size is the most rows the dynamic batcher merges
    into one ONNX Runtime call (larger requests are accepted and split) and dims leave the batch axis out.
    """
    inputs, outputs = tensor_specs(loaded, operation)
    serving = loaded.serving
    batched = operation != "sample"

    def dims(t: TensorSpec) -> list[int]:
        return list(t.shape[1:] if batched and t.batched else t.shape)

    providers = list(getattr(loaded, "providers", ()) or ())
    on_gpu = any("CUDA" in p or "Tensorrt" in p for p in providers)
    manifest = loaded.manifest
    parameters = {
        "family": manifest.family,
        "model": manifest.model,
        "operation": operation,
        "genserve_model": loaded.name,
        "data": manifest.data.name,
        "data_shape": ",".join(str(d) for d in loaded.spec.shape),
        "likelihood_kind": LIKELIHOOD_NAME.get(loaded.likelihood_kind, "exact"),
        "graphs": ",".join(g.name for g in manifest.graphs),
        "providers": ",".join(providers),
        "request_parameters": ",".join(PARAMETERS[operation]),
    }
    if loaded.spec.discrete:
        parameters["levels"] = str(loaded.spec.levels)
    if manifest.parameters.get("latent_dim"):
        parameters["latent_dim"] = str(int(manifest.parameters["latent_dim"]))
    return mc.ModelConfig(
        name=name,
        platform=PLATFORM,
        backend=BACKEND,
        version_policy=mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()),
        max_batch_size=int(serving.max_batch_size) if batched else 0,
        input=[mc.ModelInput(name=t.name, data_type=DATATYPES[t.datatype].config, dims=dims(t), optional=t.optional)
               for t in inputs],
        output=[mc.ModelOutput(name=t.name, data_type=DATATYPES[t.datatype].config, dims=dims(t)) for t in outputs],
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=int(round(float(serving.max_queue_delay_ms) * 1000)),
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=int(serving.max_queue_size))),
        instance_group=[mc.ModelInstanceGroup(name=name, count=int(serving.instances),
                                              kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu
                                              else mc.ModelInstanceGroup.KIND_CPU)],
        parameters={k: mc.ModelParameter(string_value=v) for k, v in parameters.items()},
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=False),
    )


# ---------------------------------------------------------------------------------------------------------------
# Registration


class ChainedPool:
    """Descriptor look-ups over several pools in turn, for server reflection (genserve.oip has its own pool)."""

    def __init__(self, *pools: Any) -> None:
        self.pools = pools

    def _first(self, method: str, *args: Any) -> Any:
        for pool in self.pools:
            try:
                return getattr(pool, method)(*args)
            except KeyError:
                continue
        raise KeyError(args[0] if args else method)

    def FindFileByName(self, name: str) -> Any:  # noqa: N802 - the DescriptorPool interface
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # noqa: N802
        return self._first("FindFileContainingSymbol", symbol)

    def FindMessageTypeByName(self, name: str) -> Any:  # noqa: N802
        return self._first("FindMessageTypeByName", name)

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:  # noqa: N802
        return message.file.pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Any) -> Any:  # noqa: N802
        return message.file.pool.FindAllExtensions(message)


def reflection_pool() -> ChainedPool:
    """The pool to give grpc reflection: genserve.oip's descriptors, then the default pool's (genserve.v1...)."""
    return ChainedPool(OIP_POOL, descriptor_pool.Default())


def register_oip(grpc_server: grpc.aio.Server, engine: Any, limits: Any = None,
                 observe: Callable[[str, str, str, float], None] | None = None,
                 rows: RowBudget | None = None) -> OipServicer:
    """Add GRPCInferenceService over ``engine`` to ``grpc_server`` (before it starts); returns the servicer."""
    servicer = OipServicer(engine, limits, observe, rows)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server)
    return servicer
