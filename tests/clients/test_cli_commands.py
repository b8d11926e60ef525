"""`genserve models | info | sample | score | encode | decode` against the real server, run in-process."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from genserve.app.cli import main
from genserve.clients.client import Client
from genserve.clients.images import grid

DIGITS, MOONS = "digits-ppca", "moons-ppca"
COMMANDS = ("health", "models", "info", "sample", "score", "encode", "decode")


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"genserve {command}" in out and "--server" in out and "--tls-ca" in out


def test_models_and_info(target: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_SERVER", target)  # the default server comes from the environment
    code, out, _ = run(capsys, "models")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["NAME", "VERSIONS", "FAMILY", "MODEL", "OPERATIONS", "STATE"]
    assert any(line.split()[:4] == [DIGITS, "1", "linear_gaussian", "ppca"] for line in lines)
    code, out, _ = run(capsys, "models", "--json")
    assert {m["name"] for m in json.loads(out)} >= {DIGITS, MOONS}
    code, out, _ = run(capsys, "info", DIGITS)
    assert code == 0 and "shape 8x8, discrete, 17 levels" in out and "likelihood: lower_bound" in out
    code, out, _ = run(capsys, "info", MOONS, "--json")
    info = json.loads(out)
    assert info["data"]["shape"] == [2] and info["manifest"]["model"] == "ppca" and info["version"] == 1


def test_sample_writes_npy_latents_and_a_png_grid(target: str, client: Client, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "sample", DIGITS, "-n", 20, "--seed", 1, "--out", tmp_path / "s.npy",
                       "--latents", tmp_path / "z.npy", "--server", target, "--quiet")
    assert code == 0 and "seed 1" in out
    x, z = client.sample(DIGITS, 20, seed=1, return_latents=True)
    assert np.array_equal(np.load(tmp_path / "s.npy"), x) and np.array_equal(np.load(tmp_path / "z.npy"), z)
    png = (tmp_path / "s.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # the IDAT payload is the grid of the samples on the digits' 0..16 grey scale, row by row
    start = png.index(b"IDAT") + 4
    length = int.from_bytes(png[start - 8:start - 4], "big")
    pixels = np.frombuffer(zlib.decompress(png[start:start + length]), dtype=np.uint8)
    expected = grid(x, 0, 16)
    assert np.array_equal(pixels.reshape(expected.shape[0], -1)[:, 1:], expected)

    code, out, _ = run(capsys, "sample", MOONS, "-n", 300, "--out", tmp_path / "m.npy", "--server", target,
                       "--png", tmp_path / "never.png")
    assert code == 0 and np.load(tmp_path / "m.npy").shape == (300, 2)
    assert not (tmp_path / "never.png").exists()  # rows, not images: no grid
    seed = int(out.split("seed ")[1].split(";")[0])  # a drawn seed is printed and reproduces the run
    assert np.array_equal(np.load(tmp_path / "m.npy"), client.sample(MOONS, 300, seed=seed))


def test_score_writes_one_line_per_row_and_flags_outliers(target: str, client: Client, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    x = np.random.default_rng(0).normal(0.5, 1.0, size=(3000, 2)).astype(np.float32)
    np.savetxt(tmp_path / "points.csv", x, delimiter=",", header="x,y", comments="", fmt="%.9g")
    expected = client.log_likelihood(MOONS, x).log_prob  # exact model: no noise, one unary call
    code, out, _ = run(capsys, "score", MOONS, tmp_path / "points.csv", "--out", tmp_path / "scores.csv",
                       "--quantile", 0.1, "--chunk-size", 512, "--server", target, "--quiet")
    assert code == 0 and "3000 rows" in out and "300 outliers" in out
    table = np.genfromtxt(tmp_path / "scores.csv", delimiter=",", names=True)
    # a model exported with calibration also gets each row's percentile among its calibration data
    percentile = ("percentile",) if "log_prob" in client.info(MOONS).calibrated else ()
    assert table.dtype.names == ("row", "log_prob_nats", "bits_per_dim", *percentile, "outlier")
    assert np.array_equal(table["row"], np.arange(3000))
    assert np.allclose(table["log_prob_nats"], expected, rtol=1e-7)
    assert np.allclose(table["bits_per_dim"], -expected / (2 * np.log(2)), rtol=1e-6)
    lowest = np.argsort(expected)[:300]
    assert table["outlier"].sum() == 300 and (table["outlier"][lowest] == 1).all()

    code, out, _ = run(capsys, "score", MOONS, tmp_path / "points.csv", "--out", tmp_path / "t.csv",
                       "--threshold", -4, "--server", target, "--quiet")
    flags = np.genfromtxt(tmp_path / "t.csv", delimiter=",", names=True)["outlier"]
    assert code == 0 and np.array_equal(flags == 1, expected < -4)


def test_score_digits_npz_with_a_seed_matches_the_client(target: str, client: Client, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    images = np.random.default_rng(1).integers(0, 17, size=(900, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=images, labels=np.arange(900))
    code, _, _ = run(capsys, "score", DIGITS, tmp_path / "d.npz", "--key", "x", "--seed", 5, "--chunk-size", 400,
                     "--out", tmp_path / "d.csv", "--server", target, "--quiet")
    table = np.genfromtxt(tmp_path / "d.csv", delimiter=",", names=True)
    percentile = ("percentile",) if "log_prob" in client.info(DIGITS).calibrated else ()
    assert code == 0 and table.dtype.names == ("row", "log_prob_nats", "bits_per_dim", *percentile)
    streamed = client.score_stream(DIGITS, images, chunk_size=400, seed=5, progress=False)
    assert np.allclose(table["log_prob_nats"], streamed.log_prob, rtol=1e-7)


def test_encode_and_decode_files(target: str, client: Client, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    x = np.random.default_rng(2).normal(0.5, 0.7, size=(1000, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, _ = run(capsys, "encode", MOONS, tmp_path / "x.npy", "--out", tmp_path / "z.npy",
                       "--chunk-size", 300, "--server", target)
    z = np.load(tmp_path / "z.npy")
    assert code == 0 and "encoded 1000 rows" in out and np.array_equal(z, client.encode(MOONS, x))
    code, out, _ = run(capsys, "decode", MOONS, tmp_path / "z.npy", "--out", tmp_path / "back.npy",
                       "--server", target)
    assert code == 0 and np.array_equal(np.load(tmp_path / "back.npy"), client.decode(MOONS, z))

    latent = client.encode(DIGITS, client.sample(DIGITS, 9, seed=1))
    np.save(tmp_path / "dz.npy", latent)
    code, out, _ = run(capsys, "decode", DIGITS, tmp_path / "dz.npy", "--out", tmp_path / "dx.npy",
                       "--png", tmp_path / "dx.png", "--server", target)
    assert code == 0 and np.load(tmp_path / "dx.npy").shape == (9, 8, 8)
    assert (tmp_path / "dx.png").read_bytes().startswith(b"\x89PNG")


def test_errors_end_in_one_line(target: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "sample", "no-such-model", "--out", tmp_path / "x.npy", "--server", target)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("genserve: error: NOT_FOUND: ") and DIGITS in err
    code, _, err = run(capsys, "score", MOONS, tmp_path / "missing.csv", "--out", tmp_path / "s.csv",
                       "--server", target)
    assert code == 2 and err.startswith("genserve: error: no such input file") and err.count("\n") == 1
    code, _, err = run(capsys, "sample", MOONS, "--out", tmp_path / "x.txt", "--server", target)
    assert code == 2 and "expected a .npy file name" in err
    np.save(tmp_path / "bad.npy", np.zeros((4, 3)))
    code, _, err = run(capsys, "score", MOONS, tmp_path / "bad.npy", "--out", tmp_path / "s.csv",
                       "--server", target, "--quiet")
    assert code == 2 and "3 values each" in err
    code, _, err = run(capsys, "score", MOONS, tmp_path / "bad.npy", "--out", tmp_path / "s.csv",
                       "--quantile", 1.5, "--server", target)
    assert code == 2 and "--quantile" in err
    with pytest.raises(SystemExit) as e:
        main(["score", MOONS, "x.npy", "--out", "s.csv", "--threshold", "1", "--quantile", "0.1"])
    assert e.value.code == 2


def test_health_command_for_docker_and_probes(target: str, capsys: pytest.CaptureFixture) -> None:
    assert run(capsys, "health", "--server", target)[:2] == (0, "SERVING\n")
    code, out, _ = run(capsys, "health", "moons-ppca", "--server", target)
    assert (code, out) == (0, "SERVING\n")
    code, out, _ = run(capsys, "health", "no-such-model", "--server", target)
    assert code != 0 and "SERVING\n" != out


def test_a_wrong_address_fails_at_the_first_failed_connection(capsys: pytest.CaptureFixture) -> None:
    """Nothing listens on port 1: the command fails on the first refused connection, saying what to check,
    not after the retries with backoff that calls make."""
    code, out, err = run(capsys, "models", "--server", "127.0.0.1:1")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "cannot reach a genserve server at 127.0.0.1:1: the connection failed; check the address" in err


def test_score_keeps_id_columns_and_writes_to_stdout(target: str, client: Client, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A record id and a text label beside the features (CSV and Parquet): --id-column keeps them in the output,
    --columns picks the features; without --out the CSV goes to stdout and the summary to stderr."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(2).normal(0.5, 1.0, size=(50, 2)).astype(np.float32)
    ids = [f"rec-{i:03d}" for i in range(50)]
    labels = ["a, quoted" if i % 2 else "plain" for i in range(50)]
    with open(tmp_path / "records.csv", "w") as f:
        f.write("id,x,label,y\n")
        f.writelines(f'{i},{a:.9g},"{lab}",{b:.9g}\n' for i, (a, b), lab in zip(ids, x, labels, strict=True))
    pq.write_table(pa.table({"id": ids, "x": x[:, 0], "y": x[:, 1], "label": labels}), tmp_path / "records.parquet")
    expected = client.log_likelihood(MOONS, x).log_prob
    for name in ("records.csv", "records.parquet"):
        code, out, err = run(capsys, "score", MOONS, tmp_path / name, "--id-column", "id", "--id-column", "label",
                             "--columns", "x,y", "--server", target, "--quiet")
        assert code == 0 and "50 rows" in err and "wrote stdout" in err, err
        lines = out.splitlines()
        percentile = ",percentile" if "log_prob" in client.info(MOONS).calibrated else ""
        assert lines[0] == "id,label,row,log_prob_nats,bits_per_dim" + percentile
        import csv

        table = list(csv.DictReader(lines))
        assert [r["id"] for r in table] == ids and [r["label"] for r in table] == labels
        assert np.allclose([float(r["log_prob_nats"]) for r in table], expected, rtol=1e-7)
    code, _, err = run(capsys, "score", MOONS, tmp_path / "records.csv", "--server", target, "--quiet")
    assert code == 2 and "line 2" in err and "--id-column" in err  # a text column, not named: what to do
    code, _, err = run(capsys, "score", MOONS, tmp_path / "records.csv", "--id-column", "nope", "--server", target)
    assert code == 2 and "no column 'nope'" in err and "id, x, label, y" in err
