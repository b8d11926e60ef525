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
log_likelihood      x FP32 [-1, *data]                                log_prob FP64 [-1], bits_per_dim FP64 [-1];
                                                                      when asked: score_<kind>, percentile,
                                                                      percentile_<kind> FP64 [-1],
                                                                      per_dimension FP64 [-1, *data]
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
(VAE), ``scores`` (comma-separated score kinds), ``percentile`` (bool), ``per_dimension`` (bool), ``draws``
(int; dequantisation draws of flows and pPCA on discrete data) — naming an output ``score_<kind>``,
``percentile[_<kind>]`` or ``per_dimension`` asks for it too (docs/scoring.md); encode/decode: ``sample``
(bool: draw from q(z|x) / p(x|z) instead of the mean); ``timeout`` (microseconds, Triton's) bounds the request
like a gRPC deadline. Unknown parameters are refused, so a typo does not silently fall back to a default.
log_likelihood answers the response parameter ``likelihood_kind`` (exact, lower_bound, unnormalized).

The module is a thin adapter: tensors live in server/oip_tensors.py, names, parameters, ModelConfig and
statistics in server/oip_models.py, and statuses, seeds, deadlines, the pipelined stream and accounting in
the transport layer shared with genserve.v1 (server/transport.py).

Errors are gRPC statuses with the engine's messages: NOT_FOUND (no such model, operation or version),
INVALID_ARGUMENT (tensors, datatypes, parameters, data domain, a message that is not protobuf),
UNAVAILABLE (model not loaded), RESOURCE_EXHAUSTED (queue full, a message over max_message_mb),
DEADLINE_EXCEEDED, INTERNAL (a bug; the log has a request id). In ModelStreamInfer a request that fails
answers ``error_message`` and the stream goes on; a message that does not parse ends the stream.

Statistics (ModelStatistics, one entry per ``<model>.<operation>`` and version). Request-level figures are the
OIP endpoint's own, in Triton's sense: ``success``/``fail`` (count, total ns from arrival to answer),
``compute_input`` (decoding tensors), ``compute_infer`` (the engine's work for the request, which includes its
waits in the dynamic batcher), ``compute_output`` (encoding tensors), ``inference_count`` (rows: samples drawn
or rows scored/encoded/decoded) and ``last_inference`` (ms since the epoch). Batch-level figures come from the
engine and are shared by every operation of the model, whichever API sent the rows, because the batcher
merges them into the same ONNX Runtime calls: ``execution_count`` is the number of ONNX Runtime calls of the
version's graphs (each batcher's count; fewer than the inferences when batching works), and ``queue`` the
waits of submissions in the model's batch queues (the engine's counters, ``Engine.queue_waits``, all
versions). ``batch_stats``, ``memory_usage`` and ``response_stats`` are left empty.

Descriptor pool: genserve.oip's stubs register their ``inference.*`` descriptors in a pool of their own, so this
module and tritonclient's stubs can live in one process; ``oip_models.reflection_pool()`` lets server
reflection see both.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from genserve.oip import grpc_service_pb2 as pb
from genserve.oip import grpc_service_pb2_grpc as pb_grpc
from genserve.server.config import ServerConfig
from genserve.server.errors import EngineError, NotFound
from genserve.server.interface import (
    METHOD,
    DecodeRequest,
    EncodeRequest,
    EngineInterface,
    LikelihoodRequest,
    ModelControl,
    ModelStatus,
    Request,
    SampleRequest,
)
from genserve.server.limits import RowBudget
from genserve.server.oip_models import (
    OPERATIONS,
    PLATFORM,
    SCORE_PARAMETERS,
    OpStats,
    Params,
    add_statistics,
    duration,
    extra_outputs,
    likelihood_request,
    model_config,
    oip_name,
    parse_version,
    sample_count,
    score_arrays,
    split_name,
    wanted_outputs,
)
from genserve.server.oip_tensors import decode_inputs, encode_output, latent_shape, output_datatypes, tensor_specs
from genserve.server.repository import LoadedModel
from genserve.server.transport import (
    STREAM_WINDOW,
    Accounting,
    Failure,
    Observe,
    abort,
    check_answer_size,
    invalid,
    note_rows,
    pipelined,
    status_of,
    within_deadline,
)

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
"""``inference.GRPCInferenceService``."""
EXTENSIONS = ("model_configuration", "statistics", "parameters", "model_repository")
"""Protocol extensions served (Triton's names)."""

