"""The genserve Python client, numpy in and out over gRPC: ``Client`` (blocking), ``AsyncClient`` (asyncio).

Example:
    >>> from genserve.clients.client import Client
    >>> with Client("localhost:8500") as client:                       # doctest: +SKIP
    ...     x = client.sample("digits-vae", 16, seed=1)                 # (16, 8, 8) float32 grey levels 0..16
    ...     ll = client.log_likelihood("digits-vae", x, seed=0)         # ll.log_prob: nats per example
    ...     scores = client.score_stream("digits-vae", "big.npy")       # any size, streamed in chunks

Connection options (both classes): ``target`` "host:port", a list of them or a ``dns:///``/``ipv4:`` URI
(several backends are balanced round-robin); ``timeout`` is the deadline of each unary call in seconds,
``stream_timeout`` that of a whole stream (None: no deadline); TLS with ``tls_ca`` (root certificates) and
``tls_cert``/``tls_key`` for mutual TLS; a bearer token from ``token`` or ``token_file``; ``retries`` on
UNAVAILABLE by gRPC's own retry policy (see genserve.clients.channel); ``wait_for_ready`` makes calls wait
for a server that is not up yet (until their deadline) instead of failing. Failed calls raise GenserveError
with the status ``code`` and the server's ``message``. The client needs grpcio, protobuf, numpy and tqdm
only, never torch or onnxruntime.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from genserve.clients import messages as msg
from genserve.clients.channel import (
    DEFAULT_TARGET,
    MAX_ATTEMPTS,
    ChannelSettings,
    Credential,
    DeadlineExceededError,
    FailedPreconditionError,
    GenserveError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from genserve.clients.datafiles import Rows, open_rows
from genserve.clients.messages import Likelihood, ModelInfo, ModelSummary, chunk_seed
from genserve.core.tensors import from_proto
from genserve.v1 import service_pb2, service_pb2_grpc

__all__ = ["AsyncClient", "Client", "DeadlineExceededError", "FailedPreconditionError", "GenserveError",
           "InternalError", "InvalidArgumentError", "Likelihood", "ModelInfo", "ModelSummary", "NotFoundError",
           "PermissionDeniedError", "ResourceExhaustedError", "UnauthenticatedError", "UnavailableError",
           "UnimplementedError", "chunk_seed"]

UNARY_SAMPLE_MAX = 256
"""sample() draws at most this many rows with one Sample call and streams more. The server cuts SampleStream
into 256-row blocks, the first seeded with the request's seed, so a stream of n <= 256 rows equals
Sample(n, seed): sample(n, seed) always equals SampleStream(n, seed), whichever RPC carried it."""

Samples = np.ndarray | tuple[np.ndarray, np.ndarray | None]


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    import sys

    from tqdm.auto import tqdm

    # A terminal bar only on a terminal (a log file would fill with redraws); a notebook's widget always.
    # tqdm.auto gives tqdm.notebook's class in a notebook, else a terminal class (tqdm.asyncio's, not std's).
    widget = tqdm.__module__.startswith("tqdm.notebook")
    hidden = not enabled or (not widget and not sys.stderr.isatty())
    return tqdm(total=total, desc=desc, unit="rows", unit_scale=True, disable=hidden, leave=False)


class _Base:
    """Constructor and settings shared by Client and AsyncClient."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        stream_timeout: float | None = None,
        wait_for_ready: bool = False,
        tls: bool | None = None,
        tls_ca: Credential | None = None,
        tls_cert: Credential | None = None,
        tls_key: Credential | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
        retries: int = MAX_ATTEMPTS - 1,
        backoff: tuple[float, float] = (0.5, 5.0),
        load_balancing: str | None = None,
        max_message_mb: int = 64,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        for name, value in (("timeout", timeout), ("stream_timeout", stream_timeout)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive seconds or None, got {value}")
        self.settings = ChannelSettings.build(
            target, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
            tls_server_name=tls_server_name, token=token, token_file=token_file, retries=retries,
            backoff=backoff, load_balancing=load_balancing, max_message_mb=max_message_mb, options=options,
        )
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.wait_for_ready = wait_for_ready

    def _kw(self, stream: bool = False) -> dict[str, Any]:
        """Per-call arguments: deadline, the token's metadata, wait-for-ready."""
        return {"timeout": self.stream_timeout if stream else self.timeout,
                "metadata": self.settings.metadata, "wait_for_ready": self.wait_for_ready}

    def _error(self, error: grpc.RpcError, method: str) -> GenserveError:
        return GenserveError.from_rpc(error, method, self.settings.display)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings.display!r})"


