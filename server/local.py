"""The in-process engine API: a model repository served to Python code directly, no server and no gRPC.

``LocalEngine`` is one more face of the engine (DESIGN.md, "One core, several faces"): it resolves the model a
call names, builds the request dataclasses of genserve.server.interface and awaits the same
genserve.server.engine.Engine that the gRPC, OIP and HTTP faces call, so every check (shapes, domain, options,
limits), every family program and the dynamic batcher are the server's own. The arrays it returns are the
ones the server computes for the same seed, bit for bit (tests/server/test_local_engine.py): the same engine
on the same ONNX Runtime sessions, and on the CPU provider each row's result does not depend on the rows
batched with it (tests/server/test_row_independence.py).

Which server call each method matches:

* ``sample(model, n, seed=S)``: the unary Sample RPC with seed S (one engine request of n rows). For
  ``Client.sample`` / ``genserve sample``, which stream n > 256 rows as SampleStream blocks, use
  ``sample_blocks``: block k of 256 rows seeded ``derived_seed(S, k)``, as the server cuts a stream.
* ``log_likelihood(model, x, seed=S)``: the LogLikelihood RPC. ``score(model, x, seed=S, chunk_size=C)``: the
  chunks of ``Client.score_stream`` / ``genserve score --seed S --chunk-size C``, the chunk starting at row r
  seeded ``derived_seed(S, r)``.
* ``encode`` / ``decode``: the Encode / Decode RPCs.

The engine runs on a private asyncio event loop in a daemon thread, started with the engine and stopped by
``close``: its batchers' worker tasks and queues belong to the loop they started on, so one loop must live as
long as the engine (``asyncio.run`` per call would give each call a new loop); and a private loop works from
any caller, one inside a running event loop (a notebook) included. Calls from several threads at once are
merged by the batcher, as concurrent requests to a server are. Errors are the engine's own exceptions
(genserve.server.errors: NotFound, InvalidInput, Unsupported, ...), with the messages a server sends.

Example (with a repository exported by ``genserve export``)::

    from genserve.server.local import LocalEngine

    with LocalEngine("models") as engine:                            # loads every model of the repository
        x = engine.sample("digits-realnvp", 16, seed=0).x           # (16, 8, 8) float32 grey levels
        scores = engine.log_likelihood("digits-realnvp", x, seed=1)  # .log_prob (16,) nats, .bits_per_dim
        big = engine.score("digits-realnvp", rows, seed=1)          # = genserve score --seed 1, any size
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from genserve.core.noise import derived_seed
from genserve.core.spec import DataSpec
from genserve.server.config import ServerConfig
from genserve.server.engine import Engine
from genserve.server.interface import (
    DecodeRequest,
    DecodeResult,
    EncodeRequest,
    EncodeResult,
    LikelihoodRequest,
    LikelihoodResult,
    ModelStatus,
    SampleRequest,
    SampleResult,
)
from genserve.server.servicer import STREAM_BLOCK_ROWS

T = TypeVar("T")

__all__ = ["LocalEngine", "STREAM_BLOCK_ROWS", "concat_likelihoods"]

CALL_TIMEOUT_S: float | None = None
"""No deadline on an in-process call (the server's max_deadline_s guards a shared server, not a caller's own
process); a caller that wants one runs the call in a thread of its own."""


class LocalEngine:
    """The engine of the model repository ``repo``, in this process, with synchronous methods.

    Arguments:
        repo: the model repository folder (``REPO/NAME/VERSION/manifest.json``), as ``genserve serve --repo``.
        models: load only these models (explicit model control); None loads every model of the repository.
        config: a whole ServerConfig to use instead of the defaults (its ``repo`` is replaced by ``repo``).
        **settings: ServerConfig fields over the defaults (``provider="cpu"``, ``max_batch_size=512``, ...);
            unknown names and bad values raise ValueError, as the server's config does. Ports are unused.

    A model that fails to load is reported by ``models()`` (state FAILED and its message) and by the
    NotReady error of a call that names it, as on a server.
    """

    def __init__(self, repo: str | Path, *, models: Sequence[str] | None = None, config: ServerConfig | None = None,
                 **settings: Any) -> None:
        if models is not None:
            if isinstance(models, str):
                raise TypeError("models takes a list of model names, e.g. models=['digits-vae']")
            settings.update(model_control="explicit", load_models=",".join(models), poll_s=0.0)
        checked = ServerConfig.from_toml(None, {"port": 0, "metrics_port": 0, **settings}, repo=str(repo))
        self.config = checked if config is None else replace(config, repo=Path(repo), **settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="genserve-local-engine", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._engine: Engine = self._call(self._make_engine())
            self._call(self._engine.start())
        except BaseException:
            self._stop_loop()
            raise

    async def _make_engine(self) -> Engine:
        return Engine(self.config)  # made on the engine's loop: its locks and events belong there

    # ---- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish the calls in flight, stop the batchers and ONNX Runtime sessions and the loop's thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._engine.stop())
        finally:
            self._stop_loop()

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT_S)

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError("this LocalEngine is closed; open a new one")

    # ---- queries -----------------------------------------------------------------------------------
    def models(self) -> list[ModelStatus]:
        """Every model of the repository: versions, family, operations, state (READY, FAILED, ...)."""
        self._open()
        return self._engine.list_models()

    def spec(self, model: str, version: int = 0) -> DataSpec:
        """The data spec of a model version (0: the highest): the shape of one example, its domain."""
        self._open()
        return self._engine.get_model(model, version).spec

    def version(self, model: str, version: int = 0) -> int:
        """The version number that ``version`` (0: the default, the highest) resolves to."""
        self._open()
        return self._engine.get_model(model, version).version

    def reload(self) -> list[ModelStatus]:
        """Rescan the repository (new and changed versions load; calls in flight finish on their version)."""
        self._open()
        return self._call(self._engine.reload()).models

    # ---- operations --------------------------------------------------------------------------------
    def sample(self, model: str, n: int, seed: int | None = None, *, temperature: float | None = None,
               langevin_steps: int | None = None, langevin_step_size: float | None = None,
               return_latents: bool = False, version: int = 0) -> SampleResult:
        """n samples (n, *shape) float32 in the data domain, as the unary Sample RPC with ``seed`` gives them.

        ``seed`` None draws a fresh one (not reported; pass a seed to reproduce a call). Latents (n, q) when
        ``return_latents`` and the family has them."""
        self._open()
        m = self._engine.resolve(model, version, "sample")
        request = SampleRequest(m, int(n), _seed(seed), temperature=temperature, langevin_steps=langevin_steps,
                                langevin_step_size=langevin_step_size, return_latents=return_latents)
        return self._call(self._engine.sample(request))

    def sample_blocks(self, model: str, n: int, seed: int, *, temperature: float | None = None,
                      langevin_steps: int | None = None, langevin_step_size: float | None = None,
                      return_latents: bool = False, version: int = 0) -> SampleResult:
        """n samples as SampleStream (``Client.sample``, ``genserve sample``) gives them for ``seed``: blocks
        of STREAM_BLOCK_ROWS rows, block k seeded ``derived_seed(seed, k)``; equal to ``sample`` for n <= 256."""
        parts = [self.sample(model, rows, derived_seed(seed, k), temperature=temperature,
                             langevin_steps=langevin_steps, langevin_step_size=langevin_step_size,
                             return_latents=return_latents, version=version)
                 for k, rows in enumerate(block_rows(n))]
        latents = None if parts[0].latents is None else np.concatenate([p.latents for p in parts])
        return SampleResult(np.concatenate([p.x for p in parts]), latents, parts[0].version)

    def log_likelihood(self, model: str, x: Any, seed: int | None = None, *, importance_samples: int | None = None,
                       version: int = 0, scores: Sequence[str] | str = (), percentile: bool = False,
                       per_dimension: bool = False, draws: int | None = None) -> LikelihoodResult:
        """Scores of the rows of x (N, *shape), raw data units, as the LogLikelihood RPC with ``seed``:
        log_prob (N,) float64 nats, bits_per_dim (None for unnormalized models), kind, version; and the score
        kinds, percentiles and per-dimension terms asked for (docs/scoring.md)."""
        self._open()
        m = self._engine.resolve(model, version, "log_likelihood")
        names = tuple(s.strip() for s in (scores.split(",") if isinstance(scores, str) else scores) if s.strip())
        request = LikelihoodRequest(m, np.asarray(x), _seed(seed), importance_samples, names, bool(percentile),
                                    bool(per_dimension), draws)
        return self._call(self._engine.log_likelihood(request))

    def score(self, model: str, rows: Any, seed: int, *, chunk_size: int = 4096,
              importance_samples: int | None = None, version: int = 0, scores: Sequence[str] | str = (),
              percentile: bool = False, per_dimension: bool = False, draws: int | None = None) -> LikelihoodResult:
        """Scores of many rows, chunk by chunk as ``genserve score --seed S --chunk-size C`` sends them: the
        chunk starting at row r is scored with seed ``derived_seed(seed, r)``. ``rows``: an array (N, *shape)
        (flat rows of the right size are reshaped), or an iterable of such arrays of any lengths (a file read
        piece by piece), re-cut into chunks of ``chunk_size`` rows."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        spec = self.spec(model, version)
        parts, offset = [], 0
        for chunk in _chunks(rows, chunk_size):
            chunk = fit_rows(chunk, spec.shape)
            parts.append(self.log_likelihood(model, chunk, derived_seed(seed, offset),
                                             importance_samples=importance_samples, version=version,
                                             scores=scores, percentile=percentile, per_dimension=per_dimension,
                                             draws=draws))
            offset += len(chunk)
        return concat_likelihoods(parts)

    def encode(self, model: str, x: Any, seed: int | None = None, *, sample: bool = False,
               version: int = 0) -> EncodeResult:
        """Latent codes z (N, q) float32 of x: the posterior mean, or a draw with ``sample`` (Encode RPC)."""
        self._open()
        m = self._engine.resolve(model, version, "encode")
        return self._call(self._engine.encode(EncodeRequest(m, np.asarray(x), _seed(seed), sample)))

    def decode(self, model: str, z: Any, seed: int | None = None, *, sample: bool = False,
               version: int = 0) -> DecodeResult:
        """Examples (N, *shape) float32 of latent codes z: the mean of p(x|z), or a draw with ``sample``."""
        self._open()
        m = self._engine.resolve(model, version, "decode")
        return self._call(self._engine.decode(DecodeRequest(m, np.asarray(z), _seed(seed), sample)))

    def __repr__(self) -> str:
        return f"LocalEngine({str(self.config.repo)!r}{', closed' if self._closed else ''})"


