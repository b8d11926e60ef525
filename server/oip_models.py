"""Open Inference Protocol models: ``<model>.<operation>`` names and versions, request parameters, Triton's
ModelConfig, the per-model statistics the endpoint keeps, and the descriptor pool server reflection reads (see
server/oip.py for the protocol as served)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf import descriptor_pool

from genserve.core.manifest import LIKELIHOOD_NAME
from genserve.oip import POOL as OIP_POOL
from genserve.oip import grpc_service_pb2 as pb
from genserve.oip import model_config_pb2 as mc
from genserve.server.interface import OPERATIONS, LikelihoodRequest, LikelihoodResult
from genserve.server.oip_tensors import (
    DATATYPES,
    PER_DIMENSION,
    PERCENTILE,
    PERCENTILE_PREFIX,
    SCORE_PREFIX,
    TensorSpec,
    tensor_specs,
)
from genserve.server.repository import LoadedModel
from genserve.server.transport import Failure, check_answer_size, invalid, seed_or_draw

PLATFORM = "genserve"
BACKEND = "onnxruntime"

PARAMETERS = {
    "sample": ("seed", "n", "temperature", "langevin_steps", "langevin_step_size", "return_latents", "timeout"),
    "log_likelihood": ("seed", "importance_samples", "scores", "percentile", "per_dimension", "draws", "timeout"),
    "encode": ("seed", "sample", "timeout"),
    "decode": ("seed", "sample", "timeout"),
}
"""Request parameters each operation accepts."""
SCORE_PARAMETERS = frozenset({"scores", "percentile", "per_dimension", "draws"})
"""log_likelihood's parameters beyond log_prob: score kinds (comma-separated names), percentiles, per-dimension
terms, dequantisation draws."""
IGNORED_PARAMETERS = ("priority", "triton_enable_empty_final_response")
"""Triton request parameters accepted and ignored by the operation: genserve has one priority level, and every
response of genserve is its request's final one (``triton_enable_empty_final_response``, which Triton's clients
send, perf_analyzer on every request, asks ModelStreamInfer to mark it: ``triton_final_response``)."""


def oip_name(model: str, operation: str) -> str:
    return f"{model}.{operation}"


def split_name(name: str) -> tuple[str, str]:
    """``digits-vae.encode`` -> (``digits-vae``, ``encode``); Failure NOT_FOUND when not of that form."""
    if not name:
        raise invalid("no model name given; name a model as '<model>.<operation>', e.g. digits-vae.sample "
                      "(RepositoryIndex lists them)")
    model, dot, operation = name.rpartition(".")
    if not dot or not model or operation not in OPERATIONS:
        base = model if dot and model else name
        raise Failure(grpc.StatusCode.NOT_FOUND,
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

    def text(self, key: str) -> str | None:
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise invalid(f"parameter {key!r} must be a string (string_param), got {value!r}")
        return value

    def seed(self) -> int:
        """The request's seed, or a fresh one; INVALID_ARGUMENT outside 0..2**63-1."""
        return seed_or_draw(self.integer("seed"), "parameter 'seed'")


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


def add_statistics(total: pb.ModelStatisticsResponse, other: pb.ModelStatisticsResponse) -> None:
    """Add another process's statistics (``--processes N``) to ``total``, entry by name and version: counts and
    durations add up, the last inference is the later one; an entry ``total`` lacks is left out (the model is
    not served by the process that answers)."""
    entries = {(e.name, e.version): e for e in total.model_stats}
    for entry in other.model_stats:
        mine = entries.get((entry.name, entry.version))
        if mine is None:
            continue
        mine.last_inference = max(mine.last_inference, entry.last_inference)
        mine.inference_count += entry.inference_count
        mine.execution_count += entry.execution_count
        for field, value in entry.inference_stats.ListFields():
            if isinstance(value, pb.StatisticDuration):
                target = getattr(mine.inference_stats, field.name)
                target.count += value.count
                target.ns += value.ns


def duration(count: int, ns: int) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=max(0, int(count)), ns=max(0, int(ns)))


def model_config(name: str, loaded: LoadedModel, operation: str) -> mc.ModelConfig:
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

    providers = list(loaded.providers)
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


def wanted_outputs(request: pb.ModelInferRequest, specs: list[TensorSpec]) -> list[str]:
    """The outputs the request asks for (none named: every output of the operation)."""
    names = [s.name for s in specs]
    wanted = [o.name for o in request.outputs]
    for name in wanted:
        if name not in names:
            raise invalid(f"{request.model_name} has no output {name!r}; its outputs are {', '.join(names)}")
    return wanted or names


def sample_count(inputs: dict[str, np.ndarray], params: Params) -> int:
    """The number of samples: the input ``N`` or the request parameter ``n`` (Triton clients send either)."""
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


def extra_outputs(named: list[str]) -> list[str]:
    """Of the outputs a request names, those beyond log_prob and bits_per_dim (score kinds, percentiles,
    per-dimension terms): naming one asks for it, as the matching request parameter does."""
    return [n for n in named if n not in ("log_prob", "bits_per_dim")]


def likelihood_request(loaded: LoadedModel, x: np.ndarray, seed: int, importance_samples: int | None,
                       params: Params, named: list[str], max_message_bytes: int) -> LikelihoodRequest:
    """A log_likelihood request with what its parameters (``scores`` comma-separated, ``percentile``,
    ``per_dimension``, ``draws``) and its named outputs (``score_<kind>``, ``percentile``,
    ``percentile_<kind>``, ``per_dimension``) ask for beside log_prob."""
    text = params.text("scores")
    scores = [s.strip() for s in (text or "").split(",") if s.strip()]
    percentile = params.flag("percentile")
    per_dimension = params.flag("per_dimension")
    for name in extra_outputs(named):  # unknown names were refused by wanted_outputs
        if name == PER_DIMENSION:
            per_dimension = True
        elif name == PERCENTILE:
            percentile = True
        elif name.startswith(PERCENTILE_PREFIX):
            percentile = True
            scores.append(name.removeprefix(PERCENTILE_PREFIX))
        elif name.startswith(SCORE_PREFIX):
            scores.append(name.removeprefix(SCORE_PREFIX))
    scores = list(dict.fromkeys(scores))
    if per_dimension:
        row = 8 * max(1, int(np.prod(x.shape[1:]))) if x.ndim > 1 else 8
        check_answer_size(int(x.shape[0]) if x.ndim else 1, row, max_message_bytes, "x",
                          "send fewer rows per request when asking for per_dimension")
    return LikelihoodRequest(loaded, x, seed, importance_samples, tuple(scores), percentile, per_dimension,
                             params.integer("draws"))


def score_arrays(result: LikelihoodResult) -> dict[str, np.ndarray | None]:
    """A log_likelihood result's extras as OIP outputs by name."""
    out: dict[str, np.ndarray | None] = {SCORE_PREFIX + k: v for k, v in result.scores.items()}
    for k, v in result.percentiles.items():
        out[PERCENTILE if k == "log_prob" else PERCENTILE_PREFIX + k] = v
    out[PER_DIMENSION] = result.per_dimension
    return out


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
