"""The transport layer every face shares: statuses, seeds, tensor shapes, deadlines, pipelined streams, accounting.

genserve.v1 (server/servicer.py) and the Open Inference Protocol (server/oip.py) are thin adapters over this
module and the engine interface (server/interface.py); an HTTP face is one more. A request that fails ends as
a ``Failure``: a status code (grpc.StatusCode, the canonical set; an HTTP face maps it to an HTTP status), a
message that says how to fix the request, and machine-readable details: a stable ``reason`` (UPPER_SNAKE), the
field violations (request field, what is wrong with it) and metadata (method, model, request id). ``status_of``
turns anything raised into one: engine errors carry their code and reason (genserve.server.errors), anything
else is a bug and answers INTERNAL with a request id, the traceback going to the server log.

Details travel as gRPC's rich status (``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer, with an
``ErrorInfo`` of domain ``genserve.dev`` and a ``BadRequest`` when a field is at fault; ``abort``) and as the
JSON of an HTTP error (``Failure.to_json``). docs/errors.md lists the reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from genserve.core.noise import MAX_SEED
from genserve.server.errors import EngineError
from genserve.server.interface import EngineInterface
from genserve.server.limits import Expired, within
from genserve.server.logs import ACCESS

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


DOMAIN = "genserve.dev"
"""The ErrorInfo domain of every genserve error."""
DETAILS_KEY = "grpc-status-details-bin"
"""The trailer that carries the serialized google.rpc.Status (gRPC's rich status convention)."""
MAX_DETAILS_BYTES = 4096
"""Largest serialized google.rpc.Status sent: gRPC rejects trailers past 8-16 KiB, so a status beyond this
(a message listing a huge repository) goes without details, the message alone, as before details existed."""
MAX_DESCRIPTION = 1024
"""Characters kept of a field violation's description and of a metadata value (they echo client input)."""
DEFAULT_REASON = {"NOT_FOUND": "MODEL_NOT_FOUND", "INTERNAL": "INTERNAL_ERROR", "UNKNOWN": "INTERNAL_ERROR"}
"""The reason of a failure that names none: every NOT_FOUND of the gRPC faces is a model (OIP's
``<model>.<operation>`` included); other codes default to the code's name."""


@dataclass(frozen=True)
class Violation:
    """One request field at fault: its path (``x``, ``sample.n``, ``inputs[0].datatype``) and what is wrong."""

    field: str
    description: str


class Failure(Exception):
    """A request that ends with a status; ``message`` tells the client what to fix.

    ``reason`` is the stable ErrorInfo reason (default: DEFAULT_REASON, else the code's name), ``violations``
    the fields at fault, ``metadata`` string pairs for the ErrorInfo (method, model, request_id, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, reason: str = "",
                 violations: tuple[Violation, ...] = (), metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or DEFAULT_REASON.get(code.name, code.name)
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})

    def to_status(self) -> status_pb2.Status:
        """The google.rpc.Status: the code, the message, an ErrorInfo and (with violations) a BadRequest."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=DOMAIN,
            metadata={k: str(v)[:MAX_DESCRIPTION] for k, v in self.metadata.items()})
        details = [_packed(info)]
        if self.violations:
            details.append(_packed(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description[:MAX_DESCRIPTION])
                for v in self.violations])))
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> Failure:
        """The failure a google.rpc.Status describes (the inverse of ``to_status``)."""
        code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
        reason, violations, metadata = "", [], {}
        for detail in status.details:
            info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(bad):
                violations += [Violation(v.field, v.description) for v in bad.field_violations]
        return cls(code, status.message, reason=reason, violations=tuple(violations), metadata=metadata)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """The rich status trailer, or none when it would be larger than MAX_DETAILS_BYTES."""
        data = self.to_status().SerializeToString()
        return ((DETAILS_KEY, data),) if len(data) <= MAX_DETAILS_BYTES else ()

    def to_json(self) -> dict[str, Any]:
        """The JSON body of an HTTP error: ``error`` (the message, which tritonclient reads), ``code`` (the gRPC
        status name), ``reason``, ``domain``, ``field_violations`` [{field, description}] and ``metadata``."""
        return {"error": self.message, "code": self.code.name, "reason": self.reason, "domain": DOMAIN,
                "field_violations": [{"field": v.field, "description": v.description[:MAX_DESCRIPTION]}
                                     for v in self.violations],
                "metadata": {k: str(v)[:MAX_DESCRIPTION] for k, v in self.metadata.items()}}


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def invalid(message: str, field: str = "", reason: str = "") -> Failure:
    """INVALID_ARGUMENT; the message starts with the field at fault when one is named (and the status
    details carry it as a BadRequest field violation)."""
    return Failure(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}" if field else message, reason=reason,
                   violations=(Violation(field, message),) if field else ())


