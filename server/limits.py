"""Server-wide admission limits of the transport: rows held by requests in progress, and the deadline ceiling.

Per-request limits (rows and samples per request, options) are checked in one place, ``Engine.admit``, for
every face; message sizes by the transport (server/message_parsing.py, server/transport.py). The two here
are about the server as a whole. ``RowBudget`` bounds the rows of all requests accepted and
not yet answered, so a flood of large requests is refused at once (RESOURCE_EXHAUSTED) instead of growing
memory; ``deadline`` caps how long any one unit of work may run, so a client that sets no deadline cannot
hold rows forever.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections import deque
from collections.abc import Awaitable
from typing import TypeVar

from genserve.server.errors import QueueFull

T = TypeVar("T")


class RowBudget:
    """At most ``limit`` rows held at once by requests in progress (one event loop: no locking needed)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_queued_rows must be >= 1, got {limit}")
        self.limit = int(limit)
        self.held = 0

    def hold(self, rows: int) -> Held:
        """``with budget.hold(rows):`` holds ``rows`` while the block runs; QueueFull (RESOURCE_EXHAUSTED) when
        they do not fit now."""
        rows = int(rows)
        if self.held + rows > self.limit:
            raise QueueFull(f"max_queued_rows: requests in progress hold {self.held} rows and this one needs "
                            f"{rows}, above this server's limit of {self.limit}; retry later or send fewer "
                            "rows per request")
        self.held += rows
        return Held(self, rows)


class Held:
    """Rows held from a ``RowBudget`` until the ``with`` block ends (a class rather than a generator-based
    context manager: one per request, on the event loop)."""

    __slots__ = ("budget", "rows")

    def __init__(self, budget: RowBudget, rows: int) -> None:
        self.budget, self.rows = budget, rows

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        self.budget.held -= self.rows
        return False


def deadline(remaining: float | None, ceiling: float) -> tuple[float, bool]:
    """(seconds the work may take, whether the server's ceiling rather than the client's deadline set it)."""
    if remaining is None or not math.isfinite(remaining) or remaining > ceiling:
        return ceiling, True
    return max(remaining, 0.0), False


class Expired(Exception):
    """The work ran past its deadline and was cancelled; ``capped``: the server's ceiling, not the client's
    deadline, set the limit (each transport words its own status message)."""

    def __init__(self, capped: bool) -> None:
        super().__init__("deadline ceiling" if capped else "deadline")
        self.capped = capped


async def within(work: Awaitable[T], remaining: float | None, ceiling: float) -> T:
    """Await ``work`` within ``remaining`` seconds capped at ``ceiling``; on expiry the work is cancelled (its
    queued rows drop) and Expired raised, in this task (no extra task per call).

    A client's own deadline gets an ``asyncio.timeout``. Work under the server's ceiling alone (a client that
    set no deadline, or a longer one) shares one timer per event loop and ceiling (``Ceiling``): every such
    deadline is the same length, so they expire in the order they began, and an ``asyncio.timeout`` per request
    (its timer handle, put on the loop's heap and taken off again) would be spent on the common case."""
    timeout, capped = deadline(remaining, ceiling)
    if math.isinf(timeout):
        return await work
    if capped:
        return await Ceiling.of(timeout).run(work)
    try:
        async with asyncio.timeout(timeout):
            return await work
    except TimeoutError:
        raise Expired(capped) from None


class _Entry:
    """One unit of work under a ``Ceiling``: its task (None once it ended), when it expires, and whether the
    ceiling cancelled it."""

    __slots__ = ("task", "at", "cancelling", "fired")

    def __init__(self, task: asyncio.Task, at: float) -> None:
        self.task: asyncio.Task | None = task
        self.at = at
        self.cancelling = task.cancelling()
        self.fired = False


class Ceiling:
    """Deadlines of one length on one event loop, sharing one timer: ``await Ceiling.of(seconds).run(work)``.

    Entries queue in the order they began, which is the order they expire. One timer handle waits for the
    oldest entry still running; when it fires it cancels whatever has reached its deadline (Expired is raised
    in that task, as ``asyncio.timeout`` raises TimeoutError) and waits for the next. Ended entries leave the
    front as new ones arrive, and the queue is compacted when ended entries behind a long one outnumber the
    running ones, so it holds about as many entries as there is work in progress.
    """

    _shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, Ceiling]] = \
        weakref.WeakKeyDictionary()
    _last: tuple[asyncio.AbstractEventLoop, float, Ceiling] | None = None

    __slots__ = ("seconds", "entries", "running", "armed")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds  # no reference to its loop: the loop's entry in _shared goes when the loop does
        self.entries: deque[_Entry] = deque()
        self.running = 0
        self.armed = False  # a timer waits on the loop (its handle is not kept: it would hold the loop)

    @classmethod
    def of(cls, seconds: float) -> Ceiling:
        """The running loop's ceiling of ``seconds``."""
        loop = asyncio.get_running_loop()
        last = cls._last
        if last is not None and last[0] is loop and last[1] == seconds:
            return last[2]
        ceilings = cls._shared.setdefault(loop, {})
        ceiling = ceilings.get(seconds)
        if ceiling is None:
            ceiling = ceilings[seconds] = cls(seconds)
        cls._last = (loop, seconds, ceiling)
        return ceiling

    async def run(self, work: Awaitable[T]) -> T:
        """Await ``work`` in the current task; Expired (capped) when the ceiling cancelled it."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Ceiling.run must be awaited in a task")
        entry = self._enter(task)
        try:
            return await work
        except asyncio.CancelledError:
            if entry.fired and task.uncancel() <= entry.cancelling:
                raise Expired(True) from None  # the ceiling's cancel, and no other: the work ran too long
            raise
        finally:
            entry.task = None
            self.running -= 1

    def _enter(self, task: asyncio.Task) -> _Entry:
        entries = self.entries
        while entries and entries[0].task is None:
            entries.popleft()
        if len(entries) > 2 * self.running + 64:  # ended entries held behind a long one: drop them
            self.entries = entries = deque(e for e in entries if e.task is not None)
        loop = asyncio.get_running_loop()
        entry = _Entry(task, loop.time() + self.seconds)
        entries.append(entry)
        self.running += 1
        if not self.armed:
            loop.call_at(entry.at, self._expire)
            self.armed = True
        return entry

    def _expire(self) -> None:
        """The timer: cancel every running entry whose deadline has come, then wait for the next one."""
        self.armed = False
        loop = asyncio.get_running_loop()
        entries, now = self.entries, loop.time()
        while entries and (entries[0].task is None or entries[0].at <= now):
            entry = entries.popleft()
            if entry.task is not None and not entry.fired:
                entry.fired = True
                entry.task.cancel()
        if entries:  # the oldest still running, not yet due
            loop.call_at(entries[0].at, self._expire)
            self.armed = True
