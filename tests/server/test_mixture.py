"""A mixture served as one model through a real server: its answers are its members' own served answers,
combined by the weights; its members' graph calls batch with other requests'; bad requests are named.

The repository (tests/mixture_members.py) holds the members alone (``digits-member<k>``) beside the mixture
(``digits-mix``: two briefly trained arrnn and a pPCA on digits), so every check compares the mixture with what
the server answers for each member, with the member's stream seed derived_seed(seed, k + 1).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixture_members  # noqa: E402

from genserve.core.manifest import read_manifest  # noqa: E402
from genserve.core.noise import Noise, derived_seed  # noqa: E402
from genserve.core.tensors import from_proto, to_proto  # noqa: E402
from genserve.server.app import BackgroundServer  # noqa: E402
from genserve.server.config import ServerConfig, ServingSettings  # noqa: E402
from genserve.server.programs import program_from_manifest  # noqa: E402
from genserve.server.repository import LoadFailed, load_version  # noqa: E402
from genserve.v1 import (
    manifest_pb2,  # noqa: E402
    service_pb2_grpc,  # noqa: E402
)
from genserve.v1 import service_pb2 as pb  # noqa: E402

MIX = mixture_members.MIXTURE


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = Path(request.config.cache.mkdir("genserve_mixture"))
    return mixture_members.cached(cache, tmp_path_factory.mktemp("mixture") / "built")


@pytest.fixture(scope="module")
def weights(built: Path) -> np.ndarray:
    m = read_manifest(built / "repo" / MIX / "1" / "manifest.json")
    return np.array([mm.weight for mm in m.members])


@pytest.fixture(scope="module")
def server(built: Path):
    cfg = ServerConfig(repo=built / "repo", port=0, metrics_port=free_port(), provider="cpu", max_batch_size=64,
                       max_queue_delay_ms=20.0, workers=2, grace_s=5.0)
    with BackgroundServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: BackgroundServer):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield service_pb2_grpc.GenerativeServiceStub(channel)


def digits_test_rows(n: int) -> np.ndarray:
    from genserve.training.data import load_dataset

    return np.asarray(load_dataset("digits").test[:n], dtype=np.float32)


def log_likelihood(stub, model: str, x: np.ndarray, seed: int, **options) -> pb.LogLikelihoodResponse:
    return stub.LogLikelihood(pb.LogLikelihoodRequest(model=model, x=to_proto(x), seed=seed, **options))


def sample(stub, model: str, n: int, seed: int) -> np.ndarray:
    return from_proto(stub.Sample(pb.SampleRequest(model=model, n=n, seed=seed)).samples)


def members_combined(stub, weights: np.ndarray, x: np.ndarray, seed: int, **options) -> np.ndarray:
    """log sum_k w_k p_k(x) from the members' own served scores (member k with its stream seed), by hand."""
    scores = np.stack([from_proto(log_likelihood(stub, mixture_members.member_name(k), x, derived_seed(seed, k + 1),
                                                 **(options if k == 2 else {})).log_prob).astype(np.float64)
                       for k in range(len(weights))])
    a = np.log(weights)[:, None] + scores
    top = a.max(axis=0)
    return top + np.log(np.exp(a - top).sum(axis=0))


def test_log_likelihood_is_the_log_sum_exp_of_the_members_served_scores(stub, weights: np.ndarray) -> None:
    x = digits_test_rows(40)
    r = log_likelihood(stub, MIX, x, seed=7)
    got = from_proto(r.log_prob)
    assert got.shape == (40,) and r.seed == 7
    np.testing.assert_allclose(got, members_combined(stub, weights, x, 7), rtol=0, atol=1e-6)
    assert r.kind == manifest_pb2.LIKELIHOOD_KIND_LOWER_BOUND  # the pPCA member's dequantisation bound
    np.testing.assert_allclose(from_proto(r.bits_per_dim), -got / (64 * np.log(2)), rtol=1e-12)
    # the pPCA member's draws option reaches it (the arrnn take none); its default is 16
    r4 = log_likelihood(stub, MIX, x, seed=7, draws=4)
    np.testing.assert_allclose(from_proto(r4.log_prob), members_combined(stub, weights, x, 7, draws=4), atol=1e-6)
    assert not np.array_equal(from_proto(r4.log_prob), got)