def status_of(error: BaseException, what: str) -> Failure:
    """The status a request that raised ``error`` answers with; ``what`` names the request for the log."""
    if isinstance(error, Failure):
        return error
    if isinstance(error, EngineError):
        code = STATUS.get(error.code, grpc.StatusCode.INTERNAL)
        if code == grpc.StatusCode.INTERNAL:  # a graph call failed (e.g. ONNX Runtime raised): operators' news
            log.error("%s failed: %s", what, error)
        field_name = getattr(error, "field", "")
        violations = (Violation(field_name, getattr(error, "detail", str(error))),) if field_name else ()
        return Failure(code, str(error) or type(error).__name__, reason=error.reason, violations=violations)
    rid = uuid.uuid4().hex[:12]
    log.error("request %s: %s failed", rid, what, exc_info=error)
    return Failure(grpc.StatusCode.INTERNAL,
                   f"internal error in {what} ({type(error).__name__}); see request id {rid} in the server log",
                   reason="INTERNAL_ERROR", metadata={"request_id": rid})


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
                      f"message limit; {hint}", field, reason="ANSWER_TOO_LARGE")


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
        raise Failure(grpc.StatusCode.DEADLINE_EXCEEDED, message,
                      reason="DEADLINE_CEILING" if e.capped else "DEADLINE_EXCEEDED") from None


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
    """One request being accounted: the handler may name its model and method once it knows them, and its
    rows (``note_rows``, for the access log)."""

    method: str
    model: str
    started: float
    code: grpc.StatusCode = grpc.StatusCode.OK
    rows: int = 0

    @property
    def what(self) -> str:
        return f"{self.method} for model {self.model!r}" if self.model else self.method

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


_current: contextvars.ContextVar[Tracked | None] = contextvars.ContextVar("genserve_tracked", default=None)


def note_rows(rows: int) -> None:
    """The rows of the request being accounted in this task (for its access-log line)."""
    tracked = _current.get()
    if tracked is not None:
        tracked.rows = int(rows)


class Accounting:
    """Every finished request once, whichever face took it: method, model label, status code, seconds; and,
    with ``access_log``, one line on the ``genserve.access`` logger (server/logs.py)."""

    def __init__(self, engine: EngineInterface, observe: Observe | None = None, access_log: bool = False) -> None:
        self.engine = engine
        self.observe = observe
        self.access_log = access_log
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

    def track(self, method: str, model: str = "") -> Tracking:
        """``with accounting.track(method, model) as tracked:`` accounts the block as one request; what it raises
        leaves as a ``Failure`` (CANCELLED re-raised)."""
        return Tracking(self, Tracked(method, model, time.perf_counter()))

    def _record(self, t: Tracked) -> None:
        seconds = t.elapsed()
        if self.access_log:
            ms = round(seconds * 1e3, 3)
            ACCESS.info("%s %s rows=%d %s %.3f ms", t.method, t.model or "-", t.rows, t.code.name, ms,
                        extra={"method": t.method, "model": t.model, "rows": t.rows, "code": t.code.name,
                               "latency_ms": ms, "request_id": uuid.uuid4().hex[:16]})
        if self.observe is None:
            return
        try:
            self.observe(t.method, self.label(t.model), t.code.name, seconds)
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            log.exception("metrics: recording %s failed", t.method)


class Tracking:
    """The context manager of ``Accounting.track`` (a class: it runs once per request on the event loop, where a
    generator-based one cost twice as much)."""

    __slots__ = ("accounting", "tracked", "token")

    def __init__(self, accounting: Accounting, tracked: Tracked) -> None:
        self.accounting, self.tracked = accounting, tracked

    def __enter__(self) -> Tracked:
        self.token = _current.set(self.tracked)
        return self.tracked

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: Any) -> bool:
        tracked = self.tracked
        try:
            if kind is None:
                return False
            if issubclass(kind, (asyncio.CancelledError, GeneratorExit)):  # GeneratorExit: a stream closed at a yield
                tracked.code = grpc.StatusCode.CANCELLED
                return False
            if issubclass(kind, Exception):  # every failure becomes a status
                failure = status_of(e, tracked.what)
                tracked.code = failure.code
                failure.metadata.setdefault("method", tracked.method)
                if tracked.model:
                    failure.metadata.setdefault("model", tracked.model)
                raise failure from None
            return False
        finally:
            with contextlib.suppress(ValueError):  # a stream's generator closed from another context
                _current.reset(self.token)
            self.accounting._record(tracked)


async def abort(context: grpc.aio.ServicerContext, failure: Failure) -> None:
    """End a gRPC call with the failure's status and its details as the rich status trailer (``context.abort``
    raises; this never returns)."""
    await context.abort(failure.code, failure.message, failure.trailing_metadata())


def failure_of(code: grpc.StatusCode, message: str, trailing_metadata: Any = ()) -> Failure:
    """The Failure an ``abort(code, message, trailing_metadata)`` describes: its details when the trailer holds
    a google.rpc.Status, else the code's default reason (a face that is not gRPC, the HTTP one, runs the OIP
    handlers with a context whose ``abort`` raises this)."""
    for key, value in trailing_metadata or ():
        if key == DETAILS_KEY:
            return Failure.from_status(status_pb2.Status.FromString(value))
    return Failure(code, message)
