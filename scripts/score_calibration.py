"""How well the calibration stored at export predicts flag rates on unseen in-distribution rows.

    python scripts/score_calibration.py --repo quickstart/model_repository

For every model of the repository with a calibration: the digits test split (rows neither trained on nor
calibrated on) is scored in requests of 64 rows with every score kind and percentiles; a calibrated threshold
"percentile below P" should flag about P% of them. Prints, per model and score, the flag rates at P = 1, 5 and 10
and the median percentile (50 when the calibration rows and the test rows are alike). In-process (LocalEngine),
so no server is needed.
"""

from __future__ import annotations

import argparse

import numpy as np

from genserve.server.local import LocalEngine
from genserve.training.data import load_dataset

LEVELS = (1, 5, 10)
ROWS_PER_REQUEST = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default="quickstart/model_repository")
    parser.add_argument("--dataset", default="digits")
    args = parser.parse_args()
    test = load_dataset(args.dataset).test
    print(f"{len(test)} test rows of {args.dataset}, requests of {ROWS_PER_REQUEST} rows")
    print(f"{'model':16} {'score':18} " + " ".join(f"<{p:>2}%  " for p in LEVELS) + " median pct")
    with LocalEngine(args.repo) as engine:
        for status in engine.models():
            if "log_likelihood" not in status.operations:
                continue
            manifest = engine._engine.get_model(status.name).manifest
            if not manifest.calibration or tuple(manifest.data.shape) != test.shape[1:]:
                continue
            kinds = [k.name for k in manifest.score_kinds]
            parts = [engine.log_likelihood(status.name, test[i:i + ROWS_PER_REQUEST], seed=i, scores=kinds,
                                           percentile=True) for i in range(0, len(test), ROWS_PER_REQUEST)]
            for name in ("log_prob", *kinds):
                pct = np.concatenate([p.percentiles[name] for p in parts])
                rates = " ".join(f"{np.mean(pct < p) * 100:5.1f}%" for p in LEVELS)
                print(f"{status.name:16} {name:18} {rates}  {np.median(pct):6.1f}")


if __name__ == "__main__":
    main()
