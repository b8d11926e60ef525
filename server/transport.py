"""The transport layer every face shares: statuses, seeds, tensor shapes, deadlines, pipelined streams, accounting.

genserve.v1 (server/servicer.py) and the Open Inference Protocol (server/oip.py) are thin adapters over this
module and the engine interface (server/interface.py); an HTTP face is one more. A request that fails ends as
a ``Failure``: a status code (grpc.StatusCode, the canonical set; an HTTP face maps it to an HTTP status) and a
message that says how to fix the request. ``status_of`` turns anything raised into one: engine errors carry
their code (genserve.server.errors), anything else is a bug and answers INTERNAL with a request id, the
traceback going to the server log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

from genserve.core.noise import MAX_SEED
from genserve.server.errors import EngineError
from genserve.server.interface import EngineInterface
from genserve.server.limits import Expired, within

log = logging.getLogger("genserve.server")

T = TypeVar("T")
R = TypeVar("R")

MAX_DIMS = 64
"""Most axes of a request's tensor (numpy's limit)."""
STREAM_WINDOW = 8
"""Requests of a request stream read and run ahead of the one being answered (their rows batch together)."""
MESSAGE_HEADROOM = 0.95
"""Share of the message limit an answer's tensors may fill; the rest is the envelope."""

STATUS = {code.name: code for code in grpc.StatusCode}
"""Status codes by name: an engine error names its code (genserve.server.errors knows nothing of gRPC)."""

Observe = Callable[[str, str, str, float], None]
"""``observe(method, model, code, seconds)``: records one finished request (the app's Prometheus hook)."""


class Failure(Exception):
    """A request that ends with a status; ``message`` tells the client what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str, field: str = "") -> Failure:
    """INVALID_ARGUMENT; the message starts with the field at fault when one is named."""
    return Failure(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}" if field else message)


def status_of(error: BaseException, what: str) -> Failure:
    """The status a request that raised ``error`` answers with; ``what`` names the request for the log."""
    if isinstance(error, Failure):
        return error
    if isinstance(error, EngineError):
        code = STATUS.get(error.code, grpc.StatusCode.INTERNAL)
        if code == grpc.StatusCode.INTERNAL:  # a graph call failed (e.g. ONNX Runtime raised): operators' news
            log.error("%s failed: %s", what, error)
        return Failure(code, str(error) or type(error).__name__)
    rid = uuid.uuid4().hex[:12]
    log.error("request %s: %s failed", rid, what, exc_info=error)
    return Failure(grpc.StatusCode.INTERNAL,
                   f"internal error in {what} ({type(error).__name__}); see request id {rid} in the server log")


# ---- request fields ---------------------------------------------------------------------------------------

def seed_or_draw(seed: int | None, field: str = "seed") -> int:
    """The request's seed, or a fresh one when unset; INVALID_ARGUMENT outside 0..2**63-1."""
    if seed is None:
        return secrets.randbits(63)
    if not 0 <= seed <= MAX_SEED:
        raise invalid(f"{seed} is outside 0..2**63-1; use a seed in that range (or none, and the answer "
                      "says which one was drawn)", field)
    return int(seed)


def check_shape(shape: tuple[int, ...], field: str) -> tuple[int, ...]:
    """A tensor's shape from the wire, before any array is made of it: at most 64 axes, none negative."""
    if len(shape) > MAX_DIMS:
        raise invalid(f"shape has {len(shape)} axes, more than the {MAX_DIMS} an array may have; send the "
                      "rows along axis 0 and each row in the model's data shape (GetModel / ModelMetadata "
                      "give it)", field)
    for axis, dim in enumerate(shape):
        if dim < 0:
            raise invalid(f"shape {list(shape)} has the negative dimension {dim} at axis {axis}; every "
                          "dimension must be >= 0: send the number of rows, then the model's data shape", field)
    return shape


def check_answer_size(n: int, row_bytes: int, max_message_bytes: int, field: str, hint: str) -> None:
    """INVALID_ARGUMENT when ``n`` rows of ``row_bytes`` would not fit one answer message."""
    size = n * row_bytes
    if size > max_message_bytes * MESSAGE_HEADROOM:
        raise invalid(f"{n} samples take {size / 2**20:.1f} MiB, above the {max_message_bytes // 2**20} MiB "
                      f"message limit; {hint}", field)


