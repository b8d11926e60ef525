"""OOD-robust score kinds served beside the raw log-likelihood: what each means, how it is fitted, how it is computed.

Deep generative likelihoods rate simple inputs as likely (Nalisnick et al. 2019, "Do deep generative models know
what they don't know?"): a blank 8x8 digit is more probable under a PixelCNN than any real digit, because a
likelihood mixes "how typical is this structure" with "how few bits does this input need at all". The kinds here
take the second part out, each fitted on in-distribution rows only and never on examples of anomalies:

- ``complexity_ratio`` (Serrà et al. 2020, "Input complexity and out-of-distribution detection with
  likelihood-based generative models"): log p_model(x) - log p_ref(x), the log-likelihood ratio of the model to a
  low-capacity reference model fitted on the same in-distribution data. For images the reference is a causal
  local predictor (the LOCO-I / JPEG-LS median edge predictor) with a fitted residual distribution per local
  activity context, the statistical core of a lossless image compressor; for discrete rows that are not images
  it is independent per-feature categoricals (the local predictor along the row when they would need more than
  CATEGORICAL_MAX_NUMBERS numbers); for continuous rows a Gaussian. Inputs that are merely simple get
  a high p_ref too, so their ratio stays low; only structure the model learnt beyond local smoothness raises it.
- ``min_z``: the smaller of two in-distribution z-scores, that of log p(x) and that of the complexity ratio. The
  ratio alone forgives inputs that are complex and unlikely alike (30% of pixels replaced by noise: the model and
  the reference both dislike them, their ratio barely moves); log p alone forgives simple inputs. A row is normal
  only when both tests call it normal (a union-intersection test), each test standardised on in-distribution
  rows so neither dominates by its units.
- ``typicality`` (Nalisnick et al. 2019, "Detecting out-of-distribution inputs to deep generative models using
  typicality"): |mean over the request's n rows of -log p(x) - H|, H the in-distribution mean of -log p. A batch
  of in-distribution rows has an average code length near H; both unusually long (noise) and unusually short
  (blank) averages are anomalous. Per batch: every row of a request gets its request's statistic. It is served
  standardised, sqrt(n) |mean - H| / s (s the in-distribution sd of -log p): for in-distribution rows about
  |N(0, 1)| whatever n (central limit), so one calibration, measured at export on batches of one size, gives
  percentiles that hold for requests of any size (the plain gap shrinks as 1/sqrt(n)). Manifests exported
  before the standardised form lack ``score.typicality.std`` and keep the plain gap their calibration measured.
- ``typicality_row``: the same two-sided test for one row at a time, |-log p(x) - H| / s with s the
  in-distribution standard deviation of -log p, so it does not depend on how the server batched the rows.

API (export fits and stores, the server computes per request; both through these three functions):
``applicable(spec, likelihood_kind)`` lists the kinds a model can serve, ``fit(spec, x, log_prob)`` returns the
fitted numbers as ``{"score.<kind>.<name>": float}`` for ModelManifest.parameters, and ``compute(kind, spec, x,
log_prob, params)`` returns one float64 score per row.

Example:
    >>> from genserve.core.spec import DataSpec
    >>> spec = DataSpec("toy", (2, 2), "discrete", levels=3)
    >>> rng = np.random.default_rng(0)
    >>> x = rng.integers(0, 3, size=(50, 2, 2)).astype(np.float32)
    >>> params = fit(spec, x, -rng.normal(4.0, 1.0, 50))
    >>> compute("typicality", spec, x[:3], np.array([-4.0, -4.0, -4.0]), params).shape
    (3,)
    >>> sorted(applicable(spec, "exact"))
    ['complexity_ratio', 'min_z', 'typicality', 'typicality_row']
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from genserve.core.spec import DataSpec


@dataclass(frozen=True)
class ScoreKindDef:
    """One score kind as the manifest and the responses name it (ModelManifest.score_kinds)."""

    name: str
    description: str
    """What the number means, its units, and what it was fitted on."""
    higher_is_normal: bool
    """True when a higher score means more in-distribution (as for log_prob)."""
    per_batch: bool
    """True when a row's score depends on the other rows of its request."""


