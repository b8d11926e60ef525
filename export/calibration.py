"""Score calibration at export: the distribution of every served score over held-out in-distribution rows.

``genserve export`` scores rows the model did not train on (the validation split of a built-in data set, or
a user's file given with ``--calibration``) through the same serving program over the same ONNX graphs the
server runs, and stores in the manifest, per score (log_prob and each score kind of genserve.core.scores that
applies), ~100 quantiles: enough for the server to interpolate the percentile of any row's score among
in-distribution data, so a pipeline can flag "below the 1st percentile" with a threshold fixed when the model
was released instead of one taken from the batch being scored.

The score kinds' own numbers (``core.scores.fit``: the typicality entropy, the complexity reference model,
the z-score moments) are fitted on other in-distribution rows (the training split; half of a ``--calibration``
file), so the calibration rows measure them as the server will meet unseen data.

Stochastic scores. A flow's or pPCA's dequantisation bound and a VAE's importance-weighted bound are
estimates with noise. Calibration scores every row once with the served defaults (the same draws / K a
request that leaves them unset gets) and a fixed seed, chunk by chunk as ``score_stream`` seeds chunks, so
the calibration distribution includes the noise of one estimate per row, as a served score with the same
defaults has: its percentile is comparable. A request with more draws (a tighter, higher bound) would be
compared against a distribution of looser bounds; the ``noise`` text of each entry says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from genserve.core.noise import Noise, derived_seed
from genserve.core.spec import DataSpec
from genserve.v1 import manifest_pb2 as pb

PROBABILITIES = tuple(sorted({0.0, 0.001, 0.005, *(round(0.01 * k, 2) for k in range(1, 100)), 0.995, 0.999, 1.0}))
"""The quantile levels stored: every percent, and finer tails (0.1%, 0.5%, 99.5%, 99.9%) to interpolate flags."""
SEED = 20261202
"""Seed of the calibration's scoring noise (and of the subsets and batches drawn below)."""
CHUNK_ROWS = 1024
"""Rows per scoring call, seeded ``derived_seed(SEED, offset)`` as the client's score_stream seeds chunks."""
MAX_ROWS = 10000
"""Most calibration rows (and fit rows) scored; a larger set is subsampled with SEED, to keep export fast (fewer
for a model whose score costs many graph rows: the budgets below)."""
MIN_ROWS = 20
"""Fewer calibration rows than this give no calibration: the quantiles would be noise."""
FIT_GRAPH_ROWS = 100_000
"""Budget of graph rows (rows x draws or importance samples) for scoring the fit rows: a VAE scored with
K = 500 fits its score kinds on 256 training rows (MIN_FIT_ROWS), not all of them, so export stays fast."""
MIN_FIT_ROWS = 256
CALIBRATION_GRAPH_ROWS = 2_000_000
"""Budget of graph rows for the calibration rows: at most this / (draws or K) rows, but at least
MIN_CALIBRATION_ROWS (a VAE with K = 500 calibrates on up to 4000 rows of a large set)."""
MIN_CALIBRATION_ROWS = 1000
BATCH_ROWS = 64
"""Per-batch score kinds (typicality) are calibrated over random batches of this many rows."""
BATCHES = 2000
"""How many such batches (drawn without replacement within a batch, with SEED)."""


@dataclass
class Calibration:
    """What export adds to the manifest: score kinds, their fitted parameters and the calibration entries."""

    kinds: list[pb.ScoreKind] = field(default_factory=list)
    parameters: dict[str, float] = field(default_factory=dict)
    entries: list[pb.ScoreCalibration] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""
    """Why there is no calibration, when there is none."""

    def apply(self, manifest: pb.ModelManifest) -> None:
        manifest.score_kinds.extend(self.kinds)
        manifest.calibration.extend(self.entries)
        for k, v in self.parameters.items():
            manifest.parameters[k] = float(v)

    def summary(self) -> str:
        if not self.entries:
            return self.note or "no calibration (the model has no likelihood)"
        rows = self.entries[0].rows
        names = ", ".join(e.score for e in self.entries)
        return f"{names} over {rows} rows of {self.entries[0].data} ({self.seconds:.1f} s)"


@dataclass(frozen=True)
class CalibrationData:
    """Held-out in-distribution rows: ``rows`` to calibrate on, ``fit`` to fit the score kinds on (None: fit
    on the calibration rows), and what they are (``data``, stored with the calibration)."""

    rows: np.ndarray
    fit: np.ndarray | None
    data: str


