"""`genserve score` as a pipeline step against the real server: Parquet/CSV in and out with ids kept, fixed
(calibrated) and batch-relative flags, and bad input refused in one line with no output file left behind."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from genserve.app.cli import main
from genserve.clients.client import Client

MOONS = "moons-ppca"


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def records(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A Parquet file of 700 points with an int64 id column (not in row order) and a text label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(4).normal(0.5, 1.0, size=(700, 2)).astype(np.float32)
    ids = np.random.default_rng(5).permutation(10_000)[:700].astype(np.int64)
    path = tmp_path / "records.parquet"
    pq.write_table(pa.table({"id": ids, "x": x[:, 0], "y": x[:, 1], "label": ["a"] * 700}), path, row_group_size=128)
    return path, x, ids


def test_parquet_in_parquet_out_keeps_ids_and_their_type(target: str, client: Client, records, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    import pyarrow.parquet as pq

    path, x, ids = records
    expected = client.log_likelihood(MOONS, x).log_prob
    out = tmp_path / "out" / "scored.parquet"
    code, text, _ = run(capsys, "score", MOONS, path, "--id-column", "id", "--columns", "x,y", "--out", out,
                        "--chunk-size", 100, "--threshold", -3, "--server", target, "--quiet")
    assert code == 0 and "700 rows" in text and f"{int((expected < -3).sum())} outliers" in text, text
    table = pq.read_table(out)
    assert table.column_names[:4] == ["id", "row", "log_prob_nats", "bits_per_dim"]
    assert table.schema.field("id").type == "int64" and table.column("id").to_pylist() == ids.tolist()
    assert np.array_equal(table.column("row").to_numpy(), np.arange(700))
    assert np.allclose(table.column("log_prob_nats").to_numpy(), expected, rtol=1e-7)
    assert table.column("outlier").to_pylist() == (expected < -3).tolist()
    assert [p.name for p in out.parent.iterdir()] == ["scored.parquet"]  # no temporary file left


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_quantile_is_relative_to_the_batch(target: str, client: Client, records, tmp_path: Path, suffix: str,
                                           capsys: pytest.CaptureFixture) -> None:
    """--quantile flags a fixed share of whatever file is scored (two passes), ids and order kept."""
    import pyarrow.parquet as pq

    path, x, ids = records
    expected = client.log_likelihood(MOONS, x).log_prob
    out = tmp_path / f"q{suffix}"
    code, text, _ = run(capsys, "score", MOONS, path, "--id-column", "id", "--columns", "x,y", "--out", out,
                        "--quantile", 0.1, "--chunk-size", 128, "--server", target, "--quiet")
    assert code == 0 and "70 outliers below the 0.1 quantile" in text and "of this batch" in text, text
    if suffix == ".parquet":
        table = pq.read_table(out).to_pydict()
        got_ids, flags, log_prob = table["id"], table["outlier"], table["log_prob_nats"]
    else:
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        got_ids = [int(r["id"]) for r in rows]
        flags = [r["outlier"] == "1" for r in rows]
        log_prob = [float(r["log_prob_nats"]) for r in rows]
    assert got_ids == ids.tolist() and np.allclose(log_prob, expected, rtol=1e-7)
    assert np.array_equal(flags, expected < np.quantile(expected, 0.1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["records.parquet", out.name])


def test_bad_input_fails_in_one_line_and_leaves_no_output(target: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out.parquet"
    (tmp_path / "text.csv").write_text("id,x,y\n" + "".join(f"{i},0.5,0.1\n" for i in range(300)) + "300,0.2,high\n")
    (tmp_path / "wide.csv").write_text("a,b,c\n" + "0.1,0.2,0.3\n" * 5)
    (tmp_path / "header.csv").write_text("id,x,y\n")
    pq.write_table(pa.table({"x": pa.array([], pa.float32()), "y": pa.array([], pa.float32())}),
                   tmp_path / "empty.parquet")
    cases = [
        (["text.csv", "--id-column", "id"], "line 302, column 'y': 'high' is not a number"),
        (["text.csv", "--id-column", "key"], "has no column 'key'; it has: id, x, y"),
        (["wide.csv"], "3 values each (3,) but the model's examples have shape (2,)"),
        (["header.csv", "--id-column", "id"], "has no rows to score"),
        (["empty.parquet"], "has no rows to score"),
    ]
    for argv, message in cases:
        code, text, err = run(capsys, "score", MOONS, tmp_path / argv[0], *argv[1:], "--out", out, "--chunk-size",
                              100, "--server", target, "--quiet")
        assert code == 2 and text == "" and err.count("\n") == 1 and message in err, (argv, err)
        assert "Traceback" not in err and not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], argv  # no partial file either
    code, _, err = run(capsys, "score", MOONS, tmp_path / "wide.csv", "--out", tmp_path / "s.json", "--server", target)
    assert code == 2 and "use a .csv or .parquet file name" in err


@pytest.fixture
def uncalibrated_target(repo_dir: Path, tmp_path: Path, server_config) -> Iterator[str]:
    """A server of its own over moons-ppca exported without calibration or score kinds."""
    from genserve.server.app import BackgroundServer

    repo = tmp_path / "repo"
    shutil.copytree(repo_dir / MOONS, repo / MOONS)
    for manifest in (repo / MOONS).glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        data.pop("calibration", None)
        data.pop("score_kinds", None)
        data.pop("scoreKinds", None)
        manifest.write_text(json.dumps(data))
    with BackgroundServer(server_config(repo)) as srv:
        yield f"127.0.0.1:{srv.port}"


def test_fixed_thresholds_need_a_calibrated_model(uncalibrated_target: str, records, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    path, _, _ = records
    out = tmp_path / "flags.parquet"
    code, text, err = run(capsys, "score", MOONS, path, "--id-column", "id", "--columns", "x,y", "--out", out,
                          "--below-percentile", 5, "--server", uncalibrated_target, "--quiet")
    assert code == 2 and text == "" and err.count("\n") == 1 and not out.exists()
    assert "was exported without calibration" in err and "Re-export it with calibration" in err
    assert "--calibration FILE" in err and "--quantile" in err
    code, _, err = run(capsys, "score", MOONS, path, "--id-column", "id", "--columns", "x,y", "--score-kind",
                       "no_such_kind", "--server", uncalibrated_target, "--quiet")
    assert code == 2 and "serves no score kind 'no_such_kind'; it serves: log_prob" in err
    # without a calibration, the table has no percentile column (and no error)
    code, _, _ = run(capsys, "score", MOONS, path, "--id-column", "id", "--columns", "x,y", "--out",
                     tmp_path / "plain.csv", "--server", uncalibrated_target, "--quiet")
    with open(tmp_path / "plain.csv", newline="") as f:
        assert code == 0 and next(csv.reader(f)) == ["id", "row", "log_prob_nats", "bits_per_dim"]


def test_option_checks(target: str, records, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _, _ = records
    base = ["score", MOONS, path, "--id-column", "id", "--columns", "x,y", "--server", target, "--quiet"]
    for extra, message in (
        (["--below-percentile", 100], "--below-percentile must be between 0 and 100"),
        (["--explain", tmp_path / "why.png"], "--explain draws images; moons-ppca's examples have shape (2,)"),
        (["--explain", tmp_path / "why.png", "--explain-rows", 0], "--explain-rows must be >= 1"),
    ):
        code, _, err = run(capsys, *base, *extra)
        assert code == 2 and message in err, err
    assert not (tmp_path / "why.png").exists()
    with pytest.raises(SystemExit) as e:
        main(["score", MOONS, "x.npy", "--below-percentile", "5", "--quantile", "0.1"])
    assert e.value.code == 2
    code, _, err = run(capsys, "score", MOONS, path, "--explain", tmp_path / "w.png", "--engine", "ray", "--repo",
                       tmp_path)
    assert code == 2 and "--explain needs a server (--engine grpc)" in err


def test_explain_draws_the_lowest_rows_and_flows_are_refused(target: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """pPCA has exact per-dimension terms (its Gaussian's chain rule): --explain draws the rows of lowest log p;
    a flow has none, and the server's refusal ends the run in one line with no table left behind."""
    import matplotlib.image

    rng = np.random.default_rng(6)
    images = rng.integers(0, 17, size=(300, 8, 8)).astype(np.float32)
    images[:250] = np.round(images[:250] * 0.2)  # dim images score higher; the bright ones are the worst
    np.save(tmp_path / "x.npy", images)
    code, text, _ = run(capsys, "score", "digits-ppca", tmp_path / "x.npy", "--explain", tmp_path / "why.png",
                        "--explain-rows", 5, "--chunk-size", 64, "--seed", 1, "--out", tmp_path / "s.csv",
                        "--server", target, "--quiet")
    assert code == 0 and "5 most anomalous rows explained" in text, text
    picture = matplotlib.image.imread(tmp_path / "why.png")
    assert picture.shape[0] > 100 and np.abs(picture[..., 0] - picture[..., 2]).max() > 0.3
    table = np.genfromtxt(tmp_path / "s.csv", delimiter=",", names=True)
    worst = set(np.argsort(table["log_prob_nats"])[:5].tolist())
    assert worst <= set(range(250, 300))
    drawn = {int(r) for r in text.split("explained: rows ")[1].split(")")[0].split(", ")}
    assert drawn == worst  # the five of lowest log p, whichever chunk they came in

    code, text, err = run(capsys, "score", "digits-realnvp", tmp_path / "x.npy", "--explain", tmp_path / "f.png",
                          "--out", tmp_path / "f.csv", "--server", target, "--quiet")
    assert code == 1 and err.startswith("genserve: error: FAILED_PRECONDITION") and err.count("\n") == 1, err
    assert not (tmp_path / "f.csv").exists() and not (tmp_path / "f.png").exists()


def test_score_kinds_percentiles_and_a_fixed_flag(target: str, client: Client, records, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """A calibrated model: the chosen kinds as columns, each one's percentile among the calibration data (the
    first kind's as `percentile`), and `flag` = percentile below P, the same whatever else the file holds."""
    import pyarrow.parquet as pq

    info = client.info(MOONS)
    kind = next((k for k, v in info.score_kinds.items() if k != "log_prob" and not v.per_batch), None)
    assert kind is not None and {"log_prob", kind} <= set(info.calibrated), info.score_kinds
    code, text, _ = run(capsys, "info", MOONS, "--server", target)  # what --score-kind can ask of this model
    listed = text.split("scores (genserve score --score-kind")[1]
    assert code == 0 and f"\n    {kind}: " in listed and "\n    log_prob: " in listed and "calibrated on" in listed
    path, x, ids = records
    expected = client.log_likelihood(MOONS, x, scores=[kind], percentile=True)
    out = tmp_path / "kinds.parquet"
    code, text, _ = run(capsys, "score", MOONS, path, "--id-column", "id", "--columns", "x,y", "--score-kind", kind,
                        "--score-kind", "log_prob", "--below-percentile", 10, "--out", out, "--chunk-size", 128,
                        "--server", target, "--quiet")
    table = pq.read_table(out).to_pydict()
    assert code == 0 and list(table) == ["id", "row", "log_prob_nats", "bits_per_dim", kind, "percentile",
                                         "percentile_log_prob", "flag"], list(table)
    assert table["id"] == ids.tolist()
    assert np.allclose(table[kind], expected.scores[kind], rtol=1e-7)
    assert np.allclose(table["percentile"], expected.percentiles[kind], atol=1e-9)
    assert np.allclose(table["percentile_log_prob"], expected.percentiles["log_prob"], atol=1e-9)
    flags = np.asarray(table["flag"])
    assert np.array_equal(flags, expected.percentiles[kind] < 10)
    assert f"{int(flags.sum())} flagged below the 10th percentile of {kind}" in text, text
    # a fixed threshold: the first 100 rows alone get the same flags (--quantile would flag 10% of any batch)
    pq.write_table(pq.read_table(path).slice(0, 100), tmp_path / "few.parquet")
    code, _, _ = run(capsys, "score", MOONS, tmp_path / "few.parquet", "--id-column", "id", "--columns", "x,y",
                     "--score-kind", kind, "--below-percentile", 10, "--out", tmp_path / "few.csv", "--server",
                     target, "--quiet")
    with open(tmp_path / "few.csv", newline="") as f:
        few = [r["flag"] == "1" for r in csv.DictReader(f)]
    assert code == 0 and few == flags[:100].tolist()


def test_a_progress_bar_on_a_terminal_and_none_in_a_log(target: str, records, tmp_path: Path) -> None:
    """The bar is drawn on stderr when it is a terminal (a pseudo-terminal here), never into a pipe or a file."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    path, _, _ = records
    argv = [sys.executable, "-m", "genserve.app.cli", "score", MOONS, str(path), "--id-column", "id", "--columns",
            "x,y", "--chunk-size", 50, "--server", target]
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        process = subprocess.Popen([*map(str, argv), "--out", str(tmp_path / "tty.csv")], stderr=secondary,
                                   stdout=subprocess.DEVNULL)
        os.close(secondary)  # the child holds the terminal now; reads end (EIO) when it exits
        drawn = b""
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:
                break
            if not data:
                break
            drawn += data
        done = process.wait(timeout=120)
    finally:
        os.close(primary)
    assert done == 0
    assert b"score moons-ppca" in drawn and b"rows" in drawn and b"\r" in drawn, drawn[-400:]
    piped = subprocess.run([*map(str, argv), "--out", str(tmp_path / "pipe.csv")], capture_output=True, timeout=120)
    assert piped.returncode == 0 and b"score moons-ppca" not in piped.stderr and b"\r" not in piped.stderr
