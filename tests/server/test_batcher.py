"""The dynamic batcher on real ONNX Runtime sessions of exported graphs: merging, splitting, order, queue
limits, cancellation, failures. That a row's results do not depend on the company it keeps, which merged
calls rely on, is checked for every exported graph in test_row_independence.py."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from genserve.core.manifest import read_manifest, spec_from_proto
from genserve.server.batcher import (
    BUSY_SHARE,
    HALF_MIN_ROWS,
    SPLIT_MIN_ROWS,
    Batcher,
    BatchFailed,
    LoopLoad,
    Occupancy,
    _Submission,
    handoff_cost,
    pad_buckets,
)
from genserve.server.errors import QueueFull
from genserve.server.metrics import BatchStats
from genserve.server.sessions import SessionOptions, make_session, run_session
from genserve.v1 import manifest_pb2 as pb

CPU = SessionOptions(provider="cpu", intra_op_threads=1)


def graphs(repo: Path) -> list[tuple[str, pb.ModelManifest, pb.GraphSpec]]:
    """(model folder, manifest, graph) for every graph of the newest version of every model."""
    out = []
    for model in sorted(p for p in repo.iterdir() if p.is_dir()):
        folder = max((v for v in model.iterdir() if v.name.isdigit()), key=lambda v: int(v.name))
        manifest = read_manifest(folder / "manifest.json")
        out += [(str(folder), manifest, g) for g in manifest.graphs]
    return out


def graph_feeds(manifest: pb.ModelManifest, graph: pb.GraphSpec, rows: int,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible inputs: data rows for ``x`` (integer levels for discrete data), uniforms for ``u``, else
    standard normal values."""
    rng = np.random.default_rng(seed)
    spec = spec_from_proto(manifest.data)
    feeds = {}
    for i in graph.inputs:
        shape = (rows, *[d if d > 0 else 1 for d in i.shape[1:]])
        if i.name == "x" and tuple(shape[1:]) == spec.shape:
            if spec.discrete:
                v = rng.integers(0, spec.levels, shape)
            else:
                v = rng.standard_normal(shape) * np.asarray(spec.std or 1.0) + np.asarray(spec.mean or 0.0)
        elif i.name.startswith("u"):
            v = rng.random(shape)
        elif i.name == "t":  # a time-step index (the RNN's step graph)
            v = rng.integers(0, spec.dim, shape)
        else:
            v = rng.standard_normal(shape)
        feeds[i.name] = v.astype(np.float32)
    return feeds


def rows_of(feeds: dict[str, np.ndarray], a: int, b: int) -> dict[str, np.ndarray]:
    return {k: v[a:b] for k, v in feeds.items()}


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
                                        for k in a)


@pytest.fixture(scope="module")
def ppca(repo_dir: Path) -> tuple[pb.ModelManifest, ort.InferenceSession]:
    folder = repo_dir / "digits-ppca" / "1"
    manifest = read_manifest(folder / "manifest.json")
    return manifest, make_session(folder / "log_prob.onnx", CPU)


def ppca_batcher(ppca, **kw) -> Batcher:
    manifest, session = ppca
    return Batcher("log_prob", lambda i, f: run_session(session, f), **kw)


# ---- merging, splitting, order -----------------------------------------------------------------------------

def test_64_concurrent_one_row_submissions_merge_and_each_equals_its_unbatched_twin(ppca) -> None:
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 64, seed=1)
    twins = [run_session(session, rows_of(feeds, i, i + 1)) for i in range(64)]
    stats: list[BatchStats] = []
    b = ppca_batcher(ppca, max_batch_size=64, max_queue_delay_ms=5.0, observe=stats.append)

    async def main():
        outs = await asyncio.gather(*(b.submit(rows_of(feeds, i, i + 1)) for i in range(64)))
        await b.stop()
        return outs

    outs = asyncio.run(main())
    assert all(same_bits(o, t) for o, t in zip(outs, twins, strict=True))
    assert b.calls < 64 and max(s.rows for s in stats) > 1
    assert sum(s.rows for s in stats) == 64 and sum(len(s.queue_waits) for s in stats) == 64