class Client(_Base):
    """Blocking client; safe to share between threads. Use it as a context manager, or call close()."""

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, **options: Any) -> None:
        super().__init__(target, **options)
        self._channel = self.settings.open()
        self._stub = service_pb2_grpc.GenerativeServiceStub(self._channel)
        self._health = msg.health_method(self._channel)

    def close(self) -> None:
        self._channel.close()

    def connect(self, timeout: float = 10.0) -> Client:
        """Connect now, or fail fast: UnavailableError naming the address as soon as the first connection
        attempt fails (a wrong address, nothing listening), instead of after the retries with backoff that
        calls make (seconds). A server still starting up and answering within ``timeout`` is fine."""
        ready = threading.Event()
        state: list[grpc.ChannelConnectivity] = []

        def watch(s: grpc.ChannelConnectivity) -> None:
            if s in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
                state.append(s)
                ready.set()

        self._channel.subscribe(watch, try_to_connect=True)
        try:
            ready.wait(timeout)
        finally:
            self._channel.unsubscribe(watch)
        if not state or state[0] != grpc.ChannelConnectivity.READY:
            why = "the connection failed" if state else f"no connection within {timeout:g} s"
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE,
                                   f"cannot reach a genserve server at {self.settings.display}: {why}; check the "
                                   "address (--server / GENSERVE_SERVER), that the server runs, and TLS (--tls)",
                                   "connect")
        return self

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, **self._kw())
        except grpc.RpcError as e:
            raise self._error(e, method) from None

    def models(self) -> list[ModelSummary]:
        """Every model of the server's repository, sorted by name."""
        return [msg.read_summary(m) for m in self._unary("ListModels", service_pb2.ListModelsRequest()).models]

    def info(self, model: str, version: int = 0) -> ModelInfo:
        """One model version in full: data spec, operations, likelihood kind, parameters, serving settings."""
        return msg.read_info(self._unary("GetModel", service_pb2.GetModelRequest(model=model, version=version)))

    def sample(self, model: str, n: int, seed: int | None = None, temperature: float | None = None,
               langevin_steps: int | None = None, langevin_step_size: float | None = None,
               return_latents: bool = False, version: int = 0, chunk_size: int = 0,
               progress: bool = False) -> Samples:
        """n samples (n, *shape) float32 in raw data units; with return_latents, (samples, latents or None).

        The same seed gives the same samples. n above UNARY_SAMPLE_MAX streams in chunks of ``chunk_size``
        rows (0: the server's default), with a progress bar when ``progress``.
        """
        request = msg.sample_request(model, n, seed, temperature, langevin_steps, langevin_step_size,
                                     return_latents, version)
        if n <= UNARY_SAMPLE_MAX:
            x, z = msg.read_samples(self._unary("Sample", request))
        else:
            x, z = msg.concat_samples(list(self._sample_stream(request, chunk_size, progress)), n)
        return (x, z) if return_latents else x

    def sample_chunks(self, model: str, n: int, seed: int | None = None, temperature: float | None = None,
                      langevin_steps: int | None = None, langevin_step_size: float | None = None,
                      return_latents: bool = False, version: int = 0, chunk_size: int = 0,
                      progress: bool = False) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """SampleStream as it arrives: (offset of the chunk's first row, samples, latents or None)."""
        request = msg.sample_request(model, n, seed, temperature, langevin_steps, langevin_step_size,
                                     return_latents, version)
        return self._sample_stream(request, chunk_size, progress)

    def _sample_stream(self, request: service_pb2.SampleRequest, chunk_size: int,
                       progress: bool) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        call = self._stub.SampleStream(service_pb2.SampleStreamRequest(sample=request, chunk_size=chunk_size),
                                       **self._kw(stream=True))
        offset = 0
        with _progress(request.n, f"sample {request.model}", progress) as bar:
            try:
                for response in call:
                    x, z = msg.read_samples(response, offset)
                    yield offset, x, z
                    offset += len(x)
                    bar.update(len(x))
            except grpc.RpcError as e:
                raise self._error(e, "SampleStream") from None
            finally:
                call.cancel()  # a no-op once finished; stops the server's work when the caller stops early

    def log_likelihood(self, model: str, x: Any, importance_samples: int | None = None,
                       seed: int | None = None, version: int = 0, *, scores: Sequence[str] | str = (),
                       percentile: bool = False, per_dimension: bool = False, draws: int | None = None
                       ) -> Likelihood:
        """Scores of a batch x (N, *shape) in one call: log_prob nats (N,), bits_per_dim, kind.

        ``scores``: score kinds to compute beside log_prob (``info(model).score_kinds`` lists them), returned in
        ``Likelihood.scores``; ``percentile``: each row's percentile among the model's calibration data for
        log_prob and each requested kind (``Likelihood.percentiles``, low = anomalous); ``per_dimension``: the
        terms of -log p(x) per dimension (``Likelihood.per_dimension``); ``draws``: dequantisation draws of a
        flow's or pPCA's bound on discrete data (unset: the model's default, which its calibration used).
        """
        request = msg.log_likelihood_request(model, x, seed, importance_samples, version, scores=scores,
                                             percentile=percentile, per_dimension=per_dimension, draws=draws)
        return msg.read_likelihood(self._unary("LogLikelihood", request))

    def score_stream(self, model: str, source: Any, chunk_size: int = 4096, progress: bool = True,
                     max_in_flight: int = 4, seed: int | None = None, importance_samples: int | None = None,
                     version: int = 0, key: str | None = None, *, scores: Sequence[str] | str = (),
                     percentile: bool = False, per_dimension: bool = False, draws: int | None = None
                     ) -> Likelihood:
        """Score an array or a file (.npy, .npz, .csv, .parquet) of any size; one score per row, in row order.

        Rows go through LogLikelihoodStream in chunks of ``chunk_size`` rows, with up to ``max_in_flight``
        chunks sent ahead of their answers. The chunk starting at row r is seeded ``chunk_seed(seed, r)``.
        ``scores``, ``percentile``, ``per_dimension`` and ``draws`` as in ``log_likelihood``; a per-batch score
        kind (typicality) is computed over each chunk as its batch.
        """
        chunks = self.iter_scores(model, source, chunk_size, progress, max_in_flight, seed,
                                  importance_samples, version, key, scores=scores, percentile=percentile,
                                  per_dimension=per_dimension, draws=draws)
        return msg.concat_likelihoods([part for _, part in chunks], seed)

    def iter_scores(self, model: str, source: Any, chunk_size: int = 4096, progress: bool = True,
                    max_in_flight: int = 4, seed: int | None = None, importance_samples: int | None = None,
                    version: int = 0, key: str | None = None, *, scores: Sequence[str] | str = (),
                    percentile: bool = False, per_dimension: bool = False, draws: int | None = None
                    ) -> Iterator[tuple[int, Likelihood]]:
        """score_stream chunk by chunk: (offset of the chunk's first row, its Likelihood), in row order."""
        extra = {"scores": scores, "percentile": percentile, "per_dimension": per_dimension, "draws": draws}
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        rows = self._rows(model, version, source, key)
        window = threading.Semaphore(max_in_flight)
        stop = threading.Event()
        sent: collections.deque[tuple[int, int]] = collections.deque()
        failure: list[BaseException] = []

        def requests() -> Iterator[service_pb2.LogLikelihoodRequest]:
            # Runs on gRPC's sending thread, and blocks while max_in_flight chunks await their answers.
            offset = 0
            try:
                for chunk in rows.chunks(chunk_size):
                    while not window.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    sent.append((offset, len(chunk)))
                    yield msg.log_likelihood_request(model, chunk, None if seed is None else chunk_seed(seed, offset),
                                                     importance_samples, version, chunk_id=offset, **extra)
                    offset += len(chunk)
            except Exception as e:  # noqa: BLE001 - a bad row of the file ends the stream; re-raised below
                failure.append(e)

        call = self._stub.LogLikelihoodStream(requests(), **self._kw(stream=True))
        with _progress(rows.total, f"score {model}", progress) as bar:
            try:
                for response in call:
                    window.release()
                    offset, count = sent.popleft()
                    scores = msg.read_stream_chunk(response, seed, offset, count)
                    bar.update(count)
                    yield offset, scores
            except grpc.RpcError as e:
                if failure:
                    raise failure[0] from None
                raise self._error(e, "LogLikelihoodStream") from None
            finally:
                stop.set()
                call.cancel()
        if failure:
            raise failure[0]

    def encode(self, model: str, x: Any, seed: int | None = None, sample: bool = False,
               version: int = 0) -> np.ndarray:
        """Latent codes (N, latent_dim) of x: the posterior mean, or a draw from q(z|x) with sample=True."""
        return from_proto(self._unary("Encode", msg.encode_request(model, x, seed, sample, version)).z)

    def decode(self, model: str, z: Any, seed: int | None = None, sample: bool = False,
               version: int = 0) -> np.ndarray:
        """Examples (N, *shape) in raw data units decoded from latent codes z (N, latent_dim)."""
        return from_proto(self._unary("Decode", msg.decode_request(model, z, seed, sample, version)).x)

    def health(self, model: str | None = None) -> str:
        """Standard gRPC health of the server (model=None) or of one model: SERVING, NOT_SERVING, ..."""
        try:
            return msg.HEALTH_NAME.get(self._health(model or "", **self._kw()), "UNKNOWN")
        except grpc.RpcError as e:
            raise self._error(e, "Health/Check") from None

    def reload(self) -> list[ModelSummary]:
        """Ask the server to rescan its repository; returns the models afterwards."""
        return [msg.read_summary(m) for m in self._unary("ReloadRepository", service_pb2.ReloadRequest()).models]

    def load_model(self, model: str) -> ModelSummary:
        """Load (or reload) a model of the server's repository; the server must run with model control mode
        explicit. Raises GenserveError (FAILED_PRECONDITION) when it cannot load it."""
        return msg.read_summary(self._unary("LoadModel", service_pb2.LoadModelRequest(model=model)).model)

    def unload_model(self, model: str) -> ModelSummary:
        """Unload a model (model control mode explicit); requests in flight on it finish first."""
        return msg.read_summary(self._unary("UnloadModel", service_pb2.UnloadModelRequest(model=model)).model)

    def _rows(self, model: str, version: int, source: Any, key: str | None) -> Rows:
        if isinstance(source, Rows):
            return source
        return open_rows(source, shape=self.info(model, version).spec.shape, key=key)


