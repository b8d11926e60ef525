"""Score kinds and calibrated percentiles in Ray Data scoring jobs (genserve.server.ray_data), against the server.

One local Ray (num_cpus=2) for the module; the job's ``score_<kind>`` / ``percentile[_<kind>]`` columns equal the
server's LogLikelihoodStream answers for the same seed and chunking, and a per-batch kind is refused (a Ray job
does not keep a request's rows together).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import ray.data

from genserve.clients.client import Client
from genserve.server.app import BackgroundServer
from genserve.server.config import ServerConfig
from genserve.server.ray_data import collect_scores, score_dataset
from genserve.training.data import load_dataset

CHUNK = 100
FLOW = "digits-realnvp"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(repo_dir: Path):
    cfg = ServerConfig(repo=repo_dir, host="127.0.0.1", port=0, metrics_port=0, provider="cpu", intra_op_threads=1,
                       inter_op_threads=1, max_batch_size=64, workers=2, grace_s=5.0)
    with BackgroundServer(cfg) as srv:
        yield srv


def test_ray_job_columns_equal_the_servers_stream(server, repo_dir: Path) -> None:
    x = load_dataset("digits").test[:250]
    asks = {"scores": ["min_z", "typicality_row"], "percentile": True}
    with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        want = client.score_stream(FLOW, x, chunk_size=CHUNK, progress=False, seed=3, **asks)
    ds = ray.data.from_items([{"x": row} for row in x])
    got = collect_scores(score_dataset(ds, repo_dir, FLOW, seed=3, chunk_size=CHUNK, **asks))
    np.testing.assert_array_equal(got.log_prob, want.log_prob)
    assert sorted(got.scores) == ["min_z", "typicality_row"]
    assert sorted(got.percentiles) == ["log_prob", "min_z", "typicality_row"]
    for name in got.scores:
        np.testing.assert_array_equal(got.scores[name], want.scores[name])
    for name in got.percentiles:
        np.testing.assert_array_equal(got.percentiles[name], want.percentiles[name])


def test_ray_job_refuses_a_per_batch_kind(repo_dir: Path) -> None:
    ds = ray.data.from_items([{"x": row} for row in load_dataset("digits").test[:10]])
    with pytest.raises(ValueError, match="typicality is computed over a request's rows"):
        score_dataset(ds, repo_dir, FLOW, seed=3, scores=["typicality"])
