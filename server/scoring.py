"""What a LogLikelihood request asks beside log_prob: score kinds, percentiles and per-dimension terms.

The engine calls ``check`` when it admits a request (so a bad request fails before any graph runs, on every
face alike) and ``extend`` after the family program scored the rows. Score kinds are computed by
genserve.core.scores from (x, log_prob, the manifest's fitted ``score.<kind>.<name>`` parameters); percentiles
interpolate the manifest's calibration quantiles (measured at export over held-out in-distribution rows) and
are oriented so that a low percentile is anomalous for every score: for a kind where higher means more
anomalous the percentile reported is 100 minus the plain one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from genserve.core.spec import DataSpec
from genserve.server.errors import EngineError, InvalidInput
from genserve.v1 import manifest_pb2

LOG_PROB = "log_prob"
"""The name the raw log-likelihood has among the scores (calibration entries, percentiles)."""

NO_PER_DIMENSION = {
    "flow": "a flow's coupling layers mix every dimension with every other, so log p(x) has no exact "
            "per-dimension factorisation (its latent z = f(x) is not aligned with the data's dimensions)",
    "implicit": "a GAN has no likelihood to decompose",
    "energy": "an energy-based model's -E(x) is unnormalised and does not factorise over dimensions",
    "mixture": "a mixture's log p(x) = log sum_k w_k p_k(x) does not split into per-dimension terms",
}
"""Why a family's program gives no per-dimension terms (FAILED_PRECONDITION messages)."""


class NotCalibrated(EngineError):
    """Percentiles asked of a model exported without calibration."""

    code = "FAILED_PRECONDITION"
    reason = "NOT_CALIBRATED"


class NoPerDimension(EngineError):
    """Per-dimension terms asked of a family that cannot give them exactly."""

    code = "FAILED_PRECONDITION"
    reason = "PER_DIMENSION_NOT_SUPPORTED"


def kind_names(manifest: manifest_pb2.ModelManifest) -> list[str]:
    return [k.name for k in manifest.score_kinds]


def check_fitted(manifest: manifest_pb2.ModelManifest, spec: DataSpec) -> None:
    """The manifest's fitted score numbers and calibration, checked once when a version loads; ValueError naming
    the entry a damaged or hand-edited manifest got wrong. Unchecked, a NaN or a spread of zero gave NaN or
    infinite scores to every request that asked for that kind, and a missing or mismatched entry failed each
    such request instead of the load. Each listed kind is computed once on two rows of zeros."""
    params = dict(manifest.parameters)  # a plain dict: a protobuf map reads a missing entry as 0.0
    for key, value in params.items():
        if not key.startswith("score."):
            continue
        if not math.isfinite(value):
            raise ValueError(f"manifest parameter {key!r} is {value!r}; fitted score numbers are finite; "
                             "re-export the model")
        if (key.endswith("std") or ".var." in key) and not value > 0:  # a spread: a standard deviation, a variance
            raise ValueError(f"manifest parameter {key!r} is {value!r}; a fitted spread is positive; "
                             "re-export the model")
    kinds = kind_names(manifest)
    if kinds:
        from genserve.core import scores as fitted

        x, log_prob = np.zeros((2, *spec.shape)), np.full(2, -100.0)
        for kind in kinds:
            try:
                value = np.asarray(fitted.compute(kind, spec, x, log_prob, params), dtype=np.float64)
            except (ValueError, KeyError, IndexError) as e:
                raise ValueError(f"score kind {kind!r} cannot be computed from the manifest's parameters "
                                 f"({type(e).__name__}: {e}); re-export the model") from None
            if value.shape != (2,) or not np.isfinite(value).all():
                raise ValueError(f"score kind {kind!r} gives {value.tolist()} for rows of zeros from the "
                                 "manifest's parameters; re-export the model")
    for c in manifest.calibration:
        q, p = np.asarray(c.quantiles, np.float64), np.asarray(c.probabilities, np.float64)
        if (len(q) != len(p) or len(q) < 2 or not np.isfinite(q).all() or not np.isfinite(p).all()
                or (p < 0).any() or (p > 1).any() or (np.diff(p) < 0).any() or (np.diff(q) < 0).any()):
            raise ValueError(f"the calibration of {c.score!r} needs at least two quantiles, as many as "
                             "probabilities, both finite and increasing, probabilities in [0, 1]; "
                             "re-export the model")


