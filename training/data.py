"""Data sets: built-in images (digits, digits16, patches32) and 2-D toy sets, user .npy/.npz/.csv/.parquet files,
fixed splits and the data spec (with the column names of a file's header).

Images are channels-last, (N, H, W) or (N, H, W, C) with C in 1..4 (``core.spec.DataSpec``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genserve.core.spec import DataSpec

BUILTIN = ("digits", "digits16", "patches32", "moons", "gmm")
IMAGES = ("digits", "digits16", "patches32")
"""The built-in image sets (integer levels); the others are continuous rows."""
SUFFIXES = (".npy", ".npz", ".csv", ".parquet")
# J. M. Tomczak, "Deep Generative Modeling", example code: unshuffled digits split.
DIGITS_SPLIT = (1000, 1350)
PATCH = 32  # patches32: side of the square patches cut from scikit-learn's two sample photographs


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
    """A built-in set (``digits``, ``digits16``, ``patches32``, ``moons``, ``gmm``) or a user file (.npy, .npz,
    .csv, .parquet).

    ``levels`` declares integer data with values 0..levels-1 (user files only; the built-in images bring their
    own). Toy sets draw ``n`` points with ``seed``. User files are split 70/15/15 after a seeded shuffle; the
    column names of a .csv header, a Parquet schema or an .npz ``columns`` array travel in the spec.
    """
    if name in IMAGES:
        return {"digits": _digits, "digits16": _digits16, "patches32": _patches32}[name]()
    if name in ("moons", "gmm"):
        x = _moons(n, seed) if name == "moons" else _gmm(n, seed)
        return _split(name, x, seed, levels=0)
    path = Path(name)
    if path.suffix.lower() in SUFFIXES:
        if not path.exists():
            raise DataError(f"data file {path} does not exist")
        x, columns = read_table(path)
        return _split(path.stem, x, seed, levels, columns)
    raise DataError(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN)} or a "
                    f"{'/'.join(SUFFIXES)} file")


def read_array(path: Path) -> np.ndarray:
    """Rows of a .npy, .npz (key ``x`` or the only array), numeric .csv (header row allowed) or .parquet file."""
    return read_table(path)[0]


def read_table(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """(rows as float32, column names) of a data file; names come from a .csv header, a Parquet schema or an
    .npz array ``columns`` beside ``x``, and are () when the file has none."""
    suffix = path.suffix.lower()
    columns: tuple[str, ...] = ()
    try:
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = [k for k in z.keys() if k != "columns"]
                if "x" not in keys and len(keys) != 1:
                    raise DataError(f"{path} holds arrays {keys}; name the data array 'x'")
                x = z["x" if "x" in keys else keys[0]]
                if "columns" in z:
                    columns = tuple(str(c) for c in np.asarray(z["columns"]).reshape(-1))
        elif suffix == ".parquet":
            x, columns = _read_parquet(path)
        else:
            x, columns = _read_csv(path)
    except DataError:
        raise
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path} holds {x.dtype} values; it must hold numbers")
    if columns and (x.ndim != 2 or len(columns) != x.shape[1]):
        raise DataError(f"{path} names {len(columns)} columns but its rows have shape {x.shape[1:]}; give one "
                        "name per column")
    return np.asarray(x, dtype=np.float32), columns


def _read_csv(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    with open(path) as f:
        first = f.readline()
    cells = first.strip().split(",")
    try:
        [float(v) for v in cells]
        skip, columns = 0, ()
    except ValueError:
        skip, columns = 1, tuple(c.strip().strip('"').strip() for c in cells)  # a header row
    x = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2)
    return x, columns


def _read_parquet(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """One numeric column per feature; the schema's names are the column names."""
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    cols = []
    for name, column in zip(table.column_names, table.columns, strict=True):
        values = column.to_numpy(zero_copy_only=False)
        if values.dtype == object or not np.issubdtype(values.dtype, np.number):
            raise DataError(f"{path}: column {name!r} holds {column.type} values; every column must hold numbers")
        cols.append(values.astype(np.float64))
    if not cols:
        raise DataError(f"{path} has no columns")
    return np.stack(cols, axis=1), tuple(table.column_names)


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float32)  # (1797, 8, 8), levels 0..16
    spec = DataSpec("digits", (8, 8), "discrete", levels=17)
    a, b = DIGITS_SPLIT
    return Dataset(spec, x[:a], x[a:b], x[b:])


