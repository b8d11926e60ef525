"""A row's outputs do not depend on the rows batched with it: every exported graph, every family, data of 2, 3
and 6 features and the 8x8 digits, through the server's session runner (make_session + run_session, what the
batcher calls), on the CPU provider with one intra-op thread (the server's default).

Each row is run alone, then at every position of full batches of 1, 3, 7, 33 and 64 rows; the outputs must be
equal bit for bit. Before the load-time rewrite (server/graph_rewrite.py) pPCA ``log_prob``, RealNVP ``forward``
and VAE ``log_weights`` failed this on 6-feature data (ReduceSum rows summed in an order set by their
alignment) and VAE ``log_weights`` on 2- and 3-feature data too (Log's scalar tail). The rewrite itself is
checked on hand-made graphs below: the unfixed graph shows the dependence, the rewritten one does not.

The continuous-data models are trained for a few steps on seeded Gaussian mixtures and exported with the
public functions, once; they are cached under .pytest_cache keyed like the shared repository (conftest).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_batcher import graph_feeds, same_bits

from genserve.core.manifest import read_manifest
from genserve.server.graph_rewrite import TAIL_SENSITIVE, row_independent_model
from genserve.server.sessions import ROW_MULTIPLE, Session, SessionOptions, make_session, run_session
from genserve.training.registry import MODELS

ROWS = 64
BATCH_SIZES = (1, 3, 7, 33, 64)
WIDTHS = {"moons": 2, "gmm3": 3, "gmm6": 6}
"""Continuous data sets by the number of features: the built-in moons, and seeded mixtures written as .npy."""
CPU = SessionOptions(provider="cpu", intra_op_threads=1)


def _conftest():
    """tests/server/conftest.py as a module (its export helpers), by path: every test folder has a conftest."""
    spec = importlib.util.spec_from_file_location("genserve_server_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mixture(features: int, rows: int = 1200, seed: int = 0) -> np.ndarray:
    """Four correlated Gaussian clusters in ``features`` dimensions (float32)."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((4, features))
    mixing = 0.5 * rng.standard_normal((features, features))
    return (centres[rng.integers(0, 4, rows)] + rng.standard_normal((rows, features)) @ mixing).astype(np.float32)


@pytest.fixture(scope="module")
def continuous_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<data>-<model>`` for every registered family on every data set of WIDTHS; a failed export fails here."""
    conftest = _conftest()
    cache = Path(request.config.cache.mkdir("genserve_row_independence"))
    repo = tmp_path_factory.mktemp("continuous")
    failed = {}
    for data, width in WIDTHS.items():
        dataset = "moons"
        if data != "moons":
            dataset = str(cache / f"{data}.npy")
            np.save(dataset, mixture(width))
        digest = hashlib.sha256(Path(dataset).read_bytes() if data != "moons" else b"").hexdigest()[:8]
        for model in MODELS:
            name = f"{data}-{model}"
            cached = cache / f"{name}-{conftest._cache_key(model, dataset)}-{digest}"
            if not (cached / name).is_dir():
                build = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=cache))
                try:
                    conftest.export_model(model, dataset, build, name)
                except Exception as e:  # collected, so that one run names every combination that fails
                    shutil.rmtree(build, ignore_errors=True)
                    failed[name] = f"{type(e).__name__}: {str(e)[:500]}"
                    continue
                for old in cache.glob(f"{name}-*"):
                    shutil.rmtree(old, ignore_errors=True)
                build.rename(cached)
            shutil.copytree(cached / name, repo / name)
    if failed:
        raise RuntimeError("models failed to train or export:\n" + "\n".join(f"{k}: {v}" for k, v in failed.items()))
    return repo


def check_graph(folder: Path, graph_name: str) -> list[str]:
    """Each of ROWS rows alone vs at every position of full batches of every size; the rows that differ."""
    manifest = read_manifest(folder / "manifest.json")
    graph = next(g for g in manifest.graphs if g.name == graph_name)
    session = make_session(folder / graph.file, CPU)
    names = [o.name for o in session.get_outputs()]

    def run(feeds):  # as the batcher's runner calls it: cached output names, CPU
        return run_session(session, feeds, names, False)

    feeds = graph_feeds(manifest, graph, ROWS, seed=7)
    alone = [run({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(ROWS)]
    problems = []
    for size in BATCH_SIZES:
        calls = -(-ROWS // size)
        for shift in range(size):
            # Batch k holds rows k*size - shift, ... (cyclically): over the shifts, every row takes every position.
            for k in range(calls):
                rows = (np.arange(size) + k * size - shift) % ROWS
                out = run({n: v[rows] for n, v in feeds.items()})
                for position, i in enumerate(rows):
                    row = {n: v[position:position + 1] for n, v in out.items()}
                    if not same_bits(row, alone[i]):
                        problems.append(f"row {i} at position {position} of {size}")
    return problems


def graph_names(folder: Path) -> list[str]:
    return [g.name for g in read_manifest(folder / "manifest.json").graphs]


@pytest.mark.parametrize("data", list(WIDTHS))
@pytest.mark.parametrize("model", list(MODELS))
def test_every_graph_on_continuous_data_is_row_independent(continuous_repo: Path, data: str, model: str) -> None:
    folder = continuous_repo / f"{data}-{model}" / "1"
    for g in graph_names(folder):
        problems = check_graph(folder, g)
        assert not problems, f"{data}-{model}/{g} ({WIDTHS[data]} features): {len(problems)} differ: {problems[:5]}"


@pytest.mark.parametrize("model", list(MODELS))
def test_every_graph_on_digits_is_row_independent(repo_dir: Path, model: str) -> None:
    folder = repo_dir / f"digits-{model}" / "1"
    for g in graph_names(folder):
        problems = check_graph(folder, g)
        assert not problems, f"digits-{model}/{g}: {len(problems)} differ: {problems[:5]}"


# ---- the rewrite on hand-made graphs: the dependence it removes, and that it changes nothing else ----------

def tiny_model(op: str, width: int, value_info: bool = True) -> bytes:
    """x (rows, width) -> Mul by 1 (so that the op reads an internal buffer) -> ``op`` -> y."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", width])
    inits = [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [-1])]
    nodes = [helper.make_node("Mul", ["x", "one"], ["m"])]
    if op.startswith("Reduce"):
        nodes.append(helper.make_node(op, ["m", "axes"], ["y"], keepdims=0))
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows"])
    else:
        nodes.append(helper.make_node(op, ["m"], ["y"]))
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", width])
    infos = [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["rows", width])] if value_info else []
    graph = helper.make_graph(nodes, op, [x], [y], inits, value_info=infos)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def rows_that_differ(run, x: np.ndarray) -> int:
    """How many rows of ``x`` differ between alone and batches of 3, 7 and all."""
    alone = np.concatenate([run(x[i:i + 1]) for i in range(len(x))])
    bad = np.zeros(len(x), bool)
    for size in (3, 7, len(x)):
        out = np.concatenate([run(x[a:a + size]) for a in range(0, len(x), size)])
        bad |= (out.reshape(len(x), -1) != alone.reshape(len(x), -1)).any(axis=1)
    return int(bad.sum())


