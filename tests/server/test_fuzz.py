"""Property-based fuzzing (hypothesis) of the request messages and of the repository loader.

Requests: random messages for every RPC (random bytes in Tensor.data, random shapes and dtypes, random n,
temperature, Langevin and importance settings, seeds and model names, and raw bytes that are not protobuf at
all) go to one running server. Every answer is OK or a documented status, never INTERNAL or UNKNOWN; every call
ends within its deadline; nothing is logged at ERROR.

Loader: damaged manifests (random JSON mutations, truncations, wrong types) and damaged graphs (truncated or
bit-flipped .onnx, with and without a matching sha256 in the manifest) are loaded by a running engine beside a
healthy model: the damaged model is READY (the damage was harmless) or FAILED with a message, the healthy one
keeps serving, and nothing is logged at ERROR.

Under CI (CI=true) the examples are derandomized, so a run is reproducible; locally each run explores anew.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.core.tensors import DTYPES, to_proto
from genserve.server.app import BackgroundServer
from genserve.server.config import ServerConfig
from genserve.v1 import service_pb2 as pb
from genserve.v1 import service_pb2_grpc

DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.UNAVAILABLE}
"""Statuses a request may end with (API docs); INTERNAL, UNKNOWN and DEADLINE_EXCEEDED (a hang) may not."""
CALL_TIMEOUT = 20.0
LIMITS = {"max_sample_n": 64, "max_rows_per_request": 64, "max_langevin_steps": 20,
          "max_importance_samples": 8, "max_message_mb": 2}
SETTINGS = {"deadline": None, "derandomize": os.environ.get("CI") == "true", "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large]}


class ErrorLog(logging.Handler):
    """Keeps the ERROR records of every logger (the server runs in this process)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        out = [f"{r.name}: {r.getMessage()}" for r in self.records]
        self.records.clear()
        return out


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def server(repo_dir: Path, errors: ErrorLog) -> Iterator[BackgroundServer]:
    cfg = ServerConfig(repo=repo_dir, port=0, metrics_port=0, provider="cpu", workers=2, **LIMITS)
    with BackgroundServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}",
                               options=[("grpc.max_send_message_length", 16 * 2**20)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def model_names(repo_dir: Path) -> list[str]:
    return sorted(p.name for p in repo_dir.iterdir() if p.is_dir())


# -- strategies ---------------------------------------------------------------------------------------------

INT64 = st.one_of(st.integers(-3, 70), st.sampled_from([-(2**63), 2**31, 2**63 - 1, 65, 1000]),
                  st.integers(-(2**63), 2**63 - 1))
INT32 = st.one_of(st.integers(-3, 30), st.integers(-(2**31), 2**31 - 1))
FLOATS = st.one_of(st.floats(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 1e-300, 1e300, 100.0, 100.0001]))
DIMS = st.one_of(st.integers(0, 9), st.integers(-3, 2**20), st.sampled_from([2**31, 2**40, 2**62]))


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    """Well-formed arrays of plausible shapes (some values NaN, inf, out of range), or random fields."""
    if draw(st.booleans()):
        rows = draw(st.integers(0, 5))
        tail = draw(st.sampled_from([(8, 8), (2,), (16,), (64,), (8, 7), (), (8, 8, 1), (32,), (1,)]))
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        values = draw(st.lists(st.one_of(st.integers(-2, 18).map(float), FLOATS), min_size=1, max_size=8))
        flat = np.resize(np.array(values, dtype=np.float64), rows * math.prod(tail))
        with np.errstate(all="ignore"):
            array = flat.astype(DTYPES[dtype].newbyteorder("="))
        return to_proto(array.reshape(rows, *tail))
    return pb.Tensor(shape=draw(st.lists(DIMS, max_size=6)),
                     dtype=draw(st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=10))),
                     data=draw(st.binary(max_size=2048)))


def optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


