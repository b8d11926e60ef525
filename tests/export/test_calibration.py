"""Score calibration at export (export/calibration.py): a user's file, no calibration, and files that do not fit.

A tiny pPCA on moons (continuous data: an exact, deterministic log-likelihood) is exported with ``--calibration
FILE``: the manifest's log_prob quantiles are those of the serving program over the exported ONNX graphs on one
half of the file's rows, and the score kinds are fitted on the other half.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from genserve.app.cli import main
from genserve.core import scores
from genserve.core.manifest import MANIFEST, read_manifest
from genserve.export.calibration import PROBABILITIES, SEED, file_data, score_rows
from genserve.export.repository import export_checkpoint, sha256_file
from genserve.server.programs import program_from_manifest
from genserve.server.sessions import DirectRunner
from genserve.training.data import load_dataset


@pytest.fixture(scope="module")
def moons_ppca(tiny_checkpoint) -> Path:
    return tiny_checkpoint("ppca", "moons")


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return load_dataset("moons").val


def test_a_calibration_file_calibrates_on_one_half_and_fits_on_the_other(moons_ppca, rows, tmp_path) -> None:
    path = tmp_path / "held_out.npy"
    np.save(path, rows)
    vdir = export_checkpoint(moons_ppca, tmp_path / "repo", calibration=path, log=lambda *a: None)
    manifest = read_manifest(vdir / MANIFEST)
    data = file_data(path, load_dataset("moons").spec)
    assert len(data.rows) + len(data.fit) == len(rows)
    both = np.concatenate([data.rows, data.fit])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, rows.tolist()))  # a split, nothing lost

    program = program_from_manifest(manifest)
    run = DirectRunner.from_files({g.name: vdir / g.file for g in manifest.graphs})
    entries = {c.score: c for c in manifest.calibration}
    assert set(entries) == {"log_prob", *scores.applicable(program.spec, "exact")}
    log_prob = entries["log_prob"]
    assert log_prob.rows == len(data.rows) and log_prob.seed == SEED and tuple(log_prob.probabilities) == PROBABILITIES
    assert "held_out.npy" in log_prob.data and sha256_file(path)[:16] in log_prob.data
    assert log_prob.noise.startswith("none")  # continuous pPCA: exact
    served = score_rows(program, run, data.rows, SEED)
    np.testing.assert_allclose(log_prob.quantiles, np.quantile(served, PROBABILITIES), rtol=1e-12)
    fitted = score_rows(program, run, data.fit, 0)
    assert manifest.parameters["score.typicality.entropy"] == pytest.approx(-fitted.mean(), rel=1e-9)
    assert [k.name for k in manifest.score_kinds] == scores.applicable(program.spec, "exact")


def test_no_calibration_stores_no_score_kinds(moons_ppca, tmp_path) -> None:
    vdir = export_checkpoint(moons_ppca, tmp_path / "repo", calibration=False, log=lambda *a: None)
    manifest = read_manifest(vdir / MANIFEST)
    assert not manifest.calibration and not manifest.score_kinds
    assert not [k for k in manifest.parameters if k.startswith("score.")]


@pytest.mark.parametrize("content, message", [
    (np.zeros((100, 3), np.float32), "shape"),
    (np.zeros((10, 2), np.float32), "at least 40"),
    (None, "no such file"),
])
def test_a_calibration_file_that_does_not_fit_is_refused(moons_ppca, tmp_path, content, message) -> None:
    path = tmp_path / "cal.npy"
    if content is not None:
        np.save(path, content)
    with pytest.raises(ValueError, match=message):
        export_checkpoint(moons_ppca, tmp_path / "repo", calibration=path, log=lambda *a: None)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_the_cli_takes_a_file_or_no_calibration_not_both(moons_ppca, rows, tmp_path, capsys) -> None:
    path = tmp_path / "cal.csv"
    np.savetxt(path, rows, delimiter=",", header="x0,x1", comments="")
    code = main(["export", str(moons_ppca), "--repo", str(tmp_path / "repo"), "--calibration", str(path),
                 "--no-calibration"])
    assert code != 0 and "not both" in capsys.readouterr().err
    assert main(["export", str(moons_ppca), "--repo", str(tmp_path / "repo"), "--calibration", str(path)]) == 0
    manifest = read_manifest(tmp_path / "repo" / "moons-ppca" / "1" / MANIFEST)
    assert manifest.calibration[0].rows == len(rows) // 2 and "cal.csv" in manifest.calibration[0].data


def test_repo_check_verifies_the_calibration(moons_ppca, tmp_path) -> None:
    from genserve.core.manifest import write_manifest
    from genserve.export.check import check_model

    vdir = export_checkpoint(moons_ppca, tmp_path / "repo", log=lambda *a: None)
    assert check_model(vdir.parent).ok
    manifest = read_manifest(vdir / MANIFEST)
    manifest.calibration[0].quantiles[0] = manifest.calibration[0].quantiles[-1] + 1.0
    manifest.calibration[1].score = "no_such_kind"
    del manifest.calibration[2].probabilities[-1]
    write_manifest(manifest, vdir / MANIFEST)
    problems = " | ".join(check_model(vdir.parent).problems)
    assert "quantiles must be finite and non-decreasing" in problems
    assert "'no_such_kind' names no score kind" in problems
    assert "probabilities and" in problems
