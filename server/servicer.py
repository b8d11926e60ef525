"""The gRPC face of the engine: proto <-> numpy, request checks, engine errors -> status codes, deadlines.

A thin adapter over the shared transport layer (server/transport.py: statuses, seeds, deadlines, streams,
accounting) and the engine interface (server/interface.py). Every handler follows one pattern: check the
request's fields (a bad field is INVALID_ARGUMENT naming it), resolve the model once, build the engine's
request, let the engine check it against the limits, hold its rows, run it under the request's deadline, and
turn the result back into protobuf.

SampleStream and seeds. A stream of n samples is cut into fixed blocks of ``STREAM_BLOCK_ROWS`` rows, whatever
``chunk_size`` is: block k holds rows [k*B, min(n, (k+1)*B)) and is exactly
``Sample(n=rows_k, seed=block_seed(seed, k))`` with ``block_seed(seed, 0) == seed``. So the rows of a stream
depend only on (n, seed), never on chunk_size; a stream of n <= B rows equals Sample(n, seed); and any block
can be reproduced alone with a unary Sample call.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import grpc
import numpy as np

from genserve.core.manifest import LIKELIHOOD, OPERATION
from genserve.core.noise import derived_seed
from genserve.core.tensors import from_proto, to_proto
from genserve.server.config import ServerConfig
from genserve.server.errors import InvalidInput
from genserve.server.interface import (
    DecodeRequest,
    EncodeRequest,
    EngineInterface,
    LikelihoodRequest,
    LikelihoodResult,
    ModelControl,
    ModelStatus,
    Request,
    SampleRequest,
    SampleResult,
)
from genserve.server.limits import RowBudget
from genserve.server.repository import LoadedModel
from genserve.server.transport import (
    MESSAGE_HEADROOM,
    STREAM_WINDOW,
    Accounting,
    Failure,
    Observe,
    abort,
    check_answer_size,
    check_shape,
    discard,
    invalid,
    note_rows,
    pipelined,
    seed_or_draw,
    within_deadline,
)
from genserve.v1 import manifest_pb2, service_pb2, service_pb2_grpc

T = TypeVar("T")

STREAM_BLOCK_ROWS = 256
"""Rows per SampleStream block; fixed (not a setting) because the rows of a stream depend on it."""
STREAM_BLOCKS_AHEAD = 4
"""Blocks of one SampleStream computed concurrently, so their steps merge in the batcher; bounds memory."""

STATE = {
    "READY": service_pb2.MODEL_STATE_READY,
    "FAILED": service_pb2.MODEL_STATE_FAILED,
    "LOADING": service_pb2.MODEL_STATE_LOADING,
    "UNAVAILABLE": service_pb2.MODEL_STATE_UNAVAILABLE,
}


class Targeted(Protocol):
    """A request message naming a model and version."""

    model: str
    version: int


class WithSeed(Protocol):
    seed: int

    def HasField(self, name: str) -> bool: ...  # noqa: N802 - protobuf's name


def block_seed(seed: int, block: int) -> int:
    """The seed of SampleStream block ``block`` of a stream seeded ``seed`` (genserve.core.noise.derived_seed,
    which clients use too); block 0 keeps the seed."""
    return derived_seed(seed, block)


def request_seed(request: WithSeed) -> int:
    """The request's seed, or a fresh one when unset; INVALID_ARGUMENT when outside 0..2**63-1."""
    return seed_or_draw(int(request.seed) if request.HasField("seed") else None)


def check_target(request: Targeted, prefix: str = "") -> None:
    """Model name and version fields; the engine answers NOT_FOUND for names and versions it lacks."""
    if not request.model:
        raise invalid("no model name given; ListModels lists the models this server has", prefix + "model")
    if request.version < 0:
        raise invalid(f"{request.version} is negative; name a version >= 1, or 0 for the default",
                      prefix + "version")