def builtin_data(ckpt: dict[str, Any], spec: DataSpec) -> CalibrationData | None:
    """The validation split of the checkpoint's data set (calibration) and its training split (fit); None when
    the data cannot be loaded here (a moved user file) or do not match the model's spec."""
    from genserve.training.data import load_dataset

    cfg = ckpt.get("config") or {}
    name = cfg.get("dataset", spec.name)
    try:
        data = load_dataset(name, seed=int(cfg.get("seed", 0)), levels=int(cfg.get("levels", 0)))
    except (ValueError, OSError):
        return None
    if tuple(data.spec.shape) != tuple(spec.shape) or len(data.val) < MIN_ROWS:
        return None
    return CalibrationData(np.asarray(data.val, np.float32), np.asarray(data.train, np.float32),
                           f"{Path(str(name)).name} validation split (score kinds fitted on its training split)")


def split_data(rows: np.ndarray, val: np.ndarray | None, data: str) -> CalibrationData:
    """``--factory --data``: calibrate on the data set's validation split and fit on its training rows."""
    return CalibrationData(np.asarray(val, np.float32), np.asarray(rows, np.float32), data)


def file_data(path: str | Path, spec: DataSpec) -> CalibrationData:
    """``--calibration FILE`` (.npy/.npz/.csv/.parquet): its rows shuffled with SEED, the first half to
    calibrate on, the second half to fit the score kinds on; ValueError when it does not fit the model."""
    from genserve.export.repository import sha256_file
    from genserve.training.data import read_table

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--calibration {path}: no such file; give in-distribution rows the model did not train "
                         "on (.npy, .npz, .csv or .parquet)")
    try:
        x, _ = read_table(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"--calibration {path}: cannot read it ({e})") from None
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2 and x.shape[1] == spec.dim and tuple(spec.shape) != (spec.dim,):
        x = x.reshape(len(x), *spec.shape)
    try:
        spec.check(x, f"--calibration {path.name}")
    except ValueError as e:
        raise ValueError(f"{e}; the calibration rows must be examples of the model's data "
                         f"(shape (N, {', '.join(map(str, spec.shape))}))") from None
    if len(x) < 2 * MIN_ROWS:
        raise ValueError(f"--calibration {path}: {len(x)} rows; give at least {2 * MIN_ROWS} (half calibrate the "
                         "percentiles, half fit the score kinds)")
    x = x[np.random.default_rng(SEED).permutation(len(x))]
    half = len(x) // 2
    return CalibrationData(x[:half], x[half:], f"{path.name} (sha256 {sha256_file(path)[:16]}): half of its rows, "
                           "shuffled; the score kinds fitted on the other half")


