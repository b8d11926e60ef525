"""Data sets: built-in digits and 2-D toy sets, user .npy/.npz/.csv files, fixed splits and the data spec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genserve.core.spec import DataSpec

BUILTIN = ("digits", "moons", "gmm")
# J. M. Tomczak, "Deep Generative Modeling", example code: unshuffled digits split.
DIGITS_SPLIT = (1000, 1350)


class DataError(ValueError):
    """A data set that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Dataset:
    """Train / validation / test arrays of shape (N, *spec.shape), float32, and their spec."""

    spec: DataSpec
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def load_dataset(name: str, seed: int = 0, levels: int = 0, n: int = 3000) -> Dataset:
    """A built-in set (``digits``, ``moons``, ``gmm``) or a user file (.npy, .npz, .csv).

    ``levels`` declares integer data with values 0..levels-1 (user files only; digits have 17). Toy sets
    draw ``n`` points with ``seed``. User files are split 70/15/15 after a seeded shuffle.
    """
    if name == "digits":
        return _digits()
    if name in ("moons", "gmm"):
        x = _moons(n, seed) if name == "moons" else _gmm(n, seed)
        return _split(name, x, seed, levels=0)
    path = Path(name)
    if path.suffix.lower() in (".npy", ".npz", ".csv"):
        if not path.exists():
            raise DataError(f"data file {path} does not exist")
        return _split(path.stem, read_array(path), seed, levels)
    raise DataError(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN)} or a .npy/.npz/.csv file")


def read_array(path: Path) -> np.ndarray:
    """Rows of a .npy, .npz (key ``x`` or the only array) or numeric .csv file (header row allowed)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "x" not in keys and len(keys) != 1:
                    raise DataError(f"{path} holds arrays {keys}; name the data array 'x'")
                x = z["x" if "x" in keys else keys[0]]
        else:
            x = _read_csv(path)
    except DataError:
        raise
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path} holds {x.dtype} values; it must hold numbers")
    return np.asarray(x, dtype=np.float32)


def _read_csv(path: Path) -> np.ndarray:
    with open(path) as f:
        first = f.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1  # a header row
    x = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2)
    return x


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float32)  # (1797, 8, 8), levels 0..16
    spec = DataSpec("digits", (8, 8), "discrete", levels=17)
    a, b = DIGITS_SPLIT
    return Dataset(spec, x[:a], x[a:b], x[b:])


def _moons(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    return make_moons(n, noise=0.08, random_state=seed)[0].astype(np.float32)


def _gmm(n: int, seed: int) -> np.ndarray:
    """Eight Gaussians on a ring of radius 2, standard deviation 0.15."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 8, n)
    centres = 2.0 * np.stack([np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)], axis=1)
    return (centres + 0.15 * rng.standard_normal((n, 2))).astype(np.float32)


def _split(name: str, x: np.ndarray, seed: int, levels: int) -> Dataset:
    if x.ndim == 1:
        raise DataError(f"{name}: expected rows of values (2-D) or images (3-D), got a 1-D array of {x.shape[0]}")
    if x.shape[0] < 10:
        raise DataError(f"{name}: only {x.shape[0]} rows; at least 10 are needed for train/validation/test")
    flat = x.reshape(x.shape[0], -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        raise DataError(f"{name}: row {int(np.argmax(bad))} has NaN or infinite values ({int(bad.sum())} rows); "
                        "drop or impute them")
    if levels:
        out = (flat < 0) | (flat > levels - 1) | (flat != np.round(flat))
        if out.any():
            r, c = np.argwhere(out)[0]
            raise DataError(f"{name}: row {r} holds {flat[r, c]!r}, not an integer level in 0..{levels - 1}; "
                            "fix the data or the --levels you declared")
    elif x.ndim == 3:
        raise DataError(f"{name}: images (N, H, W) need --levels (integer pixel levels, e.g. 256)")
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    x = x[perm]
    n_train, n_val = int(0.7 * len(x)), int(0.15 * len(x))
    train, val, test = x[:n_train], x[n_train:n_train + n_val], x[n_train + n_val:]
    shape = tuple(x.shape[1:])
    if levels:
        spec = DataSpec(name, shape, "discrete", levels=levels)
    else:
        t = train.reshape(len(train), -1).astype(np.float64)
        std = np.maximum(t.std(0), 1e-6)
        spec = DataSpec(name, shape, "continuous", mean=tuple(t.mean(0)), std=tuple(std))
    return Dataset(spec, train, val, test)