def tensor_field(request: service_pb2.LogLikelihoodRequest | service_pb2.EncodeRequest
                 | service_pb2.DecodeRequest, field: str) -> np.ndarray:
    """Decode a tensor field; malformed tensors are INVALID_ARGUMENT naming the field and the fix."""
    if not request.HasField(field):
        raise invalid("missing; send a tensor with a batch axis first", field)
    tensor = getattr(request, field)
    check_shape(tuple(tensor.shape), field)
    try:
        array = from_proto(tensor)
    except ValueError as e:
        raise invalid(str(e), field) from None
    if array.ndim == 0:
        raise invalid("is a scalar; send a batch with the rows along axis 0", field)
    return array


def summary(status: ModelStatus) -> service_pb2.ModelSummary:
    return service_pb2.ModelSummary(
        name=status.name, versions=list(status.versions), default_version=status.default_version,
        family=status.family, model=status.model, operations=[OPERATION[op] for op in status.operations],
        state=STATE.get(status.state, service_pb2.MODEL_STATE_UNSPECIFIED), message=status.message)


def add_scores(response: service_pb2.LogLikelihoodResponse, result: LikelihoodResult) -> None:
    """The score kinds, percentiles and per-dimension terms of ``result`` into ``response`` (float64)."""
    for name, value in result.scores.items():
        response.scores[name].CopyFrom(to_proto(np.asarray(value, dtype=np.float64)))
    for name, value in result.percentiles.items():
        response.percentiles[name].CopyFrom(to_proto(np.asarray(value, dtype=np.float64)))
    if result.per_dimension is not None:
        response.per_dimension.CopyFrom(to_proto(np.asarray(result.per_dimension, dtype=np.float64)))


def row_bytes(m: LoadedModel, latents: bool) -> int:
    """Bytes one sample row (and its latent row) takes on the wire, from the model's manifest."""
    dim = math.prod(m.manifest.data.shape)
    latent = int(m.manifest.parameters.get("latent_dim", dim)) if latents else 0
    return 4 * (dim + latent)


