"""`genserve quickstart` (README command 1) end to end on one model: train, evaluate, export, serve, call every
operation through the client, write pictures and the summary, stop the server; a second run reuses it all."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path


def quickstart(work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genserve.app.cli", "quickstart", "--models", "ppca",
                           "--workdir", str(work)], capture_output=True, text=True, timeout=600)


def test_quickstart_runs_end_to_end_and_reuses_its_work(tmp_path: Path) -> None:
    work = tmp_path / "qs"
    first = quickstart(work)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "server stopped cleanly" in first.stderr
    summary = json.loads((work / "summary.json").read_text())
    assert [row["model"] for row in summary] == ["ppca"]
    row = summary[0]
    assert row["operations"] == ["sample", "log_likelihood", "encode", "decode"]
    assert row["kind"] == "lower_bound" and math.isfinite(row["nll_nats"]) and 100 < row["nll_nats"] < 250
    # the served score of 64 test digits is the same model's: close to its test NLL
    assert abs(row["served_nll_64"] - row["nll_nats"]) < 15
    for key in ("sample_ms", "score_ms", "encode_ms", "decode_ms"):
        assert row[key] > 0
    assert "| ppca | linear_gaussian |" in (work / "summary.md").read_text()
    for png in ("ppca.png", "all.png"):
        assert (work / "samples" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "model_repository" / "digits-ppca" / "1" / "manifest.json").is_file()

    second = quickstart(work)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "ppca: reusing" in second.stderr and "training ppca" not in second.stderr
    assert json.loads((work / "summary.json").read_text())[0]["nll_nats"] == row["nll_nats"]


def test_genserve_version_names_the_installed_package(capsys) -> None:
    import importlib.metadata

    import pytest

    from genserve.app.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"genserve {importlib.metadata.version('genserve')}"