class AsyncClient(_Base):
    """The same API on grpc.aio: methods are coroutines (iter_scores and sample_chunks async generators).

    Create it inside the event loop that uses it: ``async with AsyncClient("localhost:8500") as client``.
    """

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, **options: Any) -> None:
        super().__init__(target, **options)
        self._channel = self.settings.open_aio()
        self._stub = service_pb2_grpc.GenerativeServiceStub(self._channel)
        self._health = msg.health_method(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, **self._kw())
        except grpc.RpcError as e:
            raise self._error(e, method) from None

    async def models(self) -> list[ModelSummary]:
        response = await self._unary("ListModels", service_pb2.ListModelsRequest())
        return [msg.read_summary(m) for m in response.models]

    async def info(self, model: str, version: int = 0) -> ModelInfo:
        request = service_pb2.GetModelRequest(model=model, version=version)
        return msg.read_info(await self._unary("GetModel", request))

    async def sample(self, model: str, n: int, seed: int | None = None, temperature: float | None = None,
                     langevin_steps: int | None = None, langevin_step_size: float | None = None,
                     return_latents: bool = False, version: int = 0, chunk_size: int = 0,
                     progress: bool = False) -> Samples:
        request = msg.sample_request(model, n, seed, temperature, langevin_steps, langevin_step_size,
                                     return_latents, version)
        if n <= UNARY_SAMPLE_MAX:
            x, z = msg.read_samples(await self._unary("Sample", request))
        else:
            parts = [p async for p in self._sample_stream(request, chunk_size, progress)]
            x, z = msg.concat_samples(parts, n)
        return (x, z) if return_latents else x

    def sample_chunks(self, model: str, n: int, seed: int | None = None, temperature: float | None = None,
                      langevin_steps: int | None = None, langevin_step_size: float | None = None,
                      return_latents: bool = False, version: int = 0, chunk_size: int = 0,
                      progress: bool = False) -> AsyncIterator[tuple[int, np.ndarray, np.ndarray | None]]:
        request = msg.sample_request(model, n, seed, temperature, langevin_steps, langevin_step_size,
                                     return_latents, version)
        return self._sample_stream(request, chunk_size, progress)

    async def _sample_stream(self, request: service_pb2.SampleRequest, chunk_size: int,
                             progress: bool) -> AsyncIterator[tuple[int, np.ndarray, np.ndarray | None]]:
        call = self._stub.SampleStream(service_pb2.SampleStreamRequest(sample=request, chunk_size=chunk_size),
                                       **self._kw(stream=True))
        offset = 0
        with _progress(request.n, f"sample {request.model}", progress) as bar:
            try:
                async for response in call:
                    x, z = msg.read_samples(response, offset)
                    yield offset, x, z
                    offset += len(x)
                    bar.update(len(x))
            except grpc.RpcError as e:
                raise self._error(e, "SampleStream") from None
            finally:
                call.cancel()

    async def log_likelihood(self, model: str, x: Any, importance_samples: int | None = None,
                             seed: int | None = None, version: int = 0, *, scores: Sequence[str] | str = (),
                             percentile: bool = False, per_dimension: bool = False, draws: int | None = None
                             ) -> Likelihood:
        """Client.log_likelihood, awaited."""
        request = msg.log_likelihood_request(model, x, seed, importance_samples, version, scores=scores,
                                             percentile=percentile, per_dimension=per_dimension, draws=draws)
        return msg.read_likelihood(await self._unary("LogLikelihood", request))

    async def score_stream(self, model: str, source: Any, chunk_size: int = 4096, progress: bool = True,
                           max_in_flight: int = 4, seed: int | None = None,
                           importance_samples: int | None = None, version: int = 0,
                           key: str | None = None, *, scores: Sequence[str] | str = (), percentile: bool = False,
                           per_dimension: bool = False, draws: int | None = None) -> Likelihood:
        chunks = self.iter_scores(model, source, chunk_size, progress, max_in_flight, seed,
                                  importance_samples, version, key, scores=scores, percentile=percentile,
                                  per_dimension=per_dimension, draws=draws)
        return msg.concat_likelihoods([part async for _, part in chunks], seed)

    async def iter_scores(self, model: str, source: Any, chunk_size: int = 4096, progress: bool = True,
                          max_in_flight: int = 4, seed: int | None = None,
                          importance_samples: int | None = None, version: int = 0,
                          key: str | None = None, *, scores: Sequence[str] | str = (), percentile: bool = False,
                          per_dimension: bool = False, draws: int | None = None
                          ) -> AsyncIterator[tuple[int, Likelihood]]:
        extra = {"scores": scores, "percentile": percentile, "per_dimension": per_dimension, "draws": draws}
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if not isinstance(source, Rows):
            source = open_rows(source, shape=(await self.info(model, version)).spec.shape, key=key)
        rows: Rows = source
        window = asyncio.Semaphore(max_in_flight)
        sent: collections.deque[tuple[int, int]] = collections.deque()
        failure: list[BaseException] = []

        async def requests() -> AsyncIterator[service_pb2.LogLikelihoodRequest]:
            chunks = rows.chunks(chunk_size)
            offset = 0
            try:
                while True:
                    await window.acquire()
                    chunk = await asyncio.to_thread(next, chunks, None)  # file reading off the event loop
                    if chunk is None:
                        return
                    sent.append((offset, len(chunk)))
                    yield msg.log_likelihood_request(model, chunk, None if seed is None else chunk_seed(seed, offset),
                                                     importance_samples, version, chunk_id=offset, **extra)
                    offset += len(chunk)
            except Exception as e:  # noqa: BLE001 - a bad row of the file ends the stream; re-raised below
                failure.append(e)

        call = self._stub.LogLikelihoodStream(requests(), **self._kw(stream=True))
        with _progress(rows.total, f"score {model}", progress) as bar:
            try:
                async for response in call:
                    window.release()
                    offset, count = sent.popleft()
                    scores = msg.read_stream_chunk(response, seed, offset, count)
                    bar.update(count)
                    yield offset, scores
            except grpc.RpcError as e:
                if failure:
                    raise failure[0] from None
                raise self._error(e, "LogLikelihoodStream") from None
            finally:
                call.cancel()
        if failure:
            raise failure[0]

    async def encode(self, model: str, x: Any, seed: int | None = None, sample: bool = False,
                     version: int = 0) -> np.ndarray:
        response = await self._unary("Encode", msg.encode_request(model, x, seed, sample, version))
        return from_proto(response.z)

    async def decode(self, model: str, z: Any, seed: int | None = None, sample: bool = False,
                     version: int = 0) -> np.ndarray:
        response = await self._unary("Decode", msg.decode_request(model, z, seed, sample, version))
        return from_proto(response.x)

    async def health(self, model: str | None = None) -> str:
        try:
            return msg.HEALTH_NAME.get(await self._health(model or "", **self._kw()), "UNKNOWN")
        except grpc.RpcError as e:
            raise self._error(e, "Health/Check") from None

    async def reload(self) -> list[ModelSummary]:
        response = await self._unary("ReloadRepository", service_pb2.ReloadRequest())
        return [msg.read_summary(m) for m in response.models]

    async def load_model(self, model: str) -> ModelSummary:
        response = await self._unary("LoadModel", service_pb2.LoadModelRequest(model=model))
        return msg.read_summary(response.model)

    async def unload_model(self, model: str) -> ModelSummary:
        response = await self._unary("UnloadModel", service_pb2.UnloadModelRequest(model=model))
        return msg.read_summary(response.model)