def too_large(size: int, limit: int, what: str) -> str:
    """The message of a request refused for its size (gRPC's own refusal words it for the client)."""
    return (f"{what} is {size / 2**20:.1f} MiB, above this server's message limit of {limit // 2**20} MiB "
            "(max_message_mb); send fewer rows per request, or stream them")


# ---- deadlines --------------------------------------------------------------------------------------------

async def within_deadline(work: Awaitable[T], remaining: float | None, ceiling: float) -> T:
    """Await ``work`` within the client's ``remaining`` seconds capped at the server's ``ceiling``
    (max_deadline_s); a passed deadline cancels it (its queued rows drop) and answers DEADLINE_EXCEEDED."""
    try:
        return await within(work, remaining, ceiling)
    except Expired as e:
        if e.capped:
            message = (f"the request ran past this server's deadline ceiling of {ceiling:g} s (max_deadline_s); "
                       "send less per request, or use a streaming call")
        else:
            message = "the deadline passed before the answer was ready; allow more time or send less"
        raise Failure(grpc.StatusCode.DEADLINE_EXCEEDED, message) from None


# ---- streams ----------------------------------------------------------------------------------------------

def discard(task: asyncio.Future) -> None:
    """Abandon a task (after ``cancel``): its outcome is retrieved when it ends, so a request that failed
    while the stream was already ending is not logged as "Task exception was never retrieved"."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def pipelined(requests: AsyncIterator[R], run: Callable[[R], Awaitable[T]],
                    window: int = STREAM_WINDOW) -> AsyncIterator[T]:
    """``run(request)`` for each request of a stream, answers in order; up to ``window`` requests are read and
    run while earlier answers go out. A failure to read the stream (a message that did not parse) or of a
    request's run is raised here, at its turn; the requests still running are cancelled when the stream ends."""
    pending: asyncio.Queue[asyncio.Future | None] = asyncio.Queue(maxsize=window)

    async def read() -> None:
        async for request in requests:
            await pending.put(asyncio.ensure_future(run(request)))
        await pending.put(None)

    reader = asyncio.ensure_future(read())
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
    finally:
        reader.cancel()
        discard(reader)
        while not pending.empty():
            task = pending.get_nowait()
            if task is not None:
                task.cancel()
                discard(task)


# ---- accounting -------------------------------------------------------------------------------------------

@dataclass
class Tracked:
    """One request being accounted: the handler may name its model and method once it knows them."""

    method: str
    model: str
    started: float
    code: grpc.StatusCode = grpc.StatusCode.OK

    @property
    def what(self) -> str:
        return f"{self.method} for model {self.model!r}" if self.model else self.method

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class Accounting:
    """Every finished request once, whichever face took it: method, model label, status code, seconds."""

    def __init__(self, engine: EngineInterface, observe: Observe | None = None) -> None:
        self.engine = engine
        self.observe = observe
        self._known: set[str] = set()
        self._known_at = -float("inf")

    def label(self, name: str) -> str:
        """Known model names label metrics; others are "unknown", so clients cannot blow up label sets."""
        if not name:
            return ""
        if name not in self._known and time.monotonic() - self._known_at > 1.0:  # re-list at most 1/s
            try:
                self._known = {s.name for s in self.engine.list_models()}
            except Exception:  # noqa: BLE001 - labels must never fail a request
                pass
            self._known_at = time.monotonic()
        return name if name in self._known else "unknown"

    @contextlib.contextmanager
    def track(self, method: str, model: str = "") -> Iterator[Tracked]:
        """Account the block as one request; what it raises leaves as a ``Failure`` (CANCELLED re-raised)."""
        tracked = Tracked(method, model, time.perf_counter())
        try:
            yield tracked
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: a stream closed at a yield
            tracked.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            failure = status_of(e, tracked.what)
            tracked.code = failure.code
            raise failure from None
        finally:
            self._record(tracked)

    def _record(self, t: Tracked) -> None:
        if self.observe is None:
            return
        try:
            self.observe(t.method, self.label(t.model), t.code.name, t.elapsed())
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            log.exception("metrics: recording %s failed", t.method)


async def abort(context: grpc.aio.ServicerContext, failure: Failure) -> None:
    """End a gRPC call with the failure's status (``context.abort`` raises; this never returns)."""
    await context.abort(failure.code, failure.message)