@st.composite
def requests(draw: st.DrawFn, names: list[str]) -> tuple[str, Any]:
    rpc = draw(st.sampled_from(["ListModels", "GetModel", "Sample", "SampleStream", "LogLikelihood",
                                "LogLikelihoodStream", "Encode", "Decode", "raw"]))
    model = draw(st.one_of(st.sampled_from(names), st.text(max_size=40), st.just("")))
    version = draw(st.one_of(st.just(0), st.integers(-2, 3), INT64))
    seed = draw(optional(st.integers(0, 2**64 - 1)))
    common = {"model": model, "version": version, **({} if seed is None else {"seed": seed})}
    if rpc == "ListModels":
        return rpc, pb.ListModelsRequest()
    if rpc == "GetModel":
        return rpc, pb.GetModelRequest(model=model, version=version)
    if rpc in ("Sample", "SampleStream"):
        fields = {"n": draw(INT64), "return_latents": draw(st.booleans())}
        for name, strategy in (("temperature", FLOATS), ("langevin_steps", INT32), ("langevin_step_size", FLOATS)):
            value = draw(optional(strategy))
            if value is not None:
                fields[name] = value
        sample = pb.SampleRequest(**common, **fields)
        if rpc == "Sample":
            return rpc, sample
        return rpc, pb.SampleStreamRequest(sample=sample, chunk_size=draw(INT64))
    if rpc == "raw":
        method = draw(st.sampled_from(["Sample", "LogLikelihood", "Encode", "Decode", "GetModel"]))
        return rpc, (method, draw(st.binary(max_size=512)))
    extra: dict[str, Any] = {}
    tensor = draw(optional(tensors()))
    field = "z" if rpc == "Decode" else "x"
    if tensor is not None:
        extra[field] = tensor
    if rpc in ("Encode", "Decode"):
        extra["sample"] = draw(st.booleans())
        return rpc, getattr(pb, f"{rpc}Request")(**common, **extra)
    k = draw(optional(INT32))
    if k is not None:
        extra["importance_samples"] = k
    request = pb.LogLikelihoodRequest(**common, **extra)
    if rpc == "LogLikelihood":
        return rpc, request
    more = draw(st.lists(st.builds(lambda t: pb.LogLikelihoodRequest(model=model, x=t), tensors()), max_size=2))
    return rpc, [request, *more]


def send(channel: grpc.Channel, rpc: str, request: Any) -> grpc.StatusCode:
    stub = service_pb2_grpc.GenerativeServiceStub(channel)
    try:
        if rpc == "raw":
            method, data = request
            channel.unary_unary(f"/genserve.v1.GenerativeService/{method}", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)(data, timeout=CALL_TIMEOUT)
        elif rpc == "SampleStream":
            list(stub.SampleStream(request, timeout=CALL_TIMEOUT))
        elif rpc == "LogLikelihoodStream":
            list(stub.LogLikelihoodStream(iter(request), timeout=CALL_TIMEOUT))
        else:
            getattr(stub, rpc)(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_random_requests_get_documented_statuses(channel: grpc.Channel, model_names: list[str],
                                                 errors: ErrorLog) -> None:
    errors.take()
    seen: dict[str, int] = {}

    @settings(max_examples=400, **SETTINGS)
    @given(case=requests(model_names))
    def check(case: tuple[str, Any]) -> None:
        rpc, request = case
        code = send(channel, rpc, request)
        seen[code.name] = seen.get(code.name, 0) + 1
        assert code in DOCUMENTED, f"{rpc} answered {code}: {request!r}"[:2000]
        logged = errors.take()
        assert not logged, f"{rpc} logged errors: {logged}"

    check()
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= set(seen), seen  # the fuzzer reached real work and errors
    ok = service_pb2_grpc.GenerativeServiceStub(channel).Sample(pb.SampleRequest(model="digits-ppca", n=2), timeout=10)
    assert ok.samples.shape == [2, 8, 8]


# -- the repository loader ----------------------------------------------------------------------------------

VICTIM = "victim"
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                                     st.floats(allow_nan=False), st.text(max_size=12)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indices) into a JSON value."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def damaged_manifests(draw: st.DrawFn, original: dict) -> bytes:
    kind = draw(st.sampled_from(["replace", "delete", "truncate", "bytes", "retype"]))
    text = json.dumps(original, indent=2)
    if kind == "truncate":
        return text[:draw(st.integers(0, len(text) - 1))].encode()
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    doc = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        targets = [p for p in paths(doc) if p]
        if not targets:
            break
        path = draw(st.sampled_from(targets))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if kind == "delete":
            del parent[path[-1]]
        elif kind == "retype":  # the same value in another JSON type
            old = parent[path[-1]]
            parent[path[-1]] = draw(st.sampled_from([str(old), [old], {"v": old}, None, True, -1, 1e308]))
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return json.dumps(doc).encode()


