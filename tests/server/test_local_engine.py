"""The in-process engine API (genserve.server.local.LocalEngine) against a real server, byte for byte.

The server runs the fixture repository with its test settings (64-row batches); the LocalEngine runs it with
the server's defaults (512-row batches), so equality also says the answer does not depend on batching. Every
operation of a flow (dequantisation noise), a VAE (importance samples, latents, sampled encode/decode), an
energy model (Langevin sampling, unnormalized scores) and pPCA on continuous rows.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from genserve.clients.client import Client
from genserve.core.noise import derived_seed
from genserve.server.app import BackgroundServer
from genserve.server.config import ServerConfig
from genserve.server.errors import InvalidInput, NotFound, Unsupported
from genserve.server.local import STREAM_BLOCK_ROWS, LocalEngine, fit_rows

MODELS = ("digits-realnvp", "digits-vae", "digits-ebm", "moons-ppca")


@pytest.fixture(scope="module")
def server(engine_config: ServerConfig):
    with BackgroundServer(engine_config) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine_config(repo_dir: Path) -> ServerConfig:  # module scope: one server for the module
    return ServerConfig(repo=repo_dir, host="127.0.0.1", port=0, metrics_port=0, provider="cpu",
                        intra_op_threads=1, inter_op_threads=1, max_batch_size=64, max_queue_delay_ms=2.0,
                        workers=2, grace_s=5.0)


@pytest.fixture(scope="module")
def client(server: BackgroundServer):
    with Client(f"127.0.0.1:{server.port}", timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def local(repo_dir: Path):
    with LocalEngine(repo_dir, models=list(MODELS), provider="cpu") as engine:
        yield engine


def same(a: np.ndarray | None, b: np.ndarray | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def rows(local: LocalEngine, model: str, n: int, seed: int = 3) -> np.ndarray:
    if "sample" in next(s for s in local.models() if s.name == model).operations:
        return local.sample(model, n, seed=seed).x
    raise AssertionError(f"{model} cannot sample")


@pytest.mark.parametrize("model", MODELS)
def test_sample_equals_the_sample_rpc(local: LocalEngine, client: Client, model: str) -> None:
    kw = {"langevin_steps": 5} if model == "digits-ebm" else {}
    latents = model in ("digits-vae", "moons-ppca")
    mine = local.sample(model, 40, seed=11, return_latents=latents, **kw)
    theirs = client.sample(model, 40, seed=11, return_latents=latents, **kw)
    x, z = theirs if latents else (theirs, None)
    same(mine.x, x)
    same(mine.latents, z)
    assert mine.version == 1


def test_sample_blocks_equal_a_sample_stream(local: LocalEngine, client: Client) -> None:
    n = 2 * STREAM_BLOCK_ROWS + 17
    mine = local.sample_blocks("digits-realnvp", n, seed=5)
    same(mine.x, client.sample("digits-realnvp", n, seed=5))  # n > 256: the client streams
    same(local.sample_blocks("digits-realnvp", 9, seed=5).x, local.sample("digits-realnvp", 9, seed=5).x)


@pytest.mark.parametrize("model", MODELS)
def test_log_likelihood_equals_the_rpc(local: LocalEngine, client: Client, model: str) -> None:
    x = rows(local, model, 70)
    kw = {"importance_samples": 20} if model == "digits-vae" else {}
    mine = local.log_likelihood(model, x, seed=7, **kw)
    theirs = client.log_likelihood(model, x, seed=7, **kw)
    same(mine.log_prob, theirs.log_prob)
    same(mine.bits_per_dim, theirs.bits_per_dim)
    assert (mine.kind, mine.version) == (theirs.kind, theirs.version)


@pytest.mark.parametrize("model", ("digits-realnvp", "digits-vae"))
def test_score_equals_score_stream(local: LocalEngine, client: Client, model: str, tmp_path: Path) -> None:
    x = rows(local, model, 230)
    path = tmp_path / "rows.npy"
    np.save(path, x.reshape(len(x), -1))  # flat rows, as files often hold them
    kw = {"importance_samples": 10} if model == "digits-vae" else {}
    theirs = client.score_stream(model, path, chunk_size=64, progress=False, seed=99, **kw)
    flat = np.load(path, mmap_mode="r")
    mine = local.score(model, flat, seed=99, chunk_size=64, **kw)
    same(mine.log_prob, theirs.log_prob)
    same(mine.bits_per_dim, theirs.bits_per_dim)
    pieces = local.score(model, (flat[i:i + 50] for i in range(0, len(flat), 50)), seed=99, chunk_size=64, **kw)
    same(pieces.log_prob, theirs.log_prob)  # pieces of any length are re-cut into the same chunks
    first = local.log_likelihood(model, x[64:128], seed=derived_seed(99, 64), **kw)
    same(first.log_prob, theirs.log_prob[64:128])


@pytest.mark.parametrize(("model", "draw_z", "draw_x"), [
    ("digits-realnvp", False, False), ("digits-vae", False, False), ("digits-vae", True, True),
    ("moons-ppca", False, True)])  # sample where the family draws: the VAE's q(z|x) and p(x|z), pPCA's p(x|z)
def test_encode_decode_equal_the_rpcs(local: LocalEngine, client: Client, model: str, draw_z: bool,
                                      draw_x: bool) -> None:
    x = rows(local, model, 33)
    z = local.encode(model, x, seed=4, sample=draw_z).z
    same(z, client.encode(model, x, seed=4, sample=draw_z))
    same(local.decode(model, z, seed=8, sample=draw_x).x, client.decode(model, z, seed=8, sample=draw_x))


def test_concurrent_calls_from_threads_match_one_at_a_time(local: LocalEngine) -> None:
    """Calls from several threads merge in the batcher; each still gets its own answer."""
    x = rows(local, "digits-realnvp", 48)
    alone = [local.log_likelihood("digits-realnvp", x[i:i + 6], seed=i).log_prob for i in range(0, 48, 6)]
    together: dict[int, np.ndarray] = {}

    def score(i: int) -> None:
        together[i] = local.log_likelihood("digits-realnvp", x[i:i + 6], seed=i).log_prob

    threads = [threading.Thread(target=score, args=(i,)) for i in range(0, 48, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, i in enumerate(range(0, 48, 6)):
        same(together[i], alone[k])


def test_queries_and_errors_are_the_engines(local: LocalEngine) -> None:
    names = {s.name: s for s in local.models()}
    assert set(MODELS) <= set(names)
    assert names["digits-realnvp"].state == "READY" and names["digits-gan"].state == "UNAVAILABLE"
    assert local.spec("digits-vae").shape == (8, 8) and local.version("digits-vae") == 1
    with pytest.raises(NotFound, match="no-such-model"):
        local.sample("no-such-model", 1, seed=0)
    with pytest.raises(InvalidInput, match="x"):
        local.log_likelihood("digits-vae", np.full((2, 8, 8), 99.0), seed=0)
    with pytest.raises(InvalidInput, match="importance_samples"):
        local.log_likelihood("digits-realnvp", np.zeros((2, 8, 8)), seed=0, importance_samples=5)
    with pytest.raises(Unsupported, match="encode"):
        local.encode("digits-ebm", np.zeros((1, 8, 8)), seed=0)
    with pytest.raises(ValueError, match="64 values"):
        fit_rows(np.zeros((2, 63)), (8, 8))


def test_settings_are_checked_and_a_closed_engine_refuses(repo_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown setting"):
        LocalEngine(repo_dir, max_batch=3)
    with pytest.raises(ValueError, match="max_batch_size: input should be a valid integer"):
        LocalEngine(repo_dir, max_batch_size="64")
    engine = LocalEngine(repo_dir, models=["moons-ppca"], provider="cpu", max_batch_size=8)
    assert engine.config.max_batch_size == 8
    x = engine.sample("moons-ppca", 3, seed=1).x
    engine.close()
    engine.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        engine.log_likelihood("moons-ppca", x, seed=1)
