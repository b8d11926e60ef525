"""`python -m benchmarks.inline_clock`: how often a lone client's cheap calls run on the event loop, with the
inline rule reading a call's cost on the wall clock or on the calling thread's CPU clock.

In process: one ``Batcher`` (``inline_call_s`` from ``--inline-call-us``, 400 us by default: the server's fixed
default when BENCHMARKS.md's figures were taken; the server now times 16 thread hand-offs at start) over a flow's
``forward`` graph (1 row, one intra-op thread), one client awaiting each call in turn for ``--window-s``; per
window, calls/s, CPU per call and the share of calls run on the loop's thread. Run it beside other work to see the
difference: on an idle machine both clocks agree.

    python -m benchmarks.inline_clock --repo quickstart/model_repository --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from genserve.server.batcher import Batcher
from genserve.server.sessions import SessionOptions, make_session, run_session


def measure(session, feeds, clock, executor, window_s: float,
            inline_call_s: float = 400e-6) -> tuple[float, float, float]:
    """(calls/s, CPU us per call, share inline) of one window."""
    b = Batcher("forward", lambda i, f: run_session(session, f), max_queue_delay_ms=2.0, expected=lambda: 1,
                early=True, inline_call_s=inline_call_s, executor=executor, cost_clock=clock)

    async def main() -> tuple[int, float, float]:
        n, t0, c0 = 0, time.monotonic(), time.process_time()
        while time.monotonic() < t0 + window_s:
            await b.submit(feeds)
            n += 1
        elapsed, cpu = time.monotonic() - t0, time.process_time() - c0
        await b.stop()
        return n, elapsed, cpu

    n, elapsed, cpu = asyncio.run(main())
    return n / elapsed, cpu / n * 1e6, b.inline_calls / b.calls


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inline_clock", description=__doc__.split("\n")[0])
    p.add_argument("--repo", default="quickstart/model_repository")
    p.add_argument("--model", default="digits-realnvp")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window-s", type=float, default=4.0)
    p.add_argument("--inline-call-us", type=float, default=400.0)
    args = p.parse_args()
    versions = sorted((Path(args.repo) / args.model).glob("*/forward.onnx"))
    if not versions:
        raise SystemExit(f"no {args.model}/<version>/forward.onnx under {args.repo}: export a flow first "
                         f"(the quickstart does)")
    session = make_session(str(versions[-1]), SessionOptions(provider="cpu", intra_op_threads=1, inter_op_threads=1))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.integers(0, 17, (1, 8, 8)).astype(np.float32), "u": rng.random((1, 64)).astype(np.float32)}
    clocks = (("wall", None), ("thread_time", time.thread_time))
    with ThreadPoolExecutor(4) as executor:
        for r in range(args.rounds):
            for name, clock in clocks if r % 2 == 0 else clocks[::-1]:
                rps, us, share = measure(session, feeds, clock, executor, args.window_s,
                                         args.inline_call_us / 1e6)
                print(f"round {r} {name:>11}: {rps:.0f} calls/s, {us:.0f} us CPU per call, inline {share:.0%}, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
