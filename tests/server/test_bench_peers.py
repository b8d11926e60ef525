"""benchmarks/peers without the peers: the graph the peers would serve, the OIP client loop against a real
genserve server, the ratio arithmetic, and the CLI with genserve alone and with a peer that cannot run.

Functional checks only (answers equal, counts positive, arithmetic exact); speed is shown in BENCHMARKS.md,
never asserted here. Nothing here installs a peer or needs the network.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the repository, not an installed package

from benchmarks.peers import __main__ as cli  # noqa: E402
from benchmarks.peers import perfanalyzer, summary, treecpu  # noqa: E402
from benchmarks.peers.graph import peer_graph  # noqa: E402
from benchmarks.peers.launch import PeerServer, PeerUnavailable  # noqa: E402
from benchmarks.peers.oipload import OipLoad, infer_once, infer_request  # noqa: E402
from benchmarks.serverproc import repo_variant  # noqa: E402
from genserve.server.app import BackgroundServer  # noqa: E402
from genserve.server.config import ServerConfig  # noqa: E402

MODEL = "digits-realnvp"


@pytest.fixture(scope="module")
def server(repo_dir: Path):
    cfg = ServerConfig(repo=repo_dir, host="127.0.0.1", port=0, metrics_port=0, provider="cpu", intra_op_threads=1,
                       max_batch_size=64, max_queue_delay_ms=2.0, workers=2, grace_s=5.0)
    with BackgroundServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """Eight real digits in raw units (integer levels 0..16), shape (8, 8, 8)."""
    return np.random.default_rng(0).integers(0, 17, size=(8, 8, 8)).astype(np.float32)


def test_peer_graph_answers_what_genserve_answers(server: BackgroundServer, repo_dir: Path, tmp_path: Path,
                                                   digits: np.ndarray) -> None:
    graph = peer_graph(repo_dir, MODEL, "encode", tmp_path)
    assert (graph.input, graph.outputs, graph.row_shape) == ("x", ["z"], [8, 8])
    assert graph.constants == {"u": (0.5, [64])}  # the centre of each cell, as genserve's encode feeds it
    want = cli.reference(graph, tmp_path, digits)
    target = f"127.0.0.1:{server.port}"
    got = infer_once(target, infer_request(graph.oip_name, "x", digits))
    np.testing.assert_allclose(got["z"], want["z"], atol=1e-5)
    assert cli.check_answer(target, graph.oip_name, graph, digits, want, 1e-4) is None
    wrong = cli.check_answer(target, "no-such-model.encode", graph, digits, want, 1e-4)
    assert wrong is not None and "no-such-model" in wrong  # the server's message names what was missing
    shifted = {"z": want["z"] + 1.0}
    assert "differs" in cli.check_answer(target, graph.oip_name, graph, digits, shifted, 1e-4)


def test_peer_graph_refuses_what_is_not_one_graph_call(repo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not one graph call"):
        peer_graph(repo_dir, MODEL, "log_likelihood", tmp_path)
    with pytest.raises(ValueError, match="no version folder"):
        peer_graph(repo_dir, "no-such-model", "encode", tmp_path)


def test_oip_load_loop_against_genserve(server: BackgroundServer, digits: np.ndarray) -> None:
    target = f"127.0.0.1:{server.port}"
    edges: list[int] = []
    with OipLoad(processes=2) as load:
        m = load.measure(target, infer_request(f"{MODEL}.encode", "x", digits[:2]), clients=3, warmup_s=0.2,
                         window_s=1.0, at_edges=edges.append)
        assert edges == [0, 1]
        assert m.errors == {} and m.empty_answers == 0
        assert len(m.latencies_s) > 0 and m.rps > 0 and (m.latencies_s > 0).all()
        assert m.percentile_ms(50) <= m.percentile_ms(99)
        bad = load.measure(target, infer_request("no-such-model.encode", "x", digits[:1]), clients=1,
                           warmup_s=0.0, window_s=0.5)
    assert len(bad.latencies_s) == 0 and bad.errors.get("NOT_FOUND", 0) > 0


def test_oip_load_spreads_its_clients_over_its_connections() -> None:
    """Each load process opens its own TCP connections (a server of N processes on one port gets them spread)."""
    import threading
    from concurrent import futures

    import grpc

    from benchmarks.peers.oipload import INFER

    peers: set[str] = set()
    lock = threading.Lock()

    def infer(request: bytes, context: grpc.ServicerContext) -> bytes:
        with lock:
            peers.add(context.peer())
        return b"answer"

    service, method = INFER.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(infer)})
    server = grpc.server(futures.ThreadPoolExecutor(8), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with OipLoad(processes=1, connections=3) as load:
            m = load.measure(f"127.0.0.1:{port}", b"request", clients=6, warmup_s=0.1, window_s=0.5)
    finally:
        server.stop(None)
    assert m.errors == {} and len(m.latencies_s) > 0
    assert len(peers) == 3  # six clients over three connections: three client ports
    with pytest.raises(ValueError, match="connections"):
        OipLoad(processes=1, connections=0)


def _sample(k: int, server: str, rows: int, clients: int, rps: float, p99: float) -> dict:
    return {"round": k, "server": server, "rows": rows, "clients": clients, "rps": rps, "p50_ms": p99 / 2,
            "p99_ms": p99, "errors": {}, "server_cores": 0.5, "load1": 0.1}


def test_summary_takes_the_per_round_ratio_to_the_best_peer() -> None:
    samples = []
    for k, (g, a, b) in enumerate([(300.0, 100.0, 200.0), (330.0, 150.0, 100.0), (100.0, 120.0, 100.0)]):
        samples += [_sample(k, "genserve", 1, 8, g, 10.0), _sample(k, "a", 1, 8, a, 20.0),
                    _sample(k, "b", 1, 8, b, 5.0)]
    (cell,) = summary.summarise(samples, ["genserve", "a", "b"], [1], [8])
    # each round against that round's best peer: 300/200 = 1.5, 330/150 = 2.2, 100/120 = 0.83 -> median 1.5
    assert cell["ratio"] == pytest.approx(1.5)
    assert cell["best_peer"] == "a"  # median requests/s: a 120, b 100
    assert cell["ratio_of_medians"] == pytest.approx(300.0 / 120.0)
    assert cell["p99_ratio"] == pytest.approx(0.5)  # genserve's median p99 over a's
    assert cell["servers"]["genserve"]["rps"] == 300.0
    assert cell["servers"]["genserve"]["req_per_cpu_s"] == pytest.approx(600.0)


def test_summary_verdicts_and_markdown_name_a_peer_that_did_not_run() -> None:
    samples = [_sample(0, "genserve", 64, 64, 300.0, 10.0), _sample(0, "kserve", 64, 64, 100.0, 20.0),
               _sample(0, "genserve", 64, 1, 90.0, 2.0), _sample(0, "kserve", 64, 1, 100.0, 1.0)]
    table = summary.summarise(samples, ["genserve", "kserve", "pytriton"], [64], [1, 64])
    one, many = table
    assert one["verdict"].startswith("missed") and one["ratio"] == pytest.approx(0.9)
    assert many["verdict"] == "met" and many["ratio"] == pytest.approx(3.0) and many["p99_ratio"] == 0.5
    assert summary.verdict(8, 2.0, 1.2).startswith("missed (p99")
    assert summary.verdict(8, 1.4, 0.5) == "missed (1.40x < 1.5x)"
    assert summary.verdict(16, 9.0, 0.1) == "no target" and summary.verdict(8, math.nan, 1.0) == "no peer measured"
    text = summary.markdown(table, ["genserve", "kserve", "pytriton"], {"pytriton": "install failed: no wheel"})
    assert "| 64 | 64 | pytriton | not run: install failed: no wheel |" in text
    assert "**genserve / best peer (kserve)** | **3.00x**" in text


def test_a_genserve_variant_is_never_the_best_peer_and_gets_its_own_ratio() -> None:
    samples = []
    for k, (g, v, a) in enumerate([(100.0, 160.0, 100.0), (90.0, 200.0, 100.0)]):
        samples += [_sample(k, "genserve", 1, 1, g, 4.0), _sample(k, "genserve-2p", 1, 1, v, 2.0),
                    _sample(k, "a", 1, 1, a, 3.0)]
    (cell,) = summary.summarise(samples, ["genserve", "genserve-2p", "a"], [1], [1])
    assert cell["best_peer"] == "a"  # the variant is faster, but it is genserve, not a peer
    assert cell["ratio"] == pytest.approx(0.95)  # (100/100 + 90/100) / 2
    assert cell["verdict"].startswith("missed")
    variant = cell["variants"]["genserve-2p"]
    assert variant["ratio"] == pytest.approx(1.8)  # (160/100 + 200/100) / 2
    assert variant["verdict"] == "met" and variant["p99_ratio"] == pytest.approx(2.0 / 3.0)
    text = summary.markdown([cell], ["genserve", "genserve-2p", "a"], {})
    assert "**genserve-2p / best peer (a)** | **1.80x**" in text
    assert cli.variant_flags("idle=--inline-idle-call-us 8000 --no-warmup") == (
        "genserve-idle", {"--inline-idle-call-us": "8000", "--no-warmup": None})
    for bad in ("noflags", "Upper=--processes 2", "x=2 --processes", "empty="):
        with pytest.raises(SystemExit):
            cli.variant_flags(bad)


def test_the_grpc_floor_is_never_the_best_peer_and_says_whether_a_target_is_in_reach() -> None:
    """The grpc.aio floor is a reference: never the best peer, its ratio to each round's best peer (median over
    rounds) says whether the cell's target is within reach of a grpc.aio server."""
    samples = []
    for k, (g, floor, a) in enumerate([(100.0, 140.0, 100.0), (90.0, 120.0, 100.0), (110.0, 130.0, 100.0)]):
        samples += [_sample(k, "genserve", 1, 64, g, 4.0), _sample(k, summary.FLOOR, 1, 64, floor, 1.0),
                    _sample(k, "a", 1, 64, a, 3.0)]
    (cell,) = summary.summarise(samples, ["genserve", "a", summary.FLOOR], [1], [64])
    assert cell["best_peer"] == "a" and cell["ratio"] == pytest.approx(1.0)  # the floor is faster, not a peer
    assert cell["floor_ratio"] == pytest.approx(1.3)  # 1.4, 1.2, 1.3
    text = summary.markdown([cell], ["genserve", "a", summary.FLOOR], {})
    assert f"*{summary.FLOOR} / best peer (a)* | *1.30x*" in text
    assert "target out of reach for a grpc.aio server here (the floor is 1.30x < 1.5x)" in text
    assert summary.floor_note(1, 1.3).startswith("within a grpc.aio server's reach")
    assert summary.floor_note(16, 0.5) == "" and summary.floor_note(8, math.nan) == ""
    alone = summary.summarise(samples[:2], ["genserve", summary.FLOOR], [1], [64])[0]
    assert alone["best_peer"] is None and math.isnan(alone["floor_ratio"])  # no peer: nothing to compare