def test_mixed_sizes_come_back_in_order_exactly_once_and_large_ones_are_split(ppca) -> None:
    manifest, session = ppca
    sizes = [1, 50, 3, 130, 8, 1, 64, 17]
    feeds = graph_feeds(manifest, manifest.graphs[0], sum(sizes), seed=2)
    starts = np.cumsum([0, *sizes])
    direct = run_session(session, feeds)
    stats: list[BatchStats] = []
    b = ppca_batcher(ppca, max_batch_size=16, max_queue_delay_ms=1.0, observe=stats.append)

    async def main():
        spans = zip(starts[:-1], starts[1:], strict=True)
        outs = await asyncio.gather(*(b.submit(rows_of(feeds, a, z)) for a, z in spans))
        await b.stop()
        return outs

    outs = asyncio.run(main())
    for out, a, z in zip(outs, starts, starts[1:], strict=False):
        assert same_bits(out, rows_of(direct, a, z))
    assert max(s.rows for s in stats) == 16  # never more than max_batch_size rows in one call
    assert b.calls == len(stats) >= -(-sum(sizes) // 16)
    assert b.queued_rows == 0 and b.waiting == 0


def test_a_large_request_takes_turns_with_small_ones(ppca) -> None:
    """A 640-row request is split into 10 calls; a 1-row request queued after it runs in the second call."""
    manifest, _ = ppca
    big = graph_feeds(manifest, manifest.graphs[0], 640, seed=3)
    small = graph_feeds(manifest, manifest.graphs[0], 1, seed=4)
    order: list[str] = []
    b = ppca_batcher(ppca, max_batch_size=64, max_queue_delay_ms=0.0)

    async def main():
        async def tagged(tag, feeds):
            await b.submit(feeds)
            order.append(tag)

        big_task = asyncio.ensure_future(tagged("big", big))
        await asyncio.sleep(0)
        await tagged("small", small)
        await big_task
        await b.stop()

    asyncio.run(main())
    assert order == ["small", "big"] and b.calls == 11


def test_a_request_that_fits_a_call_is_never_split(ppca) -> None:
    """Five 8-row requests and max_batch_size 10: five calls of 8 rows, one request each, in arrival order.
    Splitting them (8 + 2, 6 + 4, ...) sent each remainder to the back of the queue: under load some requests
    waited many rounds for their last rows."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 40, seed=5)
    direct = run_session(session, feeds)
    stats: list[BatchStats] = []
    done: list[int] = []
    b = ppca_batcher(ppca, max_batch_size=10, max_queue_delay_ms=5.0, observe=stats.append)

    async def main():
        async def one(k):
            out = await b.submit(rows_of(feeds, 8 * k, 8 * k + 8))
            done.append(k)
            return out

        outs = await asyncio.gather(*(one(k) for k in range(5)))
        await b.stop()
        return outs

    outs = asyncio.run(main())
    for k, out in enumerate(outs):
        assert same_bits(out, rows_of(direct, 8 * k, 8 * k + 8))
    assert [(s.rows, s.requests) for s in stats] == [(8, 1)] * 5 and done == [0, 1, 2, 3, 4]


# ---- queue limit, cancellation, failures -------------------------------------------------------------------

class Gate:
    """Wraps a session's run so that calls block until released: lets a test hold the worker busy."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.open = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def __call__(self, instance: int, feeds):
        self.entered.set()
        self.open.wait(10)
        self.batches.append(next(iter(feeds.values())).shape[0])
        return run_session(self.session, feeds)


async def until(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.001)


def test_queue_full_refuses_at_once_and_frees_up_when_the_queue_drains(ppca) -> None:
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 4, seed=5)
    gate = Gate(session)
    b = Batcher("log_prob", gate, max_batch_size=4, max_queue_delay_ms=0.0, max_queue_size=3)

    async def main():
        running = asyncio.ensure_future(b.submit(feeds))  # taken by the worker, blocked in the gate
        await until(gate.entered.is_set)
        queued = [asyncio.ensure_future(b.submit(feeds)) for _ in range(3)]
        await asyncio.sleep(0)
        assert b.waiting == 3
        with pytest.raises(QueueFull, match="max_queue_size 3"):
            await b.submit(feeds)
        gate.open.set()
        await asyncio.gather(running, *queued)
        out = await b.submit(feeds)  # room again
        await b.stop()
        return out

    assert same_bits(asyncio.run(main()), run_session(session, feeds))


def test_cancelled_requests_rows_are_dropped_from_the_queue(ppca) -> None:
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 10, seed=6)
    gate = Gate(session)
    b = Batcher("log_prob", gate, max_batch_size=64, max_queue_delay_ms=0.0)

    async def main():
        first = asyncio.ensure_future(b.submit(rows_of(feeds, 0, 1)))
        await until(gate.entered.is_set)
        doomed = asyncio.ensure_future(b.submit(rows_of(feeds, 1, 8)))  # 7 rows
        kept = asyncio.ensure_future(b.submit(rows_of(feeds, 8, 10)))  # 2 rows
        await asyncio.sleep(0)
        assert b.queued_rows == 9
        doomed.cancel()
        await until(lambda: b.queued_rows == 2)
        assert b.waiting == 1
        gate.open.set()
        out = await kept
        await first
        await b.stop()
        assert doomed.cancelled()
        return out

    out = asyncio.run(main())
    assert gate.batches == [1, 2]  # the cancelled request's 7 rows never ran
    assert same_bits(out, run_session(session, rows_of(feeds, 8, 10)))


def test_the_worker_survives_cancellations_it_sees_before_their_callbacks_run(ppca) -> None:
    """A cancelled future is done at once, but its done-callbacks run a loop step later. A worker woken in
    between (here by the second submission; in the server by a stream's chunks all cancelled together) must
    not find the queue empty while its row count still holds the cancelled rows: once, that killed the worker
    with an IndexError and the graph served nothing more."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 6, seed=7)
    b = Batcher("log_prob", lambda i, f: run_session(session, f), max_batch_size=64, max_queue_delay_ms=60_000)

    async def main():
        for _ in range(3):
            a = asyncio.ensure_future(b.submit(rows_of(feeds, 0, 2)))
            await asyncio.sleep(0)  # queued; the worker waits for company
            c = asyncio.ensure_future(b.submit(rows_of(feeds, 2, 4)))
            await asyncio.sleep(0)  # queued, the worker's wake-up scheduled
            a.cancel(), c.cancel()  # both futures done now, their bookkeeping callbacks after the worker
            await asyncio.sleep(0.01)
            assert (b.queued_rows, b.waiting) == (0, 0)
            b.delay = 0.0
            out = await asyncio.wait_for(b.submit(rows_of(feeds, 4, 6)), 5)
            b.delay = 60.0
        assert all(not w.done() for w in b._workers)
        await asyncio.wait_for(b.stop(), 5)  # nothing left counted as queued or running
        return out

    assert same_bits(asyncio.run(main()), run_session(session, rows_of(feeds, 4, 6)))


def test_a_failing_call_fails_every_request_in_it_and_only_those(ppca) -> None:
    """The run raises for a batch holding a poisoned row: its requests fail, the next batch is answered."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 12, seed=7)
    poison = rows_of(feeds, 0, 1)
    poison["x"] = poison["x"].copy()
    poison["x"][0, 0, 0] = -1.0  # not a level: the wrapped run refuses the whole call

    def run(instance, f):
        if (f["x"] < 0).any():
            raise RuntimeError("ONNX Runtime refused the batch")
        return run_session(session, f)

    b = Batcher("log_prob", run, max_batch_size=4, max_queue_delay_ms=50.0)

    async def main():
        first = [b.submit(poison), *(b.submit(rows_of(feeds, i, i + 1)) for i in range(1, 4))]  # one call
        second = [b.submit(rows_of(feeds, i, i + 1)) for i in range(4, 12)]  # two more calls
        return await asyncio.gather(*first, *second, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, BatchFailed) and "refused the batch" in str(r) for r in results[:4])
    for i, r in enumerate(results[4:], start=4):
        assert same_bits(r, run_session(session, rows_of(feeds, i, i + 1)))


