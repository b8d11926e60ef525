"""Scoring and sampling as Ray Data jobs (genserve.server.ray_data) against a real server, byte for byte.

One local Ray (num_cpus=2) for the module. Files of each kind `genserve score` reads (.npy, .csv with and
without a header, .parquet) scored by Ray actors equal the server's LogLikelihoodStream for the same seed and
chunking; so do datasets whose blocks cut chunks (the VAE, whose importance-sample noise depends on a row's
place in its chunk) and datasets that carry their own row numbers out of order; samples equal Client.sample;
`genserve score --engine ray` writes the file the gRPC path writes; score kinds and calibrated percentiles
equal the server's, and a per-batch kind is refused (a Ray job does not keep a request's rows together).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data

from genserve.app.cli import main
from genserve.clients.client import Client
from genserve.server.app import BackgroundServer
from genserve.server.config import ServerConfig
from genserve.server.ray_data import (
    collect_samples,
    collect_scores,
    read_dataset,
    sample_dataset,
    score_dataset,
)
from genserve.training.data import load_dataset

CHUNK = 128
ROWS = 300  # chunks of 128, 128 and 44 rows


RAY_STARTS = 3
"""Tries to start the local Ray. Ray waits a fixed 30 s for its raylet to register; a clean clone's first start
(a fresh virtualenv's Ray processes compiling their bytecode) beside other work on two cores once took longer,
and every test of the module errored."""


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    for attempt in range(1, RAY_STARTS + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception when its node does not come up in time
            # The half-started node's processes are not ray.shutdown()'s to stop: `ray stop` ends them.
            subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True,
                           check=False)
            if attempt == RAY_STARTS:
                raise
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(repo_dir: Path):
    cfg = ServerConfig(repo=repo_dir, host="127.0.0.1", port=0, metrics_port=0, provider="cpu", intra_op_threads=1,
                       inter_op_threads=1, max_batch_size=64, workers=2, grace_s=5.0)
    with BackgroundServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer):
    with Client(f"127.0.0.1:{server.port}", timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def digits(client: Client) -> np.ndarray:
    """(ROWS, 8, 8) grey levels: a flow's samples, in the domain of every digits model."""
    return client.sample("digits-realnvp", ROWS, seed=1)


def same(a: np.ndarray | None, b: np.ndarray | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        assert a.shape == b.shape and a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()


def write(kind: str, x: np.ndarray, folder: Path) -> Path:
    flat = x.reshape(len(x), -1)
    path = folder / f"rows-{kind}"
    if kind == "npy":
        path = path.with_suffix(".npy")
        np.save(path, x)
    elif kind in ("csv", "csv-header"):
        path = path.with_suffix(".csv")
        header = ",".join(f"p{i}" for i in range(flat.shape[1])) + "\n" if kind == "csv-header" else ""
        path.write_text(header + "\n".join(",".join(f"{v:g}" for v in row) for row in flat) + "\n")
    elif kind == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.table({f"p{i}": flat[:, i] for i in range(flat.shape[1])}), path)
    return path


@pytest.mark.parametrize("kind", ["npy", "csv", "csv-header", "parquet"])
def test_a_file_scores_as_through_the_server(kind: str, digits: np.ndarray, client: Client, repo_dir: Path,
                                             tmp_path: Path) -> None:
    path = write(kind, digits, tmp_path)
    theirs = client.score_stream("digits-realnvp", path, chunk_size=CHUNK, progress=False, seed=42)
    scored = score_dataset(read_dataset(path), repo_dir, "digits-realnvp", seed=42, chunk_size=CHUNK,
                           concurrency=2)
    mine = collect_scores(scored)
    same(mine.log_prob, theirs.log_prob)
    same(mine.bits_per_dim, theirs.bits_per_dim)
    assert (mine.kind, mine.version) == (theirs.kind, theirs.version)


def test_blocks_that_cut_chunks_change_no_score(digits: np.ndarray, client: Client, repo_dir: Path) -> None:
    """Blocks of 100, 233 and 67 rows: Ray's batches cut chunks; the VAE's importance noise still matches."""
    theirs = client.score_stream("digits-vae", digits, chunk_size=CHUNK, progress=False, seed=5,
                                 importance_samples=8)
    ds = ray.data.from_numpy([digits[:100], digits[100:233], digits[233:]])
    mine = collect_scores(score_dataset(ds, repo_dir, "digits-vae", seed=5, chunk_size=CHUNK,
                                        importance_samples=8, concurrency=2))
    same(mine.log_prob, theirs.log_prob)
    assert mine.kind == theirs.kind == "lower_bound"


def test_rows_that_carry_their_numbers_stream_in_any_order(digits: np.ndarray, client: Client,
                                                           repo_dir: Path) -> None:
    theirs = client.score_stream("digits-ebm", digits, chunk_size=CHUNK, progress=False, seed=8)
    order = np.random.default_rng(0).permutation(ROWS)
    ds = ray.data.from_items([{"n": int(i), "image": digits[i]} for i in order])
    mine = collect_scores(score_dataset(ds, repo_dir, "digits-ebm", seed=8, chunk_size=CHUNK, row_column="n"))
    same(mine.log_prob, theirs.log_prob)
    assert mine.bits_per_dim is None and theirs.bits_per_dim is None and mine.kind == "unnormalized"


def test_samples_equal_client_sample(client: Client, repo_dir: Path) -> None:
    n = 600  # three SampleStream blocks, the last one short
    x, z = client.sample("digits-vae", n, seed=9, return_latents=True)
    mine_x, mine_z = collect_samples(sample_dataset(repo_dir, "digits-vae", n, seed=9, return_latents=True,
                                                    concurrency=2, blocks_per_batch=1))
    same(mine_x, x)
    same(mine_z, z)


def test_cli_engine_ray_writes_what_the_server_path_writes(digits: np.ndarray, server: BackgroundServer,
                                                          repo_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = write("npy", digits, tmp_path)
    common = ["score", "digits-realnvp", str(path), "--seed", "3", "--chunk-size", str(CHUNK), "--quantile", "0.1",
              "--quiet"]
    assert main([*common, "--out", str(tmp_path / "grpc.csv"), "--server", f"127.0.0.1:{server.port}"]) == 0
    assert main([*common, "--out", str(tmp_path / "ray.csv"), "--engine", "ray", "--repo", str(repo_dir),
                 "--concurrency", "2"]) == 0
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "grpc.csv").read_bytes()
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith(lines[-2].split(" in ")[0]) and "Ray Data" in lines[-1]


def test_cli_engine_ray_errors_end_in_one_line(digits: np.ndarray, repo_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = write("npy", digits, tmp_path)
    base = ["score", "digits-realnvp", str(path), "--out", str(tmp_path / "s.csv")]
    assert main([*base, "--engine", "ray"]) == 2
    assert "--repo" in capsys.readouterr().err
    assert main([*base, "--repo", str(repo_dir)]) == 2  # --repo without --engine ray
    assert "--engine ray" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((3, 8, 8), 99.0, np.float32))
    assert main(["score", "digits-realnvp", str(bad), "--out", str(tmp_path / "s.csv"), "--engine", "ray",
                 "--repo", str(repo_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not an integer level" in err and "rows 0..2" in err


# ---- score kinds and calibrated percentiles (issue 16) ----------------------------------------------------

SCORE_CHUNK = 100
SCORE_MODEL = "digits-realnvp"


def test_ray_job_score_columns_equal_the_servers_stream(server, repo_dir: Path) -> None:
    """score_<kind> / percentile[_<kind>] columns equal the server's LogLikelihoodStream answers (issue 16)."""
    x = load_dataset("digits").test[:250]
    asks = {"scores": ["min_z", "typicality_row"], "percentile": True}
    with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        want = client.score_stream(SCORE_MODEL, x, chunk_size=SCORE_CHUNK, progress=False, seed=3, **asks)
    ds = ray.data.from_items([{"x": row} for row in x])
    got = collect_scores(score_dataset(ds, repo_dir, SCORE_MODEL, seed=3, chunk_size=SCORE_CHUNK, **asks))
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
        score_dataset(ds, repo_dir, SCORE_MODEL, seed=3, scores=["typicality"])