KINDS: dict[str, ScoreKindDef] = {k.name: k for k in (
    ScoreKindDef(
        "complexity_ratio",
        "log p_model(x) - log p_ref(x) in nats: the model's log-likelihood minus that of a low-capacity reference "
        "model fitted at export on in-distribution rows (images: a causal median-edge predictor with a fitted "
        "residual distribution per local-activity context, as in lossless image compressors; other discrete rows: "
        "independent per-feature categoricals, or that predictor along the row when long; continuous rows: a "
        "Gaussian). Simple inputs (blank, constant) are "
        "likely under both, so only structure the model learnt beyond local smoothness scores high (Serra et al. "
        "2020). Higher is more normal. Alone it forgives inputs the reference finds even harder than the model "
        "does (dense noise patterns); min_z guards against that.",
        higher_is_normal=True, per_batch=False),
    ScoreKindDef(
        "min_z",
        "min((log p(x) - m1) / s1, (r(x) - m2) / s2), unitless: the smaller of two z-scores, of the log-likelihood "
        "and of the complexity_ratio r(x), with m and s their mean and standard deviation over in-distribution "
        "rows measured at export. Low when either test finds the row anomalous: unlikely under the model "
        "(noise, corrupted pixels) or likely only because it is simple (blank, constant images). Higher is more "
        "normal.",
        higher_is_normal=True, per_batch=False),
    ScoreKindDef(
        "typicality",
        "sqrt(n) |mean over the request's n rows of -log p(x) - H| / s, H and s the mean and standard deviation of "
        "-log p(x) over in-distribution rows measured at export: the typicality test of Nalisnick et al. 2019, "
        "standardised so that in-distribution batches of any size score about |N(0, 1)| (unitless) and the "
        "calibrated percentile holds whatever the request size. Two-sided, so unusually likely inputs (blank "
        "images) are flagged as well as unlikely ones. Every row of a request gets its request's value; send rows "
        "that belong together in one request. Higher is more anomalous.",
        higher_is_normal=False, per_batch=True),
    ScoreKindDef(
        "typicality_row",
        "|-log p(x) - H| / s for each row alone, H and s the mean and standard deviation of -log p(x) over "
        "in-distribution rows measured at export (a two-sided z-score of the code length, unitless): flags rows "
        "that are unusually likely (blank, constant images) as well as unusually unlikely ones, independent of "
        "the request's other rows. Higher is more anomalous.",
        higher_is_normal=False, per_batch=False),
)}
"""The score kinds genserve knows, by name."""

PREFIX = "score."
"""Every fitted number's key in ModelManifest.parameters starts with this, then the kind's name."""

# Reference models of complexity_ratio, stored as a number under "score.complexity_ratio.reference".
REF_LOCAL, REF_CATEGORICAL, REF_GAUSSIAN, REF_GAUSSIAN_DIAG = 1.0, 2.0, 3.0, 4.0
CATEGORICAL_MAX_NUMBERS = 4096
"""Discrete rows that are not images get per-feature categoricals (D x levels numbers in the manifest) up to this
many numbers; longer rows are read as a one-row image by the local predictor, whose size does not grow with D."""
FULL_COVARIANCE_MAX_DIM = 64
"""Continuous rows up to this many features get a full-covariance Gaussian reference (D(D+1)/2 numbers in the
manifest); wider rows a diagonal one."""
ACTIVITY_EDGES = (0.0, 0.125, 0.25, 0.5, 1.0)
"""Context boundaries of the image reference: local activity |NE-N| + |N-NW| + |NW-W| as a fraction of the level
range (levels - 1); activity above the last edge is its own context. Fixed fractions, not fitted, so the contexts
mean the same for every data set."""
SMOOTHING = 0.5
"""Pseudo-count added to every residual bin of the reference tables (the Krichevsky-Trofimov estimator), so an
unseen residual costs a finite number of nats."""


def applicable(spec: DataSpec, likelihood_kind: str) -> list[str]:
    """Names of the score kinds a model with this data and likelihood can serve.

    Every kind needs a log-likelihood of some sort. An unnormalised one (energy models, -E(x) = log p(x) + log Z)
    serves the typicality kinds, whose H is measured with the same unknown constant; it does not serve the
    complexity kinds: a ratio to a reference in nats is meaningful only when the model's score is in nats too,
    and an energy trained by short-run Langevin sampling has an arbitrary scale (on the quickstart EBM, -E varies
    by 0.02 nats over the test digits, so the ratio is just minus the reference).
    """
    kind = likelihood_kind.lower().removeprefix("likelihood_kind_")
    if kind in ("", "none", "unspecified"):
        return []
    if kind == "unnormalized":
        return [k for k in KINDS if k.startswith("typicality")]
    return list(KINDS)