def plain_run(model: bytes):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


@pytest.mark.parametrize("op, width", [("ReduceSum", 6), ("ReduceSum", 7), ("ReduceMean", 6), ("Log", 2),
                                       ("Log", 6), ("Softplus", 3)])
def test_the_rewrite_removes_the_dependence_onnx_runtime_shows(op: str, width: int, tmp_path: Path) -> None:
    x = (np.random.default_rng(0).random((64, width)) + 0.5).astype(np.float32)
    model = tiny_model(op, width)
    assert rows_that_differ(plain_run(model), x) > 0, "ONNX Runtime no longer shows it: the rewrite may go"
    rewrite = row_independent_model(model)
    reduction = op.startswith("Reduce")
    assert (rewrite.reductions, rewrite.elementwise, rewrite.unfixed) == ((1, 0, ()) if reduction else (0, 1, ()))
    onnx.checker.check_model(onnx.load_from_string(rewrite.model), full_check=True)
    (tmp_path / "g.onnx").write_bytes(model)
    session = make_session(tmp_path / "g.onnx", CPU)
    assert session.row_multiple == 1
    assert rows_that_differ(lambda b: run_session(session, {"x": b})["y"], x) == 0
    np.testing.assert_allclose(run_session(session, {"x": x})["y"], plain_run(model)(x), rtol=1e-6)


def test_a_tail_sensitive_node_of_unknown_shape_is_padded_with_rows_instead(tmp_path: Path) -> None:
    """Without a value info for Log's input the rewrite cannot pad its last axis: the session pads the rows of
    each call to ROW_MULTIPLE instead, and cuts them off again."""
    x = (np.random.default_rng(1).random((64, 6)) + 0.5).astype(np.float32)
    model = tiny_model("Log", 6, value_info=False)
    assert row_independent_model(model).unfixed == ("y",)
    (tmp_path / "g.onnx").write_bytes(model)
    session = make_session(tmp_path / "g.onnx", CPU)
    assert isinstance(session, Session) and session.row_multiple == ROW_MULTIPLE
    assert run_session(session, {"x": x[:3]})["y"].shape == (3, 6)
    assert rows_that_differ(lambda b: run_session(session, {"x": b})["y"], x) == 0


@pytest.mark.parametrize("op", ["Exp", "Tanh", "Sigmoid", "Erf", "Sqrt"])
def test_mlas_element_wise_kernels_need_no_rewrite(op: str) -> None:
    """The reason TAIL_SENSITIVE is short: these are computed the same way in the tail (MLAS)."""
    assert op not in TAIL_SENSITIVE
    x = (np.random.default_rng(2).random((64, 6)) + 0.5).astype(np.float32)
    model = tiny_model(op, 6)
    assert row_independent_model(model).model is model
    assert rows_that_differ(plain_run(model), x) == 0


def test_graphs_without_anything_to_rewrite_come_back_as_the_same_bytes(repo_dir: Path) -> None:
    folder = repo_dir / "digits-ppca" / "1"
    data = (folder / "generator.onnx").read_bytes()
    assert row_independent_model(data).model is data
