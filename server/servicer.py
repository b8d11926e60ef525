"""The gRPC face of the engine: proto <-> numpy, request checks, engine errors -> status codes, deadlines.

Everything here is transport: the engine (server/engine.py) knows nothing about gRPC, and this module knows
nothing about graphs or batching. Every handler follows one pattern: check the request's fields (a bad field
is INVALID_ARGUMENT naming it), call the engine under the request's deadline, and turn the result back into
protobuf. Engine errors carry the status code they mean (genserve.server.errors, ``.code``); anything else is
a bug and answers INTERNAL with a short message and a request id, with the traceback in the server log.

SampleStream and seeds. A stream of n samples is cut into fixed blocks of ``STREAM_BLOCK_ROWS`` rows, whatever
``chunk_size`` is: block k holds rows [k*B, min(n, (k+1)*B)) and is exactly
``Sample(n=rows_k, seed=block_seed(seed, k))`` with ``block_seed(seed, 0) == seed``. So the rows of a stream
depend only on (n, seed), never on chunk_size; a stream of n <= B rows equals Sample(n, seed); and any block
can be reproduced alone with a unary Sample call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from genserve.clients.tensors import from_proto, to_proto
from genserve.core.manifest import LIKELIHOOD, OPERATION
from genserve.server.errors import EngineError
from genserve.server.limits import Expired, RowBudget, within
from genserve.server.message_parsing import BadMessage
from genserve.v1 import manifest_pb2, service_pb2, service_pb2_grpc

log = logging.getLogger("genserve.server")

T = TypeVar("T")

STREAM_BLOCK_ROWS = 256
"""Rows per SampleStream block; fixed (not a setting) because the rows of a stream depend on it."""
STREAM_BLOCKS_AHEAD = 4
"""Blocks of one SampleStream computed concurrently, so their steps merge in the batcher; bounds memory."""
STREAM_WINDOW = 8
"""LogLikelihoodStream chunks read and scored ahead of the one being answered (client pipelining depth)."""
MAX_SEED = 2**63 - 1
"""Seeds are 0..2**63-1 (the range of genserve.core.noise.Noise)."""

STATE = {
    "READY": service_pb2.MODEL_STATE_READY,
    "FAILED": service_pb2.MODEL_STATE_FAILED,
    "LOADING": service_pb2.MODEL_STATE_LOADING,
}


class RpcFailure(Exception):
    """A request that ends with a status: raised by checks, turned into ``context.abort`` by the wrapper."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}")


def discard(task: asyncio.Future) -> None:
    """Abandon a task (after ``cancel``): its outcome is retrieved when it ends, so a chunk that failed
    while the stream was already ending is not logged as "Task exception was never retrieved"."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def block_seed(seed: int, block: int) -> int:
    """The seed of SampleStream block ``block`` of a stream seeded ``seed``; block 0 keeps the seed."""
    if block == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed), int(block)]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & MAX_SEED


def draw_seed() -> int:
    return secrets.randbits(63)


def request_seed(request: Any) -> int:
    """The request's seed, or a fresh one when unset; INVALID_ARGUMENT when outside 0..2**63-1."""
    if not request.HasField("seed"):
        return draw_seed()
    if request.seed > MAX_SEED:
        raise invalid("seed", f"{request.seed} is above the largest seed 2**63-1; use a smaller one")
    return int(request.seed)


def check_target(request: Any, prefix: str = "") -> None:
    """Model name and version fields; the engine answers NOT_FOUND for names and versions it lacks."""
    if not request.model:
        raise invalid(prefix + "model", "no model name given; ListModels lists the models this server has")
    if request.version < 0:
        raise invalid(prefix + "version", f"{request.version} is negative; name a version >= 1, or 0 for the "
                                          "default")


def tensor_field(request: Any, field: str, max_rows: int) -> np.ndarray:
    """Decode a tensor field; malformed tensors are INVALID_ARGUMENT naming the field."""
    if not request.HasField(field):
        raise invalid(field, "missing; send a tensor with a batch axis first")
    try:
        array = from_proto(getattr(request, field))
    except ValueError as e:
        raise invalid(field, str(e)) from None
    if array.ndim == 0:
        raise invalid(field, "is a scalar; send a batch with the rows along axis 0")
    if array.shape[0] > max_rows:
        raise invalid(field, f"has {array.shape[0]} rows, more than the limit of {max_rows} per request;"
                             " split it, or use LogLikelihoodStream to score a data set in chunks")
    return array