Outputs = tuple[dict[str, np.ndarray | None], int, dict[str, str]]
"""(output arrays by name, served version, extra string parameters of the response)."""


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over an engine (genserve.server.interface.EngineInterface).

    ``cfg`` gives the limits (``max_message_mb`` bounds a sample's answer, ``max_deadline_s`` caps how long one
    inference may run, as on genserve's own API); ``rows`` is the server-wide RowBudget shared with
    GenerativeService, so that both APIs together hold at most ``max_queued_rows`` rows (None: a budget of
    this servicer's own); ``observe(method, model, code, seconds)`` records each finished inference for the
    Prometheus metrics (method ``oip.Sample`` etc.; the app's ``Server._observe``).
    """

    def __init__(self, engine: EngineInterface, cfg: ServerConfig, observe: Observe | None = None,
                 rows: RowBudget | None = None, control: ModelControl | None = None) -> None:
        self.engine = engine
        self.control = control or engine
        self.max_message_bytes = cfg.max_message_mb * 2**20
        self.max_deadline_s = cfg.max_deadline_s
        self.rows = rows if rows is not None else RowBudget(cfg.max_queued_rows)
        self.accounting = Accounting(engine, observe, access_log=cfg.access_log)
        self.stats: dict[tuple[str, int, str], OpStats] = {}
        self.others: Callable[[bytes], Awaitable[list[bytes]]] | None = None
        """With --processes N: the other workers' statistics for a serialized request (server/workers.py)."""
        self.carried: pb.ModelStatisticsResponse | None = None
        """With --processes N, in a worker that replaced one that died: the statistics that worker had kept
        (``Server.keep_statistics``), added to this one's own."""
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
            await abort(context, status_of(e, what))
            raise

    def _resolve(self, name: str, version: str) -> tuple[LoadedModel, str, str]:
        """(loaded model version, model name, operation) of an OIP model name; NOT_FOUND etc. when missing."""
        model, operation = split_name(name)
        try:
            loaded = self.engine.get_model(model, parse_version(version))
        except NotFound as e:
            raise Failure(grpc.StatusCode.NOT_FOUND, f"{name}: {e} (their operations are the OIP models "
                                                     "'<model>.<operation>'; RepositoryIndex lists them)") from None
        if operation not in loaded.operations:
            have = ", ".join(oip_name(model, op) for op in loaded.operations) or "none"
            raise Failure(grpc.StatusCode.NOT_FOUND,
                          f"no model named {name!r}: {model} version {loaded.version} is a {loaded.model} "
                          f"model ({loaded.family}) without a {operation} operation; its models are: {have}")
        return loaded, model, operation

    def _names(self) -> list[tuple[ModelStatus, str]]:
        """(model status, operation) of every addressable OIP model, by name."""
        return [(s, op) for s in sorted(self.engine.list_models(), key=lambda s: s.name) for op in s.operations]

    # -- health and metadata ---------------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        # Triton's strict readiness: every model of the repository serves (with --processes N, in every process).
        return pb.ServerReadyResponse(ready=self.control.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        try:
            _, model, _ = self._resolve(request.name, request.version)
        except (Failure, EngineError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.control.ready(model))

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

    # -- repository control ----------------------------------------------------------------------------------

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
                                  ) -> pb.RepositoryModelLoadResponse:
        async def handle() -> pb.RepositoryModelLoadResponse:
            await self.control.load_model(self._control_name(request))
            return pb.RepositoryModelLoadResponse()

        return await self._answer(context, "RepositoryModelLoad", handle)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        async def handle() -> pb.RepositoryModelUnloadResponse:
            await self.control.unload_model(self._control_name(request))
            return pb.RepositoryModelUnloadResponse()

        return await self._answer(context, "RepositoryModelUnload", handle)

    def _control_name(self, request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest) -> str:
        """The repository model a load/unload names: ``<model>`` or one of its ``<model>.<operation>`` names."""
        return control_name(request.model_name, list(request.parameters),
                            {s.name for s in self.engine.list_models()})

    # -- statistics ------------------------------------------------------------------------------------------

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
                              ) -> pb.ModelStatisticsResponse:
        async def handle() -> pb.ModelStatisticsResponse:
            response = self.local_statistics(request)
            if self.others is not None:  # every worker counts only the calls that reached it
                for data in await self.others(request.SerializeToString()):
                    add_statistics(response, pb.ModelStatisticsResponse.FromString(data))
            return response

        return await self._answer(context, "ModelStatistics", handle)

    def local_statistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        """This process's statistics for ``request``."""
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
        response = pb.ModelStatisticsResponse(model_stats=entries)
        if self.carried is not None:
            add_statistics(response, self.carried)
        return response

    def _statistics(self, model: str, loaded: LoadedModel, operation: str) -> pb.ModelStatistics:
        s = self.stats.get((model, loaded.version, operation), OpStats())
        waits = self.engine.queue_waits(model)
        executions = sum(b.calls for b in loaded.batchers.values())
        return pb.ModelStatistics(
            name=oip_name(model, operation), version=str(loaded.version), last_inference=s.last_ms,
            inference_count=s.inferences, execution_count=executions,
            inference_stats=pb.InferStatistics(
                success=duration(s.success, s.success_ns), fail=duration(s.fail, s.fail_ns),
                queue=duration(waits.count, waits.ns), compute_input=duration(s.success, s.input_ns),
                compute_infer=duration(s.success, s.infer_ns), compute_output=duration(s.success, s.output_ns)))

    def _count(self, key: tuple[str, int, str] | None, started: int, rows: int = 0,
               times: tuple[int, int, int] | None = None) -> None:
        """Statistics of one finished inference (``times`` None: it failed; ``key`` None: no model to count
        it to)."""
        if key is None:
            return
        elapsed = time.perf_counter_ns() - started
        s = self.stats.setdefault(key, OpStats())
        if times is None:
            s.fail += 1
            s.fail_ns += elapsed
            return
        s.success += 1
        s.success_ns += elapsed
        s.input_ns += times[0]
        s.infer_ns += times[1]
        s.output_ns += times[2]
        s.inferences += rows
        s.last_ms = time.time_ns() // 1_000_000

    # -- inference -------------------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, context.time_remaining())
        except Failure as failure:
            await abort(context, failure)
            raise

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in order; a failed request answers ``error_message`` and the stream goes
        on (Triton's behaviour). Up to STREAM_WINDOW requests run at once, so their rows batch together. A
        message of the stream that does not parse ends the stream with its status (INVALID_ARGUMENT)."""
        async def one(req: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                answer = pb.ModelStreamInferResponse(infer_response=await self._infer(req, context.time_remaining()))
            except Failure as e:
                answer = pb.ModelStreamInferResponse(
                    error_message=e.message,
                    infer_response=pb.ModelInferResponse(model_name=req.model_name, id=req.id))
            flag = req.parameters.get("triton_enable_empty_final_response")
            if flag is not None and flag.bool_param:  # each answer is its request's last: say so, as Triton does
                answer.infer_response.parameters["triton_final_response"].bool_param = True
            return answer

        try:
            async for response in pipelined(request_iterator, one, STREAM_WINDOW):
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # noqa: BLE001 - reading the stream failed: that is the stream's status
            await abort(context, status_of(e, "ModelStreamInfer"))

    async def _infer(self, request: pb.ModelInferRequest, remaining: float | None) -> pb.ModelInferResponse:
        """One inference, accounted; a Failure with the status when it fails."""
        started = time.perf_counter_ns()
        key = None
        with self.accounting.track("oip.ModelInfer", request.model_name) as tracked:
            try:
                loaded, model, operation = self._resolve(request.model_name, request.model_version)
                tracked.method, tracked.model = f"oip.{METHOD[operation]}", model
                key = (model, loaded.version, operation)
                in_specs, out_specs = tensor_specs(loaded, operation)
                inputs = decode_inputs(request, in_specs, request.model_name)
                params = Params(request, operation, request.model_name)
                wanted = wanted_outputs(request, out_specs)
                timeout = params.integer("timeout")
                if timeout is not None:
                    if timeout <= 0:
                        raise invalid(f"parameter 'timeout' = {timeout}: give microseconds > 0")
                    remaining = timeout / 1e6 if remaining is None else min(remaining, timeout / 1e6)
                seed = params.seed()
                decoded = time.perf_counter_ns()
                engine_request, rows = self._engine_request(loaded, operation, inputs, params, seed, wanted,
                                                            request.outputs)
                self.engine.admit(engine_request)
                note_rows(rows)
                with self.rows.hold(rows):
                    results, version, extra = await within_deadline(self._run(engine_request), remaining,
                                                                    self.max_deadline_s)
                inferred = time.perf_counter_ns()
                response = pb.ModelInferResponse(model_name=request.model_name, model_version=str(version),
                                                 id=request.id)
                response.parameters["seed"].int64_param = seed
                for k, v in extra.items():
                    response.parameters[k].string_param = v
                datatypes = output_datatypes(loaded, operation)
                for name in wanted:
                    array = results.get(name)
                    if array is None:
                        continue  # e.g. latents the family does not produce
                    meta, raw = encode_output(name, datatypes[name], array)
                    response.outputs.append(meta)
                    response.raw_output_contents.append(raw)
                key = (model, version, operation)
                self._count(key, started, rows, (decoded - started, inferred - decoded,
                                                 time.perf_counter_ns() - inferred))
                return response
            except BaseException:
                self._count(key, started)
                raise

    def _engine_request(self, loaded: LoadedModel, operation: str, inputs: dict[str, np.ndarray], params: Params,
                        seed: int, wanted: list[str], request_outputs: Sequence[Any] = ()) -> tuple[Request, int]:
        """(the engine's request for the operation, on the version resolved above; the rows it produces).
        ``request_outputs``: the request's named outputs (InferRequestedOutputTensor); naming a score output
        asks for it."""
        if operation == "sample":
            n = sample_count(inputs, params)
            latents = "latents" in wanted
            dim = math.prod(loaded.spec.shape) + (math.prod(latent_shape(loaded)) if latents else 0)
            check_answer_size(n, 4 * dim, self.max_message_bytes, "N", "ask for fewer per request")
            request = SampleRequest(loaded, n, seed, temperature=params.number("temperature"),
                                    langevin_steps=params.integer("langevin_steps"),
                                    langevin_step_size=params.number("langevin_step_size"),
                                    return_latents=params.flag("return_latents") or latents)
            return request, n
        if operation == "log_likelihood":
            x = inputs["x"]
            k = params.integer("importance_samples")
            named = [o.name for o in request_outputs]
            if not params.values.keys() & SCORE_PARAMETERS and not extra_outputs(named):
                return LikelihoodRequest(loaded, x, seed, k), _rows(x)  # the plain path: nothing else to read
            return likelihood_request(loaded, x, seed, k, params, named, self.max_message_bytes), _rows(x)
        if operation == "encode":
            x = inputs["x"]
            return EncodeRequest(loaded, x, seed, params.flag("sample")), _rows(x)
        z = inputs["z"]
        return DecodeRequest(loaded, z, seed, params.flag("sample")), _rows(z)

    async def _run(self, request: Request) -> Outputs:
        """The engine's answer as OIP outputs by name."""
        engine = self.engine
        if isinstance(request, SampleRequest):
            x, z, version = await engine.sample(request)
            return {"samples": x, "latents": z if request.return_latents else None}, version, {}
        if isinstance(request, LikelihoodRequest):
            result = await engine.log_likelihood(request)
            outputs = {"log_prob": result.log_prob, "bits_per_dim": result.bits_per_dim}
            if request.scores or request.percentile or request.per_dimension:
                outputs.update(score_arrays(result))
            return outputs, result.version, {"likelihood_kind": result.kind}
        if isinstance(request, EncodeRequest):
            z, version = await engine.encode(request)
            return {"z": z}, version, {}
        x, version = await engine.decode(request)
        return {"x": x}, version, {}

def control_name(name: str, parameters: list[str], known: set[str]) -> str:
    """The model folder a repository load/unload names (gRPC and HTTP alike); INVALID_ARGUMENT for parameters."""
    parameters = [p for p in parameters if p != "unload_dependents"]  # no ensembles here: nothing depends
    if parameters:
        raise invalid(f"genserve takes no parameters in a repository load or unload (got {', '.join(parameters)}); "
                      "a model's files and config.json live in the repository: change them there and load again",
                      "parameters")
    if not name:
        raise invalid("name the model to load or unload: its folder in the repository", "model_name")
    model, dot, operation = name.rpartition(".")
    if name not in known and dot and model in known and operation in OPERATIONS:
        return model
    return name


def _rows(a: np.ndarray) -> int:
    return int(a.shape[0]) if a.ndim else 1


def register_oip(grpc_server: grpc.aio.Server, engine: EngineInterface, cfg: ServerConfig,
                 observe: Observe | None = None, rows: RowBudget | None = None,
                 control: ModelControl | None = None) -> OipServicer:
    """Add GRPCInferenceService over ``engine`` to ``grpc_server`` (before it starts); returns the servicer."""
    servicer = OipServicer(engine, cfg, observe, rows, control)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server)
    return servicer