def calibrate(program: Any, run: Callable, spec: DataSpec, likelihood_kind: str, data: CalibrationData,
              operations: tuple[str, ...] = ("log_likelihood",)) -> Calibration:
    """Fit the score kinds and measure every score's quantiles over ``data`` with the serving ``program``
    over ``run`` (the exported ONNX graphs); an empty Calibration for a model without a likelihood."""
    import time

    from genserve.core import scores

    start = time.perf_counter()
    if "log_likelihood" not in operations or likelihood_kind in ("none", ""):
        return Calibration()
    cost = draws_per_row(program, spec)
    rows = _subset(data.rows, 1, max(MIN_CALIBRATION_ROWS, CALIBRATION_GRAPH_ROWS // cost))
    if len(rows) < MIN_ROWS:
        return Calibration(note=f"no calibration: {len(rows)} rows of {data.data}, fewer than {MIN_ROWS}")
    fit_rows = rows
    if data.fit is not None and len(data.fit) >= 2:
        fit_rows = _subset(data.fit, 2, max(MIN_FIT_ROWS, FIT_GRAPH_ROWS // cost))
    log_prob = score_rows(program, run, rows, SEED)
    fit_log_prob = log_prob if fit_rows is rows else score_rows(program, run, fit_rows, derived_seed(SEED, 1))
    names = scores.applicable(spec, likelihood_kind)
    params = scores.fit(spec, fit_rows, fit_log_prob) if names else {}
    noise = noise_text(program, spec)
    out = Calibration(parameters=params)
    out.entries.append(entry("log_prob", log_prob, len(rows), data.data, noise))
    for name in names:
        kind = scores.KINDS[name]
        out.kinds.append(pb.ScoreKind(name=name, description=kind.description, higher_is_normal=kind.higher_is_normal,
                                      per_batch=kind.per_batch))
        if kind.per_batch:
            values = batch_scores(name, spec, rows, log_prob, params)
            how = (f"{noise} Per batch: the quantiles are over {BATCHES} random batches of {BATCH_ROWS} calibration "
                   f"rows (seed {SEED}), so a request of about {BATCH_ROWS} rows compares like with like; the "
                   "statistic's spread shrinks as 1/sqrt(rows), so larger requests read as more typical.")
        else:
            values = scores.compute(name, spec, rows, log_prob, params)
            how = noise
        out.entries.append(entry(name, values, len(rows), data.data, how))
    out.seconds = time.perf_counter() - start
    return out


def score_rows(program: Any, run: Callable, x: np.ndarray, seed: int) -> np.ndarray:
    """log_prob (N,) float64 of the rows with the program's served defaults, chunk by chunk, chunk at row r
    seeded ``derived_seed(seed, r)``."""
    from genserve.server.programs.base import run_sync

    async def go() -> np.ndarray:
        parts = []
        for offset in range(0, len(x), CHUNK_ROWS):
            chunk = x[offset:offset + CHUNK_ROWS].astype(np.float32)
            lp = await program.log_likelihood(run, chunk, Noise(derived_seed(seed, offset)))
            parts.append(np.asarray(lp, dtype=np.float64))
        return np.concatenate(parts)

    return run_sync(go())


def batch_scores(name: str, spec: DataSpec, x: np.ndarray, log_prob: np.ndarray, params: dict[str, float]
                 ) -> np.ndarray:
    """A per-batch kind's value over BATCHES random batches of BATCH_ROWS rows (fewer when there are fewer)."""
    from genserve.core import scores

    rng = np.random.default_rng(SEED)
    size = min(BATCH_ROWS, len(x))
    values = np.empty(BATCHES)
    for b in range(BATCHES):
        pick = rng.choice(len(x), size=size, replace=False)
        values[b] = scores.compute(name, spec, x[pick], log_prob[pick], params)[0]
    return values


def entry(score: str, values: np.ndarray, rows: int, data: str, noise: str) -> pb.ScoreCalibration:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if len(finite) < MIN_ROWS:
        raise ValueError(f"calibration: only {len(finite)} finite {score} values over {data}; the model scores "
                         "its own in-distribution rows as -inf or NaN")
    quantiles = np.quantile(finite, PROBABILITIES)
    return pb.ScoreCalibration(score=score, probabilities=list(PROBABILITIES), quantiles=quantiles.tolist(),
                               rows=int(rows), data=data, seed=SEED, noise=noise)


def noise_text(program: Any, spec: DataSpec) -> str:
    """How the noise of the model's log_prob enters its calibration (stored with each entry)."""
    declared = program.declared("log_likelihood")
    if "importance_samples" in declared:
        k = int(program.param("importance_samples"))
        return (f"log_prob is the importance-weighted bound with the served default K = {k} importance samples; "
                f"each row was scored once (noise seeded {SEED}, chunks of {CHUNK_ROWS} rows seeded as "
                "score_stream seeds them), so the quantiles include one estimate's noise per row, as a served "
                "score with the default K has. A request with another K is not comparable.")
    if "draws" in declared and spec.discrete:
        k = int(program.param("dequant_draws"))
        return (f"log_prob is the dequantisation bound over the served default of {k} uniform draws; each row was "
                f"scored once (noise seeded {SEED}, chunks of {CHUNK_ROWS} rows seeded as score_stream seeds "
                "them), so the quantiles include one estimate's noise per row, as a served score with the default "
                "draws has. A request with other draws is not comparable.")
    return "none: log_prob is deterministic"


def draws_per_row(program: Any, spec: DataSpec) -> int:
    """Graph rows one scored row costs with the served defaults (K importance samples, dequantisation draws)."""
    declared = program.declared("log_likelihood")
    if "importance_samples" in declared:
        return max(1, int(program.param("importance_samples")))
    if "draws" in declared and spec.discrete:
        return max(1, int(program.param("dequant_draws")))
    return 1


def _subset(x: np.ndarray, salt: int, most: int = MAX_ROWS) -> np.ndarray:
    """At most ``most`` rows of x (MAX_ROWS at most), a seeded random subset in their order."""
    most = min(most, MAX_ROWS)
    if len(x) <= most:
        return x
    pick = np.sort(np.random.default_rng([SEED, salt]).choice(len(x), size=most, replace=False))
    return x[pick]
