"""The OOD-robust score kinds of core/scores.py: what each computes, its orientation, the reference model's maths."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.datasets import load_digits

from genserve.core import scores
from genserve.core.spec import DataSpec

DIGITS = DataSpec("digits", (8, 8), "discrete", levels=17)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x = load_digits().images.astype(np.float32)
    return x[:1000], x[1350:]


def _fake_log_prob(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """A stand-in model log-likelihood: more ink, lower likelihood, plus noise (nats)."""
    rng = np.random.default_rng(seed)
    return -0.2 * x.reshape(len(x), -1).sum(axis=1) - 20.0 + rng.normal(0, 2, len(x))


SPECS = [
    DIGITS,
    DataSpec("rgb", (4, 4, 3), "discrete", levels=5),
    DataSpec("counts", (6,), "discrete", levels=4),
    DataSpec("wine", (5,), "continuous"),
    DataSpec("wide", (80,), "continuous"),
    DataSpec("long", (3000,), "discrete", levels=2),
]


def _rows(spec: DataSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    if spec.discrete:
        return rng.integers(0, spec.levels, size=(n, *spec.shape)).astype(np.float32)
    return rng.normal(3.0, 2.0, size=(n, *spec.shape)).astype(np.float32)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_kind_gives_one_finite_float64_per_row_even_for_blank_and_single_rows(spec):
    rng = np.random.default_rng(1)
    x = _rows(spec, 120, rng)
    params = scores.fit(spec, x, _fake_log_prob(x))
    assert all(isinstance(v, float) and np.isfinite(v) for v in params.values())
    assert {k.split(".")[1] for k in params} == set(scores.KINDS)
    assert all(k.startswith("score.") for k in params)
    blank = np.zeros((3, *spec.shape), np.float32)
    constant = np.full((2, *spec.shape), spec.levels - 1 if spec.discrete else 7.0, np.float32)
    for batch in (x[:7], blank, constant, x[:1]):
        for kind in scores.KINDS:
            out = scores.compute(kind, spec, batch, _fake_log_prob(batch), params)
            assert out.dtype == np.float64 and out.shape == (len(batch),), (kind, out.shape)
            assert np.isfinite(out).all(), (kind, out)


@pytest.mark.parametrize(("spec", "long_rows"), [
    (DataSpec("tiny", (2, 2), "discrete", levels=3), False),
    (DataSpec("rgb", (1, 2, 2), "discrete", levels=3), False),
    (DataSpec("rows", (4,), "discrete", levels=3), False),
    (DataSpec("rows", (4,), "discrete", levels=3), True),
], ids=["image", "channels", "rows", "long-rows"])
def test_the_discrete_reference_is_a_normalised_distribution_over_every_possible_input(spec, long_rows, monkeypatch):
    if long_rows:  # rows too long for per-feature tables take the local predictor along the row
        monkeypatch.setattr(scores, "CATEGORICAL_MAX_NUMBERS", 0)
    rng = np.random.default_rng(2)
    x = _rows(spec, 40, rng)
    params = scores.fit(spec, x, _fake_log_prob(x))
    want = scores.REF_LOCAL if spec.is_image or long_rows else scores.REF_CATEGORICAL
    assert params["score.complexity_ratio.reference"] == want
    every = np.array(list(itertools.product(range(spec.levels), repeat=spec.dim)), np.float32)
    log_p = scores.reference_log_prob(spec, every.reshape(-1, *spec.shape), params)
    assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-9)
    # fitted on the data: the training rows are more likely than uniform on average
    assert scores.reference_log_prob(spec, x, params).mean() > log_p.mean() - 1.0


@pytest.mark.parametrize("dim", [3, 80])
def test_the_continuous_reference_is_the_gaussian_density_of_the_fitted_moments(dim):
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(3)
    spec = DataSpec("rows", (dim,), "continuous")
    a = rng.normal(size=(dim, dim)) * 0.3 + np.eye(dim)
    x = rng.normal(size=(5000, dim)) @ a.T + 10.0
    params = scores.fit(spec, x, np.zeros(len(x)))
    test = rng.normal(size=(50, dim)) @ a.T + 10.0
    got = scores.reference_log_prob(spec, test, params)
    cov = np.cov(x, rowvar=False) if dim <= scores.FULL_COVARIANCE_MAX_DIM else np.diag(x.var(axis=0))
    want = multivariate_normal(x.mean(axis=0), cov).logpdf(test)
    # Shrinkage toward the diagonal (weight D/N) moves the full covariance a little.
    assert np.abs(got - want).max() < 0.05 * dim


def test_the_complexity_ratio_is_the_log_likelihood_minus_the_reference_and_rises_with_the_model(digits):
    train, test = digits
    params = scores.fit(DIGITS, train, _fake_log_prob(train))
    ref = scores.reference_log_prob(DIGITS, test, params)
    ratio = scores.compute("complexity_ratio", DIGITS, test, ref + 5.0, params)
    assert ratio == pytest.approx(np.full(len(test), 5.0))
    higher = scores.compute("complexity_ratio", DIGITS, test, ref + 6.0, params)
    assert (higher > ratio).all() and scores.KINDS["complexity_ratio"].higher_is_normal


def test_blank_and_constant_images_are_simpler_than_every_real_digit_under_the_reference(digits):
    """Why the ratio works: what a deep model over-rates for being simple, the local reference rates higher still."""
    train, test = digits
    params = scores.fit(DIGITS, train, _fake_log_prob(train))
    digit = scores.reference_log_prob(DIGITS, test, params)
    simple = scores.reference_log_prob(DIGITS, np.repeat(np.arange(17.0), 64).reshape(17, 8, 8), params)
    assert simple.min() > digit.max(), (simple.min(), digit.max())
    noise = np.random.default_rng(4).integers(0, 17, size=(50, 8, 8)).astype(np.float64)
    assert scores.reference_log_prob(DIGITS, noise, params).max() < digit.min()


def test_typicality_is_two_sided_and_per_batch(digits):
    train, _ = digits
    lp = _fake_log_prob(train)
    params = scores.fit(DIGITS, train, lp)
    h, s = params["score.typicality.entropy"], params["score.typicality.std"]
    assert h == pytest.approx(-lp.mean()) and s == pytest.approx((-lp).std(ddof=1))
    x = train[:2]
    for d in (0.0, 3.0, 40.0):
        above = scores.compute("typicality", DIGITS, x[:1], np.array([-(h + d)]), params)
        below = scores.compute("typicality", DIGITS, x[:1], np.array([-(h - d)]), params)
        assert above == pytest.approx([d / s]) and below == pytest.approx([d / s])
    # one statistic for the whole request: a too-likely row and a too-unlikely one average out
    both = scores.compute("typicality", DIGITS, x, np.array([-(h + 10.0), -(h - 10.0)]), params)
    assert both == pytest.approx([0.0, 0.0])
    skewed = scores.compute("typicality", DIGITS, x, np.array([-(h + 10.0), -(h + 2.0)]), params)
    assert skewed == pytest.approx([np.sqrt(2) * 6.0 / s] * 2)
    assert scores.KINDS["typicality"].per_batch and not scores.KINDS["typicality"].higher_is_normal


def test_typicality_of_in_distribution_batches_does_not_depend_on_their_size(digits):
    """One calibration (export measures batches of one size) must hold for requests of any size: the served
    statistic is standardised by sqrt(n) / s, so in-distribution batches of 4 and of 256 rows score alike."""
    train, _ = digits
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train))
    fit_rows, held_out = train[order[:500]], train[order[500:]]  # the same distribution; unseen by the fit
    params = scores.fit(DIGITS, fit_rows, _fake_log_prob(fit_rows))
    lp = _fake_log_prob(held_out, seed=5)
    medians = {}
    for n in (4, 256):
        stats = [scores.compute("typicality", DIGITS, np.zeros((n, 8, 8)), lp[rng.choice(len(lp), n)], params)[0]
                 for _ in range(300)]
        medians[n] = float(np.median(stats))
    assert medians[256] == pytest.approx(medians[4], rel=0.6), medians  # the plain gap differs 8x between them
    # A manifest exported before the standardised form has no score.typicality.std: its calibration is of the
    # plain gap, which it keeps.
    old = {k: v for k, v in params.items() if k != "score.typicality.std"}
    h = params["score.typicality.entropy"]
    assert scores.compute("typicality", DIGITS, train[:2], np.array([-(h + 3.0), -(h + 5.0)]), old) == \
        pytest.approx([4.0, 4.0])


def test_typicality_row_is_a_two_sided_z_score_of_each_row_alone(digits):
    train, _ = digits
    lp = _fake_log_prob(train)
    params = scores.fit(DIGITS, train, lp)
    h, s = -lp.mean(), lp.std(ddof=1)
    x = train[:3]
    out = scores.compute("typicality_row", DIGITS, x, np.array([-(h + 2 * s), -(h - 2 * s), -h]), params)
    assert out == pytest.approx([2.0, 2.0, 0.0])
    alone = scores.compute("typicality_row", DIGITS, x[:1], np.array([-(h + 2 * s)]), params)
    assert alone == pytest.approx(out[:1])
    assert not scores.KINDS["typicality_row"].per_batch


def test_min_z_is_low_when_either_the_likelihood_or_the_ratio_is_low(digits):
    train, test = digits
    lp = _fake_log_prob(train)
    params = scores.fit(DIGITS, train, lp)
    ref = scores.reference_log_prob(DIGITS, test[:1], params)
    typical = np.array([lp.mean()])
    base = scores.compute("min_z", DIGITS, test[:1], typical, params)
    ratio = scores.compute("complexity_ratio", DIGITS, test[:1], typical, params)
    z_lp = (typical - params["score.min_z.log_prob_mean"]) / params["score.min_z.log_prob_std"]
    z_r = (ratio - params["score.min_z.ratio_mean"]) / params["score.min_z.ratio_std"]
    assert base == pytest.approx(np.minimum(z_lp, z_r))
    # a blank image with a typical log-likelihood: its ratio is low (it is simple), so min_z is low
    blank = np.zeros((1, 8, 8))
    assert scores.reference_log_prob(DIGITS, blank, params) > ref
    assert scores.compute("min_z", DIGITS, blank, typical, params) < base
    # a much less likely row is lower too, whatever its ratio
    assert scores.compute("min_z", DIGITS, test[:1], typical - 50.0, params) < base


def test_fit_depends_only_on_the_rows_it_is_given_not_their_order(digits):
    train, _ = digits
    lp = _fake_log_prob(train)
    a = scores.fit(DIGITS, train, lp)
    perm = np.random.default_rng(5).permutation(len(train))
    b = scores.fit(DIGITS, train[perm], lp[perm])
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-9) for k in a)
    c = scores.fit(DIGITS, train[:500], lp[:500])
    assert any(a[k] != pytest.approx(c[k]) for k in a)


def test_applicable_kinds_follow_the_likelihood():
    assert scores.applicable(DIGITS, "none") == []
    assert scores.applicable(DIGITS, "LIKELIHOOD_KIND_NONE") == []
    assert set(scores.applicable(DIGITS, "exact")) == set(scores.KINDS)
    assert set(scores.applicable(DIGITS, "lower_bound")) == set(scores.KINDS)
    # an energy's scale is arbitrary: only the kinds that compare it with itself
    assert set(scores.applicable(DIGITS, "unnormalized")) == {"typicality", "typicality_row"}
    for name, kind in scores.KINDS.items():
        assert kind.name == name and len(kind.description) > 80


def test_bad_calls_say_what_is_wrong(digits):
    train, _ = digits
    params = scores.fit(DIGITS, train[:50], _fake_log_prob(train[:50]))
    with pytest.raises(ValueError, match="unknown score kind 'ratio'.*complexity_ratio"):
        scores.compute("ratio", DIGITS, train[:2], np.zeros(2), params)
    with pytest.raises(ValueError, match="3 rows but log_prob has 2"):
        scores.compute("typicality", DIGITS, train[:3], np.zeros(2), params)
    with pytest.raises(ValueError, match="not fitted.*score.min_z.ratio_std"):
        scores.compute("min_z", DIGITS, train[:2], np.zeros(2),
                       {k: v for k, v in params.items() if k != "score.min_z.ratio_std"})
    with pytest.raises(ValueError, match="fitted on data with 17 levels but these have 5"):
        other = DataSpec("digits", (8, 8), "discrete", levels=5)
        scores.compute("complexity_ratio", other, np.zeros((1, 8, 8)), np.zeros(1), params)
    with pytest.raises(ValueError, match="at least 2"):
        scores.fit(DIGITS, train[:1], np.zeros(1))
    with pytest.raises(ValueError, match="NaN or infinite"):
        scores.fit(DIGITS, train[:3], np.array([0.0, np.nan, 1.0]))


@pytest.mark.parametrize("cultivar", [0, 1, 2])
def test_min_z_keeps_the_likelihoods_power_on_tabular_anomalies(cultivar):
    """Wine rows, one cultivar in-distribution, a Gaussian mixture as a stand-in model: the Gaussian reference
    "explains" far-away rows too, so the ratio alone is weak on tabular data; min_z must not lose log p's AUROC."""
    from sklearn.datasets import load_wine
    from sklearn.metrics import roc_auc_score
    from sklearn.mixture import GaussianMixture

    x, y = load_wine(return_X_y=True)
    rows = x[y == cultivar][np.random.default_rng(0).permutation(int((y == cultivar).sum()))]
    train, test, anomalies = rows[: len(rows) // 2], rows[len(rows) // 2:], x[y != cultivar]
    mu, sd = train.mean(axis=0), train.std(axis=0)
    gmm = GaussianMixture(2, covariance_type="diag", random_state=0).fit((train - mu) / sd)

    def log_prob(v: np.ndarray) -> np.ndarray:  # nats in the raw units, as genserve reports continuous densities
        return gmm.score_samples((v - mu) / sd) - np.log(sd).sum()

    spec = DataSpec("wine", (13,), "continuous")
    params = scores.fit(spec, train, log_prob(train))
    labels = np.r_[np.zeros(len(test)), np.ones(len(anomalies))]
    raw = roc_auc_score(labels, -np.r_[log_prob(test), log_prob(anomalies)])
    min_z = roc_auc_score(labels, -np.r_[scores.compute("min_z", spec, test, log_prob(test), params),
                                        scores.compute("min_z", spec, anomalies, log_prob(anomalies), params)])
    assert raw > 0.85 and min_z >= raw - 0.02, (raw, min_z)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_a_per_row_kind_of_a_row_does_not_depend_on_the_other_rows_of_its_request(spec):
    rng = np.random.default_rng(6)
    x = _rows(spec, 60, rng)
    params = scores.fit(spec, x, _fake_log_prob(x))
    batch, lp = x[:9], _fake_log_prob(x[:9], seed=1)
    for name, kind in scores.KINDS.items():
        together = scores.compute(name, spec, batch, lp, params)
        alone = np.concatenate([scores.compute(name, spec, batch[i:i + 1], lp[i:i + 1], params) for i in range(9)])
        if kind.per_batch:
            assert len(set(together.tolist())) == 1 and not np.allclose(together, alone), name
        else:
            assert together == pytest.approx(alone, rel=1e-12, abs=1e-12), name