def optional(request: Any, field: str) -> Any:
    return getattr(request, field) if request.HasField(field) else None


def operation_enums(operations: Any) -> list[int]:
    """Operations as manifest_pb2.Operation values, whether the engine lists names or enum values."""
    return [OPERATION[op] if isinstance(op, str) else int(op) for op in operations]


def serving_proto(serving: Any) -> manifest_pb2.ServingConfig:
    """The engine's effective serving settings as a ServingConfig message (a proto, dataclass or dict)."""
    if isinstance(serving, manifest_pb2.ServingConfig):
        return serving
    if serving is None:
        return manifest_pb2.ServingConfig()
    if hasattr(serving, "to_proto"):
        return serving.to_proto()
    items = serving.items() if isinstance(serving, dict) else vars(serving).items()
    fields = manifest_pb2.ServingConfig.DESCRIPTOR.fields_by_name
    return manifest_pb2.ServingConfig(**{k: v for k, v in items if k in fields and v is not None})


def summary(status: Any) -> service_pb2.ModelSummary:
    return service_pb2.ModelSummary(
        name=status.name,
        versions=list(status.versions),
        default_version=int(status.default_version or 0),
        family=status.family or "",
        model=status.model or "",
        operations=operation_enums(status.operations or ()),
        state=STATE.get(status.state, service_pb2.MODEL_STATE_UNSPECIFIED),
        message=status.message or "",
    )