def block_rows(n: int) -> list[int]:
    """Rows of each SampleStream block of an n-row stream: STREAM_BLOCK_ROWS each, the last one fewer."""
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [min(STREAM_BLOCK_ROWS, n - start) for start in range(0, int(n), STREAM_BLOCK_ROWS)]


def fit_rows(x: Any, shape: tuple[int, ...]) -> np.ndarray:
    """x as (N, *shape): rows already in that shape as they are, flat rows of prod(shape) values reshaped
    (CSV columns, (N, 64) arrays for 8x8 images), as ``genserve score`` reads a file."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[:, None]
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        raise ValueError(f"rows have {int(np.prod(x.shape[1:]))} values each {tuple(x.shape[1:])} but the "
                         f"model's examples have shape {tuple(shape)} ({int(np.prod(shape))} values)")
    return x.reshape(len(x), *shape)


def concat_likelihoods(parts: Sequence[LikelihoodResult]) -> LikelihoodResult:
    """The scores of consecutive chunks as one result."""
    if not parts:
        raise ValueError("no rows to score")
    bpd = None if parts[0].bits_per_dim is None else np.concatenate([p.bits_per_dim for p in parts])
    per_dim = None if parts[0].per_dimension is None else np.concatenate([p.per_dimension for p in parts])
    return LikelihoodResult(np.concatenate([p.log_prob for p in parts]), bpd, parts[0].kind, parts[0].version,
                            {k: np.concatenate([p.scores[k] for p in parts]) for k in parts[0].scores},
                            {k: np.concatenate([p.percentiles[k] for p in parts]) for k in parts[0].percentiles},
                            per_dim)


def _chunks(rows: Any, size: int) -> Iterable[np.ndarray]:
    if isinstance(rows, np.ndarray) or not isinstance(rows, Iterable):
        array = np.asarray(rows)
        for start in range(0, len(array), size):
            yield np.asarray(array[start:start + size], dtype=np.float32)
        return
    pending: list[np.ndarray] = []
    held = 0
    for piece in rows:
        piece = np.asarray(piece, dtype=np.float32)
        pending.append(piece)
        held += len(piece)
        while held >= size:
            joined = np.concatenate(pending)
            yield joined[:size]
            pending, held = [joined[size:]], held - size
    if held:
        yield np.concatenate(pending)


def _seed(seed: int | None) -> int:
    return secrets.randbits(63) if seed is None else int(seed)