def test_sample_is_reproducible_and_each_row_comes_from_a_member_picked_by_weight(stub, weights: np.ndarray
                                                                                  ) -> None:
    n, seed = 400, 11
    x = sample(stub, MIX, n, seed)
    assert x.shape == (n, 8, 8)
    np.testing.assert_array_equal(sample(stub, MIX, n, seed), x)
    assert not np.array_equal(sample(stub, MIX, n, seed + 1), x)
    # member of each row: the request's first n uniforms against the cumulative weights
    choice = np.searchsorted(np.cumsum(weights), Noise(seed).uniform(n).astype(np.float64), side="right")
    for k in range(len(weights)):
        rows = np.flatnonzero(choice == k)
        assert abs(len(rows) / n - weights[k]) < 4 * np.sqrt(weights[k] * (1 - weights[k]) / n) + 1 / n
        if len(rows):  # the member's own served samples, its rows in one call with its stream seed
            np.testing.assert_array_equal(x[rows], sample(stub, mixture_members.member_name(k), len(rows),
                                                          derived_seed(seed, k + 1)))


def test_percentiles_come_from_the_mixtures_own_calibration(stub, built: Path) -> None:
    m = read_manifest(built / "repo" / MIX / "1" / "manifest.json")
    log_prob = next(c for c in m.calibration if c.score == "log_prob")
    assert log_prob.rows == 350 and "validation split" in log_prob.data
    assert m.parameters["dequant_draws"] == 16  # the pPCA member's default, which the calibration used
    x = digits_test_rows(20)
    r = log_likelihood(stub, MIX, x, seed=3, percentile=True)
    pct = from_proto(r.percentiles["log_prob"])
    want = 100 * np.interp(from_proto(r.log_prob), np.array(log_prob.quantiles), np.array(log_prob.probabilities))
    assert pct.shape == (20,) and ((pct >= 0) & (pct <= 100)).all()
    np.testing.assert_allclose(pct, want, atol=1e-6)