def fit(spec: DataSpec, x_train: np.ndarray, log_prob_train: np.ndarray) -> dict[str, float]:
    """The numbers every kind needs, fitted on in-distribution rows only: ``{"score.<kind>.<name>": float}``.

    ``x_train`` (N, *spec.shape) in raw data units, ``log_prob_train`` (N,) the model's log-likelihood of those
    rows in nats. Training rows are fine (export fits on the training split): the reference model never saw
    them, and the bias an overfitted model puts into H and the z-score moments (its training rows score higher
    than unseen ones) is measured by the calibration, which export runs on held-out rows.
    """
    x, log_prob = _rows(spec, x_train, log_prob_train)
    if len(log_prob) < 2:
        raise ValueError(f"fitting score kinds needs at least 2 in-distribution rows, got {len(log_prob)}")
    if not np.isfinite(log_prob).all():
        raise ValueError("log_prob of the in-distribution rows has NaN or infinite values; score kinds cannot be "
                         "fitted on them")
    nll = -log_prob
    entropy, std = float(nll.mean()), _std(nll)
    params = {
        "score.typicality.entropy": entropy, "score.typicality.std": std, "score.typicality.rows": float(len(nll)),
        "score.typicality_row.entropy": entropy, "score.typicality_row.std": std,
    }
    params.update(_fit_reference(spec, x))
    ratio = log_prob - reference_log_prob(spec, x, params)
    params.update({
        "score.min_z.log_prob_mean": float(log_prob.mean()), "score.min_z.log_prob_std": _std(log_prob),
        "score.min_z.ratio_mean": float(ratio.mean()), "score.min_z.ratio_std": _std(ratio),
    })
    return params


def compute(kind: str, spec: DataSpec, x: np.ndarray, log_prob: np.ndarray,
            params: Mapping[str, float]) -> np.ndarray:
    """Score kind ``kind`` of each row of one request: (N,) float64, oriented as KINDS[kind].higher_is_normal.

    ``x`` (N, *spec.shape) raw data units, ``log_prob`` (N,) the model's log-likelihood in nats, ``params``
    what ``fit`` returned (ModelManifest.parameters; other keys are ignored). A per-batch kind treats the N rows
    as one batch.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown score kind {kind!r}; known kinds: {', '.join(KINDS)}")
    x, log_prob = _rows(spec, x, log_prob)
    if kind == "typicality":
        h = _param(params, kind, "entropy")
        gap = abs(float(np.mean(-log_prob)) - h)
        s = params.get("score.typicality.std")
        if s is not None:  # standardised (see the module docstring); older manifests calibrated the plain gap
            gap *= math.sqrt(len(log_prob)) / s
        return np.full(len(log_prob), gap, dtype=np.float64)
    if kind == "typicality_row":
        h, s = _param(params, kind, "entropy"), _param(params, kind, "std")
        return np.abs(-log_prob - h) / s
    ratio = log_prob - reference_log_prob(spec, x, params)
    if kind == "complexity_ratio":
        return ratio
    z_log_prob = (log_prob - _param(params, kind, "log_prob_mean")) / _param(params, kind, "log_prob_std")
    z_ratio = (ratio - _param(params, kind, "ratio_mean")) / _param(params, kind, "ratio_std")
    return np.minimum(z_log_prob, z_ratio)


def reference_log_prob(spec: DataSpec, x: np.ndarray, params: Mapping[str, float]) -> np.ndarray:
    """log p_ref(x) (N,) float64 nats under the complexity_ratio's fitted reference model."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, *spec.shape)
    ref = _param(params, "complexity_ratio", "reference")
    if ref == REF_LOCAL:
        return _image_log_prob(spec, x, params)
    if ref == REF_CATEGORICAL:
        return _categorical_log_prob(spec, x, params)
    if ref in (REF_GAUSSIAN, REF_GAUSSIAN_DIAG):
        return _gaussian_log_prob(spec, x, params)
    raise ValueError(f"unknown complexity_ratio reference model {ref}; re-export the model with this genserve")


