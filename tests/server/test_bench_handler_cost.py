"""benchmarks/handler_cost.py: the in-process request path it times is the OIP servicer's, end to end."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the repository, not an installed package

from benchmarks.handler_cost import bare_graph, dequant_draws, request_bytes, servicer_path  # noqa: E402


def test_handler_cost_runs_every_request_through_the_servicer_and_one_graph_call_each(repo_dir: Path) -> None:
    data, x = request_bytes("digits-realnvp", "encode", 2)
    out = asyncio.run(servicer_path(repo_dir, "digits-realnvp", data, 30, profile=True))
    assert out["calls"] == 200 + 30  # warm-up and the timed window (counted before profiling): one call each
    assert 0 <= out["inline_calls"] <= out["calls"] and out["us_per_request"] > 0
    assert out["python_calls_per_request"] > 50 and "oip.py" in out["profile"] and "batcher.py" in out["profile"]
    assert bare_graph(repo_dir, "digits-realnvp", x, 30) > 0


def test_handler_cost_times_a_log_likelihood_request_and_its_one_call_of_rows_times_draws(repo_dir: Path) -> None:
    draws = dequant_draws(repo_dir, "digits-realnvp")
    assert draws > 1
    data, x = request_bytes("digits-realnvp", "log_likelihood", 2)
    out = asyncio.run(servicer_path(repo_dir, "digits-realnvp", data, 30, profile=False))
    assert out["calls"] == 200 + 30  # every request's draws go to the graph as one call
    assert bare_graph(repo_dir, "digits-realnvp", x, 30, draws) > 0