def _digits16() -> Dataset:
    """The digits upsampled to 16x16 (bilinear) and binarised at half intensity: (N, 16, 16, 1), 2 levels.

    Same unshuffled split as ``digits``; a small binary, single-channel image set of another size."""
    from sklearn.datasets import load_digits

    x = _upsample2(load_digits().images.astype(np.float64))  # (1797, 16, 16), values 0..16
    x = (x >= 8.0).astype(np.float32)[..., None]
    spec = DataSpec("digits16", (16, 16, 1), "discrete", levels=2)
    a, b = DIGITS_SPLIT
    return Dataset(spec, x[:a], x[a:b], x[b:])


def _upsample2(x: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 2H, 2W) by bilinear interpolation at the new pixel centres (edges repeated)."""
    def axis(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n - 1), pos - lo

    r0, r1, fr = axis(x.shape[1])
    c0, c1, fc = axis(x.shape[2])
    rows = x[:, r0] * (1 - fr)[:, None] + x[:, r1] * fr[:, None]
    return rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc


def _patches32() -> Dataset:
    """Non-overlapping 32x32 RGB patches of scikit-learn's two bundled photographs (china.jpg, flower.jpg,
    427x640 each): 2 x 13 x 20 = 520 patches (N, 32, 32, 3), 256 levels, split 70/15/15 after a fixed shuffle
    (seed 0, whatever the run's seed, so that every run sees the same split)."""
    from sklearn.datasets import load_sample_images

    patches = []
    for image in load_sample_images().images:  # (427, 640, 3) uint8 each
        h, w = image.shape[0] // PATCH, image.shape[1] // PATCH
        tiles = image[:h * PATCH, :w * PATCH].reshape(h, PATCH, w, PATCH, 3).swapaxes(1, 2)
        patches.append(tiles.reshape(h * w, PATCH, PATCH, 3))
    return _split("patches32", np.concatenate(patches).astype(np.float32), 0, levels=256)


def _moons(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    return make_moons(n, noise=0.08, random_state=seed)[0].astype(np.float32)


def _gmm(n: int, seed: int) -> np.ndarray:
    """Eight Gaussians on a ring of radius 2, standard deviation 0.15."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 8, n)
    centres = 2.0 * np.stack([np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)], axis=1)
    return (centres + 0.15 * rng.standard_normal((n, 2))).astype(np.float32)


def _split(name: str, x: np.ndarray, seed: int, levels: int, columns: tuple[str, ...] = ()) -> Dataset:
    if x.ndim == 1:
        raise DataError(f"{name}: expected rows of values (2-D) or images (3-D), got a 1-D array of {x.shape[0]}")
    if x.ndim == 4 and not 1 <= x.shape[3] <= 4:
        hint = (f"; channels first? np.moveaxis(x, 1, -1) gives (N, {x.shape[2]}, {x.shape[3]}, {x.shape[1]})"
                if 1 <= x.shape[1] <= 4 else "")
        raise DataError(f"{name}: images are channels-last (N, H, W, C) with 1 to 4 channels, got shape "
                        f"{x.shape}{hint}")
    if x.ndim > 4:
        raise DataError(f"{name}: expected rows (N, D) or images (N, H, W) / (N, H, W, C), got shape {x.shape}")
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
    elif x.ndim >= 3:
        raise DataError(f"{name}: images {x.shape[1:]} need --levels (integer pixel levels, e.g. 256)")
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    x = x[perm]
    n_train, n_val = int(0.7 * len(x)), int(0.15 * len(x))
    train, val, test = x[:n_train], x[n_train:n_train + n_val], x[n_train + n_val:]
    shape = tuple(x.shape[1:])
    try:
        if levels:
            spec = DataSpec(name, shape, "discrete", levels=levels, columns=columns)
        else:
            t = train.reshape(len(train), -1).astype(np.float64)
            std = np.maximum(t.std(0), 1e-6)
            spec = DataSpec(name, shape, "continuous", mean=tuple(t.mean(0)), std=tuple(std), columns=columns)
    except ValueError as e:  # e.g. a header naming a column twice
        raise DataError(f"{name}: {e}") from None
    return Dataset(spec, train, val, test)
