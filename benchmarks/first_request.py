"""The first request after a load against the next ones, with and without warm-up (issue 13 point 4).

Two `genserve serve` processes run side by side with explicit model control, one with warm-up off and one
with it on. The client first serves itself from a model that stays loaded (so the process and the channel
are warm: what is measured is the load, not a cold process). Then, for each model, over ``--repeats`` rounds
interleaved between the two servers: LoadModel, one request, ``--next`` more of the same kind, UnloadModel.
The script prints the first request's latency, the median of the next ones, and their ratio (target: <= 2
with warm-up). The request is a LogLikelihood of ``--rows`` rows, or a Sample of as many for a model without
one (the GAN).

    python -m benchmarks.first_request --repo quickstart/model_repository
    python -m benchmarks.first_request --repo quickstart/model_repository --models digits-realnvp --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.serverproc import ServerProcess
from genserve.clients.client import Client


def first_and_next(client: Client, model: str, following: int, rows: int) -> tuple[float, float, str]:
    """Load ``model``, then (first latency ms, median of the next ``following`` ms, operation); unload it."""
    client.load_model(model)
    info = client.info(model)
    if "log_likelihood" in info.operations:
        x = np.zeros((rows, *info.spec.shape), np.float32)

        def call() -> None:
            client.log_likelihood(model, x, seed=1)

        op = "log_likelihood"
    else:
        def call() -> None:
            client.sample(model, rows, seed=1)

        op = "sample"
    times = []
    for _ in range(1 + following):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    client.unload_model(model)
    return times[0], statistics.median(times[1:]), op


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, type=Path, help="model repository")
    p.add_argument("--models", nargs="*", help="model names (default: every model of the repository)")
    p.add_argument("--next", type=int, default=20, help="requests after the first (default 20)")
    p.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="loads per model and setting (default 5)")
    p.add_argument("--resident", help="the model that stays loaded (default: the first in name order)")
    args = p.parse_args(argv)
    models = args.models or sorted(d.name for d in args.repo.iterdir() if d.is_dir() and not d.name.startswith("."))
    resident = args.resident or models[0]
    flags = {"--model-control-mode": "explicit", "--load-model": resident}
    with ServerProcess(args.repo, flags={**flags, "--no-warmup": None}) as cold, \
            ServerProcess(args.repo, flags=flags) as warm, \
            Client(cold.target, timeout=120) as cold_client, Client(warm.target, timeout=120) as warm_client:
        clients = {False: cold_client, True: warm_client}
        for client in clients.values():  # a warm process and channel: only the load is measured below
            x = np.zeros((1, *client.info(resident).spec.shape), np.float32)
            for _ in range(20):
                client.log_likelihood(resident, x, seed=1)
        print(f"{'model':<18} {'op':<15} {'warm-up':<8} {'first ms':>9} {'next p50 ms':>12} {'ratio':>6}")
        for model in models:
            if model == resident:
                continue
            results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            op = ""
            for _ in range(args.repeats):
                for warmed in (False, True):  # interleaved, so a busy machine weighs on both alike
                    first, median, op = first_and_next(clients[warmed], model, args.next, args.rows)
                    results[warmed].append((first, median))
            for warmed in (False, True):
                first = statistics.median(r[0] for r in results[warmed])
                median = statistics.median(r[1] for r in results[warmed])
                print(f"{model:<18} {op:<15} {'on' if warmed else 'off':<8} {first:>9.1f} {median:>12.1f} "
                      f"{first / median:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