def batch_calls(port: int, graph: str) -> tuple[float, float]:
    """(ONNX Runtime calls, rows) of the mixture's ``graph`` so far."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.labels.get("model") == MIX and s.labels.get("graph") == graph]
    count = sum(s.value for s in samples if s.name == "genserve_batch_size_rows_count")
    rows = sum(s.value for s in samples if s.name == "genserve_batch_size_rows_sum")
    return count, rows


def test_concurrent_requests_share_the_members_graph_calls(server: BackgroundServer, stub) -> None:
    x = digits_test_rows(32)
    alone = [from_proto(log_likelihood(stub, MIX, x[i:i + 1], seed=i).log_prob) for i in range(32)]
    before = batch_calls(server.metrics_port, "m0/logits")

    async def together() -> list:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            aio = service_pb2_grpc.GenerativeServiceStub(channel)
            return await asyncio.gather(*[aio.LogLikelihood(pb.LogLikelihoodRequest(
                model=MIX, x=to_proto(x[i:i + 1]), seed=i)) for i in range(32)])

    # A starved machine (CI beside other work) can hand the server a burst one request at a time, each alone by
    # the time it runs; a few bursts give the merge its chance, and every burst must answer what it answers alone.
    for _ in range(5):
        answers = asyncio.run(together())
        after = batch_calls(server.metrics_port, "m0/logits")
        calls, rows = after[0] - before[0], after[1] - before[1]
        for i, r in enumerate(answers):  # merged rows answer exactly what they answer alone
            np.testing.assert_array_equal(from_proto(r.log_prob), alone[i])
        if calls < 32:
            break
        before = after
    assert rows == 32 and calls < 32, f"{calls} calls of m0/logits for 32 concurrent one-row requests, 5 times"


@pytest.mark.parametrize(("method", "request_", "code", "words"), [
    ("Encode", pb.EncodeRequest(model=MIX, x=to_proto(np.zeros((1, 8, 8), np.float32))),
     grpc.StatusCode.FAILED_PRECONDITION, ("sample", "log_likelihood")),
    ("Decode", pb.DecodeRequest(model=MIX, z=to_proto(np.zeros((1, 4), np.float32))),
     grpc.StatusCode.FAILED_PRECONDITION, ("sample", "log_likelihood")),
    ("LogLikelihood", pb.LogLikelihoodRequest(model=MIX, x=to_proto(np.zeros((1, 8, 8), np.float32)),
                                              importance_samples=5),
     grpc.StatusCode.INVALID_ARGUMENT, ("importance_samples", "does not apply")),
    ("LogLikelihood", pb.LogLikelihoodRequest(model=MIX, x=to_proto(np.zeros((1, 8, 8), np.float32)), draws=0),
     grpc.StatusCode.INVALID_ARGUMENT, ("draws", "outside")),
    ("LogLikelihood", pb.LogLikelihoodRequest(model=MIX, x=to_proto(np.zeros((1, 4, 4), np.float32))),
     grpc.StatusCode.INVALID_ARGUMENT, ("8, 8",)),
    ("LogLikelihood", pb.LogLikelihoodRequest(model=MIX, x=to_proto(np.full((1, 8, 8), 17, np.float32))),
     grpc.StatusCode.INVALID_ARGUMENT, ("x",)),
    ("LogLikelihood", pb.LogLikelihoodRequest(model=MIX, x=to_proto(np.zeros((1, 8, 8), np.float32)),
                                              per_dimension=True),
     grpc.StatusCode.FAILED_PRECONDITION, ("per_dimension",)),
])
def test_bad_requests_are_named(stub, method: str, request_, code: grpc.StatusCode, words: tuple[str, ...]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request_)
    assert err.value.code() == code, err.value.details()
    for w in words:
        assert w in err.value.details(), err.value.details()
    assert sample(stub, MIX, 2, 0).shape == (2, 8, 8)  # and the server goes on


def broken(built: Path, tmp_path: Path, edit) -> Path:
    """A copy of the mixture whose manifest.json ``edit`` (a function of the parsed JSON) changed."""
    repo = tmp_path / "repo"
    shutil.copytree(built / "repo" / MIX, repo / MIX)
    path = repo / MIX / "1" / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return repo


def _weights(doc: dict) -> None:
    doc["members"][0]["weight"] = 0.9


def _stray(doc: dict) -> None:
    doc["graphs"][0]["name"] = "loose/logits"


def _kind(doc: dict) -> None:
    doc["members"][1]["likelihood"] = "LIKELIHOOD_KIND_UNNORMALIZED"


def _nested(doc: dict) -> None:
    doc["members"][1]["family"] = "mixture"


def _none(doc: dict) -> None:
    doc["members"] = []


@pytest.mark.parametrize(("edit", "message"), [
    (_weights, "weights must be > 0 and sum to 1"),
    (_stray, "belong to no mixture member"),
    (_kind, "a mixture combines members with exact or lower_bound likelihoods only"),
    (_nested, "is itself a mixture"),
    (_none, "needs at least one member"),
])
def test_a_broken_mixture_manifest_does_not_load_and_says_why(built: Path, tmp_path: Path, edit, message: str
                                                              ) -> None:
    repo = broken(built, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        program_from_manifest(read_manifest(repo / MIX / "1" / "manifest.json"))
    with pytest.raises(LoadFailed, match=message):
        load_version(repo, MIX, 1, ServingSettings(), inter_op_threads=1)
