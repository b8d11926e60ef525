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


def test_digits16_are_the_digits_upsampled_and_binarised():
    d, small = load_dataset("digits16"), load_dataset("digits")
    assert d.spec == DataSpec("digits16", (16, 16, 1), "discrete", levels=2)
    assert d.spec.is_image and d.spec.channels == 1
    assert (d.train.shape, d.val.shape, d.test.shape) == ((1000, 16, 16, 1), (350, 16, 16, 1), (447, 16, 16, 1))
    assert set(np.unique(d.train)) == {0.0, 1.0}
    # the same images in the same (unshuffled) split: each 2x2 block's mean follows the 8x8 pixel it came from
    blocks = d.test[..., 0].reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
    assert np.corrcoef(blocks.ravel(), small.test.ravel())[0, 1] > 0.9
    assert 0.2 < d.train.mean() < 0.45  # strokes, not an empty or a full canvas


def test_patches32_are_rgb_patches_of_the_sample_photographs():
    from sklearn.datasets import load_sample_images

    d = load_dataset("patches32")
    assert d.spec == DataSpec("patches32", (32, 32, 3), "discrete", levels=256)
    assert d.spec.is_image and d.spec.channels == 3 and d.spec.dim == 3072
    assert len(d.train) + len(d.val) + len(d.test) == 2 * 13 * 20  # non-overlapping patches of two 427x640 photos
    assert d.train.min() >= 0 and d.train.max() <= 255 and (d.train == np.round(d.train)).all()
    # every patch is a channels-last crop of one of the photographs, at a multiple of 32
    china = load_sample_images().images[0].astype(np.float32)
    crops = {china[r:r + 32, c:c + 32].tobytes() for r in range(0, 416, 32) for c in range(0, 640, 32)}
    every = np.concatenate([d.train, d.val, d.test])
    assert sum(p.tobytes() in crops for p in every) == 13 * 20
    np.testing.assert_array_equal(load_dataset("patches32", seed=5).test, d.test)  # a fixed split


def test_csv_and_parquet_headers_become_the_specs_column_names(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    np.savetxt(tmp_path / "named.csv", x, delimiter=",", header='age, "income (k$)",score', comments="")
    d = load_dataset(str(tmp_path / "named.csv"))
    assert d.spec.columns == ("age", "income (k$)", "score") and d.spec.shape == (3,)
    assert DataSpec.from_dict(d.spec.to_dict()) == d.spec
    np.savetxt(tmp_path / "bare.csv", x, delimiter=",")
    assert load_dataset(str(tmp_path / "bare.csv")).spec.columns == ()
    np.savez(tmp_path / "named.npz", x=x, columns=np.array(["a", "b", "c"]))
    assert load_dataset(str(tmp_path / "named.npz")).spec.columns == ("a", "b", "c")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"left": x[:, 0], "right": x[:, 1], "up": x[:, 2]}), tmp_path / "named.parquet")
    d = load_dataset(str(tmp_path / "named.parquet"), levels=0)
    assert d.spec.columns == ("left", "right", "up")
    np.testing.assert_allclose(np.sort(np.concatenate([d.train, d.val, d.test])[:, 1]), np.sort(x[:, 1]))


def test_bad_column_names_and_image_layouts_say_what_to_fix(tmp_path):
    x = np.ones((40, 3), dtype=np.float32)
    np.savetxt(tmp_path / "twice.csv", x, delimiter=",", header="a,b,a", comments="")
    with pytest.raises(DataError, match="'a' appears twice"):
        load_dataset(str(tmp_path / "twice.csv"))
    np.savetxt(tmp_path / "short.csv", x, delimiter=",", header="a,b", comments="")
    with pytest.raises(DataError, match="names 2 columns"):
        load_dataset(str(tmp_path / "short.csv"))
    np.save(tmp_path / "chw.npy", np.zeros((20, 3, 8, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"channels-last.*np.moveaxis\(x, 1, -1\)"):
        load_dataset(str(tmp_path / "chw.npy"), levels=256)
    np.save(tmp_path / "rgb.npy", np.zeros((20, 8, 8, 3), dtype=np.float32))
    with pytest.raises(DataError, match="need --levels"):
        load_dataset(str(tmp_path / "rgb.npy"))
    d = load_dataset(str(tmp_path / "rgb.npy"), levels=256)
    assert d.spec.shape == (8, 8, 3) and d.spec.channels == 3


def test_spec_images_channels_and_columns():
    assert DataSpec("a", (8, 8), "discrete", levels=17).channels == 1
    assert DataSpec("a", (32, 32, 3), "discrete", levels=256).is_image
    assert not DataSpec("a", (4, 4, 7), "discrete", levels=2).is_image  # 7 values per cell: not a pixel
    assert DataSpec("a", (4, 4, 7), "discrete", levels=2).channels == 0
    rows = DataSpec("r", (2,), "continuous", mean=(0, 0), std=(1, 1), columns=("x", "y"))
    assert not rows.is_image and rows.channels == 0 and rows.to_dict()["columns"] == ["x", "y"]
    assert "columns" not in DataSpec("r", (2,), "continuous").to_dict()  # specs without names read as before
    with pytest.raises(ValueError, match="2 names for shape"):
        DataSpec("r", (3,), "continuous", columns=("x", "y"))
    with pytest.raises(ValueError, match="rows"):
        DataSpec("i", (2, 2), "discrete", levels=2, columns=("a", "b", "c", "d"))
    with pytest.raises(ValueError, match="non-empty"):
        DataSpec("r", (2,), "continuous", columns=("x", " "))