def _rows(spec: DataSpec, x: np.ndarray, log_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    log_prob = np.asarray(log_prob, dtype=np.float64).reshape(-1)
    if x.shape[1:] != spec.shape:
        raise ValueError(f"x has shape {x.shape} but this data needs (N, {', '.join(map(str, spec.shape))})")
    if len(x) != len(log_prob):
        raise ValueError(f"x has {len(x)} rows but log_prob has {len(log_prob)} values; give one per row")
    return x, log_prob


def _std(v: np.ndarray) -> float:
    # A floor keeps z-scores finite for a model whose in-distribution scores are all equal.
    return float(max(np.std(v, ddof=1), 1e-6 * (1.0 + abs(float(np.mean(v))))))


def _param(params: Mapping[str, float], kind: str, name: str) -> float:
    key = f"{PREFIX}{kind}.{name}"
    if key not in params:
        raise ValueError(f"score kind {kind!r} was not fitted for this model ({key} missing from its parameters); "
                         "re-export it with this genserve")
    return float(params[key])


# ---- complexity_ratio's reference models ------------------------------------------------------------------------


def _fit_reference(spec: DataSpec, x: np.ndarray) -> dict[str, float]:
    key = PREFIX + "complexity_ratio."
    if spec.discrete and (spec.is_image or spec.dim * spec.levels > CATEGORICAL_MAX_NUMBERS):
        logq = _image_tables(spec, x)
        out = {key + "reference": REF_LOCAL, key + "levels": float(spec.levels)}
        out.update({f"{key}logq.{k}.{j}": float(v) for (k, j), v in np.ndenumerate(logq)})
        return out
    if spec.discrete:
        flat = x.reshape(len(x), -1).astype(np.int64)
        counts = np.stack([np.bincount(flat[:, d], minlength=spec.levels) for d in range(flat.shape[1])])
        logq = np.log(counts + SMOOTHING) - np.log(counts.sum(axis=1, keepdims=True) + SMOOTHING * spec.levels)
        out = {key + "reference": REF_CATEGORICAL, key + "levels": float(spec.levels)}
        out.update({f"{key}logq.{d}.{v}": float(p) for (d, v), p in np.ndenumerate(logq)})
        return out
    flat = x.reshape(len(x), -1)
    mean = flat.mean(axis=0)
    dim = flat.shape[1]
    # Shrinkage toward the diagonal, weight D/N (more with fewer rows per feature), keeps the covariance
    # invertible and its inverse tame when rows are few; the tiny floor on the variances does so for a constant
    # feature.
    var = flat.var(axis=0) + 1e-9 * (1.0 + flat.var(axis=0).max())
    out = {key + "dim": float(dim)}
    out.update({f"{key}mean.{i}": float(m) for i, m in enumerate(mean)})
    if dim > FULL_COVARIANCE_MAX_DIM:
        out[key + "reference"] = REF_GAUSSIAN_DIAG
        out.update({f"{key}var.{i}": float(v) for i, v in enumerate(var)})
        return out
    cov = np.cov(flat, rowvar=False).reshape(dim, dim)
    shrink = min(1.0, dim / max(len(flat), 1))
    cov = (1 - shrink) * cov + shrink * np.diag(var)
    cov[np.diag_indices(dim)] = np.maximum(np.diag(cov), var)
    precision = np.linalg.inv(cov)
    out[key + "reference"] = REF_GAUSSIAN
    out[key + "logdet"] = float(np.linalg.slogdet(cov)[1])
    out.update({f"{key}precision.{i}.{j}": float(precision[i, j]) for i in range(dim) for j in range(i, dim)})
    return out


def _gaussian_log_prob(spec: DataSpec, x: np.ndarray, params: Mapping[str, float]) -> np.ndarray:
    key = PREFIX + "complexity_ratio."
    dim = spec.dim
    if int(params.get(key + "dim", -1)) != dim:
        raise ValueError(f"complexity_ratio was fitted on {params.get(key + 'dim')} features but the data have "
                         f"{dim}; re-export the model")
    d = x.reshape(len(x), -1) - np.array([params[f"{key}mean.{i}"] for i in range(dim)])
    if params[key + "reference"] == REF_GAUSSIAN_DIAG:
        var = np.array([params[f"{key}var.{i}"] for i in range(dim)])
        return -0.5 * ((d * d / var).sum(axis=1) + np.log(var).sum() + dim * math.log(2 * math.pi))
    precision = np.zeros((dim, dim))
    for i in range(dim):
        for j in range(i, dim):
            precision[i, j] = precision[j, i] = params[f"{key}precision.{i}.{j}"]
    quad = np.einsum("ni,ij,nj->n", d, precision, d)
    return -0.5 * (quad + params[key + "logdet"] + dim * math.log(2 * math.pi))


def _categorical_log_prob(spec: DataSpec, x: np.ndarray, params: Mapping[str, float]) -> np.ndarray:
    key = PREFIX + "complexity_ratio."
    _check_levels(spec, params)
    dim = spec.dim
    logq = np.array([[params[f"{key}logq.{d}.{v}"] for v in range(spec.levels)] for d in range(dim)])
    flat = np.clip(np.rint(x.reshape(len(x), -1)), 0, spec.levels - 1).astype(np.int64)
    return logq[np.arange(dim), flat].sum(axis=1)


def _check_levels(spec: DataSpec, params: Mapping[str, float]) -> None:
    fitted = int(params.get(PREFIX + "complexity_ratio.levels", -1))
    if fitted != spec.levels:
        raise ValueError(f"complexity_ratio was fitted on data with {fitted} levels but these have {spec.levels}; "
                         "re-export the model")


def _planes(spec: DataSpec, x: np.ndarray) -> np.ndarray:
    """(N, H, W[, C]) -> (N*C, H, W) integer planes, each channel predicted from its own neighbours; rows that
    are not images -> (N, 1, D), one row of pixels."""
    x = np.clip(np.rint(x), 0, spec.levels - 1).astype(np.int64)
    if not spec.is_image:
        return x.reshape(len(x), 1, -1)
    if x.ndim == 4:
        x = np.moveaxis(x, -1, 1).reshape(-1, x.shape[1], x.shape[2])
    return x


def _contexts(spec: DataSpec, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, context index) per pixel of (P, H, W) planes, from causal neighbours only.

    The prediction is LOCO-I's median edge detector over W (a), N (b) and NW (c); the context is the local
    activity |NE-N| + |N-NW| + |NW-W| quantised at ACTIVITY_EDGES. Missing neighbours at the borders take the
    nearest causal one (a row's first pixel its N, the top row its W); the first pixel of a plane has none and
    is its own context (last index) with prediction 0, so its table is the marginal of first pixels.
    """
    p = planes
    a = np.zeros_like(p)
    a[:, :, 1:] = p[:, :, :-1]
    a[:, 1:, 0] = p[:, :-1, 0]
    b = np.empty_like(p)
    b[:, 1:, :] = p[:, :-1, :]
    b[:, 0, :] = a[:, 0, :]
    c = np.empty_like(p)
    c[:, 1:, 1:] = p[:, :-1, :-1]
    c[:, 1:, 0] = b[:, 1:, 0]
    c[:, 0, :] = a[:, 0, :]
    d = np.empty_like(p)
    d[:, 1:, :-1] = p[:, :-1, 1:]
    d[:, 1:, -1] = b[:, 1:, -1]
    d[:, 0, :] = a[:, 0, :]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pred = np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))
    activity = np.abs(d - b) + np.abs(b - c) + np.abs(c - a)
    edges = np.array(ACTIVITY_EDGES) * (spec.levels - 1)
    ctx = np.searchsorted(edges, activity, side="left")  # activity <= edges[k] -> context k
    ctx[:, 0, 0] = len(ACTIVITY_EDGES) + 1
    pred[:, 0, 0] = 0
    return pred, ctx


def _image_tables(spec: DataSpec, x: np.ndarray) -> np.ndarray:
    """log q[context, residual + levels - 1]: smoothed residual frequencies per context over the training rows."""
    planes = _planes(spec, x)
    pred, ctx = _contexts(spec, planes)
    bins = 2 * spec.levels - 1
    n_ctx = len(ACTIVITY_EDGES) + 2
    idx = ctx.reshape(-1) * bins + (planes - pred).reshape(-1) + spec.levels - 1
    counts = np.bincount(idx, minlength=n_ctx * bins).reshape(n_ctx, bins).astype(np.float64) + SMOOTHING
    return np.log(counts) - np.log(counts.sum(axis=1, keepdims=True))


def _image_log_prob(spec: DataSpec, x: np.ndarray, params: Mapping[str, float]) -> np.ndarray:
    _check_levels(spec, params)
    key = PREFIX + "complexity_ratio."
    levels, bins, n_ctx = spec.levels, 2 * spec.levels - 1, len(ACTIVITY_EDGES) + 2
    logq = np.array([[params[f"{key}logq.{k}.{j}"] for j in range(bins)] for k in range(n_ctx)])
    # p(v | pred, ctx) = q[ctx, v - pred] / sum over the valid levels u of q[ctx, u - pred]: the residual table
    # renormalised to the levels reachable from this prediction, so every pixel's distribution sums to one.
    window = np.arange(levels)[None, :] - np.arange(levels)[:, None] + levels - 1  # [pred, v] -> bin
    log_norm = np.logaddexp.reduce(logq[:, window], axis=2)  # (n_ctx, levels): [ctx, pred]
    planes = _planes(spec, x)
    pred, ctx = _contexts(spec, planes)
    per_pixel = logq[ctx, planes - pred + levels - 1] - log_norm[ctx, pred]
    per_plane = per_pixel.reshape(len(planes), -1).sum(axis=1)
    return per_plane.reshape(len(x), -1).sum(axis=1)
