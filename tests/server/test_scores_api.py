"""Score kinds, calibrated percentiles and per-dimension terms (issue 16), served on every face.

A real server on free loopback ports serves a copy of the test repository (every model exported with its
calibration, plus ``digits-arcnn-raw``: the arcnn with its calibration and score kinds taken out of the manifest,
as a model exported before calibration existed). Checked: per-dimension terms are the chain rule (they sum to
-log_prob, and a term never depends on later dimensions); score kinds are genserve.core.scores of the served
log_prob with the manifest's fitted numbers; percentiles of the calibration rows themselves are uniform and
oriented so that low is anomalous; bad requests get the right status and reason on genserve.v1, OIP gRPC and
OIP HTTP alike; the client's stream, the asyncio client and the in-process engine give the same numbers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from ports import free_port
from supervised import serving
from tritonclient.utils import InferenceServerException

from genserve.clients.channel import GenserveError
from genserve.clients.client import AsyncClient, Client
from genserve.clients.messages import chunk_seed
from genserve.core import scores as core_scores
from genserve.core.manifest import read_manifest, write_manifest
from genserve.export.calibration import PROBABILITIES, SEED
from genserve.server.config import ServerConfig
from genserve.server.local import LocalEngine
from genserve.server.scoring import percentile_of
from genserve.training.data import load_dataset
from genserve.v1 import manifest_pb2

ARCNN, ARRNN, PPCA, MOONS = "digits-arcnn", "digits-arrnn", "digits-ppca", "moons-ppca"
VAE, FLOW, EBM, GAN = "digits-vae", "digits-realnvp", "digits-ebm", "digits-gan"
RAW = "digits-arcnn-raw"
LIKELIHOOD_MODELS = (ARCNN, ARRNN, PPCA, MOONS, VAE, FLOW, EBM)
MAX_DRAWS = 8


@pytest.fixture(scope="module")
def repo(repo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test repository and an arcnn exported "before calibration" (no score kinds, no calibration)."""
    dst = tmp_path_factory.mktemp("scores") / "repo"
    shutil.copytree(repo_dir, dst)
    shutil.copytree(dst / ARCNN, dst / RAW)
    path = dst / RAW / "1" / "manifest.json"
    manifest = read_manifest(path)
    manifest.name = RAW
    del manifest.calibration[:]
    del manifest.score_kinds[:]
    for key in [k for k in manifest.parameters if k.startswith("score.")]:
        del manifest.parameters[key]
    write_manifest(manifest, path)
    return dst


