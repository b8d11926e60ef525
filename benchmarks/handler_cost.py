"""`python -m benchmarks.handler_cost`: what genserve's own request path costs, without gRPC, against the bare graph.

In process, on the thread that runs it: an ``Engine`` with one model of a repository and the Open Inference
Protocol servicer over it (``OipServicer._infer``, what ``ModelInfer`` runs once gRPC has parsed the message:
resolving the model, decoding the tensor, the data check, admission, the engine's program, the batcher, the
Prometheus observations and the answer), fed the same serialised 1-row request ``--requests`` times in a row
(parsed each time, the answer serialised each time); then the same graph call on a bare ONNX Runtime session.
Both are read on the thread's CPU clock, so other work on the machine stretches neither. The difference is the
Python a request costs besides the graph and gRPC; ``--profile`` prints cProfile's top (timed on the thread's
CPU clock too) and the Python calls per request.

    python -m benchmarks.handler_cost --repo quickstart/model_repository --model digits-realnvp --profile

``--operation log_likelihood`` times a LogLikelihood request instead: its one graph call holds the rows times
the flow's dequantisation draws (16 for the quickstart's), and the bare call is that call.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import pstats
import time
from pathlib import Path

import numpy as np

from benchmarks.peers.graph import model_version_dir


def request_bytes(model: str, operation: str, rows: int) -> tuple[bytes, np.ndarray]:
    """A serialised 1-input OIP request of ``rows`` digits-like rows (levels 0..16), seed 1 (request_cost's
    ``payloads``, the request its servers are measured with); and the rows."""
    from benchmarks.request_cost import payloads

    x = np.random.default_rng(0).integers(0, 17, (rows, 8, 8)).astype("<f4")
    return payloads(model, operation, x)["oip"][1], x


async def servicer_path(repo: Path, model: str, data: bytes, requests: int, profile: bool,
                        inline_call_us: float | None = None) -> dict:
    from genserve.oip import grpc_service_pb2 as oip
    from genserve.server.config import ServerConfig
    from genserve.server.engine import Engine
    from genserve.server.metrics import Metrics
    from genserve.server.oip import OipServicer

    cfg = ServerConfig(repo=repo, model_control="explicit", load_models=model, port=0, metrics_port=0,
                       provider="cpu", inline_call_us=inline_call_us)
    engine = Engine(cfg, Metrics())
    await engine.start()
    try:
        servicer = OipServicer(engine, cfg)

        async def run(n: int) -> None:
            for _ in range(n):
                answer = await servicer._infer(oip.ModelInferRequest.FromString(data), None)
                answer.SerializeToString()

        await run(200)  # warm: the batcher times the size class, then runs it inline
        t = time.thread_time()
        await run(requests)
        out = {"us_per_request": (time.thread_time() - t) / requests * 1e6,
               "inline_call_us": engine.inline_call_s * 1e6}
        batchers = engine.get_model(model).batchers.values()
        out["calls"] = sum(b.calls for b in batchers)
        out["inline_calls"] = sum(b.inline_calls for b in batchers)
        if profile:
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            await run(requests)
            prof.disable()
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            out["python_calls_per_request"] = stats.total_calls / requests
            stats.sort_stats("tottime").print_stats(30)
            out["profile"] = text.getvalue()
        return out
    finally:
        await engine.stop()


def dequant_draws(repo: Path, model: str) -> int:
    """The flow's dequantisation draws K per LogLikelihood row (its manifest's ``dequant_draws``)."""
    from genserve.core.manifest import read_manifest

    return int(read_manifest(model_version_dir(repo, model) / "manifest.json").parameters["dequant_draws"])


def bare_graph(repo: Path, model: str, x: np.ndarray, requests: int, draws: int = 0) -> float:
    """CPU us per call of the model's forward graph on a bare session: the flow's encode (u = 1/2), or with
    ``draws`` the one call of a LogLikelihood request (``draws`` copies of the rows, uniform u)."""
    from genserve.server.sessions import SessionOptions, make_session

    session = make_session(str(model_version_dir(repo, model) / "forward.onnx"), SessionOptions(provider="cpu"))
    shape = (x.shape[0] * max(draws, 1), int(np.prod(x.shape[1:])))
    if draws:
        feeds = {"x": np.concatenate([x] * draws), "u": np.random.default_rng(0).random(shape, np.float32)}
    else:
        feeds = {"x": x, "u": np.full(shape, 0.5, np.float32)}
    for _ in range(200):
        session.run(None, feeds)
    t = time.thread_time()
    for _ in range(requests):
        session.run(None, feeds)
    return (time.thread_time() - t) / requests * 1e6


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.handler_cost", description=__doc__.split("\n")[0])
    p.add_argument("--repo", type=Path, default=Path("quickstart/model_repository"))
    p.add_argument("--model", default="digits-realnvp", help="a flow (its encode runs the forward graph)")
    p.add_argument("--operation", default="encode", choices=("encode", "log_likelihood"),
                   help="the request: encode (one forward call of its rows) or log_likelihood (one forward call "
                        "of its rows times the dequantisation draws, then the log-mean-exp)")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inline-call-us", type=float, default=None,
                   help="the server's --inline-call-us (default: measured); e.g. 20000 runs 64-row calls inline too")
    p.add_argument("--profile", action="store_true", help="also print cProfile's top (a further window)")
    args = p.parse_args()
    if not (args.repo / args.model).is_dir():
        raise SystemExit(f"no model {args.model!r} in {args.repo}: run `genserve quickstart` first, or pass --repo")
    logging.getLogger("genserve").setLevel(logging.WARNING)
    data, x = request_bytes(args.model, args.operation, args.rows)
    draws = dequant_draws(args.repo, args.model) if args.operation == "log_likelihood" else 0
    for r in range(args.rounds):
        path = asyncio.run(servicer_path(args.repo, args.model, data, args.requests,
                                         args.profile and r == args.rounds - 1, args.inline_call_us))
        graph = bare_graph(args.repo, args.model, x, args.requests, draws)
        print(f"round {r}: servicer path {path['us_per_request']:.0f} us CPU per request "
              f"({path['inline_calls']}/{path['calls']} calls inline, threshold {path['inline_call_us']:.0f} us); "
              f"bare graph call {graph:.0f} us; genserve's own {path['us_per_request'] - graph:.0f} us", flush=True)
        if "profile" in path:
            print(f"Python calls per request: {path['python_calls_per_request']:.0f}")
            print(path["profile"])


if __name__ == "__main__":
    main()