def test_a_real_onnx_runtime_error_stays_within_its_call(ppca) -> None:
    """Without shape checks, a malformed request reaches ONNX Runtime; it cannot merge with well-formed ones
    (different row shapes never share a call), so only it fails and its neighbours are answered."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 8, seed=8)
    bad = {"x": np.zeros((2, 8, 9), np.float32), "u": np.zeros((2, 64), np.float32)}
    b = ppca_batcher(ppca, max_batch_size=64, max_queue_delay_ms=20.0)

    async def main():
        subs = [b.submit(rows_of(feeds, i, i + 1)) for i in range(4)] + [b.submit(bad)]
        subs += [b.submit(rows_of(feeds, i, i + 1)) for i in range(4, 8)]
        out = await asyncio.gather(*subs, return_exceptions=True)
        await b.stop()
        return out

    results = asyncio.run(main())
    assert isinstance(results[4], BatchFailed) and "ONNX" not in type(results[4]).__name__
    good = results[:4] + results[5:]
    for i, r in enumerate(good):
        assert same_bits(r, run_session(session, rows_of(feeds, i, i + 1)))
    assert b.calls == 2


def test_malformed_feeds_are_refused_before_queueing(ppca) -> None:
    manifest, _ = ppca
    b = Batcher("log_prob", lambda i, f: f, input_shapes={"x": (8, 8), "u": (64,)})
    good = graph_feeds(manifest, manifest.graphs[0], 2)

    async def main():
        with pytest.raises(ValueError, match="takes inputs"):
            await b.submit({"x": good["x"]})
        with pytest.raises(ValueError, match="rows of shape"):
            await b.submit({"x": np.zeros((2, 8, 9), np.float32), "u": good["u"]})
        with pytest.raises(ValueError, match="same number"):
            await b.submit({"x": good["x"], "u": good["u"][:1]})
        assert b.queued_rows == 0

    asyncio.run(main())


def test_instances_run_calls_concurrently(ppca) -> None:
    """Two instances: a second call starts while the first is still inside ONNX Runtime."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 2, seed=9)
    inside, both = [0], threading.Event()
    lock = threading.Lock()

    def run(instance, f):
        with lock:
            inside[0] += 1
            if inside[0] == 2:
                both.set()
        both.wait(5)
        with lock:
            inside[0] -= 1
        return run_session(session, f)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        b = Batcher("log_prob", run, max_batch_size=1, max_queue_delay_ms=0.0, instances=2, executor=pool)

        async def main():
            out = await asyncio.gather(b.submit(rows_of(feeds, 0, 1)), b.submit(rows_of(feeds, 1, 2)))
            await b.stop()
            return out

        asyncio.run(main())
    assert both.is_set()


def test_a_request_waits_for_a_peer_in_flight_and_continuation_steps_go_once_everyone_in_flight_is_queued(
        ppca) -> None:
    """A submission waits the delay for a request in flight that has not queued yet (Triton's window); a later
    step goes at once when every request in flight waits."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 1, seed=10)
    in_flight = [2]  # another request is in flight but never queues: wait for it
    b = Batcher("log_prob", lambda i, f: run_session(session, f), max_queue_delay_ms=300.0,
                expected=lambda: in_flight[0])

    async def timed(**kw) -> float:
        loop = asyncio.get_running_loop()
        t = loop.time()
        await b.submit(feeds, **kw)
        return loop.time() - t

    async def main():
        fresh = await timed()
        waiting_for_peer = await timed(fresh=False)
        in_flight[0] = 1
        await timed(fresh=False)
        await b.stop()
        return fresh, waiting_for_peer

    fresh, waiting_for_peer = asyncio.run(main())
    assert fresh >= 0.29 and waiting_for_peer >= 0.29
    assert b.reasons == {"delay": 2, "steps": 1}


# ---- no wait for company that is not coming ----------------------------------------------------------------

def test_a_lone_request_goes_at_once_when_nothing_else_is_in_flight(ppca) -> None:
    """One client: the only request in flight is queued and no more were in flight lately, so its call goes
    without the delay (20 s here: a call that waited it would be counted as "delay")."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 1, seed=12)
    stats: list[BatchStats] = []
    in_flight = [0]
    b = Batcher("log_prob", lambda i, f: run_session(session, f), max_queue_delay_ms=20000.0,
                expected=lambda: in_flight[0], observe=stats.append, early=True)

    async def main():
        for _ in range(5):  # the engine's enter / leave around each request of one closed-loop client
            in_flight[0] += 1
            await b.submit(feeds)
            in_flight[0] -= 1
        await b.stop()

    asyncio.run(main())
    assert b.reasons == {"all_here": 5} and [s.rows for s in stats] == [1] * 5