@pytest.fixture(scope="module", params=[1, 2], ids=["1 process", "2 processes"])
def server(repo: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One process, and `genserve serve --processes 2` with the same settings (issue 17)."""
    cfg = ServerConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=free_port(), http_port=free_port(),
                       provider="cpu", intra_op_threads=1, max_batch_size=64, max_queue_delay_ms=2.0, workers=2,
                       grace_s=5.0, max_dequant_draws=MAX_DRAWS)
    with serving(cfg, request.param, tmp_path_factory.mktemp("processes") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.fixture(scope="module")
def oip(server):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def oip_http(server):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def moons():
    return load_dataset("moons")


def rows_of(model: str, digits, moons) -> np.ndarray:
    return (moons if model == MOONS else digits).test[:40]


def post(port: int, path: str, body: dict) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def http_infer(port: int, model: str, x: np.ndarray, parameters: dict) -> tuple[int, Any]:
    body = {"parameters": parameters,
            "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    return post(port, f"/v2/models/{model}.log_likelihood/infer", body)


def oip_infer(oip, model: str, x: np.ndarray, parameters: dict | None = None, outputs: tuple[str, ...] = ()):
    t = grpcclient.InferInput("x", list(x.shape), "FP32")
    t.set_data_from_numpy(np.asarray(x, dtype=np.float32))
    wanted = [grpcclient.InferRequestedOutput(o) for o in outputs] or None
    return oip.infer(f"{model}.log_likelihood", [t], outputs=wanted, parameters=parameters)


def refused_everywhere(client, oip, port: int, model: str, x: np.ndarray, kwargs: dict, parameters: dict,
                       code: grpc.StatusCode, reason: str, words: tuple[str, ...]) -> None:
    """The same bad request on genserve.v1, OIP gRPC and OIP HTTP: ``code`` (HTTP 400), ``reason``, ``words``."""
    with pytest.raises(GenserveError) as info:
        client.log_likelihood(model, x, seed=1, **kwargs)
    assert info.value.code == code and info.value.reason == reason, info.value
    assert all(w in info.value.message for w in words), info.value.message
    with pytest.raises(InferenceServerException) as oip_error:
        oip_infer(oip, model, x, parameters)
    assert code.name in str(oip_error.value.status()) and all(w in oip_error.value.message() for w in words)
    status, answer = http_infer(port, model, x, parameters)
    assert status == 400 and answer["reason"] == reason and all(w in answer["error"] for w in words), answer


# ---- per-dimension terms ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [ARCNN, ARRNN, PPCA, MOONS])
def test_per_dimension_terms_are_the_chain_rule(client, digits, moons, model: str) -> None:
    """They sum to -log_prob, asking for them leaves log_prob as it is, and term i ignores dimensions > i."""
    x = rows_of(model, digits, moons)
    plain = client.log_likelihood(model, x, seed=5)
    got = client.log_likelihood(model, x, seed=5, per_dimension=True)
    assert got.per_dimension.shape == x.shape and got.per_dimension.dtype == np.float64
    np.testing.assert_array_equal(got.log_prob, plain.log_prob)
    total = got.per_dimension.reshape(len(x), -1).sum(axis=1)
    np.testing.assert_allclose(total, -got.log_prob, rtol=1e-5, atol=1e-3)
    if model == PPCA:  # the dequantised bound's weights see every dimension; checked for the exact models
        return
    changed = x.reshape(len(x), -1).copy()
    if model == MOONS:
        changed[:, -1] += 3.0
    else:
        changed[:, -1] = np.where(changed[:, -1] > 8, 0, 16)
    after = client.log_likelihood(model, changed.reshape(x.shape), seed=5, per_dimension=True)
    before_terms, after_terms = got.per_dimension.reshape(len(x), -1), after.per_dimension.reshape(len(x), -1)
    np.testing.assert_allclose(after_terms[:, :-1], before_terms[:, :-1], rtol=1e-5, atol=1e-5)
    assert np.abs(after_terms[:, -1] - before_terms[:, -1]).min() > 1e-3


def test_vae_terms_explain_the_reconstruction(client, digits) -> None:
    """Terms are -log p(x_i | z) at z = Encode(x) (the posterior mean) under the decoder Decode reads: where x_i
    is Decode's most likely level its probability is >= 1/levels (term <= log levels); elsewhere it is <= 1/2
    (term >= log 2)."""
    x = digits.test[:60]
    got = client.log_likelihood(VAE, x, seed=2, per_dimension=True)
    terms = got.per_dimension.reshape(len(x), -1)
    assert np.isfinite(terms).all() and (terms >= -1e-9).all()
    mode = client.decode(VAE, client.encode(VAE, x)).reshape(len(x), -1)
    hit = mode == x.reshape(len(x), -1)
    assert hit.any() and (~hit).any()
    assert (terms[hit] <= np.log(digits.spec.levels) + 1e-6).all()
    assert (terms[~hit] >= np.log(2) - 1e-6).all()
    assert terms[hit].mean() < terms[~hit].mean()


@pytest.mark.parametrize("model, words", [(FLOW, ("flow", "mix")), (EBM, ("unnormalised",))])
def test_per_dimension_is_refused_with_its_reason_on_every_face(client, oip, server, digits, model, words) -> None:
    refused_everywhere(client, oip, server.http_port, model, digits.test[:3], {"per_dimension": True},
                       {"per_dimension": True}, grpc.StatusCode.FAILED_PRECONDITION, "PER_DIMENSION_NOT_SUPPORTED",
                       ("per_dimension", *words))


# ---- score kinds ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", LIKELIHOOD_MODELS)
def test_score_kinds_are_core_scores_of_the_served_log_prob(client, digits, moons, model: str) -> None:
    info = client.info(model)
    kinds = [k.name for k in info.manifest.score_kinds]
    likelihood = {"exact": "exact", "lower_bound": "lower_bound", "unnormalized": "unnormalized"}[info.likelihood]
    assert kinds == core_scores.applicable(info.spec, likelihood)
    assert set(info.score_kinds) == {"log_prob", *kinds}
    assert all(info.score_kinds[k].calibration_rows == len(digits.val if model != MOONS else moons.val)
               for k in info.score_kinds)
    x = rows_of(model, digits, moons)
    got = client.log_likelihood(model, x, seed=9, scores=kinds)
    assert sorted(got.scores) == sorted(kinds) and not got.percentiles and got.per_dimension is None
    for kind in kinds:
        want = core_scores.compute(kind, info.spec, x, got.log_prob, dict(info.manifest.parameters))
        np.testing.assert_allclose(got.scores[kind], want, rtol=1e-9, atol=1e-9, err_msg=kind)
    assert np.ptp(got.scores["typicality"]) == 0  # per batch: one value for the request's rows


def test_an_unknown_score_kind_is_invalid_on_every_face(client, oip, server, digits) -> None:
    refused_everywhere(client, oip, server.http_port, ARCNN, digits.test[:3], {"scores": ["likelihood_ratio"]},
                       {"scores": "likelihood_ratio"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                       ("likelihood_ratio", "complexity_ratio", "typicality"))


def test_a_model_without_a_likelihood_lists_no_score_kinds(client) -> None:
    info = client.info(GAN)
    assert info.score_kinds == {} and info.calibrated == () and not info.manifest.calibration


# ---- percentiles ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [ARCNN, FLOW])
def test_percentiles_of_the_calibration_rows_are_uniform(client, digits, model: str) -> None:
    """The validation split, scored as calibration scored it (its seed: the same dequantisation noise for the
    flow), lands uniformly on the percentile scale: the stored quantiles are its distribution."""
    x = digits.val
    kinds = ["complexity_ratio", "min_z", "typicality_row"]
    got = client.log_likelihood(model, x, seed=SEED, scores=kinds, percentile=True)
    assert sorted(got.percentiles) == sorted(["log_prob", *kinds])
    for name, pct in got.percentiles.items():
        assert pct.shape == (len(x),) and (pct >= 0).all() and (pct <= 100).all(), name
        for q in (5, 25, 50, 75, 95):
            assert abs(np.mean(pct <= q) - q / 100) < 0.02, (name, q, np.mean(pct <= q))


def test_percentiles_are_oriented_low_is_anomalous(client, digits) -> None:
    """log_prob (higher is normal): the percentile grows with the score; typicality_row (higher is anomalous):
    it falls as the score grows, so a low percentile is anomalous for both."""
    x = np.concatenate([digits.test[:60], np.zeros((5, 8, 8), np.float32), np.full((5, 8, 8), 16, np.float32)])
    got = client.log_likelihood(ARCNN, x, seed=1, scores=["typicality_row"], percentile=True)
    for name, values, sign in (("log_prob", got.log_prob, 1), ("typicality_row", got.scores["typicality_row"], -1)):
        order = np.argsort(values, kind="stable")
        assert (sign * np.diff(got.percentiles[name][order]) >= -1e-9).all(), name
    assert got.percentiles["log_prob"][-5:].max() < 1  # all-16 images: far below every calibration digit


def test_percentile_interpolates_and_handles_ties() -> None:
    cal = manifest_pb2.ScoreCalibration(score="s", probabilities=[0.0, 0.25, 0.5, 0.75, 1.0],
                                        quantiles=[0.0, 1.0, 1.0, 1.0, 4.0])
    got = percentile_of(cal, np.array([-1.0, 0.5, 1.0, 2.5, 4.0, 9.0, np.nan]), higher_is_normal=True)
    np.testing.assert_allclose(got, [0.0, 25.0, 50.0, 75.0, 100.0, 100.0, 0.0])
    flipped = percentile_of(cal, np.array([0.5, 9.0]), higher_is_normal=False)
    np.testing.assert_allclose(flipped, [75.0, 0.0])


def test_percentile_without_calibration_is_failed_precondition_on_every_face(client, oip, server, digits) -> None:
    refused_everywhere(client, oip, server.http_port, RAW, digits.test[:3], {"percentile": True},
                       {"percentile": True}, grpc.StatusCode.FAILED_PRECONDITION, "NOT_CALIBRATED",
                       ("without calibration", "genserve export"))
    assert client.log_likelihood(RAW, digits.test[:3], seed=1).percentiles == {}  # plain scoring still serves


def test_the_manifest_stores_calibration_of_every_score(client, digits) -> None:
    for model in (ARCNN, PPCA, VAE, FLOW, EBM):
        manifest = client.info(model).manifest
        entries = {c.score: c for c in manifest.calibration}
        assert set(entries) == {"log_prob", *(k.name for k in manifest.score_kinds)}, model
        for c in entries.values():
            assert tuple(c.probabilities) == PROBABILITIES and len(c.probabilities) >= 101
            assert (np.diff(c.quantiles) >= 0).all() and c.rows == len(digits.val) and c.seed == SEED
            assert "validation split" in c.data
    noise = {m: client.info(m).manifest.calibration[0].noise for m in (ARCNN, VAE, FLOW)}
    assert noise[ARCNN].startswith("none") and "importance" in noise[VAE] and "dequantisation" in noise[FLOW]


# ---- OIP outputs, draws, streams, the other clients ---------------------------------------------------------

def test_oip_outputs_equal_genserve_by_parameter_or_by_name(client, oip, oip_http, digits) -> None:
    x = digits.test[:7]
    want = client.log_likelihood(ARCNN, x, seed=3, scores=["min_z"], percentile=True, per_dimension=True)
    by_name = oip_infer(oip, ARCNN, x, {"seed": 3}, ("log_prob", "score_min_z", "percentile", "percentile_min_z",
                                                     "per_dimension"))
    by_param = oip_infer(oip, ARCNN, x, {"seed": 3, "scores": "min_z", "percentile": True, "per_dimension": True})
    t = httpclient.InferInput("x", list(x.shape), "FP32")
    t.set_data_from_numpy(x.astype(np.float32), binary_data=True)
    over_http = oip_http.infer(f"{ARCNN}.log_likelihood", [t],
                               parameters={"seed": 3, "scores": "min_z", "percentile": True, "per_dimension": True})
    for answer in (by_name, by_param, over_http):
        np.testing.assert_array_equal(answer.as_numpy("score_min_z"), want.scores["min_z"])
        np.testing.assert_array_equal(answer.as_numpy("percentile"), want.percentiles["log_prob"])
        np.testing.assert_array_equal(answer.as_numpy("percentile_min_z"), want.percentiles["min_z"])
        np.testing.assert_array_equal(answer.as_numpy("per_dimension"), want.per_dimension)
    plain = oip_infer(oip, ARCNN, x, {"seed": 3})
    assert plain.as_numpy("score_min_z") is None and plain.as_numpy("per_dimension") is None
    outputs = {o.name for o in oip.get_model_metadata(f"{ARCNN}.log_likelihood").outputs}
    assert {"score_min_z", "percentile", "percentile_typicality", "per_dimension"} <= outputs
    flow_outputs = {o.name for o in oip.get_model_metadata(f"{FLOW}.log_likelihood").outputs}
    assert "per_dimension" not in flow_outputs and "percentile" in flow_outputs


def test_draws_go_through_the_program_option_and_its_cap(client, oip, server, digits) -> None:
    x = digits.test[:10]
    default = int(client.info(FLOW).parameters["dequant_draws"])
    unset = client.log_likelihood(FLOW, x, seed=4)
    two = client.log_likelihood(FLOW, x, seed=4, draws=2)
    assert not np.array_equal(unset.log_prob, two.log_prob)
    if default <= MAX_DRAWS:
        np.testing.assert_array_equal(client.log_likelihood(FLOW, x, seed=4, draws=default).log_prob, unset.log_prob)
    refused_everywhere(client, oip, server.http_port, FLOW, x, {"draws": MAX_DRAWS + 1}, {"draws": MAX_DRAWS + 1},
                       grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", ("draws", str(MAX_DRAWS)))
    refused_everywhere(client, oip, server.http_port, ARCNN, x, {"draws": 2}, {"draws": 2},
                       grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", ("draws", "does not apply"))


def test_score_stream_concatenates_chunk_answers(client, digits) -> None:
    x = digits.test[:250]
    asks = {"scores": ["complexity_ratio", "typicality"], "percentile": True, "per_dimension": True}
    whole = client.score_stream(ARRNN, x, chunk_size=100, progress=False, seed=11, **asks)
    parts = [client.log_likelihood(ARRNN, x[o:o + 100], seed=chunk_seed(11, o), **asks) for o in (0, 100, 200)]
    np.testing.assert_array_equal(whole.per_dimension, np.concatenate([p.per_dimension for p in parts]))
    for name in ("complexity_ratio", "typicality"):
        np.testing.assert_array_equal(whole.scores[name], np.concatenate([p.scores[name] for p in parts]))
    for name in ("log_prob", "complexity_ratio", "typicality"):
        np.testing.assert_array_equal(whole.percentiles[name], np.concatenate([p.percentiles[name] for p in parts]))


def test_async_client_and_local_engine_give_the_same_numbers(server, client, repo, digits) -> None:
    x = digits.test[:12]
    asks = {"scores": ["min_z"], "percentile": True, "per_dimension": True}
    want = client.log_likelihood(PPCA, x, seed=6, **asks)

    async def go():
        async with AsyncClient(f"127.0.0.1:{server.port}") as ac:
            return await ac.log_likelihood(PPCA, x, seed=6, **asks)

    got = asyncio.run(go())
    with LocalEngine(repo, models=[PPCA]) as local:
        mine = local.log_likelihood(PPCA, x, seed=6, **asks)
    for other in (got, mine):
        np.testing.assert_array_equal(other.log_prob, want.log_prob)
        np.testing.assert_array_equal(other.scores["min_z"], want.scores["min_z"])
        np.testing.assert_array_equal(other.percentiles["min_z"], want.percentiles["min_z"])
        np.testing.assert_array_equal(other.per_dimension, want.per_dimension)


def test_the_scoring_reasons_are_documented() -> None:
    """docs/errors.md lists the reasons server/scoring.py sends (test_error_details checks the engine's)."""
    import re

    root = Path(__file__).resolve().parents[2]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", (root / "docs" / "errors.md").read_text(), re.M))
    used = set(re.findall(r'reason = "([A-Z_]+)"', (root / "server" / "scoring.py").read_text()))
    assert used == {"NOT_CALIBRATED", "PER_DIMENSION_NOT_SUPPORTED"} and used <= documented