@pytest.fixture(scope="module")
def loader(repo_dir: Path, tmp_path_factory: pytest.TempPathFactory, errors: ErrorLog):
    """An engine over a repository of digits-ppca (healthy) and a copy of it named ``victim`` to damage; its
    event loop runs in this thread, one example at a time."""
    from genserve.core.manifest import read_manifest, write_manifest
    from genserve.server.engine import Engine

    repo = tmp_path_factory.mktemp("fuzzrepo")
    shutil.copytree(repo_dir / "digits-ppca", repo / "digits-ppca")
    shutil.copytree(repo_dir / "digits-ppca", repo / VICTIM)
    folder = repo / VICTIM / "1"
    manifest = read_manifest(folder / "manifest.json")
    manifest.name = VICTIM
    write_manifest(manifest, folder / "manifest.json")
    pristine = {p.name: p.read_bytes() for p in folder.iterdir()}
    loop = asyncio.new_event_loop()
    engine = Engine(ServerConfig(repo=repo, port=0, metrics_port=0, provider="cpu", workers=1))
    loop.run_until_complete(engine.start())
    yield loop, engine, folder, pristine
    loop.run_until_complete(engine.stop())
    loop.close()


def reload_and_check(loader: tuple, errors: ErrorLog, damage: dict[str, bytes]) -> str:
    """Restore the victim, apply ``damage`` (file name -> bytes), reload; the victim is READY or FAILED with a
    message, digits-ppca still samples, nothing was logged at ERROR. Returns the victim's state."""
    loop, engine, folder, pristine = loader
    for name, data in {**pristine, **damage}.items():
        (folder / name).write_bytes(data)
    os.utime(folder / "manifest.json")  # a new mtime even when the bytes are back to the original
    result = loop.run_until_complete(engine.reload())
    status = {s.name: s for s in result.models}
    victim = status[VICTIM]
    assert victim.state in ("READY", "FAILED"), victim
    failed = [e for e in result.errors if e.model == VICTIM]
    if victim.state == "FAILED" or failed:
        # A damaged version that replaces a loaded one leaves the loaded one serving (READY) and says why.
        assert failed and failed[0].message.strip() and victim.message.strip(), "a failed load must say why"
    assert status["digits-ppca"].state == "READY"
    from genserve.server.interface import SampleRequest

    request = SampleRequest(engine.resolve("digits-ppca", 0, "sample"), 2, 1)
    x, _, _ = loop.run_until_complete(engine.sample(request))
    assert x.shape == (2, 8, 8)
    logged = errors.take()
    assert not logged, logged
    return "FAILED" if failed else victim.state


def test_damaged_manifests_fail_that_model_alone(loader: tuple, errors: ErrorLog) -> None:
    errors.take()
    original = json.loads(loader[3]["manifest.json"])
    states: dict[str, int] = {}

    @settings(max_examples=200, **SETTINGS)
    @given(data=damaged_manifests(original))
    def check(data: bytes) -> None:
        state = reload_and_check(loader, errors, {"manifest.json": data})
        states[state] = states.get(state, 0) + 1

    check()
    assert states.get("FAILED"), states
    assert reload_and_check(loader, errors, {}) == "READY"


def test_a_default_option_out_of_range_fails_that_model_at_load_not_at_every_request(loader: tuple,
                                                                                     errors: ErrorLog) -> None:
    """A manifest whose own default for an option lies outside the range a request may ask for (1e9
    dequantisation draws, infinity, a fraction, zero) fails to load, naming the parameter, instead of loading
    and then running forever at warm-up or at every request that leaves the option unset (a fuzzed manifest
    with a huge dequant_draws once held the reload up until the test's timeout)."""
    errors.take()
    original = json.loads(loader[3]["manifest.json"])
    for bad in (1e9, "Infinity", 2.5, 0):  # "Infinity": protobuf JSON's spelling of a double's infinity
        doc = json.loads(json.dumps(original))
        doc["parameters"]["dequant_draws"] = bad
        assert reload_and_check(loader, errors, {"manifest.json": json.dumps(doc).encode()}) == "FAILED", bad
        victim = next(s for s in loader[1].list_models() if s.name == VICTIM)
        assert "'dequant_draws'" in victim.message and "re-export" in victim.message, (bad, victim.message)
    assert reload_and_check(loader, errors, {}) == "READY"


