"""benchmarks/gpu_check.py: its checks run on the CPU provider (CPU against CPU is exact, and on the CPU a row's
answer does not depend on its batch), and on a machine without CUDA it says so and measures nothing."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import gpu_check


def test_the_checks_on_the_cpu_find_exact_parity_and_batch_invariance(repo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    assert gpu_check.main(["--repo", str(repo_dir), "--provider", "cpu", "--quick", "--rows", "8",
                           "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    checked = {(p["model"], p["operation"]) for p in report["parity"]}
    assert ("digits-realnvp", "encode") in checked and ("digits-arcnn", "log_likelihood") in checked
    assert all(p["max_rel_diff"] == 0.0 for p in report["parity"])
    assert {p["model"] for p in report["invariance"]} >= {"digits-realnvp", "digits-vae", "digits-arrnn"}
    assert all(p["max_abs_diff"] == 0.0 for p in report["invariance"])


def test_without_cuda_nothing_is_measured(repo_dir: Path, capsys) -> None:
    available, why = gpu_check.cuda_available()
    code = gpu_check.main(["--repo", str(repo_dir), "--quick", "--rows", "4"])
    if available:  # a GPU machine: the CUDA checks ran
        assert code == 0 and "provider cuda" in capsys.readouterr().out
    else:
        assert code == 2 and "no CUDAExecutionProvider" in capsys.readouterr().err and why
