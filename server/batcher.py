"""Dynamic batching for one graph: concurrent submissions merge into shared ONNX Runtime calls.

A queue of futures, in the manner of Triton's dynamic batcher and Ray Serve's ``@serve.batch``. Each
``submit(feeds)`` enqueues its rows and awaits a future. Workers (one per model instance) take up to
``max_batch_size`` rows as soon as that many are queued, or once the oldest waiting submission has waited
``max_queue_delay_ms`` (Triton's rule), or, given the engine's count of requests in flight (``expected``),
earlier when no company is coming (``_due_reason``; the last two rules only with ``early``):

* every request in flight on the model has a submission queued (``expected``) and none of them is fresh: only
  later steps of programs wait (sampling loops, dequantisation draws, importance-sample chunks, submitted with
  ``fresh=False``), so a lone sampler pays no delay at its steps;
* every request in flight is queued and no more have been in flight at once lately (the most seen at a fresh
  arrival in the last ``MEMORY_S``): with one client, or once all of C closed-loop clients have arrived, no one
  else can join;
* a lone submission waits, no other request is in flight, and the rate at which new requests have been arriving
  while others were in flight (a decaying count over ``MEMORY_S``) makes one within the rest of the delay
  unlikely (expected count below ``COMPANY``): a trickle of lone requests is not held back for company that
  arrives every few delays. Once two or more wait, a batch is forming under load, where fewer, bigger calls
  are what the server's throughput is made of (its per-call Python cost): they wait for the delay, or for
  everyone in flight, as before.

So one client's request runs at once (the latency of a server without batching) while concurrent ones still
wait to merge. While the event loop is saturated (``LoopLoad``: many clients, and requests wait for the loop to
read them rather than for the graph) the wait stretches to ``busy_delay_factor`` times the delay, so calls hold
the requests the loop reads meanwhile instead of the few it read in one delay.

Each batch runs as ONE call in a thread pool (ONNX Runtime releases the GIL, so the event loop keeps serving),
and its outputs are split back in row order; a large due batch is split over idle instances, and a lone costly
call on an idle server runs as two halves at once, one on the loop's thread (``_halves``). Guarantees:

* exactly one result per submission: its own rows, in its order, never a neighbour's;
* a call that raises fails every submission with rows in that call, and only those; the next call runs;
* a submission larger than ``max_batch_size`` is split over several calls and reassembled; a partly taken
  submission goes to the back of the queue, so big requests take turns with small ones (round robin); one
  that fits a call is never split: when it does not fit what is left of a call, it goes first in the next;
* a cancelled submission's rows that have not run yet are dropped from the queue;
* at most ``max_queue_size`` submissions wait; beyond that ``submit`` raises QueueFull at once.

Per-row results do not depend on the company a row keeps: on the CPU provider (one intra-op thread), sessions
made by ``sessions.make_session`` compute each output row from its own input row with the same arithmetic
whatever its position and the batch size (the graph rewrite in ``graph_rewrite`` removes the two kernel
behaviours of ONNX Runtime that broke this; checked bit for bit for every exported graph in
tests/server/test_row_independence.py).

The batcher knows nothing about gRPC or models: ``run(instance, feeds) -> outputs`` is any blocking callable.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np

from genserve.server import tracing
from genserve.server.errors import EngineError, NotReady, QueueFull
from genserve.server.metrics import BatchStats

log = logging.getLogger("genserve.server")

Feeds = dict[str, np.ndarray]
RunFn = Callable[[int, Feeds], Feeds]
"""``run(instance, feeds) -> outputs``: one blocking graph call on model instance ``instance``."""


MEMORY_S = 0.1
"""How long the batcher remembers arrivals (the peak of requests in flight, the rate of arrivals in company): long
enough to span many calls, short enough that a load that stops stops holding the next lone request back."""
COMPANY = 0.1
"""A lone submission waits for company only while at least this many arrivals are expected within the rest of
the delay (about a one-in-ten chance of one). Closed-loop clients arrive in bunches rather than at the steady
rate this assumes: at 0.5, lone 64-row submissions at 8 clients went a millisecond early a third of the time."""

CALL_MEAN_WEIGHT = 0.2
"""Weight of the newest call in a size class's running mean of call time (for ``inline_call_s``)."""

INLINE_HANDOFFS = 16
"""The server's default ``inline_call_s`` is this many thread hand-offs of the machine it runs on
(``handoff_cost``): a lone call no dearer than that runs on the event loop. On the core the rule was tuned on, a
hand-off cost the loop about 24 us, so 16 of them made the 400 us found best there; on a core three to four times
slower for Python (and for a small graph's many operators) a hand-off costs about 86 us and a 1-row flow call 450
to 600 us, which a fixed 400 us would send to a worker thread every time."""
INLINE_CALL_BOUNDS_S = (100e-6, 5e-3)
"""The default ``inline_call_s`` stays within these, whatever one measurement of the hand-off said."""

INLINE_IDLE_FACTOR = 4
"""The server's default ``inline_idle_call_s`` is this many times its ``inline_call_s``: a lone large call (64
rows of the digits flow: about 1 ms on the fast core, 3.8 ms on the slow one, whose ``inline_call_s`` are 0.4
and 1.6-2.3 ms) runs on the event loop when nothing else is in flight in the whole server, as a server without
a batcher runs every call; on the slow core this gave a lone client's 64-row requests 1.1x the requests/s
(BENCHMARKS.md). A request that arrives meanwhile waits at most that long to be read."""