class GenerativeServicer(service_pb2_grpc.GenerativeServiceServicer):
    """GenerativeService on grpc.aio over an engine (genserve.server.interface.EngineInterface).

    ``cfg`` gives the limits (max_message_mb, max_deadline_s, max_queued_rows); ``rows`` the server-wide row
    budget (None: one of its own); ``control`` loads, unloads and reloads models for LoadModel, UnloadModel and
    ReloadRepository (the app's, which also refreshes health; default the engine); ``observe(method, model, code,
    seconds)`` records
    each finished request for metrics.
    """

    def __init__(self, engine: EngineInterface, cfg: ServerConfig, observe: Observe | None = None,
                 rows: RowBudget | None = None, control: ModelControl | None = None) -> None:
        self.engine = engine
        self.max_message_bytes = cfg.max_message_mb * 2**20
        self.max_deadline_s = cfg.max_deadline_s
        self.rows = rows if rows is not None else RowBudget(cfg.max_queued_rows)
        self.accounting = Accounting(engine, observe, access_log=cfg.access_log)
        self.control = control or engine

    # -- plumbing ------------------------------------------------------------------------------------------

    async def _unary(self, method: str, model: str, context: grpc.aio.ServicerContext,
                     handler: Callable[[], Awaitable[T]]) -> T:
        """Run one unary handler with accounting and its failure as the call's status."""
        try:
            with self.accounting.track(method, model):
                return await handler()
        except Failure as failure:
            await abort(context, failure)
            raise  # abort raises; for type checkers

    async def _run(self, context: grpc.aio.ServicerContext, request: Request, rows: int,
                   work: Callable[[], Awaitable[T]], prefix: str = "") -> T:
        """The engine's part of a request: its limits, its rows held, under the call's deadline."""
        self._admit(request, prefix)
        note_rows(rows)
        with self.rows.hold(rows):
            return await within_deadline(work(), context.time_remaining(), self.max_deadline_s)

    def _admit(self, request: Request, prefix: str = "") -> None:
        try:
            self.engine.admit(request)
        except InvalidInput as e:
            if not prefix or not e.field:
                raise
            raise invalid(e.detail, prefix + e.field) from None

    # -- metadata ------------------------------------------------------------------------------------------

    async def ListModels(self, request: service_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ListModelsResponse:
        async def handle() -> service_pb2.ListModelsResponse:
            statuses = sorted(self.engine.list_models(), key=lambda s: s.name)
            return service_pb2.ListModelsResponse(models=[summary(s) for s in statuses])

        return await self._unary("ListModels", "", context, handle)

    async def GetModel(self, request: service_pb2.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> service_pb2.ModelInfo:
        async def handle() -> service_pb2.ModelInfo:
            check_target(request)
            loaded = self.engine.get_model(request.model, int(request.version))
            status = next((s for s in self.engine.list_models() if s.name == request.model), None)
            info = service_pb2.ModelInfo(name=request.model, version=loaded.version, manifest=loaded.manifest,
                                         serving=loaded.serving.to_proto(), providers=list(loaded.providers))
            if status is not None:
                info.versions.extend(status.versions)
                info.default_version = status.default_version
                info.state = STATE.get(status.state, service_pb2.MODEL_STATE_UNSPECIFIED)
            return info

        return await self._unary("GetModel", request.model, context, handle)

    async def ReloadRepository(self, request: service_pb2.ReloadRequest,
                               context: grpc.aio.ServicerContext) -> service_pb2.ReloadResponse:
        async def handle() -> service_pb2.ReloadResponse:
            result = await self.control.reload()
            statuses = sorted(self.engine.list_models(), key=lambda s: s.name)
            return service_pb2.ReloadResponse(
                models=[summary(s) for s in statuses],
                errors=[service_pb2.LoadError(model=e.model, version=e.version, message=e.message)
                        for e in result.errors])

        return await self._unary("ReloadRepository", "", context, handle)

    async def LoadModel(self, request: service_pb2.LoadModelRequest,
                        context: grpc.aio.ServicerContext) -> service_pb2.LoadModelResponse:
        async def handle() -> service_pb2.LoadModelResponse:
            if not request.model:
                raise InvalidInput("name the model to load (its folder in the repository)", "model")
            return service_pb2.LoadModelResponse(model=summary(await self.control.load_model(request.model)))

        return await self._unary("LoadModel", request.model, context, handle)

    async def UnloadModel(self, request: service_pb2.UnloadModelRequest,
                          context: grpc.aio.ServicerContext) -> service_pb2.UnloadModelResponse:
        async def handle() -> service_pb2.UnloadModelResponse:
            if not request.model:
                raise InvalidInput("name the model to unload", "model")
            return service_pb2.UnloadModelResponse(model=summary(await self.control.unload_model(request.model)))

        return await self._unary("UnloadModel", request.model, context, handle)

    # -- sampling ------------------------------------------------------------------------------------------

    def _sample_request(self, request: service_pb2.SampleRequest, m: LoadedModel, n: int, seed: int
                        ) -> SampleRequest:
        return SampleRequest(
            m, int(n), seed,
            temperature=request.temperature if request.HasField("temperature") else None,
            langevin_steps=request.langevin_steps if request.HasField("langevin_steps") else None,
            langevin_step_size=request.langevin_step_size if request.HasField("langevin_step_size") else None,
            return_latents=request.return_latents)

    async def Sample(self, request: service_pb2.SampleRequest,
                     context: grpc.aio.ServicerContext) -> service_pb2.SampleResponse:
        async def handle() -> service_pb2.SampleResponse:
            check_target(request)
            seed = request_seed(request)
            m = self.engine.resolve(request.model, int(request.version), "sample")
            req = self._sample_request(request, m, request.n, seed)
            self._admit(req)
            check_answer_size(req.n, row_bytes(m, request.return_latents), self.max_message_bytes, "n",
                              "use SampleStream")
            x, z, version = await self._run(context, req, req.n, lambda: self.engine.sample(req))
            response = service_pb2.SampleResponse(samples=to_proto(x), model_version=version, seed=seed)
            if z is not None and request.return_latents:
                response.latents.CopyFrom(to_proto(z))
            return response

        return await self._unary("Sample", request.model, context, handle)

    async def SampleStream(self, request: service_pb2.SampleStreamRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[service_pb2.SampleResponse]:
        sample = request.sample
        blocks: list[asyncio.Task] = []
        try:
            with self.accounting.track("SampleStream", sample.model):
                check_target(sample, "sample.")
                seed = request_seed(sample)
                m = self.engine.resolve(sample.model, int(sample.version), "sample")
                whole = self._sample_request(sample, m, sample.n, seed)
                self._admit(whole, "sample.")
                if request.chunk_size < 0:
                    raise invalid(f"{request.chunk_size} is negative; use >= 1, or 0 for the default", "chunk_size")
                chunk = int(request.chunk_size) or STREAM_BLOCK_ROWS
                most = max(1, int(self.max_message_bytes * MESSAGE_HEADROOM) // row_bytes(m, sample.return_latents))
                if chunk > most:
                    raise invalid(f"{chunk} rows exceed the message limit of {self.max_message_bytes // 2**20} MiB;"
                                  f" use at most {most}", "chunk_size")
                # The rows a stream holds at once: the blocks computed ahead plus one chunk being cut.
                held = min(whole.n, STREAM_BLOCK_ROWS * (STREAM_BLOCKS_AHEAD + 1) + chunk)
                with self.rows.hold(held):
                    async for response in self._stream_blocks(sample, m, seed, chunk, blocks, context):
                        yield response
        except Failure as failure:
            await abort(context, failure)
        finally:
            for task in blocks:
                task.cancel()
                discard(task)

    async def _stream_blocks(self, sample: service_pb2.SampleRequest, m: LoadedModel, seed: int, chunk: int,
                             blocks: list[asyncio.Task], context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[service_pb2.SampleResponse]:
        """Compute fixed blocks (a few concurrently) and re-cut them into chunks of ``chunk`` rows. Every block
        runs on the version resolved for the stream, so a reload mid-stream cannot mix versions."""
        n = int(sample.n)
        count = -(-n // STREAM_BLOCK_ROWS)

        def block(k: int) -> Awaitable[SampleResult]:
            rows = min(n, (k + 1) * STREAM_BLOCK_ROWS) - k * STREAM_BLOCK_ROWS
            return self.engine.sample(self._sample_request(sample, m, rows, block_seed(seed, k)))

        def deadline(work: Awaitable[T]) -> Awaitable[T]:
            return within_deadline(work, context.time_remaining(), self.max_deadline_s)

        first = await deadline(block(0))
        version = first.version
        next_block = 1
        while next_block < count and len(blocks) < STREAM_BLOCKS_AHEAD:
            blocks.append(asyncio.ensure_future(block(next_block)))
            next_block += 1
        xs, zs = [first.x], [first.latents]
        buffered, offset, done = len(first.x), 0, 1
        while offset < n:
            while buffered < min(chunk, n - offset) and done < count:
                x, z, _ = await deadline(asyncio.shield(blocks[0]))
                blocks.pop(0)
                done += 1
                if next_block < count:
                    blocks.append(asyncio.ensure_future(block(next_block)))
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
        x = tensor_field(request, "x")
        seed = request_seed(request)
        m = self.engine.resolve(request.model, int(request.version), "log_likelihood")
        k = request.importance_samples if request.HasField("importance_samples") else None
        if request.scores or request.percentile or request.per_dimension or request.HasField("draws"):
            req = LikelihoodRequest(m, x, seed, k, tuple(request.scores), request.percentile, request.per_dimension,
                                    request.draws if request.HasField("draws") else None)
        else:
            req = LikelihoodRequest(m, x, seed, k)
        if req.per_dimension:  # 8 bytes per dimension per row come back
            check_answer_size(len(x), 8 * max(1, math.prod(x.shape[1:])), self.max_message_bytes, "x",
                              "send fewer rows per request when asking for per_dimension")
        result = await self._run(context, req, len(x), lambda: self.engine.log_likelihood(req))
        log_prob, bpd, kind, version = result
        response = service_pb2.LogLikelihoodResponse(
            log_prob=to_proto(np.asarray(log_prob, dtype=np.float64)),
            kind=LIKELIHOOD.get(kind, manifest_pb2.LIKELIHOOD_KIND_UNSPECIFIED),
            model_version=version, chunk_id=request.chunk_id, seed=seed)
        if bpd is not None:
            response.bits_per_dim.CopyFrom(to_proto(np.asarray(bpd, dtype=np.float64)))
        if req.scores or req.percentile or req.per_dimension:
            add_scores(response, result)
        return response

    async def LogLikelihood(self, request: service_pb2.LogLikelihoodRequest,
                            context: grpc.aio.ServicerContext) -> service_pb2.LogLikelihoodResponse:
        return await self._unary("LogLikelihood", request.model, context,
                                 lambda: self._log_likelihood(request, context))

    async def LogLikelihoodStream(self, request_iterator: AsyncIterator[service_pb2.LogLikelihoodRequest],
                                  context: grpc.aio.ServicerContext
                                  ) -> AsyncIterator[service_pb2.LogLikelihoodResponse]:
        """Pipelined: up to STREAM_WINDOW chunks are read and scored while earlier answers go out; the first
        failing chunk (or a message that did not parse) ends the stream with its status."""
        try:
            with self.accounting.track("LogLikelihoodStream") as tracked:
                def score(req: service_pb2.LogLikelihoodRequest) -> Awaitable[service_pb2.LogLikelihoodResponse]:
                    tracked.model = tracked.model or req.model
                    return self._log_likelihood(req, context)

                async for response in pipelined(request_iterator, score, STREAM_WINDOW):
                    yield response
                # a client's cancel ends the request stream as if it were complete; when gRPC has reported it by
                # now the stream is CANCELLED (when it reports it only after the handler returned, the stream
                # was answered in full and stays OK: context.cancelled() is False then, even in a done callback)
                if context.cancelled():
                    tracked.code = grpc.StatusCode.CANCELLED
        except Failure as failure:
            await abort(context, failure)

    async def Encode(self, request: service_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> service_pb2.EncodeResponse:
        async def handle() -> service_pb2.EncodeResponse:
            check_target(request)
            x = tensor_field(request, "x")
            seed = request_seed(request)
            m = self.engine.resolve(request.model, int(request.version), "encode")
            req = EncodeRequest(m, x, seed, request.sample)
            z, version = await self._run(context, req, len(x), lambda: self.engine.encode(req))
            return service_pb2.EncodeResponse(z=to_proto(np.asarray(z, dtype=np.float32)), model_version=version,
                                              seed=seed)

        return await self._unary("Encode", request.model, context, handle)

    async def Decode(self, request: service_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> service_pb2.DecodeResponse:
        async def handle() -> service_pb2.DecodeResponse:
            check_target(request)
            z = tensor_field(request, "z")
            seed = request_seed(request)
            m = self.engine.resolve(request.model, int(request.version), "decode")
            req = DecodeRequest(m, z, seed, request.sample)
            x, version = await self._run(context, req, len(z), lambda: self.engine.decode(req))
            return service_pb2.DecodeResponse(x=to_proto(np.asarray(x, dtype=np.float32)), model_version=version,
                                              seed=seed)

        return await self._unary("Decode", request.model, context, handle)
