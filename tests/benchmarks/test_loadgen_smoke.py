"""The benchmark tool works end to end on a tiny run: server process, load-generator processes, JSON and PNG.

Functional checks only (fields present, counts and rates positive, the server's split consistent); speed is
shown in BENCHMARKS.md, never asserted here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the repository, not an installed package

from benchmarks import loadgen, run, scrape  # noqa: E402

SOURCES = ("training/ppca.py", "server/programs/ppca.py", "export/repository.py", "export/onnx_export.py",
           "core/manifest.py", "core/spec.py")
"""The files that shape the exported digits-ppca folder; they key its cache."""


@pytest.fixture(scope="module")
def ppca_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with digits-ppca (closed-form fit), made with the public train and export steps.

    The exported folder is cached under .pytest_cache keyed by the sources that shape it, so only the first
    run pays for training and export.
    """
    import hashlib
    import shutil

    h = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in SOURCES)).hexdigest()[:16]
    cache = Path(request.config.cache.mkdir("genserve_bench_ppca")) / h
    repo = tmp_path_factory.mktemp("bench") / "repo"
    if not (cache / "digits-ppca").is_dir():
        from genserve.export.repository import export_checkpoint

        build = tmp_path_factory.mktemp("build")
        subprocess.run([sys.executable, "-m", "genserve.training.cli", "ppca", "--out", str(build / "ppca.pt"),
                        "--quiet"], check=True, capture_output=True, timeout=300)
        export_checkpoint(build / "ppca.pt", build / "repo", name="digits-ppca", version=1, log=lambda *a: None)
        shutil.rmtree(cache.parent, ignore_errors=True)  # older keys
        shutil.copytree(build / "repo", cache)
    shutil.copytree(cache, repo)
    return repo


def test_sweep_cli_writes_json_and_plot(ppca_repo: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = run.main(["--repo", str(ppca_repo), "--model", "digits-ppca", "--operation", "log_likelihood",
                     "--rows", "2", "--concurrency", "1,2", "--processes", "2", "--warmup-s", "0.3",
                     "--window-s", "0.7", "--stable-windows", "1", "--max-windows", "1",
                     "--max-batch-size", "8", "--out", str(out), "--plot", str(png), "--quiet"])
    assert code == 0
    result = json.loads(out.read_text())
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert result["spec"]["model"] == "digits-ppca" and result["processes"] == 2
    assert result["machine"]["cores"] >= 1 and result["command"].startswith("python -m benchmarks.run")
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    for lv in result["levels"]:
        assert lv["requests"] > 0 and not lv["errors"]
        assert lv["throughput_rps"] > 0 and lv["throughput_rows_s"] == pytest.approx(2 * lv["throughput_rps"])
        lat = lv["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]
        server = lv["server"]
        assert server["available"] and server["requests"] > 0
        # The server answered what the clients counted. Each client has one request in flight, so at a common
        # instant the two counts differ by at most one per client (either way: the server counts before the
        # client sees the answer, or after it replied), that is by 2 x concurrency over a window's two edges.
        # The edges are the scrapes of the server's counters, each read at some instant within
        # edge_uncertainty_s of the edge, during which the clients kept completing requests at their rate.
        uncertain = lv["throughput_rps"] * server["edge_uncertainty_s"]
        slack = 2 * lv["concurrency"] + math.ceil(uncertain) + 1
        assert abs(server["requests"] - lv["requests"]) <= slack, (
            f"server counted {server['requests']}, clients {lv['requests']} (allowed difference {slack}: "
            f"{lv['concurrency']} clients, {server['edge_uncertainty_s'] * 1e3:.1f} ms of scrape uncertainty "
            f"at {lv['throughput_rps']:.0f} req/s)")
        assert server["edge_uncertainty_s"] >= 0
        assert server["server_request_s"] > 0 and server["compute_s"] > 0 and server["queue_s"] >= 0
        assert server["queue_s"] + server["compute_s"] <= server["server_request_s"] * 1.5
        # the per-model max_batch_size written into config.json (a request is 2 rows x 16 dequantisation draws,
        # so calls are full; the ratio of scraped sum and count deltas can straddle a call at a window edge)
        assert 1 <= server["rows_per_call"] <= 8.5
        assert set(server["calls_per_graph"]) <= {"log_prob", "encoder", "generator"}
        cpu = lv["cpu"]["processes_cores"]
        assert cpu["server"] > 0 and {"loadgen0", "loadgen1"} <= set(cpu)
        assert lv["limited_by"]
    assert result["server"]["serving"] == {"max_batch_size": 8}


def test_stability_rule() -> None:
    def window(n: int) -> loadgen.Window:
        import numpy as np

        return loadgen.Window(0.0, 1.0, np.ones(n), [], {}, {})

    assert loadgen.stable([window(100), window(104), window(96)], 3, 0.10)
    assert not loadgen.stable([window(100), window(120), window(96)], 3, 0.10)
    assert not loadgen.stable([window(100), window(100)], 3, 0.10)  # too few windows yet
    assert loadgen.stable([window(50), window(100), window(101)], 2, 0.10)  # only the last k count


def test_server_split_from_metrics() -> None:
    before = scrape.parse('genserve_request_duration_seconds_count{model="m",method="LogLikelihood"} 10\n'
                          'genserve_request_duration_seconds_sum{model="m",method="LogLikelihood"} 1.0\n')
    after = scrape.parse("# HELP x\n"
                         'genserve_request_duration_seconds_count{model="m",method="LogLikelihood"} 30\n'
                         'genserve_request_duration_seconds_sum{model="m",method="LogLikelihood"} 3.0\n'
                         'genserve_queue_wait_seconds_count{model="m",graph="g"} 20\n'
                         'genserve_queue_wait_seconds_sum{model="m",graph="g"} 0.4\n'
                         'genserve_inference_duration_seconds_count{model="m",graph="g"} 5\n'
                         'genserve_inference_duration_seconds_sum{model="m",graph="g"} 0.5\n'
                         'genserve_batch_size_rows_sum{model="m",graph="g"} 20\n'
                         'genserve_batch_requests_sum{model="m",graph="g"} 20\n'
                         'genserve_batch_size_rows_sum{model="other",graph="g"} 999\n')
    s = scrape.split(before, after, "m", "LogLikelihood", wall_s=2.0)
    assert s["requests"] == 20 and s["server_request_s"] == pytest.approx(0.1)
    assert s["queue_s"] == pytest.approx(0.02)  # 0.4 s of waits over 20 requests
    assert s["compute_s"] == pytest.approx(0.1)  # 20 submissions each waited for a 0.1 s call
    assert s["rows_per_call"] == 4 and s["ort_busy"] == pytest.approx(0.25)
    assert s["calls_per_graph"] == {"g": 5}