class GenerativeServicer(service_pb2_grpc.GenerativeServiceServicer):
    """GenerativeService on grpc.aio over an Engine (see server_common: the agreed interface).

    ``limits`` is the ServerConfig (max_sample_n, max_rows_per_request, max_message_mb); ``reload`` runs a
    repository reload for the ReloadRepository RPC (the app's, which also refreshes health; default
    ``engine.reload``); ``observe(method, model, code, seconds)`` records each finished request for metrics.
    """

    def __init__(self, engine: Any, limits: Any,
                 observe: Callable[[str, str, str, float], None] | None = None,
                 reload: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.engine = engine
        self.max_sample_n = int(limits.max_sample_n)
        self.max_rows = int(limits.max_rows_per_request)
        self.max_message_bytes = int(limits.max_message_mb) * 2**20
        self.max_deadline_s = float(getattr(limits, "max_deadline_s", math.inf))
        self.rows = RowBudget(int(getattr(limits, "max_queued_rows", 2**62)))
        self.observe = observe
        self.reload = reload or engine.reload
        self._known: set[str] = set()
        self._known_at = -math.inf

    # -- plumbing ------------------------------------------------------------------------------------------

    def _model_label(self, name: str) -> str:
        """Known model names label metrics; others are "unknown", so clients cannot blow up label sets."""
        if name not in self._known and time.monotonic() - self._known_at > 1.0:  # re-list at most 1/s
            try:
                self._known = {s.name for s in self.engine.list_models()}
            except Exception:  # noqa: BLE001 - labels must never fail a request
                pass
            self._known_at = time.monotonic()
        return name if name in self._known else "unknown"

    def _record(self, method: str, model: str, code: grpc.StatusCode, started: float) -> None:
        if self.observe is not None:
            try:
                self.observe(method, self._model_label(model) if model else "", code.name,
                             time.perf_counter() - started)
            except Exception:  # noqa: BLE001
                log.exception("metrics: recording %s failed", method)

    async def _deadline(self, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
        """Await ``work`` within the RPC's deadline, capped at max_deadline_s; a passed deadline cancels it
        (its queued rows drop)."""
        try:
            return await within(work, context.time_remaining(), self.max_deadline_s)
        except Expired as e:
            if e.capped:
                message = (f"the request ran past this server's deadline ceiling of {self.max_deadline_s:g} s"
                           " (max_deadline_s); send less per request, or use the streaming RPCs")
            else:
                message = "the deadline passed before the answer was ready; allow more time or send less"
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, message) from None

    def _failure(self, method: str, model: str, error: BaseException) -> RpcFailure:
        """The status a failed request answers with."""
        if isinstance(error, RpcFailure):
            return error
        if isinstance(error, BadMessage):  # a request stream's message that did not parse
            return RpcFailure(error.code, error.message)
        if isinstance(error, EngineError):
            code = getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)
            if code == grpc.StatusCode.INTERNAL:  # a graph call failed (e.g. ONNX Runtime raised): operators' news
                log.error("%s for model %r failed: %s", method, model, error)
            return RpcFailure(code, str(error) or type(error).__name__)
        rid = uuid.uuid4().hex[:12]
        log.error("request %s: %s for model %r failed", rid, method, model, exc_info=error)
        return RpcFailure(grpc.StatusCode.INTERNAL,
                          f"internal error in {method} ({type(error).__name__}); see request id {rid}"
                          " in the server log")

    async def _unary(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                     handler: Callable[[], Awaitable[T]]) -> T:
        """Run one unary handler with accounting and error mapping."""
        started = time.perf_counter()
        model = getattr(request, "model", "")
        try:
            response = await handler()
        except asyncio.CancelledError:
            self._record(method, model, grpc.StatusCode.CANCELLED, started)
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            failure = self._failure(method, model, e)
            self._record(method, model, failure.code, started)
            await context.abort(failure.code, failure.message)
        self._record(method, model, grpc.StatusCode.OK, started)
        return response

    # -- metadata ------------------------------------------------------------------------------------------

    async def ListModels(self, request: service_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ListModelsResponse:
        async def handle() -> service_pb2.ListModelsResponse:
            statuses = sorted(self.engine.list_models(), key=lambda s: s.name)
            return service_pb2.ListModelsResponse(models=[summary(s) for s in statuses])

        return await self._unary("ListModels", request, context, handle)

    async def GetModel(self, request: service_pb2.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> service_pb2.ModelInfo:
        async def handle() -> service_pb2.ModelInfo:
            check_target(request)
            loaded = self.engine.get_model(request.model, int(request.version))
            status = next((s for s in self.engine.list_models() if s.name == request.model), None)
            info = service_pb2.ModelInfo(
                name=request.model,
                version=int(loaded.version),
                manifest=loaded.manifest,
                serving=serving_proto(getattr(loaded, "serving", None)),
                providers=list(getattr(loaded, "providers", ()) or ()),
            )
            if status is not None:
                info.versions.extend(status.versions)
                info.default_version = int(status.default_version or 0)
                info.state = STATE.get(status.state, service_pb2.MODEL_STATE_UNSPECIFIED)
            return info

        return await self._unary("GetModel", request, context, handle)

    async def ReloadRepository(self, request: service_pb2.ReloadRequest,
                               context: grpc.aio.ServicerContext) -> service_pb2.ReloadResponse:
        async def handle() -> service_pb2.ReloadResponse:
            result = await self.reload()
            statuses = sorted(self.engine.list_models(), key=lambda s: s.name)
            return service_pb2.ReloadResponse(
                models=[summary(s) for s in statuses],
                errors=[service_pb2.LoadError(model=e.model, version=int(e.version or 0), message=e.message)
                        for e in getattr(result, "errors", ()) or ()],
            )

        return await self._unary("ReloadRepository", request, context, handle)

    # -- sampling ------------------------------------------------------------------------------------------

    def _check_sample(self, request: service_pb2.SampleRequest, field: str = "n") -> None:
        check_target(request)
        if request.n <= 0:
            raise invalid(field, f"{request.n} samples asked for; ask for at least 1")
        if request.n > self.max_sample_n:
            raise invalid(field, f"{request.n} samples asked for, more than this server's limit of "
                                 f"{self.max_sample_n}; ask for fewer per request")

    def _row_bytes(self, request: service_pb2.SampleRequest) -> int:
        """Bytes one sample row (and its latent row) takes on the wire, from the model's manifest."""
        loaded = self.engine.get_model(request.model, int(request.version))
        dim = math.prod(loaded.manifest.data.shape)
        latent = int(loaded.manifest.parameters.get("latent_dim", dim)) if request.return_latents else 0
        return 4 * (dim + latent)

    async def _sample(self, request: service_pb2.SampleRequest, n: int, seed: int, version: int
                      ) -> tuple[np.ndarray, np.ndarray | None, int]:
        return await self.engine.sample(
            request.model, version, n, seed,
            optional(request, "temperature"), optional(request, "langevin_steps"),
            optional(request, "langevin_step_size"), bool(request.return_latents),
        )

    async def Sample(self, request: service_pb2.SampleRequest,
                     context: grpc.aio.ServicerContext) -> service_pb2.SampleResponse:
        async def handle() -> service_pb2.SampleResponse:
            self._check_sample(request)
            seed = request_seed(request)
            size = request.n * self._row_bytes(request)
            if size > self.max_message_bytes * 0.95:  # headroom for the envelope
                raise invalid("n", f"{request.n} samples take {size / 2**20:.1f} MiB, above the"
                                   f" {self.max_message_bytes // 2**20} MiB message limit; use SampleStream")
            with self.rows.hold(request.n):
                x, z, version = await self._deadline(context, self._sample(request, int(request.n), seed,
                                                                            int(request.version)))
            response = service_pb2.SampleResponse(samples=to_proto(x), model_version=int(version), seed=seed)
            if z is not None and request.return_latents:
                response.latents.CopyFrom(to_proto(z))
            return response

        return await self._unary("Sample", request, context, handle)

    async def SampleStream(self, request: service_pb2.SampleStreamRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[service_pb2.SampleResponse]:
        started = time.perf_counter()
        sample = request.sample
        code = grpc.StatusCode.OK
        blocks: list[asyncio.Task] = []
        try:
            try:
                check_target(sample, "sample.")
                self._check_sample(sample, field="sample.n")
                seed = request_seed(sample)
                if request.chunk_size < 0:
                    raise invalid("chunk_size", f"{request.chunk_size} is negative; use >= 1, or 0 for"
                                                " the default")
                chunk = int(request.chunk_size) or STREAM_BLOCK_ROWS
                most = max(1, int(self.max_message_bytes * 0.95) // self._row_bytes(sample))
                if chunk > most:
                    raise invalid("chunk_size", f"{chunk} rows exceed the message limit of "
                                                f"{self.max_message_bytes // 2**20} MiB; use at most {most}")
                # The rows a stream holds at once: the blocks computed ahead plus one chunk being cut.
                held = min(int(sample.n), STREAM_BLOCK_ROWS * (STREAM_BLOCKS_AHEAD + 1) + chunk)
                with self.rows.hold(held):
                    async for response in self._stream_blocks(sample, seed, chunk, blocks, context):
                        yield response
            except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed at a yield
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as e:  # noqa: BLE001
                failure = self._failure("SampleStream", sample.model, e)
                code = failure.code
                await context.abort(failure.code, failure.message)
        finally:
            for task in blocks:
                task.cancel()
                discard(task)
            self._record("SampleStream", sample.model, code, started)

    async def _stream_blocks(self, sample: service_pb2.SampleRequest, seed: int, chunk: int,
                             blocks: list[asyncio.Task], context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[service_pb2.SampleResponse]:
        """Compute fixed blocks (a few concurrently) and re-cut them into chunks of ``chunk`` rows."""
        n = int(sample.n)
        count = -(-n // STREAM_BLOCK_ROWS)
        version = int(sample.version)
        # Block 0 runs first and pins the version, so a reload mid-stream cannot mix versions in one stream.
        first = await self._deadline(context, self._sample(sample, min(n, STREAM_BLOCK_ROWS), seed, version))
        version = int(first[2])

        def launch(k: int) -> asyncio.Task:
            rows = min(n, (k + 1) * STREAM_BLOCK_ROWS) - k * STREAM_BLOCK_ROWS
            return asyncio.ensure_future(self._sample(sample, rows, block_seed(seed, k), version))

        next_block = 1
        while next_block < count and len(blocks) < STREAM_BLOCKS_AHEAD:
            blocks.append(launch(next_block))
            next_block += 1
        xs, zs = [first[0]], [first[1]]
        buffered, offset, done = len(first[0]), 0, 1
        while offset < n:
            while buffered < min(chunk, n - offset) and done < count:
                x, z, _ = await self._deadline(context, asyncio.shield(blocks[0]))
                blocks.pop(0)
                done += 1
                if next_block < count:
                    blocks.append(launch(next_block))
                    next_block += 1
                xs.append(x)
                zs.append(z)
                buffered += len(x)
            x_all = np.concatenate(xs) if len(xs) > 1 else xs[0]
            z_all = None if zs[0] is None else (np.concatenate(zs) if len(zs) > 1 else zs[0])
            take = min(chunk, len(x_all))
            response = service_pb2.SampleResponse(samples=to_proto(x_all[:take]), model_version=version,
                                                  seed=seed, offset=offset)
            if z_all is not None and sample.return_latents:
                response.latents.CopyFrom(to_proto(z_all[:take]))
            xs = [x_all[take:]]
            zs = [None if z_all is None else z_all[take:]]
            buffered -= take
            offset += take
            yield response

    # -- scoring and latents -------------------------------------------------------------------------------

    async def _log_likelihood(self, request: service_pb2.LogLikelihoodRequest,
                              context: grpc.aio.ServicerContext) -> service_pb2.LogLikelihoodResponse:
        check_target(request)
        x = tensor_field(request, "x", self.max_rows)
        seed = request_seed(request)
        k = optional(request, "importance_samples")
        with self.rows.hold(len(x)):
            log_prob, bpd, kind, version = await self._deadline(
                context, self.engine.log_likelihood(request.model, int(request.version), x, seed, k))
        response = service_pb2.LogLikelihoodResponse(
            log_prob=to_proto(np.asarray(log_prob, dtype=np.float64)),
            kind=LIKELIHOOD.get(kind, manifest_pb2.LIKELIHOOD_KIND_UNSPECIFIED),
            model_version=int(version), chunk_id=request.chunk_id, seed=seed,
        )
        if bpd is not None:
            response.bits_per_dim.CopyFrom(to_proto(np.asarray(bpd, dtype=np.float64)))
        return response

    async def LogLikelihood(self, request: service_pb2.LogLikelihoodRequest,
                            context: grpc.aio.ServicerContext) -> service_pb2.LogLikelihoodResponse:
        return await self._unary("LogLikelihood", request, context,
                                 lambda: self._log_likelihood(request, context))

    async def LogLikelihoodStream(self, request_iterator: AsyncIterator[service_pb2.LogLikelihoodRequest],
                                  context: grpc.aio.ServicerContext
                                  ) -> AsyncIterator[service_pb2.LogLikelihoodResponse]:
        """Pipelined: up to STREAM_WINDOW chunks are read and scored while earlier answers go out."""
        started = time.perf_counter()
        model = ""
        code = grpc.StatusCode.OK
        pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def read() -> None:
            nonlocal model
            async for req in request_iterator:
                model = model or req.model
                await pending.put(asyncio.ensure_future(self._log_likelihood(req, context)))
            await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            try:
                while True:
                    getter = asyncio.ensure_future(pending.get())
                    done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done and reader.exception() is not None:
                        getter.cancel()  # reading the client's stream failed: that is the stream's status
                        raise reader.exception()
                    task = await getter
                    if task is None:
                        break
                    yield await task
            except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed at a yield
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as e:  # noqa: BLE001 - the first failing chunk ends the stream with its status
                failure = self._failure("LogLikelihoodStream", model, e)
                code = failure.code
                await context.abort(failure.code, failure.message)
        finally:
            reader.cancel()
            discard(reader)
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()
                    discard(task)
            self._record("LogLikelihoodStream", model, code, started)

    async def Encode(self, request: service_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> service_pb2.EncodeResponse:
        async def handle() -> service_pb2.EncodeResponse:
            check_target(request)
            x = tensor_field(request, "x", self.max_rows)
            seed = request_seed(request)
            with self.rows.hold(len(x)):
                z, version = await self._deadline(
                    context,
                    self.engine.encode(request.model, int(request.version), x, seed, bool(request.sample)))
            return service_pb2.EncodeResponse(z=to_proto(np.asarray(z, dtype=np.float32)),
                                              model_version=int(version), seed=seed)

        return await self._unary("Encode", request, context, handle)

    async def Decode(self, request: service_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> service_pb2.DecodeResponse:
        async def handle() -> service_pb2.DecodeResponse:
            check_target(request)
            z = tensor_field(request, "z", self.max_rows)
            seed = request_seed(request)
            with self.rows.hold(len(z)):
                x, version = await self._deadline(
                    context,
                    self.engine.decode(request.model, int(request.version), z, seed, bool(request.sample)))
            return service_pb2.DecodeResponse(x=to_proto(np.asarray(x, dtype=np.float32)),
                                              model_version=int(version), seed=seed)

        return await self._unary("Decode", request, context, handle)