def test_the_grpc_floor_answers_what_the_graph_answers_and_repeats_from_its_table(
        repo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--floor`` serves the graph from a real grpc.aio process: the CLI checks its answer against the graph run
    in-process and measures it beside genserve; a repeated request gets the same bytes, Triton's ModelConfig is
    answered, and a request for another model is refused with INVALID_ARGUMENT."""
    import grpc

    from benchmarks.peers.graph import triton_model_config
    from genserve.oip import grpc_service_pb2 as pb
    from genserve.oip import grpc_service_pb2_grpc as pb_grpc

    out = tmp_path / "peers.json"
    code = cli.main(["--repo", str(repo_dir), "--model", MODEL, "--operation", "encode", "--peers", "", "--floor",
                     "--rows", "2", "--clients", "2", "--rounds", "1", "--processes", "1", "--warmup-s", "0.2",
                     "--window-s", "0.5", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["status"] == {}  # both answered what the graph answers in-process
    measured = {s["server"]: s for s in result["samples"]}
    assert set(measured) == {"genserve", summary.FLOOR}
    assert measured[summary.FLOOR]["requests"] > 0 and measured[summary.FLOOR]["errors"] == {}
    assert f"| 2 | 2 | {summary.FLOOR} |" in capsys.readouterr().out

    graph = peer_graph(repo_dir, MODEL, "encode", tmp_path / "graph")
    x = np.random.default_rng(3).integers(0, 17, size=(3, 8, 8)).astype(np.float32)
    with PeerServer(summary.FLOOR, graph, tmp_path / "floor", 512, 2.0, [3]) as floor:
        request = infer_request(graph.oip_name, graph.input, x)
        with grpc.insecure_channel(floor.target) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            first, second = infer(request, timeout=30), infer(request, timeout=30)
            assert first == second
            answer = pb.ModelInferResponse.FromString(first)
            assert answer.model_name == graph.oip_name and [o.name for o in answer.outputs] == graph.outputs
            assert list(answer.outputs[0].shape) == [3, *graph.output_row_shapes[graph.outputs[0]]]
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = stub.ModelConfig(pb.ModelConfigRequest(name=graph.oip_name), timeout=30)
            assert config.SerializeToString() == triton_model_config(graph, 512)
            assert not stub.ModelReady(pb.ModelReadyRequest(name="other"), timeout=30).ready
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(pb.ModelInferRequest(model_name="other"), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "other" in refused.value.details()


def test_tree_cpu_covers_the_process_and_its_children() -> None:
    with OipLoad(processes=1) as load:
        pids = treecpu.tree(os.getpid())
        assert os.getpid() in pids and set(load.pids()) <= set(pids)
    assert treecpu.cores_between({1: 1.0, 2: 5.0}, {1: 2.0, 3: 9.0}, 2.0) == 0.5  # only pids read twice


def test_mlserver_models_get_their_limit_in_rows(repo_dir: Path, tmp_path: Path) -> None:
    graph = peer_graph(repo_dir, MODEL, "encode", tmp_path)
    ml = PeerServer("mlserver", graph, tmp_path / "ml", max_batch_size=512, delay_ms=2.0, rows=[1, 64])
    assert ml.model_name(1) == f"{MODEL}.encode" and ml.model_name(64) == f"{MODEL}.encode.rows64"
    assert PeerServer("kserve", graph, tmp_path / "ks", 512, 2.0, [1, 64]).model_name(64) == f"{MODEL}.encode"


def test_cli_runs_genserve_alone_and_names_a_peer_that_cannot_run(repo_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    def unavailable(peer: str, log: object = None) -> Path:
        raise PeerUnavailable("simulated: no virtualenv in this test")

    monkeypatch.setattr(cli, "venv", unavailable)
    out = tmp_path / "peers.json"
    code = cli.main(["--repo", str(repo_dir), "--model", MODEL, "--operation", "encode", "--peers", "kserve",
                     "--rows", "2", "--clients", "2", "--rounds", "1", "--processes", "1", "--warmup-s", "0.2",
                     "--window-s", "0.5", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| 2 | 2 | kserve | not run: simulated: no virtualenv in this test |" in text
    assert "no peer measured" in text
    import json

    result = json.loads(out.read_text())
    assert result["status"] == {"kserve": "simulated: no virtualenv in this test"}
    (sample,) = result["samples"]
    assert sample["server"] == "genserve" and sample["requests"] > 0 and sample["errors"] == {}


def test_a_peer_venv_is_reused_while_its_pins_hold_and_a_failed_install_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from benchmarks.peers import launch

    monkeypatch.setattr(launch, "CACHE", tmp_path)
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        raise subprocess.CalledProcessError(1, cmd, output="", stderr="ERROR: No matching distribution\n")

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    (tmp_path / "kserve" / "bin").mkdir(parents=True)
    (tmp_path / "kserve" / "bin" / "python").touch()
    (tmp_path / "kserve" / ".genserve-pins").write_text("\n".join(launch.PINS["kserve"]) + "\n")
    assert launch.venv("kserve") == tmp_path / "kserve" and calls == []  # pins hold: nothing installed
    (tmp_path / "kserve" / ".genserve-pins").write_text("kserve==0.1\n")  # other pins: install again
    with pytest.raises(PeerUnavailable, match="No matching distribution"):
        launch.venv("kserve")
    assert calls and calls[0][-len(launch.PINS["kserve"]):] == launch.PINS["kserve"]


def test_a_variants_per_model_flags_are_not_overruled_by_the_copied_config_json(repo_dir: Path,
                                                                              tmp_path: Path) -> None:
    """config.json outranks the server's flags, so a variant's copy loses the per-model settings its flags set
    (``--instances 2`` would otherwise meet ``"instances": 1`` and be ignored), while the sweep's own settings
    stay for everything else; flags that are not per-model settings drop nothing."""
    serving = {"max_batch_size": 512, "max_queue_delay_ms": 2.0}
    flags = cli.variant_flags("i2=--instances 2 --max-queue-delay-ms 5 --no-warmup --processes 2")[1]
    own, drop = cli.variant_serving(serving, flags)
    assert drop == ("instances", "max_queue_delay_ms", "warmup") and own == {"max_batch_size": 512}
    assert cli.variant_serving(serving, {"--processes": "2", "--threads": "1"}) == (serving, ("intra_op_threads",))
    src = tmp_path / "src"
    shutil.copytree(repo_dir / MODEL, src / MODEL)
    (src / MODEL / "config.json").write_text(json.dumps({"instances": 1, "max_queue_size": 7, "warmup": True}))
    out = repo_variant(src, tmp_path / "copy", own, [MODEL], drop=drop)
    assert json.loads((out / MODEL / "config.json").read_text()) == {"max_queue_size": 7, "max_batch_size": 512}


PERF_ANALYZER_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
8,69536.2,3,706,499,27,6112,10,0,7271,7925,8241,9325
"""
"""perf_analyzer 2.41's CSV of one cell (64 rows per request, 8 clients, against genserve)."""


def test_perf_analyzer_cell_command_and_csv(tmp_path: Path) -> None:
    """The load of ``--load perf_analyzer``: a cell's rows, clients and window become perf_analyzer's batch
    size, concurrency and window; its CSV counts rows, so requests/s is inferences/s over the rows."""
    cmd = perfanalyzer.command(Path("/pa"), "127.0.0.1:9", "m.encode", "x", 64, [8, 8], 8, 4.0, tmp_path / "c.csv")
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == "/pa" and args["-m"] == "m.encode" and args["-u"] == "127.0.0.1:9" and args["-i"] == "grpc"
    assert args["-b"] == "64" and args["--shape"] == "x:8,8" and args["--concurrency-range"] == "8:8"
    assert args["-p"] == "4000" and args["-f"] == str(tmp_path / "c.csv")
    rps, p50, p99 = perfanalyzer.parse_csv(PERF_ANALYZER_CSV, rows=64)
    assert rps == pytest.approx(69536.2 / 64) and p50 == pytest.approx(7.271) and p99 == pytest.approx(9.325)


def test_a_peer_without_model_config_answers_it_for_perf_analyzer(repo_dir: Path, tmp_path: Path) -> None:
    """KServe and MLServer lack Triton's ModelConfig RPC, which perf_analyzer calls first: their gRPC server gets
    a handler that answers it with the graph's config (and ModelStatistics empty), on a real socket, while every
    other method stays the server's own (here none: UNIMPLEMENTED)."""
    import asyncio
    import importlib.util
    import types

    import grpc

    from benchmarks.peers.graph import triton_model_config
    from genserve.oip import grpc_service_pb2 as pb
    from genserve.oip import grpc_service_pb2_grpc as pb_grpc

    spec = importlib.util.spec_from_file_location("triton_config", ROOT / "benchmarks/peers/runtimes/triton_config.py")
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    graph = peer_graph(repo_dir, MODEL, "encode", tmp_path)
    added: list[object] = []
    server_module = types.SimpleNamespace(add_GRPCInferenceServiceServicer_to_server=lambda s, server: added.append(s))
    runtime.answer_model_config(server_module, triton_model_config(graph, 512))
    async def serve_and_ask() -> None:
        server = grpc.aio.server()
        server_module.add_GRPCInferenceServiceServicer_to_server("the server's servicer", server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                config = (await stub.ModelConfig(pb.ModelConfigRequest(name=graph.oip_name), timeout=30)).config
                assert config.name == graph.oip_name and config.max_batch_size == 512
                assert [(i.name, list(i.dims)) for i in config.input] == [(graph.input, graph.row_shape)]
                assert [o.name for o in config.output] == graph.outputs
                stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=graph.oip_name), timeout=30)
                assert stats == pb.ModelStatisticsResponse()
                with pytest.raises(grpc.RpcError) as e:
                    await stub.ModelInfer(pb.ModelInferRequest(model_name=graph.oip_name), timeout=30)
                assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(None)

    asyncio.run(serve_and_ask())
    assert added == ["the server's servicer"]