def test_a_lone_cheap_call_runs_on_the_loop_thread_once_its_size_was_timed(ppca) -> None:
    """``inline_call_s``: the first call of a size class goes to a worker thread and is timed; later lone calls
    of that class, cheaper than the bound, run on the event loop's own thread; a call that others in flight
    could use the loop beside (``expected`` > its submissions) still goes to a worker; answers are the same."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 1, seed=14)
    threads: list[int] = []
    in_flight = [0]

    def run(i, f):
        threads.append(threading.get_ident())
        return run_session(session, f)

    b = Batcher("log_prob", run, max_queue_delay_ms=50.0, expected=lambda: in_flight[0], early=True,
                inline_call_s=10.0)

    async def main():
        outs = []
        for _ in range(4):
            in_flight[0] += 1
            outs.append(await b.submit(feeds))
            in_flight[0] -= 1
        in_flight[0] = 2  # another request in flight, not in this call: it waits the delay, then a worker runs it
        outs.append(await b.submit(feeds))
        await b.stop()
        return threading.get_ident(), outs

    loop_thread, outs = asyncio.run(main())
    assert threads[0] != loop_thread and threads[1:4] == [loop_thread] * 3 and threads[4] != loop_thread
    assert b.inline_calls == 3 and b.calls == 5 and b.reasons["delay"] == 1
    assert all(same_bits(o, outs[0]) for o in outs)
    never = ppca_batcher(ppca, expected=lambda: 1, early=True, inline_call_s=0.0)

    async def again():
        for _ in range(3):
            await never.submit(feeds)
        await never.stop()

    asyncio.run(again())
    assert never.inline_calls == 0 and never.calls == 3
    # After a crowd (three in flight at once, within memory_s), a lone call still goes to a worker: under load
    # the loop has other requests to read while the graph runs.
    crowd = [0]
    after = Batcher("log_prob", run, max_queue_delay_ms=50.0, expected=lambda: crowd[0], early=True,
                    inline_call_s=10.0, memory_s=600.0)

    async def crowded():
        crowd[0] = 1
        await after.submit(feeds)  # times the 1-row class (worker)
        await after.submit(feeds)  # lone, no crowd yet: inline
        crowd[0] = 3
        await asyncio.gather(*(after.submit(feeds) for _ in range(3)))
        crowd[0] = 1
        await after.submit(feeds)  # lone again, but three were in flight lately: a worker
        await after.stop()

    threads.clear()
    asyncio.run(crowded())
    loop_thread = threading.get_ident()  # asyncio.run's loop runs on the calling thread
    assert after.inline_calls == 1 and after.calls == 4
    assert threads[1] == loop_thread and threads[3] != loop_thread


async def turns_while(work):
    """(work's result, how many times the event loop turned while it was awaited)."""
    turns, done = [0], [False]

    async def count():
        while not done[0]:
            turns[0] += 1
            await asyncio.sleep(0)

    counter = asyncio.ensure_future(count())
    await asyncio.sleep(0)
    turns[0] = 0
    try:
        return await work, turns[0]
    finally:
        done[0] = True
        await counter


def test_a_lone_inline_call_is_run_by_submit_itself_after_one_turn_of_the_loop(ppca) -> None:
    """A lone submission that would be taken at once and run inline is run inside ``submit`` after one turn of
    the loop (for requests that arrived with it), without the queue, its future and the worker's wake-up: the
    loop turns once while it is answered, not the two or more of the worker's path. Its answer equals a
    worker's; a failing call raises BatchFailed with the cause and is counted as failed; the batcher keeps
    serving with its counts back at zero."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 2, seed=15)
    fail = [False]
    stats: list[BatchStats] = []

    def run(i, f):
        if fail[0]:
            raise RuntimeError("graph exploded")
        return run_session(session, f)

    b = Batcher("log_prob", run, max_queue_delay_ms=50.0, expected=lambda: 1, early=True, inline_call_s=10.0,
                observe=stats.append)

    async def main():
        first, worker_turns = await turns_while(b.submit(feeds))  # times the 2-row class on a worker thread
        second, alone_turns = await turns_while(b.submit(feeds))
        fail[0] = True
        with pytest.raises(BatchFailed, match="graph exploded") as failed:
            await b.submit(feeds)
        fail[0] = False
        third = await b.submit(feeds)
        counts = (b.queued_rows, b.waiting, b._running)
        await b.stop()
        return first, second, third, worker_turns, alone_turns, failed.value, counts

    first, second, third, worker_turns, alone_turns, error, counts = asyncio.run(main())
    assert alone_turns == 1 and worker_turns > 1
    assert same_bits(first, second) and same_bits(first, third)
    assert isinstance(error.__cause__, RuntimeError)
    assert b.calls == 4 and b.inline_calls == 2 and b.reasons["all_here"] == 4
    assert [s.ok for s in stats] == [True, True, False, True] and all(s.rows == 2 and s.requests == 1 for s in stats)
    assert counts == (0, 0, 0)


def test_a_lone_costly_call_runs_on_the_loop_thread_only_when_the_whole_server_is_idle(ppca) -> None:
    """``inline_idle_call_s``: a call too costly for ``inline_call_s`` still runs on the loop's thread when
    nothing else is in flight in the whole server (``Occupancy``) and nothing was lately; a request in flight on
    another model, or a crowd on any model lately, sends it to a worker; without an occupancy, never."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 1, seed=15)
    threads: list[int] = []

    def run(i, f):
        threads.append(threading.get_ident())
        return run_session(session, f)

    server = Occupancy(memory_s=600.0)
    model = [0]
    b = Batcher("log_prob", run, max_queue_delay_ms=50.0, expected=lambda: model[0], early=True,
                inline_call_s=1e-12, inline_idle_call_s=10.0, occupancy=server)

    async def request(elsewhere: int = 0):
        model[0] += 1
        server.enter()
        for _ in range(elsewhere):
            server.enter()  # requests in flight on other models
        try:
            return await b.submit(feeds)
        finally:
            model[0] -= 1
            for _ in range(elsewhere + 1):
                server.leave()

    async def main():
        outs = [await request(), await request()]  # times the class (worker), then idle: inline
        outs.append(await request(elsewhere=1))  # another model busy: a worker
        outs.append(await request())  # that was two at once lately: a worker still
        await b.stop()
        return threading.get_ident(), outs

    loop_thread, outs = asyncio.run(main())
    assert threads[0] != loop_thread and threads[1] == loop_thread
    assert threads[2] != loop_thread and threads[3] != loop_thread and b.inline_calls == 1
    assert all(same_bits(o, outs[0]) for o in outs)
    # The crowd is forgotten after memory_s (here: a clock moved past two windows).
    quiet = Occupancy(memory_s=0.1)
    quiet.enter(at=0.0), quiet.enter(at=0.0), quiet.leave(), quiet.leave()
    assert not quiet.idle(1, at=0.05) and not quiet.idle(1, at=0.15) and quiet.idle(1, at=0.25)
    quiet.enter(at=1.0)
    assert quiet.idle(1, at=1.0) and not quiet.idle(0, at=1.0)
    # No occupancy (in-process use): the costly class always goes to a worker.
    threads.clear()
    alone = Batcher("log_prob", run, max_queue_delay_ms=50.0, expected=lambda: 1, early=True,
                    inline_call_s=1e-12, inline_idle_call_s=10.0)

    async def again():
        for _ in range(3):
            await alone.submit(feeds)
        await alone.stop()

    asyncio.run(again())
    assert alone.inline_calls == 0 and loop_thread not in threads


def test_a_lone_costly_call_runs_as_two_halves_at_once_on_the_loop_and_a_worker(ppca) -> None:
    """With two instances, a lone call that runs on the loop only because the server is idle (its size class
    costs at least ``inline_call_s``) runs as two halves at once: the first on instance 0 on the loop's thread,
    the second on instance 1 in a worker thread. The answer is the whole call's, bit for bit (odd rows too);
    each half is a call of its own in the metrics. With one instance, or a cheap size class, the call stays
    whole. A failing half fails its submission only; the batcher keeps serving with its counts at zero."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 2 * HALF_MIN_ROWS + 1, seed=21)
    half = HALF_MIN_ROWS + 1
    calls: list[tuple[int, int, int]] = []  # (instance, rows, thread)
    fail = [-1]  # the instance whose call raises

    def run(i, f):
        calls.append((i, len(next(iter(f.values()))), threading.get_ident()))
        if i == fail[0]:
            raise RuntimeError(f"instance {i} exploded")
        return run_session(session, f)

    server = Occupancy(memory_s=600.0)

    def batcher(instances: int, inline_call_s: float, stats: list[BatchStats]) -> Batcher:
        return Batcher("log_prob", run, max_batch_size=512, max_queue_delay_ms=50.0, expected=lambda: 1, early=True,
                       instances=instances, inline_call_s=inline_call_s, inline_idle_call_s=10.0,
                       occupancy=server, observe=stats.append)

    async def requests(b: Batcher, n: int):
        server.enter()
        try:
            return threading.get_ident(), [await b.submit(feeds) for _ in range(n)]
        finally:
            server.leave()

    stats: list[BatchStats] = []
    b = batcher(2, 1e-12, stats)

    async def halves():
        out = await requests(b, 3)  # the first times the class (a worker), then two run as halves
        fail[0] = 1
        with pytest.raises(BatchFailed, match="instance 1 exploded"):
            await b.submit(feeds)
        fail[0] = 0
        with pytest.raises(BatchFailed, match="instance 0 exploded"):
            await b.submit(feeds)
        fail[0] = -1
        await until(lambda: not b._running, 60.0)  # the worker's half of the last request ends on its own
        again = await b.submit(feeds)
        counts = (b.queued_rows, b.waiting, b._running)
        await b.stop()
        return out, again, counts

    (loop_thread, outs), again, counts = asyncio.run(halves())
    whole = run_session(session, feeds)
    assert all(same_bits(o, whole) for o in [*outs, again])
    assert calls[0][:2] == (0, 2 * half - 1) and calls[0][2] != loop_thread  # timing the class: a worker
    for pair in (calls[1:3], calls[3:5]):  # the two halves of a request, in whichever order they began
        assert sorted((i, rows, t == loop_thread) for i, rows, t in pair) == [(0, half, True), (1, half - 1, False)]
    assert b.inline_calls == 4 and counts == (0, 0, 0)
    # The loop's half is counted as it returns; the worker's once the loop, free again, hears that it ended.
    assert [s.rows for s in stats[:5]] == [2 * half - 1, half, half - 1, half, half - 1]
    assert all(s.ok for s in stats[:5]) and [s.queue_waits for s in stats[1:3]] == [(0.0,), ()]  # one per request
    assert sum(not s.ok for s in stats) == 2 and stats[-1].ok and stats[-1].rows in (half, half - 1)

    # One instance, or a size class cheaper than inline_call_s: the call stays whole on the loop's thread.
    for instances, inline_call_s in ((1, 1e-12), (2, 10.0)):
        calls.clear()
        whole_stats: list[BatchStats] = []
        one = batcher(instances, inline_call_s, whole_stats)

        async def main(one=one):
            out = await requests(one, 3)
            await one.stop()
            return out

        loop_thread, outs = asyncio.run(main())
        assert all(same_bits(o, whole) for o in outs)
        assert [rows for _, rows, _ in calls] == [2 * half - 1] * 3
        assert [t == loop_thread for *_, t in calls[1:]] == [True] * 2


def test_a_cancelled_request_s_worker_half_still_ends_its_call(ppca) -> None:
    """A request cancelled while its worker half runs: the cancellation reaches the request at once, the
    worker's call ends on its own, and only then does the batcher count it ended (no second call starts on a
    running instance unseen, no exception left unretrieved)."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 2 * HALF_MIN_ROWS, seed=22)
    release = threading.Event()
    slow = [False]

    def run(i, f):
        if slow[0] and i == 1:
            release.wait(60)
        return run_session(session, f)

    server = Occupancy(memory_s=600.0)
    b = Batcher("log_prob", run, max_queue_delay_ms=50.0, expected=lambda: 1, early=True, instances=2,
                inline_call_s=1e-12, inline_idle_call_s=10.0, occupancy=server)

    async def main():
        server.enter()
        await b.submit(feeds)  # times the class
        slow[0] = True
        task = asyncio.ensure_future(b.submit(feeds))
        await until(lambda: b.inline_calls == 1, 60.0)  # the loop's half ran; the worker's waits on the event
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        running = b._running
        release.set()
        await until(lambda: not b._running, 60.0)
        server.leave()
        await b.stop()
        return running

    assert asyncio.run(main()) == 1 and b.calls == 3