async def handoff_cost(executor: Executor | None, rounds: int = 64, warmup: int = 16) -> float:
    """Lower quartile of the CPU seconds of the calling thread (the event loop's) per hand-off of a no-op to
    ``executor`` and back (``run_in_executor``): the cost a graph call run inline saves. CPU time rather than wall
    time, so that a busy machine, which stretches the wait, does not inflate it; the lower quartile rather than the
    median, because a busy machine still inflates some rounds (cold caches after another process ran: on one
    2-core machine four starts beside a test run read medians of 86 to 162 us)."""
    loop = asyncio.get_running_loop()
    costs = []
    for i in range(warmup + rounds):
        t = time.thread_time()
        await loop.run_in_executor(executor, _noop)
        if i >= warmup:
            costs.append(time.thread_time() - t)
    costs.sort()
    return costs[len(costs) // 4]


def _noop() -> None:
    pass


BUSY_SHARE = 0.7
"""The event loop counts as saturated while its thread was on a CPU at least this share of the last window
(``LoopLoad``). At 64 closed-loop clients of 1-row flow requests it read 0.8 to 0.9 (the load generator shares
the two cores); a lone client 0.6 (whose requests run alone, so the rule never applies to them)."""


SPLIT_MIN_ROWS = 64
"""A due batch is split over idle instances (``instances`` > 1) only into parts of at least this many rows: a
large batch (eight 64-row requests, 512 rows) runs as two calls at once on two instances instead of one call
while the other instance waits; small ones stay whole, since every call costs the event loop its hand-off. While
a call runs, a batch under this many rows waits for it instead of starting a second one."""


HALF_MIN_ROWS = 32
"""A lone call runs as two halves at once (``_halves``) only with at least this many rows in each. A call's
fixed cost (about 90 us of a 1-row digits-flow call, against 9 us a row) does not halve: 64 rows took 650 us
whole and 480 us as two halves, but 32 rows 364 us whole and 325 to 355 us as halves, for half as much CPU
again; and a size class timed while the server warmed up (its first calls are slow) must not split small calls
for nothing."""


class LoopLoad:
    """How busy the event loop's thread is: its CPU time over the wall time of the last window (``memory_s``).

    A saturated loop is where a gRPC server in Python spends its requests' time: at many concurrent clients the
    requests wait for the loop to read them (in gRPC's queues, unseen by the batcher) rather than for the graph,
    so a batch that goes after ``max_queue_delay_ms`` holds only the few the loop read meanwhile, and every call
    costs the loop (and ONNX Runtime) its fixed share again. Waiting longer there costs no throughput (the loop
    keeps reading) and buys larger calls. Read on the loop's thread only (``busy``), lazily: a window closes at
    the first reading after ``memory_s``, so a reading after an idle spell averages the spell in (not busy).
    """

    __slots__ = ("memory_s", "cpu_clock", "share", "_at", "_cpu")

    def __init__(self, memory_s: float = MEMORY_S, cpu_clock: Callable[[], float] = time.thread_time) -> None:
        self.memory_s = memory_s
        self.cpu_clock = cpu_clock  # the loop's thread's CPU seconds (when read on that thread)
        self.share = 0.0  # of the last closed window
        self._at = -math.inf
        self._cpu = 0.0

    def busy(self, now: float) -> bool:
        """Whether the loop's thread was on a CPU at least ``BUSY_SHARE`` of the last window; ``now`` on the
        monotonic clock (the loop's time)."""
        if now - self._at >= self.memory_s:
            cpu = self.cpu_clock()
            self.share = (cpu - self._cpu) / (now - self._at) if math.isfinite(self._at) else 0.0
            self._at, self._cpu = now, cpu
        return self.share >= BUSY_SHARE


class Occupancy:
    """Requests in flight in the whole server (every model), and the most seen at once lately (``memory_s``).

    The engine enters and leaves it around every operation; a batcher asks it whether the server is idle but
    for one call's requests (``idle``), the condition for running a call of any cost up to
    ``inline_idle_call_s`` on the event loop: with nothing else in flight anywhere, the loop has nothing to do
    while the graph runs, and the hand-off to a worker thread and back is pure cost.
    """

    __slots__ = ("now", "memory_s", "_peak_now", "_peak_before", "_window_start")

    def __init__(self, memory_s: float = MEMORY_S) -> None:
        self.now = 0
        self.memory_s = memory_s
        self._peak_now = self._peak_before = 0
        self._window_start = -math.inf

    def enter(self, at: float | None = None) -> None:
        self.now += 1
        at = time.monotonic() if at is None else at
        if at - self._window_start >= self.memory_s:
            self._peak_before = self._peak_now if at - self._window_start < 2 * self.memory_s else 0
            self._peak_now, self._window_start = 0, at
        self._peak_now = max(self._peak_now, self.now)

    def leave(self) -> None:
        self.now -= 1

    def idle(self, requests: int, at: float | None = None) -> bool:
        """No requests in flight but these, and no more than these at once lately."""
        at = time.monotonic() if at is None else at
        if at - self._window_start >= 2 * self.memory_s:
            peak = 0
        elif at - self._window_start >= self.memory_s:
            peak = self._peak_now
        else:
            peak = max(self._peak_now, self._peak_before)
        return self.now <= requests and max(peak, self.now) <= requests


class BatchFailed(EngineError):
    """The graph call that held this submission's rows raised; the message names the graph and the cause."""


class _Submission:
    """One ``submit`` call: its rows, how many were handed to calls, and the parts that came back."""

    __slots__ = ("feeds", "rows", "key", "taken", "done", "parts", "future", "enqueued", "fresh", "trace")

    def __init__(self, feeds: Feeds, rows: int, future: asyncio.Future, now: float, fresh: bool) -> None:
        self.feeds = feeds
        self.rows = rows
        self.key = tuple((k, v.shape[1:]) for k, v in sorted(feeds.items()))  # only equal keys can merge
        self.taken = 0  # rows [0, taken) were handed to calls
        self.done = 0  # rows whose outputs came back
        self.parts: list[tuple[int, Feeds]] = []
        self.future = future
        self.enqueued = now
        self.fresh = fresh  # a request's first submission: waits up to the delay for company
        self.trace = None  # with tracing on: the request's span context and when it was queued (tracing.py)


class Batcher:
    """The dynamic batcher of one graph.

    Args:
        graph: graph name (metrics label, error messages).
        run: blocking ``run(instance, feeds) -> outputs``; called with ``instance`` in 0..instances-1.
        max_batch_size: most rows per call.
        max_queue_delay_ms: longest wait of the oldest queued submission for others to join it.
        max_queue_size: most submissions waiting (not yet fully handed to calls).
        instances: calls that may run at once (one worker per instance); a due batch of at least twice
            ``SPLIT_MIN_ROWS`` rows is split over the idle ones, and while a call runs, a batch under
            ``SPLIT_MIN_ROWS`` rows waits for it rather than start another (as with one instance; its
            submissions then do not even wake the idle worker). One idle worker watches the queue at a time.
            A lone call that runs on the loop's thread only because the server is idle (its size class costs
            ``inline_call_s`` or more) runs as two halves at once, the second on instance 1 (``_halves``).
        executor: thread pool for the calls (None: the event loop's default executor).
        input_shapes: input name -> shape of one row (None for a free axis); submissions are checked against
            it so that a malformed submission fails alone instead of breaking a merged call.
        model: metrics label.
        observe: receives a ``BatchStats`` per call.
        on_depth: receives the number of queued rows whenever it changes.
        pad_to: when > 0, every call is padded to this many rows (copies of its first row, outputs cut back), so
            each call has the same shape; for providers whose kernels depend on the batch shape (CUDA).
        pad_sizes: row counts a call is padded up to (the smallest one that holds it; ``pad_buckets``): a few
            shapes per graph instead of one, so a small call does not pay for max_batch_size rows.
        expected: how many submissions could be waiting at most right now (the engine: operations in flight on
            the model version, counting the one submitting); once that many wait, the batch goes without the
            delay when none is fresh or when no other request is likely to arrive (see the module docstring).
            None: nothing goes before it is full or its oldest waited the delay.
        early: send a fresh batch before the delay when no company is coming (the "all_here" and "no_company"
            rules of the module docstring); off, a lone request waits the delay (tests that hold requests in
            a batching window rely on that).
        memory_s: how long arrivals are remembered for that judgement (``MEMORY_S``).
        inline_call_s: run a call on the event loop's thread instead of ``executor`` when every submission that
            could be waiting (``expected``) is in it, no more requests than it holds have been in flight at once
            lately (under a crowd the loop has other requests to parse while the graph runs) and calls of its
            size class (rows rounded up to a power of two) have lately taken less than this many seconds; 0:
            never. Handing a call to a worker thread and
            its result back costs two thread wake-ups (futex, the loop's self-pipe, context switches): for a
            cheap graph that is more CPU than the call, and with nothing else of the model in flight the loop
            has nothing to overlap with the call.
        occupancy: the server's requests in flight (``Occupancy``), for ``inline_idle_call_s``.
        inline_idle_call_s: the same for calls that took less than this (more than ``inline_call_s``) when,
            besides, nothing else is in flight in the whole server and nothing was lately (``occupancy``): a lone
            large request (say 64 rows of a flow, about a millisecond) skips the hand-off too; a request that
            arrives meanwhile waits at most this long to be read. 0: never.
        cost_clock: the clock a call's cost is read on for those two rules (None: the wall clock, which the
            call's metrics always use). With ONNX Runtime working on the calling thread alone (one intra-op
            thread, CPU), ``time.thread_time``: that thread's CPU time is the call's cost whatever else the
            machine runs, where the wall clock also counts time the thread was preempted or waited for the GIL
            after a worker-thread call, so on a busy machine a cheap graph read as costly stayed on the
            (costlier) worker-thread path.
        loop_load: the event loop's ``LoopLoad`` (one per loop, shared by its batchers); with it, while the loop
            is saturated, a batch waits up to ``busy_delay_factor`` times ``max_queue_delay_ms`` (``delay`` is
            still the reason it goes, and "full" and "all_here" still send it earlier). None: never longer.
        busy_delay_factor: see ``loop_load`` (>= 1; 1: never longer).

    Example:
        >>> import asyncio, numpy as np
        >>> b = Batcher("double", lambda i, f: {"y": 2 * f["x"]}, max_batch_size=8)
        >>> async def main():
        ...     xs = [np.full((1, 2), k, np.float32) for k in range(3)]
        ...     outs = await asyncio.gather(*(b.submit({"x": x}) for x in xs))
        ...     await b.stop()
        ...     return [float(o["y"][0, 0]) for o in outs]
        >>> asyncio.run(main())
        [0.0, 2.0, 4.0]
    """

    def __init__(self, graph: str, run: RunFn, *, max_batch_size: int = 64, max_queue_delay_ms: float = 2.0,
                 max_queue_size: int = 4096, instances: int = 1, executor: Executor | None = None,
                 input_shapes: dict[str, Sequence[int | None]] | None = None, model: str = "",
                 observe: Callable[[BatchStats], None] | None = None,
                 on_depth: Callable[[int], None] | None = None, expected: Callable[[], int] | None = None,
                 pad_to: int = 0, early: bool = False, memory_s: float = MEMORY_S,
                 pad_sizes: tuple[int, ...] = (), inline_call_s: float = 0.0, occupancy: Occupancy | None = None,
                 inline_idle_call_s: float = 0.0, cost_clock: Callable[[], float] | None = None,
                 loop_load: LoopLoad | None = None, busy_delay_factor: float = 1.0) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or instances < 1 or max_queue_delay_ms < 0 or memory_s <= 0:
            raise ValueError(f"need max_batch_size, max_queue_size, instances >= 1, max_queue_delay_ms >= 0, "
                             f"memory_s > 0, got {max_batch_size}, {max_queue_size}, {instances}, "
                             f"{max_queue_delay_ms}, {memory_s}")
        if not busy_delay_factor >= 1:
            raise ValueError(f"busy_delay_factor must be >= 1, got {busy_delay_factor}")
        self.graph, self.model = graph, model
        self.run = run
        self.max_batch_size = max_batch_size
        self.delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.executor = executor
        self.pad_to = pad_to
        self.pad_sizes = tuple(sorted(pad_sizes)) or ((pad_to,) if pad_to > 0 else ())
        self.early = early
        self.memory_s = memory_s
        self.input_shapes = None if input_shapes is None else {k: tuple(v) for k, v in input_shapes.items()}
        # every input's row shape when none has a free axis: _checked's one-comparison path
        self._row_shapes = None if self.input_shapes is None or any(
            d is None for shape in self.input_shapes.values() for d in shape) else self.input_shapes
        self.observe = observe
        self.on_depth = on_depth
        self.expected = expected
        self.inline_call_s = inline_call_s
        self.occupancy = occupancy
        self.inline_idle_call_s = inline_idle_call_s
        self.cost_clock = cost_clock
        self.loop_load = loop_load
        self.busy_delay_factor = busy_delay_factor
        self._call_s: dict[int, float] = {}  # size class (rows.bit_length()) -> running mean of call seconds
        self.inline_calls = 0  # calls run on the loop's thread (of ``calls``), for tests and benchmarks
        self._queue: deque[_Submission] = deque()
        self._queued_rows = 0  # rows not yet handed to a call, of live submissions
        self._waiting = 0  # live submissions with rows not yet handed to a call
        self._fresh = 0  # of those, the fresh ones
        self._running = 0  # calls in progress
        self._wakeup: asyncio.Event | None = None
        self._watch: asyncio.Lock | None = None  # held by the one idle worker that watches the queue
        self._idle: asyncio.Event | None = None
        self._workers: list[asyncio.Task] = []
        self._closed = False
        # Arrivals remembered over memory_s: the most requests in flight seen at a fresh arrival in the current
        # and the previous window, and a decaying count of fresh arrivals that found others in flight.
        self._window_start = -math.inf
        self._peak_now = self._peak_before = 0
        self._company = 0.0
        self._company_at = 0.0
        self.calls = 0  # ONNX Runtime calls made, for tests and benchmarks
        self.reasons: Counter[str] = Counter()
        """Why each call went: "full", "delay" (the oldest waited max_queue_delay_ms), "steps" (only later steps
        of the requests in flight wait), "all_here" (every request in flight lately is queued), "no_company"
        (a lone submission, and no arrival likely within the rest of the delay), "split" (the rest of a batch
        whose first part another instance took, ``SPLIT_MIN_ROWS``)."""
        self._split_rest = False  # the queue's front is the rest of a batch split over idle instances: due now

    # ---- public ------------------------------------------------------------------------------------
    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def waiting(self) -> int:
        return self._waiting

    def start(self) -> None:
        """Start the workers on the running event loop (``submit`` does this on first use)."""
        if self._workers:
            return
        self._wakeup, self._idle, self._watch = asyncio.Event(), asyncio.Event(), asyncio.Lock()
        self._idle.set()
        self._workers = [asyncio.ensure_future(self._worker(i)) for i in range(self.instances)]

    async def submit(self, feeds: Feeds, fresh: bool = True) -> Feeds:
        """Run ``feeds`` (arrays with the same number of rows on axis 0) as part of shared calls.

        ``fresh=False`` marks a later step of a request already in flight (see the module docstring).

        Returns the outputs for exactly these rows, in order. Raises QueueFull when ``max_queue_size``
        submissions wait, BatchFailed when a call with these rows raised, ValueError for malformed feeds;
        cancelling the awaiting task drops the rows not yet run.
        """
        self._admit()
        feeds, rows = self._checked(feeds)
        self.start()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if fresh and self.early and self.expected is not None:
            self._arrived(now)
        if self._alone(rows, fresh):
            # One turn of the loop first: requests that arrived with this one (handlers gRPC has ready to run)
            # enter the engine and submit now, and then this one is no longer alone and queues to merge with
            # them. Without the turn each of a burst ran alone, one after another, and nothing merged.
            await asyncio.sleep(0)
            self._admit()  # the turn may have closed the batcher or filled its queue
            if self._alone(rows, fresh):
                if self._halves(rows):
                    return await self._run_halves(feeds, rows, fresh)
                return self._run_alone(feeds, rows, fresh)
            now = loop.time()
        sub = _Submission(feeds, rows, loop.create_future(), now, fresh)
        if tracing.tracer is not None:
            sub.trace = tracing.submitted()
        sub.future.add_done_callback(lambda _f, s=sub: self._settled(s))
        self._queue.append(sub)
        self._queued_rows += rows
        self._waiting += 1
        self._fresh += fresh
        self._depth_changed()
        if not self._beside_a_call():
            self._wakeup.set()  # else an idle instance would only find a small batch, which waits
        return await sub.future  # task cancellation cancels the future; _settled drops its unrun rows

    async def stop(self, drain: bool = True) -> None:
        """Refuse new submissions; with ``drain`` finish what is queued and running first; end the workers."""
        self._closed = True
        if drain and self._workers:
            while self._queued_rows or self._running:
                self._idle.clear()
                await self._idle.wait()
        for w in self._workers:
            w.cancel()
        for w in self._workers:
            try:
                await w
            except asyncio.CancelledError:
                pass
        self._workers = []
        while self._queue:
            sub = self._queue.popleft()
            if not sub.future.done():
                sub.future.set_exception(NotReady(f"graph {self.graph!r} of model {self.model!r} stopped "
                                                  "before this request ran; retry"))

    # ---- internals ---------------------------------------------------------------------------------
    def _admit(self) -> None:
        """NotReady once stopping, QueueFull with ``max_queue_size`` submissions waiting."""
        if self._closed:
            raise NotReady(f"graph {self.graph!r} of model {self.model!r} is shutting down; retry")
        if self._waiting >= self.max_queue_size:
            raise QueueFull(f"graph {self.graph!r} of model {self.model!r} has {self._waiting} requests "
                            f"queued (max_queue_size {self.max_queue_size}); retry later, send fewer "
                            "concurrent requests, or raise max_queue_size in the model's config.json")

    def _checked(self, feeds: Feeds) -> tuple[Feeds, int]:
        """(the feeds as contiguous float32, their rows); ValueError naming what does not fit the graph."""
        out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        row_shapes = self._row_shapes
        if row_shapes is not None and out and len(out) == len(row_shapes):  # one pass, no message to build
            n = -1
            for k, v in out.items():
                shape = v.shape
                if not shape or shape[1:] != row_shapes.get(k) or (n != -1 and shape[0] != n):
                    break
                n = shape[0]
            else:
                if n >= 1:
                    return out, n
        return self._check_slowly(out)

    def _check_slowly(self, out: Feeds) -> tuple[Feeds, int]:
        """Every check of ``_checked``, one after another, naming the first that fails."""
        if not out:
            raise ValueError(f"graph {self.graph!r}: no inputs given")
        rows = {k: (v.shape[0] if v.ndim else -1) for k, v in out.items()}
        n = next(iter(rows.values()))
        if n < 1 or any(r != n for r in rows.values()):
            raise ValueError(f"graph {self.graph!r}: inputs need the same number (>= 1) of rows on axis 0, "
                             f"got {rows}")
        if self.input_shapes is not None:
            if set(out) != set(self.input_shapes):
                raise ValueError(f"graph {self.graph!r} takes inputs {sorted(self.input_shapes)}, "
                                 f"got {sorted(out)}")
            for k, v in out.items():
                want = self.input_shapes[k]
                if len(want) != v.ndim - 1 or any(w not in (None, s) for w, s in zip(want, v.shape[1:],
                                                                                     strict=True)):
                    raise ValueError(f"graph {self.graph!r} input {k!r}: rows of shape {v.shape[1:]}, "
                                     f"the graph takes {tuple(want)}")
        return out, n

    def _arrived(self, now: float) -> None:
        """A fresh submission is about to be queued: remember how many requests are in flight with it."""
        in_flight = self.expected()
        if now - self._window_start >= self.memory_s:
            self._peak_before = self._peak_now if now - self._window_start < 2 * self.memory_s else 0
            self._peak_now, self._window_start = 0, now
        self._peak_now = max(self._peak_now, in_flight)
        if in_flight > 1:  # it came while others were in flight: company arrives at this rate
            self._company = self._company * math.exp((self._company_at - now) / self.memory_s) + 1.0
            self._company_at = now

    def _arrival_rate(self, now: float) -> float:
        """Fresh arrivals per second that found others in flight, over the last ``memory_s`` or so."""
        return self._company * math.exp((self._company_at - now) / self.memory_s) / self.memory_s

    def _due_reason(self, now: float) -> tuple[str | None, float]:
        """Why the queue's front batch goes now (None: not yet), and until when to wait otherwise."""
        delay = self.delay
        if self.busy_delay_factor > 1 and self.loop_load is not None and self.loop_load.busy(now):
            delay *= self.busy_delay_factor  # the loop is saturated: company waits where it has not looked yet
        due = self._queue[0].enqueued + delay
        if self._queued_rows >= self.max_batch_size:
            return "full", due
        if self._split_rest:
            return "split", due
        if self._beside_a_call():
            return None, math.inf  # until that call returns (``_ended`` wakes the watching worker)
        if now >= due:
            return "delay", due
        if self.expected is None or self._waiting < self.expected():  # someone in flight may still join
            return None, due
        if not self._fresh:
            return "steps", due
        if not self.early:
            return None, due
        if self._waiting >= max(self._peak_now, self._peak_before):
            return "all_here", due
        if self._waiting > 1:  # a batch is forming: under load, bigger calls are worth the delay (Triton's rule)
            return None, due
        rate = self._arrival_rate(now)
        if rate * (due - now) < COMPANY:
            return "no_company", due
        return None, due - COMPANY / rate  # by then, company is no longer likely to come in time

    def _beside_a_call(self) -> bool:
        """Another instance's call runs and the queue holds a small batch (under ``SPLIT_MIN_ROWS`` rows, and not
        full): it waits for that call to return, as with one instance, rather than start a second call of its
        own (a hand-off for few rows, and smaller calls after it); its arrivals do not wake the idle worker."""
        return bool(self._running) and self._queued_rows < min(SPLIT_MIN_ROWS, self.max_batch_size)

    def _settled(self, sub: _Submission) -> None:
        """A submission's future is done (answered, failed or cancelled): forget its unrun rows."""
        if sub.taken < sub.rows:
            self._queued_rows -= sub.rows - sub.taken
            self._waiting -= 1
            self._unfresh(sub)
            sub.taken = sub.rows
            self._depth_changed()
            self._check_idle()

    def _unfresh(self, sub: _Submission) -> None:
        if sub.fresh:
            sub.fresh = False
            self._fresh -= 1

    def _depth_changed(self) -> None:
        if self.on_depth is not None:
            try:
                self.on_depth(self._queued_rows)
            except Exception:  # noqa: BLE001 - metrics must never break the queue's bookkeeping
                log.exception("batcher %s/%s: recording queue depth failed", self.model, self.graph)

    def _check_idle(self) -> None:
        if self._idle is not None and not self._queued_rows and not self._running:
            self._idle.set()

    async def _worker(self, instance: int) -> None:
        while True:
            try:
                parts = await self._next_batch()
                if parts:
                    await self._execute(instance, parts)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug in the bookkeeping must not stop the graph's only worker
                log.exception("batcher %s/%s: worker error", self.model, self.graph)
                await asyncio.sleep(0.01)  # and must not spin

    async def _next_batch(self) -> list[tuple[_Submission, int, int]]:
        """Wait until a batch is due (full, or its oldest row waited ``delay``), then take it. One idle worker
        watches the queue at a time; the others wait their turn (each arrival wakes one worker, not all)."""
        async with self._watch:
            return await self._watch_queue()

    async def _watch_queue(self) -> list[tuple[_Submission, int, int]]:
        loop = asyncio.get_running_loop()
        while True:
            while self._queue and self._queue[0].future.done():
                self._settled(self._queue.popleft())
            # A cancelled future is done at once but its _settled callback runs a loop iteration later: the
            # submissions dropped here are settled now, so the counts agree with the queue (once, rows still
            # counted with the queue empty killed the worker); an empty queue is waited on whatever they say.
            if not self._queued_rows or not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = loop.time()
            reason, until = self._due_reason(now)
            if reason is not None:
                self.reasons[reason] += 1
                return self._take()
            self._wakeup.clear()
            try:
                async with asyncio.timeout(None if until == math.inf else max(until - now, 0.0)):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    def _take(self) -> list[tuple[_Submission, int, int]]:
        """Up to max_batch_size rows from the queue front; a partly taken submission moves to the back. With
        other instances idle and enough rows queued, only this instance's share (``SPLIT_MIN_ROWS``): the rest
        is due at once, for the next idle instance."""
        parts: list[tuple[_Submission, int, int]] = []
        skipped: list[_Submission] = []
        capacity, key, rotate = self.max_batch_size, None, None
        self._split_rest = False
        idle = self.instances - self._running - 1  # other workers waiting for a batch (this one takes it now)
        if idle > 0 and self._queued_rows >= 2 * SPLIT_MIN_ROWS:
            ways = min(idle + 1, self._queued_rows // SPLIT_MIN_ROWS)
            share = -(-min(self._queued_rows, self.max_batch_size * ways) // ways)  # ceiling division
            if share < capacity:
                capacity, self._split_rest = share, True
        while capacity and self._queue:
            sub = self._queue.popleft()
            if sub.future.done():
                self._settled(sub)
                continue
            if key is not None and sub.key != key:  # other input shapes: a later call takes it
                skipped.append(sub)
                continue
            if parts and capacity < sub.rows - sub.taken <= self.max_batch_size:
                # It fits a call of its own: it goes first in the next call rather than lend a sliver to this
                # one and wait a whole round of the queue for the rest (calls that each end in a sliver of the
                # next request starved some requests for seconds). Smaller ones behind it may fill this call.
                skipped.append(sub)
                continue
            key = sub.key
            k = min(capacity, sub.rows - sub.taken)
            parts.append((sub, sub.taken, sub.taken + k))
            sub.taken += k
            capacity -= k
            self._queued_rows -= k
            self._unfresh(sub)  # a partly taken submission's remaining rows do not wait again
            if sub.taken < sub.rows:
                rotate = sub
            else:
                self._waiting -= 1
        self._queue.extendleft(reversed(skipped))
        if rotate is not None:
            self._queue.append(rotate)
        if parts:
            self._running += 1  # _execute's finally takes it back; an empty batch is never executed
        if self._split_rest:
            self._split_rest = bool(self._queue)
            self._wakeup.set()  # an idle worker takes the rest now
        self._depth_changed()
        return parts

    async def _execute(self, instance: int, parts: list[tuple[_Submission, int, int]]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        waits = tuple(now - sub.enqueued for sub, start, _ in parts if start == 0)
        rows = sum(stop - start for _, start, stop in parts)
        seconds, ok = 0.0, False
        span = None
        if tracing.tracer is not None:
            span = tracing.start_call(self.model, self.graph, instance, rows,
                                      next((n for n in self.pad_sizes if n >= rows), rows),
                                      [(sub.trace, b - a, a == 0) for sub, a, b in parts])
        try:
            if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == parts[0][0].rows:
                feeds = parts[0][0].feeds  # a whole submission alone: no copy
            else:
                feeds = {k: np.concatenate([sub.feeds[k][a:b] for sub, a, b in parts])
                         for k in parts[0][0].feeds}
            size = rows.bit_length()
            if self._inline(size, len(parts)):
                outputs, seconds, cost = self._call(instance, feeds)
                self.inline_calls += 1
            else:
                outputs, seconds, cost = await loop.run_in_executor(self.executor, self._call, instance, feeds)
            self._called(size, cost, outputs, rows)
            ok = True
        except asyncio.CancelledError:
            for sub, _, _ in parts:
                if not sub.future.done():
                    sub.future.set_exception(NotReady(f"graph {self.graph!r} stopped while running this "
                                                      "request; retry"))
            raise
        except Exception as e:  # noqa: BLE001 - the call's failure is every one of its submissions' failure
            if span is not None:
                tracing.failed(span, e)
            for sub, _, _ in parts:
                if not sub.future.done():
                    sub.future.set_exception(self._failure(e, rows, len(parts)))
        else:
            offset = 0
            for sub, a, b in parts:
                self._deliver(sub, a, b - a, {k: v[offset:offset + b - a] for k, v in outputs.items()})
                offset += b - a
        finally:
            if span is not None:
                tracing.end_call(span, seconds, ok)
            self._ended(rows, len(parts), waits, seconds, ok)

    def _alone(self, rows: int, fresh: bool) -> bool:
        """Whether a submission arriving now would be taken at once and run inline by ``_execute``: nothing
        queued or running, every request in flight is this one (``expected``) and none more were lately, and its
        size class runs inline (``_inline``). Then ``submit`` runs it itself (``_run_alone``), without the
        queue, its future and the worker's wake-up: the same call, one event-loop turn and a few dozen Python
        calls cheaper. Not while tracing (the call's span belongs to the worker's path)."""
        if (self._queue or self._running or rows > self.max_batch_size or self.expected is None
                or tracing.tracer is not None or (fresh and not self.early) or self.expected() > 1
                or max(self._peak_now, self._peak_before) > 1):
            return False
        self._running += 1  # _inline judges a call that is running; _run_alone takes it back
        try:
            return self._inline(rows.bit_length(), 1)
        finally:
            self._running -= 1

    def _run_alone(self, feeds: Feeds, rows: int, fresh: bool) -> Feeds:
        """A lone submission's call on the event loop's thread, as ``_execute`` would run it (see ``_alone``)."""
        self.reasons["all_here" if fresh else "steps"] += 1
        self._running += 1
        seconds, ok = 0.0, False
        try:
            outputs, seconds, cost = self._call(0, feeds)
            self.inline_calls += 1
            self._called(rows.bit_length(), cost, outputs, rows)
            ok = True
            return outputs
        except Exception as e:  # noqa: BLE001 - as in _execute: the call's failure is the submission's
            raise self._failure(e, rows, 1) from e
        finally:
            self._ended(rows, 1, (0.0,), seconds, ok)

    def _halves(self, rows: int) -> bool:
        """Whether a lone call (``_alone``) runs as two halves at once, the loop's thread running one and a worker
        thread the other: with two or more instances, on the CPU (no padded shapes), when calls of its size
        class cost at least ``inline_call_s``. Such a call runs on the loop only because nothing else is in
        flight in the whole server (``inline_idle_call_s``), so the machine's other cores have nothing of this
        server to do; its per-row work is most of its cost, so each half takes about half the time (figures at
        ``HALF_MIN_ROWS``, the fewest rows a half may have), and the hand-off to the worker (about a sixteenth
        of ``inline_call_s``) is small beside it. Each row's result is the same either way (one intra-op
        thread: rows do not depend on their company)."""
        return (self.instances > 1 and rows >= 2 * HALF_MIN_ROWS and not self.pad_sizes
                and self._call_s.get(rows.bit_length(), 0.0) >= self.inline_call_s)

    async def _run_halves(self, feeds: Feeds, rows: int, fresh: bool) -> Feeds:
        """A lone submission as two calls at once (``_halves``): its second half on instance 1 in the executor,
        its first half on instance 0 on the loop's thread meanwhile; the outputs joined in row order. Each half
        counts as a call. A failure of either fails the submission; the worker's half, when the submission
        fails or is cancelled first, is still awaited by its own accounting (``_running`` stays right)."""
        self.reasons["all_here" if fresh else "steps"] += 1
        half = rows - rows // 2
        second = rows - half
        loop = asyncio.get_running_loop()
        other = loop.run_in_executor(self.executor, self._call, 1, {k: v[half:] for k, v in feeds.items()})
        self._running += 2  # after the hand-off: an executor that refuses work leaves the count as it was

        def other_ended(f: asyncio.Future) -> None:
            ok = not f.cancelled() and f.exception() is None
            self._ended(second, 1, (), f.result()[1] if ok else 0.0, ok)  # its wait is the first half's

        other.add_done_callback(other_ended)
        seconds, ok = 0.0, False
        try:
            first, seconds, cost = self._call(0, {k: v[:half] for k, v in feeds.items()})
            self.inline_calls += 1
            _check_rows(first, half)
            ok = True
        except Exception as e:  # noqa: BLE001 - as in _execute: the call's failure is the submission's
            raise self._failure(e, half, 1) from e
        finally:
            self._ended(half, 1, (0.0,), seconds, ok)
        try:
            rest, _, rest_cost = await asyncio.shield(other)  # cancelled: the worker's half still ends first
            _check_rows(rest, second)
            outputs = {k: np.concatenate([first[k], rest[k]]) for k in first}
            self._called(rows.bit_length(), cost + rest_cost, outputs, rows)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the worker's half failed, or the halves do not add up
            raise self._failure(e, rows, 1) from e
        return outputs

    def _called(self, size: int, cost: float, outputs: Feeds, rows: int) -> None:
        """A call of size class ``size`` returned after ``cost`` seconds: remember its cost, check its rows."""
        mean = self._call_s.get(size)
        self._call_s[size] = cost if mean is None else mean + CALL_MEAN_WEIGHT * (cost - mean)
        _check_rows(outputs, rows)

    def _failure(self, e: Exception, rows: int, requests: int) -> BatchFailed:
        err = BatchFailed(f"graph {self.graph!r} of model {self.model!r} failed on a batch of {rows} rows from "
                          f"{requests} requests: {type(e).__name__}: {str(e)[:500]}")
        err.__cause__ = e
        return err

    def _ended(self, rows: int, requests: int, waits: tuple[float, ...], seconds: float, ok: bool) -> None:
        """A call ended (answered or failed): the running count, the idle event, the metrics."""
        self._running -= 1
        self.calls += 1
        if self._queued_rows:
            self._wakeup.set()  # the watching worker may sleep on a small batch that waited for this call
        self._check_idle()
        if self.observe is not None:
            try:
                self.observe(BatchStats(self.model, self.graph, rows, requests, waits, seconds, ok))
            except Exception:  # noqa: BLE001 - metrics must never stop a worker
                log.exception("batcher %s/%s: recording metrics failed", self.model, self.graph)

    def _inline(self, size: int, submissions: int) -> bool:
        """Whether a call of this size class, holding this many submissions, runs on the loop's thread."""
        mean = self._call_s.get(size)
        if (mean is None or self._running != 1 or self.expected is None or self.expected() > submissions
                or max(self._peak_now, self._peak_before) > submissions):  # a crowd lately
            return False
        return mean < self.inline_call_s or (mean < self.inline_idle_call_s and self.occupancy is not None
                                              and self.occupancy.idle(submissions))

    def _call(self, instance: int, feeds: Feeds) -> tuple[Feeds, float, float]:
        """One graph call -> (outputs, wall seconds, cost seconds on ``cost_clock``)."""
        clock = self.cost_clock
        t, c = time.perf_counter(), (0.0 if clock is None else clock())
        rows = next(iter(feeds.values())).shape[0]
        size = next((n for n in self.pad_sizes if n >= rows), rows)
        if rows < size:
            feeds = {k: np.concatenate([v, np.repeat(v[:1], size - rows, axis=0)]) for k, v in feeds.items()}
            out = {k: v[:rows] for k, v in self.run(instance, feeds).items()}
        else:
            out = self.run(instance, feeds)
        seconds = time.perf_counter() - t
        return out, seconds, (seconds if clock is None else clock() - c)

    @staticmethod
    def _deliver(sub: _Submission, start: int, rows: int, outputs: Feeds) -> None:
        """Store one part; the submission's future resolves when all its rows are back, in row order."""
        if sub.future.done():
            return
        sub.parts.append((start, outputs))
        sub.done += rows
        if sub.done < sub.rows:
            return
        if len(sub.parts) == 1:
            sub.future.set_result(sub.parts[0][1])
            return
        sub.parts.sort(key=lambda p: p[0])
        names = sub.parts[0][1].keys()
        sub.future.set_result({k: np.concatenate([p[1][k] for p in sub.parts]) for k in names})


def _check_rows(outputs: Feeds, rows: int) -> None:
    bad = {k: v.shape for k, v in outputs.items() if v.ndim == 0 or v.shape[0] != rows}
    if bad:
        raise RuntimeError(f"outputs {bad} do not have the batch's {rows} rows on axis 0")


def pad_buckets(max_batch_size: int, smallest: int = 16, step: int = 4) -> tuple[int, ...]:
    """A few padded call sizes up to ``max_batch_size``: ``smallest``, then times ``step`` (16, 64, 256, 512 for
    512). A call is padded to the smallest that holds it, so at most ``step`` times its rows run (a 1-row call
    runs 16, not 512) while a graph sees at most a handful of shapes.

    Example:
        >>> pad_buckets(512), pad_buckets(100), pad_buckets(8)
        ((16, 64, 256, 512), (16, 64, 100), (8,))
    """
    sizes, n = [], smallest
    while n < max_batch_size:
        sizes.append(n)
        n *= step
    return (*sizes, max_batch_size)
