"""The wine pipeline example, run small (one seed, closed-form pPCA): train, export with calibration, serve,
score a Parquet file with its ids kept, and compare with IsolationForest and a Gaussian mixture."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]


def test_wine_pipeline_scores_records_beside_sklearn(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("wine_pipeline", ROOT / "examples" / "wine_pipeline.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--seeds", "3", "--models", "ppca", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "$ genserve export" in printed and "--calibration" in printed and "--below-percentile 5" in printed

    results = json.loads((tmp_path / "wine_results.json").read_text())
    run = results["seeds"][0]
    # cultivar 1 (71 wines): 40 calibration rows, the other 31 split 20 train / 11 test
    assert run["seed"] == 3 and run["anomaly_rows"] == 59 + 48 and run["in_distribution_test_rows"] == 11
    assert run["calibration_rows"] == 40 and run["fit_rows"] == 14  # genserve's own 70% of the 20 training rows
    methods = run["methods"]
    assert {"genserve ppca", "IsolationForest", "GaussianMixture"} <= set(methods)
    assert all(m.startswith("genserve ppca, ") for m in set(methods) - {"genserve ppca", "IsolationForest",
                                                                         "GaussianMixture"})  # its score kinds
    assert all(0.0 <= m["auroc"] <= 1.0 for m in methods.values()), methods
    # the other cultivars differ in their chemistry: genserve's density separates them well from 14 rows
    assert methods["genserve ppca"]["auroc"] > 0.75, methods
    for m in ("IsolationForest", "GaussianMixture"):
        assert 0.0 <= methods[m]["flag below percentile 5"]["recall"] <= 1.0

    # the scored file kept the ids, in the test file's order, with a percentile and a fixed-threshold flag
    scored = pq.read_table(tmp_path / "seed-3" / "scored-ppca.parquet").to_pydict()
    test = pq.read_table(tmp_path / "seed-3" / "test.parquet").to_pydict()
    assert scored["id"] == test["id"]
    percentile, flag = np.asarray(scored["percentile"]), np.asarray(scored["flag"])
    assert ((0 <= percentile) & (percentile <= 100)).all() and np.array_equal(flag, percentile < 5)
    flags = methods["genserve ppca"]["flag below percentile 5"]
    assert flags["flagged"] == int(flag.sum()) and 0.0 <= flags["recall"] <= 1.0
    # anomalies sit far below the calibration data: most are flagged, and mostly anomalies are flagged
    assert flags["recall"] > 0.5 and flags["precision"] > 0.8, flags

    markdown = (tmp_path / "wine_results.md").read_text()
    assert "| genserve ppca |" in markdown and "| IsolationForest |" in markdown and "| GaussianMixture |" in markdown