def test_the_inline_rule_reads_a_calls_cost_on_its_cost_clock(ppca) -> None:
    """``cost_clock``: a call whose wall time is long but whose thread does little (here it sleeps, as a thread
    preempted by the machine's other work or waiting for the GIL does) is cheap on ``time.thread_time`` and
    runs on the loop's thread; read on the wall clock (None, the default) it is costly and goes to a worker."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 1, seed=15)

    def make(clock):
        threads: list[int] = []

        def run(i, f):
            threads.append(threading.get_ident())
            time.sleep(0.05)  # 50 ms of wall time, almost no CPU time
            return run_session(session, f)

        return threads, Batcher("log_prob", run, max_queue_delay_ms=50.0, expected=lambda: 1, early=True,
                                inline_call_s=0.01, cost_clock=clock)

    for clock, inlined in ((time.thread_time, 2), (None, 0)):
        threads, b = make(clock)

        async def main(b=b):
            outs = [await b.submit(feeds) for _ in range(3)]
            await b.stop()
            return threading.get_ident(), outs

        loop_thread, outs = asyncio.run(main())
        assert b.inline_calls == inlined and b.calls == 3, clock
        assert threads.count(loop_thread) == inlined and threads[0] != loop_thread
        assert all(same_bits(o, outs[0]) for o in outs)


def test_without_an_engine_count_a_lone_request_waits_the_delay(ppca) -> None:
    """With no ``expected`` (in-process use, or a test that needs a request to stay queued) the batcher cannot
    know that no one else is in flight: Triton's rule, the delay."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 1, seed=13)
    stats: list[BatchStats] = []
    b = ppca_batcher(ppca, max_queue_delay_ms=300.0, observe=stats.append, early=True)

    async def main():
        await b.submit(feeds)
        await b.stop()

    asyncio.run(main())
    assert b.reasons == {"delay": 1} and stats[0].queue_waits[0] >= 0.29


