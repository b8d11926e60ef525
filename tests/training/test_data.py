"""Data sets: the fixed digits split, seeded toy sets, user files, and one-line errors for bad data."""

from __future__ import annotations

import numpy as np
import pytest

from genserve.core.spec import DataSpec
from genserve.training.data import DataError, load_dataset


def test_digits_uses_the_books_unshuffled_split():
    from sklearn.datasets import load_digits

    d = load_dataset("digits")
    images = load_digits().images.astype(np.float32)
    assert d.spec == DataSpec("digits", (8, 8), "discrete", levels=17)
    assert (d.train.shape, d.val.shape, d.test.shape) == ((1000, 8, 8), (350, 8, 8), (447, 8, 8))
    np.testing.assert_array_equal(d.test, images[1350:])
    assert d.train.min() == 0 and d.train.max() == 16


@pytest.mark.parametrize("name", ["moons", "gmm"])
def test_toy_sets_are_seeded_and_normalised_from_train(name):
    a, b, c = load_dataset(name, seed=1), load_dataset(name, seed=1), load_dataset(name, seed=2)
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.array_equal(a.train, c.train)
    assert a.spec.kind == "continuous" and a.spec.shape == (2,)
    np.testing.assert_allclose(a.spec.mean, a.train.mean(0), atol=1e-5)
    np.testing.assert_allclose(a.spec.std, a.train.std(0), rtol=1e-4)


def test_user_files_npy_npz_csv(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3)).astype(np.float32)
    np.save(tmp_path / "rows.npy", x)
    np.savez(tmp_path / "rows.npz", x=x)
    np.savetxt(tmp_path / "rows.csv", x, delimiter=",", header="a,b,c", comments="")
    for f in ("rows.npy", "rows.npz", "rows.csv"):
        d = load_dataset(str(tmp_path / f), seed=0)
        assert d.spec.shape == (3,) and len(d.train) + len(d.val) + len(d.test) == 100
        np.testing.assert_allclose(np.sort(np.concatenate([d.train, d.val, d.test])[:, 0]), np.sort(x[:, 0]),
                                   atol=1e-5)
    imgs = rng.integers(0, 4, size=(50, 5, 5)).astype(np.float32)
    np.save(tmp_path / "imgs.npy", imgs)
    d = load_dataset(str(tmp_path / "imgs.npy"), levels=4)
    assert d.spec.discrete and d.spec.levels == 4 and d.spec.shape == (5, 5)


def test_bad_data_gives_errors_that_say_what_to_fix(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npy"))
    x = np.ones((40, 2), dtype=np.float32)
    x[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(DataError, match="row 7 has NaN"):
        load_dataset(str(tmp_path / "nan.npy"))
    np.save(tmp_path / "levels.npy", np.full((40, 4, 4), 9.0, dtype=np.float32))
    with pytest.raises(DataError, match="not an integer level in 0..7"):
        load_dataset(str(tmp_path / "levels.npy"), levels=8)
    with pytest.raises(DataError, match="need --levels"):
        load_dataset(str(tmp_path / "levels.npy"))
    np.save(tmp_path / "flat.npy", np.ones(40, dtype=np.float32))
    with pytest.raises(DataError, match="1-D array"):
        load_dataset(str(tmp_path / "flat.npy"))
    (tmp_path / "words.csv").write_text("a,b\nx,y\n")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(tmp_path / "words.csv"))


def test_spec_check_names_the_problem():
    spec = DataSpec("digits", (8, 8), "discrete", levels=17)
    spec.check(np.zeros((3, 8, 8)))
    for bad, msg in [
        (np.zeros((8, 8)), "add a batch axis"),
        (np.zeros((2, 64)), r"needs \(N, 8, 8\)"),
        (np.full((1, 8, 8), np.inf), "NaN or infinite"),
        (np.full((1, 8, 8), 17.0), "not an integer level"),
        (np.full((1, 8, 8), 0.5), "not an integer level"),
        (np.zeros((0, 8, 8)), "empty"),
    ]:
        with pytest.raises(ValueError, match=msg):
            spec.check(bad)
    assert spec.to_dict()["shape"] == [8, 8] and DataSpec.from_dict(spec.to_dict()) == spec