def test_damaged_score_numbers_fail_that_model_at_load_not_at_every_scored_request(loader: tuple,
                                                                                   errors: ErrorLog) -> None:
    """A manifest whose fitted score numbers or calibration are damaged (a NaN, a spread of zero, an unknown
    reference model, a missing table entry, quantiles that do not pair with their probabilities) fails to load,
    naming what is wrong, instead of loading and giving NaN or infinite scores, or an error, to every request
    that asks for those kinds or percentiles."""
    errors.take()
    original = json.loads(loader[3]["manifest.json"])
    logq = next(k for k in original["parameters"] if ".logq." in k)

    def params(**changes: Any) -> dict:
        doc = json.loads(json.dumps(original))
        doc["parameters"].update(changes)
        return doc

    dropped = json.loads(json.dumps(original))
    del dropped["parameters"][logq]
    unpaired = json.loads(json.dumps(original))
    unpaired["calibration"][0]["quantiles"] = unpaired["calibration"][0]["quantiles"][:-1]
    reversed_ = json.loads(json.dumps(original))
    reversed_["calibration"][1]["quantiles"].reverse()
    cases = [(params(**{"score.typicality_row.std": 0.0}), "'score.typicality_row.std' is 0.0"),
             (params(**{"score.min_z.ratio_mean": "NaN"}), "'score.min_z.ratio_mean' is nan"),
             (params(**{"score.complexity_ratio.reference": 99.0}), "score kind 'complexity_ratio'"),
             (dropped, "score kind 'complexity_ratio'"),
             (unpaired, f"calibration of {original['calibration'][0]['score']!r}"),
             (reversed_, f"calibration of {original['calibration'][1]['score']!r}")]
    for doc, message in cases:
        assert reload_and_check(loader, errors, {"manifest.json": json.dumps(doc).encode()}) == "FAILED", message
        victim = next(s for s in loader[1].list_models() if s.name == VICTIM)
        assert message in victim.message and "re-export" in victim.message, (message, victim.message)
    assert reload_and_check(loader, errors, {}) == "READY"


def test_a_graph_whose_names_are_not_utf8_fails_that_model_alone(loader: tuple, errors: ErrorLog) -> None:
    """A damaged graph that ONNX Runtime loads but whose axis names are not UTF-8 (a bit flip a clean-clone CI's
    fuzzing drew, with the manifest's sha256 updated to match) fails that version's load with a message; reading
    its signature once raised UnicodeDecodeError, an unexpected error logged at ERROR."""
    import hashlib

    errors.take()
    pristine = loader[3]
    doc = json.loads(pristine["manifest.json"])
    graph = doc["graphs"][0]
    damaged = pristine[graph["file"]].replace(b"batch", b"\xe2atch")
    assert damaged != pristine[graph["file"]]
    graph["sha256"] = hashlib.sha256(damaged).hexdigest()
    damage = {graph["file"]: damaged, "manifest.json": json.dumps(doc).encode()}
    assert reload_and_check(loader, errors, damage) == "FAILED"
    victim = next(s for s in loader[1].list_models() if s.name == VICTIM)
    assert "cannot load" in victim.message and "utf-8" in victim.message, victim.message
    assert reload_and_check(loader, errors, {}) == "READY"


@st.composite
def damaged_graphs(draw: st.DrawFn, graphs: dict[str, bytes]) -> tuple[str, bytes, bool]:
    """(graph file, damaged bytes, whether the manifest's sha256 is updated to match them)."""
    name = draw(st.sampled_from(sorted(graphs)))
    data = bytearray(graphs[name])
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data) - 1))]
    else:
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    return name, bytes(data), draw(st.booleans())


def test_damaged_graphs_fail_that_model_alone(loader: tuple, errors: ErrorLog) -> None:
    """Truncated or bit-flipped ONNX files. With the manifest's sha256 left alone the hash check refuses
    them; with a matching sha256 (a bad export) ONNX Runtime's parser must refuse them or load them,
    never crash the process."""
    import hashlib

    errors.take()
    pristine = loader[3]
    original = json.loads(pristine["manifest.json"])
    graphs = {k: v for k, v in pristine.items() if k.endswith(".onnx")}
    states: dict[str, int] = {}

    @settings(max_examples=150, **SETTINGS)
    @given(case=damaged_graphs(graphs))
    def check(case: tuple[str, bytes, bool]) -> None:
        name, data, rehash = case
        damage = {name: data}
        if rehash:
            doc = copy.deepcopy(original)
            for g in doc["graphs"]:
                if g["file"] == name:
                    g["sha256"] = hashlib.sha256(data).hexdigest()
            damage["manifest.json"] = json.dumps(doc).encode()
        state = reload_and_check(loader, errors, damage)
        states[state] = states.get(state, 0) + 1

    check()
    assert states.get("FAILED"), states
    assert reload_and_check(loader, errors, {}) == "READY"