def test_with_early_sends_off_a_lone_request_waits_the_delay(ppca) -> None:
    """``early=False`` (the default until the server's settings turn it on): Triton's rule, even alone."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 1, seed=17)
    stats: list[BatchStats] = []
    b = ppca_batcher(ppca, max_queue_delay_ms=300.0, observe=stats.append, expected=lambda: 1)

    async def main():
        await b.submit(feeds)
        await b.stop()

    asyncio.run(main())
    assert b.reasons == {"delay": 1} and stats[0].queue_waits[0] >= 0.29


def test_concurrent_clients_still_merge_into_one_call_per_round(ppca) -> None:
    """Four closed-loop clients. In the first round all four are in flight when the first queues: it waits for
    them. In later rounds the first queues while the other three are still on their way (not yet counted in
    flight), but requests have been arriving in company (at a rate that promises more within the delay): it
    waits for them too. Each round is one call of four rows that goes as soon as the fourth arrives (as many as
    were in flight lately), not after the (20 s) delay."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 4, seed=14)
    direct = run_session(session, feeds)
    stats: list[BatchStats] = []
    in_flight = [0]
    b = Batcher("log_prob", lambda i, f: run_session(session, f), max_queue_delay_ms=20000.0,
                expected=lambda: in_flight[0], observe=stats.append, memory_s=10.0, early=True)

    async def one(k: int) -> bool:
        in_flight[0] += 1
        out = await b.submit(rows_of(feeds, k, k + 1))
        in_flight[0] -= 1
        return same_bits(out, rows_of(direct, k, k + 1))

    async def main():
        same = []
        for r in range(3):
            if r == 0:
                in_flight[0] = 3  # the other three entered the engine, not yet the batcher
            first = asyncio.ensure_future(one(0))
            await until(lambda: b.waiting == 1)
            for _ in range(10):  # the worker sees the lone first submission and must not take it
                await asyncio.sleep(0)
            assert b.calls == r and b.waiting == 1
            if r == 0:
                in_flight[0] -= 3
            same += await asyncio.gather(first, *(one(k) for k in range(1, 4)))
        await b.stop()
        return same

    assert all(asyncio.run(main()))
    assert [(s.rows, s.requests) for s in stats] == [(4, 4)] * 3 and b.reasons == {"all_here": 3}


def test_a_forming_batch_waits_for_the_delay_even_when_arrivals_are_rare(ppca) -> None:
    """Three requests in flight merge at once (all here); then two, both queued, fewer than the three seen
    lately, with arrivals in company rare (5 over a 1000 s memory): a lone one would go at once, but a batch
    is forming, so it waits the delay as Triton's does."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 3, seed=16)
    stats: list[BatchStats] = []
    in_flight = [3]
    b = ppca_batcher(ppca, max_queue_delay_ms=300.0, observe=stats.append, memory_s=1000.0,
                     expected=lambda: in_flight[0], early=True)

    async def main():
        await asyncio.gather(*(b.submit(rows_of(feeds, i, i + 1)) for i in range(3)))
        in_flight[0] = 2
        await asyncio.gather(b.submit(rows_of(feeds, 0, 1)), b.submit(rows_of(feeds, 1, 2)))
        await b.stop()

    asyncio.run(main())
    assert b.reasons == {"all_here": 1, "delay": 1} and [s.rows for s in stats] == [3, 2]
    assert min(stats[1].queue_waits) >= 0.29


def test_after_a_burst_in_company_a_lone_request_waits_for_more(ppca) -> None:
    """40 requests in flight together set an arrival rate (40 in company over a 390 s memory, about 0.1 a
    second) and a peak of 40; the next lone one (nothing else in flight) waits for the company that rate
    promises: until fewer than COMPANY (0.1) arrivals are expected in the rest of the 2 s delay, about 1 s."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 41, seed=15)
    stats: list[BatchStats] = []
    in_flight = [40]
    b = ppca_batcher(ppca, max_batch_size=64, max_queue_delay_ms=2000.0, observe=stats.append, memory_s=390.0,
                     expected=lambda: in_flight[0], early=True)

    async def main():
        await asyncio.gather(*(b.submit(rows_of(feeds, i, i + 1)) for i in range(40)))
        in_flight[0] = 1
        await b.submit(rows_of(feeds, 40, 41))
        await b.stop()

    asyncio.run(main())
    assert [s.rows for s in stats] == [40, 1] and stats[1].queue_waits[0] >= 0.5
    assert b.reasons == {"all_here": 1, "no_company": 1}