def check(m, scores: tuple[str, ...], percentile: bool, per_dimension: bool) -> None:
    """The request's extra asks against what the model ``m`` (a LoadedModel) has; raises what to fix."""
    manifest = m.manifest
    if scores:
        have = kind_names(manifest)
        unknown = [s for s in scores if s not in have]
        if unknown:
            offer = (f"its score kinds are: {', '.join(have)}" if have else
                     "it serves no score kinds (re-export it with a genserve that fits them, "
                     "`genserve export`)")
            raise InvalidInput(f"{m.name} has no score kind {', '.join(map(repr, unknown))}; {offer}", "scores")
        if len(set(scores)) != len(scores):
            raise InvalidInput(f"{', '.join(scores)} names a score kind twice; name each once", "scores")
    if percentile:
        calibrated = {c.score for c in manifest.calibration}
        missing = [s for s in (LOG_PROB, *scores) if s not in calibrated]
        if missing:
            what = ("was exported without calibration" if not calibrated else
                    f"has no calibration of {', '.join(missing)} (it has: {', '.join(sorted(calibrated))})")
            raise NotCalibrated(f"percentile: {m.name} version {m.version} {what}; re-export it with "
                                "`genserve export` (which scores held-out in-distribution data, or a file given "
                                "with --calibration, into the manifest), or leave percentile unset")
    if per_dimension and not hasattr(m.program, "log_likelihood_terms"):
        why = NO_PER_DIMENSION.get(m.family, f"the {m.family} family's program does not give them")
        raise NoPerDimension(f"per_dimension: {m.name} is a {m.model} model ({m.family}) and has no per-dimension "
                             f"terms: {why}; leave per_dimension unset (docs/scoring.md lists what each family "
                             "gives)")


def compute_scores(m, x: np.ndarray, log_prob: np.ndarray, scores: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The requested score kinds, each (N,) float64, by name (genserve.core.scores.compute)."""
    from genserve.core import scores as kinds  # imported when first asked: most requests ask for no kind

    params = m.manifest.parameters
    out = {}
    for name in scores:
        value = np.asarray(kinds.compute(name, m.spec, x, log_prob, params), dtype=np.float64)
        if value.shape != log_prob.shape:
            raise RuntimeError(f"score kind {name} gave shape {value.shape} for {log_prob.shape[0]} rows")
        out[name] = value
    return out


def percentile_of(calibration: manifest_pb2.ScoreCalibration, values: np.ndarray, higher_is_normal: bool
                  ) -> np.ndarray:
    """Percentiles (N,) float64 in [0, 100] of ``values`` among the calibration's distribution, by linear
    interpolation of its quantiles (ties, as a discrete score has, take the middle of their probabilities);
    low = anomalous, so a score where higher is anomalous reports 100 minus the plain percentile."""
    q = np.asarray(calibration.quantiles, dtype=np.float64)
    p = np.asarray(calibration.probabilities, dtype=np.float64)
    q, first, counts = np.unique(q, return_index=True, return_counts=True)
    if len(q) < len(p):  # mid-probability of each run of equal quantiles
        p = np.array([p[i:i + c].mean() for i, c in zip(first, counts, strict=True)])
    else:
        p = p[first]
    plain = 100.0 * np.interp(np.asarray(values, dtype=np.float64), q, p, left=0.0, right=1.0)
    # NaN scores (a -inf log_prob) percentile 0: as anomalous as it gets
    plain = np.where(np.isnan(plain), 0.0, plain)
    return plain if higher_is_normal else 100.0 - plain


def percentiles(manifest: manifest_pb2.ModelManifest, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The percentile of each score in ``values`` (log_prob and score kinds) among the calibration data."""
    calibration = {c.score: c for c in manifest.calibration}
    higher = {k.name: k.higher_is_normal for k in manifest.score_kinds}
    return {name: percentile_of(calibration[name], v, higher.get(name, True)) for name, v in values.items()}
