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
    queued rows drop) and Expired raised. ``asyncio.timeout`` cancels it in this task: no extra task per call."""
    timeout, capped = deadline(remaining, ceiling)
    if math.isinf(timeout):
        return await work
    try:
        async with asyncio.timeout(timeout):
            return await work
    except TimeoutError:
        raise Expired(capped) from None
