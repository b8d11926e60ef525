"""`python -m benchmarks.ray_scoring`: rows/s of `genserve score --engine ray` against one server (issue 17, point 5).

One file of ``--rows`` rows (the model's own samples, tiled), scored with the same seed and chunking:

* **server**: ``genserve serve`` in its own process (server defaults: ``max_batch_size`` 512, 4 ORT worker
  threads, 1 intra-op thread), then ``genserve score FILE --server ...`` (LogLikelihoodStream, 4 chunks in
  flight); the time is the score command's, the server already up;
* **ray CLI**: ``genserve score FILE --engine ray --repo DIR --concurrency N``, a fresh local Ray each time,
  so its time includes starting Ray and the actors (what one command costs on a laptop);
* **ray job**: ``score_dataset`` + ``collect_scores`` on a Ray started once beforehand (what a job costs on a
  running cluster), for each ``--concurrency``.

Each way writes or returns the same scores; the command checks that the two CSVs are byte-identical and the
job's scores equal the server's. Rows/s are rows over wall seconds, the median of ``--rounds``.

    python -m benchmarks.ray_scoring --repo /tmp/bench/model_repository --model digits-realnvp --rows 200000 \\
        --concurrency 1,2 --out docs/benchmarks/ray_scoring.json

Run from the repository root (Ray and the server need no other setup); every Ray worker reads the repository
and the file at the same paths, which on one machine they do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.serverproc import ServerProcess

SEED = 1


def make_rows(repo: Path, model: str, rows: int, path: Path) -> None:
    """``rows`` rows of the model's own samples (4096 drawn, tiled) as a .npy of (rows, *shape) float32."""
    from genserve.server.local import LocalEngine

    with LocalEngine(repo, models=[model]) as engine:
        x = engine.sample_blocks(model, min(rows, 4096), seed=0).x
    np.save(path, np.resize(x, (rows, *x.shape[1:])))


def cli(args: list[str]) -> float:
    """Seconds of one `genserve score ...` command (checked to succeed)."""
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "genserve.app.cli", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"genserve {' '.join(args)} failed:\n{run.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, type=Path, help="model repository")
    p.add_argument("--model", default="digits-realnvp")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--concurrency", default="1,2", help="Ray actors, comma-separated levels")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, help="JSON of every measurement")
    a = p.parse_args(argv)
    levels = [int(v) for v in a.concurrency.split(",")]
    repo = a.repo.resolve()
    results: dict[str, Any] = {"model": a.model, "rows": a.rows, "chunk_size": a.chunk_size, "rounds": a.rounds,
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "python": platform.python_version()}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="ray-scoring-") as tmp:
        work = Path(tmp)
        data = work / "rows.npy"
        make_rows(repo, a.model, a.rows, data)
        common = ["score", a.model, str(data), "--seed", str(SEED), "--chunk-size", str(a.chunk_size), "--quiet"]

        def record(way: str, concurrency: int | None, seconds: list[float]) -> None:
            median = statistics.median(seconds)
            load = os.getloadavg()[0]  # the machine may be shared: its load over the last minute, for the record
            results["runs"].append({"way": way, "concurrency": concurrency, "seconds": seconds,
                                    "rows_per_s": a.rows / median, "load_1min": load})
            print(f"{way:<10} {concurrency or '-':>3}  {median:7.1f} s  {a.rows / median:8.0f} rows/s  load {load:.1f}",
                  flush=True)

        with ServerProcess(repo) as server:
            record("server", None, [cli([*common, "--out", str(work / "grpc.csv"), "--server", server.target])
                                    for _ in range(a.rounds)])
        for n in levels:
            record("ray CLI", n, [cli([*common, "--out", str(work / f"ray-{n}.csv"), "--engine", "ray",
                                       "--repo", str(repo), "--concurrency", str(n)]) for _ in range(a.rounds)])
            if (work / f"ray-{n}.csv").read_bytes() != (work / "grpc.csv").read_bytes():
                raise AssertionError(f"--engine ray (concurrency {n}) wrote other scores than the server")

        import ray
        import ray.data

        from genserve.server.ray_data import collect_scores, read_dataset, score_dataset

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
        ray.data.DataContext.get_current().enable_progress_bars = False
        expected = np.loadtxt(work / "grpc.csv", delimiter=",", skiprows=1, usecols=1)
        try:
            for n in levels:
                seconds = []
                for _ in range(a.rounds):
                    started = time.perf_counter()
                    scores = collect_scores(score_dataset(read_dataset(data), repo, a.model, seed=SEED,
                                                          chunk_size=a.chunk_size, concurrency=n))
                    seconds.append(time.perf_counter() - started)
                    written = np.array([float(f"{v:.9g}") for v in scores.log_prob])
                    if not np.array_equal(written, expected):
                        raise AssertionError(f"the Ray job (concurrency {n}) scored other than the server")
                record("ray job", n, seconds)
        finally:
            ray.shutdown()
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