def test_padding_gives_every_call_one_shape_and_changes_no_answer(ppca) -> None:
    """pad_to (used on CUDA, where kernels may depend on the batch shape): calls always see 16 rows."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 21, seed=11)
    shapes: list[int] = []

    def run(instance, f):
        shapes.append(f["x"].shape[0])
        return run_session(session, f)

    b = Batcher("log_prob", run, max_batch_size=16, max_queue_delay_ms=0.0, pad_to=16)

    async def main():
        out = await asyncio.gather(b.submit(rows_of(feeds, 0, 1)), b.submit(rows_of(feeds, 1, 21)))
        await b.stop()
        return out

    one, twenty = asyncio.run(main())
    assert set(shapes) == {16} and len(shapes) == 2
    assert same_bits(one, run_session(session, rows_of(feeds, 0, 1)))
    assert same_bits(twenty, run_session(session, rows_of(feeds, 1, 21)))


def test_bucket_padding_pads_each_call_to_the_smallest_size_that_holds_it(ppca) -> None:
    """pad_sizes (CUDA's default, ``pad_batches = "auto"``): a 1-row call runs 16 rows, 21 rows run 64, never the
    whole max_batch_size; the answers are the unpadded ones."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 21, seed=11)
    shapes: list[int] = []

    def run(instance, f):
        shapes.append(f["x"].shape[0])
        return run_session(session, f)

    b = Batcher("log_prob", run, max_batch_size=512, max_queue_delay_ms=0.0, pad_sizes=pad_buckets(512))

    async def main():
        one = await b.submit(rows_of(feeds, 0, 1))
        twenty = await b.submit(rows_of(feeds, 1, 21))
        await b.stop()
        return one, twenty

    one, twenty = asyncio.run(main())
    assert shapes == [16, 64]
    assert same_bits(one, run_session(session, rows_of(feeds, 0, 1)))
    assert same_bits(twenty, run_session(session, rows_of(feeds, 1, 21)))


def test_handoff_cost_times_no_op_hand_offs_to_the_executor_on_the_loop_threads_cpu_clock() -> None:
    """``handoff_cost``: the lower quartile of the event-loop CPU time of ``run_in_executor`` round trips of a
    no-op, every one run on the executor's threads (warm-up rounds first, not counted)."""
    from concurrent.futures import ThreadPoolExecutor

    ran: list[int] = []

    class Counting(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            return super().submit(lambda: (ran.append(threading.get_ident()), fn(*args, **kwargs))[1])

    async def main():
        with Counting(2) as pool:
            return await handoff_cost(pool, rounds=20, warmup=4), threading.get_ident()

    cost, loop_thread = asyncio.run(main())
    assert len(ran) == 24 and loop_thread not in ran
    assert cost > 0.0  # the loop's own CPU for a submission, its wake-up and the result: never nothing


# ---- a saturated event loop: a longer wait for company ------------------------------------------------------

class _Load(LoopLoad):
    """A LoopLoad whose verdict the test sets."""

    __slots__ = ("saturated",)

    def __init__(self, saturated: bool) -> None:
        super().__init__()
        self.saturated = saturated

    def busy(self, now: float) -> bool:
        return self.saturated


def test_loop_load_is_the_loops_cpu_share_of_the_last_window_read_lazily() -> None:
    """CPU seconds of the loop's thread over wall seconds, per window of ``memory_s`` closed at the first reading
    after it: 0.1 s of CPU in 0.125 s is busy (>= BUSY_SHARE), half is not, and a reading after an idle spell
    averages the spell in."""
    cpu = [0.0]
    load = LoopLoad(memory_s=0.1, cpu_clock=lambda: cpu[0])
    assert not load.busy(10.0) and load.share == 0.0  # the first reading opens a window
    cpu[0] = 0.1
    assert load.busy(10.125) and load.share == pytest.approx(0.8) and BUSY_SHARE <= 0.8
    cpu[0] = 0.13
    assert load.busy(10.2)  # within the window: the last closed window's verdict stands
    cpu[0] = 0.1625
    assert not load.busy(10.25) and load.share == pytest.approx(0.5)
    cpu[0] = 0.2
    assert not load.busy(20.25) and load.share == pytest.approx(0.0375 / 10.0)


def test_a_batch_forming_while_the_loop_is_saturated_waits_busy_delay_factor_times_the_delay(ppca) -> None:
    """As in the test above a batch of two forms while three were in flight lately; with the event loop
    saturated (``LoopLoad``) it waits 3 x the 100 ms delay rather than 100 ms, and still goes for the reason
    "delay". A batch that holds everyone in flight goes at once all the same."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 3, seed=17)
    stats: list[BatchStats] = []
    in_flight = [3]
    b = ppca_batcher(ppca, max_queue_delay_ms=100.0, observe=stats.append, memory_s=1000.0,
                     expected=lambda: in_flight[0], early=True, loop_load=_Load(True), busy_delay_factor=3.0)

    async def main():
        outs = await asyncio.gather(*(b.submit(rows_of(feeds, i, i + 1)) for i in range(3)))
        in_flight[0] = 2
        outs += await asyncio.gather(b.submit(rows_of(feeds, 0, 1)), b.submit(rows_of(feeds, 1, 2)))
        await b.stop()
        return outs

    outs = asyncio.run(main())
    assert b.reasons == {"all_here": 1, "delay": 1} and [s.rows for s in stats] == [3, 2]
    assert min(stats[1].queue_waits) >= 0.29
    assert same_bits(outs[3], outs[0]) and same_bits(outs[4], outs[1])  # the same rows, the same answers


def test_the_delay_stretches_only_while_the_loop_is_saturated_and_only_with_a_loop_load(ppca) -> None:
    """``_due_reason`` of a queue whose oldest submission came at t = 100 s, delay 10 ms, factor 5: due at
    100.05 while the loop is saturated, at 100.01 when it is not and without a LoopLoad; factor 1 never
    stretches; a factor below 1 is refused."""
    def due(loop_load, factor: float, now: float):
        b = ppca_batcher(ppca, max_queue_delay_ms=10.0, loop_load=loop_load, busy_delay_factor=factor)
        sub = _Submission({"x": np.zeros((1, 2), np.float32)}, 1, None, 100.0, True)
        b._queue.append(sub)
        b._queued_rows, b._waiting, b._fresh = 1, 1, 1
        return b._due_reason(now)

    assert due(_Load(True), 5.0, 100.02) == (None, pytest.approx(100.05))
    assert due(_Load(True), 5.0, 100.06) == ("delay", pytest.approx(100.05))
    assert due(_Load(False), 5.0, 100.02) == ("delay", pytest.approx(100.01))
    assert due(None, 5.0, 100.005) == (None, pytest.approx(100.01))
    assert due(_Load(True), 1.0, 100.02) == ("delay", pytest.approx(100.01))
    with pytest.raises(ValueError, match="busy_delay_factor must be >= 1"):
        due(_Load(True), 0.5, 100.0)


# ---- splitting a due batch over idle instances --------------------------------------------------------------

@pytest.mark.parametrize(("instances", "rows", "want_calls"),
                         [(2, 64, [256, 256]), (1, 64, [512]), (2, 1, [8]), (3, 32, [64, 96, 96])])
def test_a_large_due_batch_is_split_over_idle_instances_and_small_ones_stay_whole(ppca, instances, rows,
                                                                                   want_calls) -> None:
    """Eight requests queued together: with two instances, eight 64-row requests (512 rows) run as two 256-row
    calls at the same time, where one instance alone runs one 512-row call; eight 1-row requests stay one call
    (parts under SPLIT_MIN_ROWS rows are not worth a call each); three instances split 256 rows of 32-row
    requests three ways, in whole requests (a share of 86 rows holds two of them). Every request gets its own
    rows' answers, bit for bit."""
    assert SPLIT_MIN_ROWS == 64
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 8 * rows, seed=18)
    calls, inside, most = [], [0], [0]
    lock, together = threading.Lock(), threading.Barrier(len(want_calls), timeout=60)

    def run(instance, f):
        with lock:
            calls.append(len(f["x"]))
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            together.wait()  # every part waits here until all have started: they run at once
            return run_session(session, f)
        finally:
            with lock:
                inside[0] -= 1

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(instances) as pool:
        b = Batcher("log_prob", run, max_batch_size=512, max_queue_delay_ms=60_000.0, instances=instances,
                    executor=pool, expected=lambda: 8, early=True)

        async def main():
            return await asyncio.gather(*(b.submit(rows_of(feeds, i * rows, (i + 1) * rows)) for i in range(8)))

        outs = asyncio.run(main())
    assert calls == want_calls and most[0] == len(want_calls)
    first = "full" if 8 * rows >= 512 else "all_here"  # 512 rows fill max_batch_size
    assert b.reasons == ({first: 1, "split": len(want_calls) - 1} if len(want_calls) > 1 else {first: 1})
    for i, out in enumerate(outs):
        assert same_bits(out, run_session(session, rows_of(feeds, i * rows, (i + 1) * rows)))


def test_while_one_instance_runs_a_small_batch_waits_for_it_and_a_large_one_takes_the_other(ppca) -> None:
    """Two instances, one call running: a batch under SPLIT_MIN_ROWS rows does not start a second call (a
    hand-off for a few rows, and smaller calls after it: 1-row requests at 64 clients ran 0.92x of one instance),
    even past its delay; once SPLIT_MIN_ROWS rows are queued they go to the idle instance at once, in one call,
    while the first still runs. Every request gets its own rows' answers, bit for bit."""
    manifest, session = ppca
    feeds = graph_feeds(manifest, manifest.graphs[0], 2 + SPLIT_MIN_ROWS, seed=21)
    started, release = [], threading.Event()
    lock = threading.Lock()

    def run(instance, f):
        with lock:
            started.append(len(f["x"]))
            first = len(started) == 1
        if first:
            release.wait(60)  # the first call holds its instance until the test lets it go
        return run_session(session, f)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        # delay 0: without the rule the small batch would be due at once, and the idle instance would take it
        b = Batcher("log_prob", run, max_batch_size=512, max_queue_delay_ms=0.0, instances=2, executor=pool)

        async def main():
            parts = [(0, 1), (1, 2), (2, 2 + SPLIT_MIN_ROWS)]
            first = asyncio.ensure_future(b.submit(rows_of(feeds, *parts[0])))
            await until(lambda: started == [1], timeout=60)
            small = asyncio.ensure_future(b.submit(rows_of(feeds, *parts[1])))
            for _ in range(20):  # loop turns (not time): the idle instance's worker has looked at the queue
                await asyncio.sleep(0)
            assert b.queued_rows == 1 and started == [1]
            large = asyncio.ensure_future(b.submit(rows_of(feeds, *parts[2])))
            await until(lambda: len(started) == 2, timeout=60)
            assert started == [1, 1 + SPLIT_MIN_ROWS] and not first.done()  # the second call, beside the first
            release.set()
            outs = await asyncio.gather(first, small, large)
            # and a small batch that waited beside a running call goes when that call returns, with no arrival
            # after it to wake the idle worker (once it waited for the server's deadline instead)
            release.clear()
            started.clear()
            held = asyncio.ensure_future(b.submit(rows_of(feeds, *parts[0])))
            await until(lambda: started == [1], timeout=60)
            late = asyncio.ensure_future(b.submit(rows_of(feeds, *parts[1])))
            for _ in range(20):
                await asyncio.sleep(0)
            assert started == [1]
            release.set()
            again = await asyncio.wait_for(asyncio.gather(held, late), timeout=60)
            assert started == [1, 1] and all(same_bits(o, out) for o, out in zip(again, outs[:2], strict=True))
            await b.stop()
            return parts, outs

        parts, outs = asyncio.run(main())
    for (a, z), out in zip(parts, outs, strict=True):
        assert same_bits(out, run_session(session, rows_of(feeds, a, z)))
