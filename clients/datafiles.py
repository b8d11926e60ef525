"""Read examples chunk by chunk from arrays and files of any size: .npy (memory-mapped), .npz, .csv, .parquet.

A ``Rows`` source knows its row count (for progress bars) and yields float32 chunks of at most ``size`` rows
in file order, so scoring a file never holds more than a few chunks in memory (.npz and in-memory arrays are
the exception: .npz members cannot be memory-mapped). With ``shape`` given, flat rows of product(shape) values
(CSV columns, (N, 64) arrays for 8x8 images) are reshaped to (rows, *shape).
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SUFFIXES = (".npy", ".npz", ".csv", ".parquet")


@dataclass
class Rows:
    """Examples to read in chunks: ``total`` rows (None when unknown) and a chunk generator."""

    name: str
    """Where the rows come from, for messages."""
    total: int | None
    _chunks: Callable[[int], Iterator[np.ndarray]]
    shape: tuple[int, ...] | None = None

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """float32 arrays of at most ``size`` rows, in order; reshaped to (rows, *shape) when shape is set."""
        if size < 1:
            raise ValueError(f"chunk size must be >= 1, got {size}")
        offset = 0
        for chunk in self._chunks(size):
            if len(chunk):
                yield self._fit(np.asarray(chunk, dtype=np.float32), offset)
                offset += len(chunk)

    def read(self) -> np.ndarray:
        """All rows at once (for sources small enough to hold)."""
        parts = list(self.chunks(65536))
        if not parts:
            raise ValueError(f"{self.name} has no rows")
        return np.concatenate(parts)

    def _fit(self, chunk: np.ndarray, offset: int) -> np.ndarray:
        if chunk.ndim == 1:
            chunk = chunk[:, None]
        if self.shape is None or tuple(chunk.shape[1:]) == self.shape:
            return chunk
        per_row = math.prod(chunk.shape[1:])
        if per_row != math.prod(self.shape):
            raise ValueError(
                f"{self.name}: rows from {offset} have {per_row} values each {tuple(chunk.shape[1:])} but the"
                f" model's examples have shape {self.shape} ({math.prod(self.shape)} values)"
            )
        return chunk.reshape(len(chunk), *self.shape)


def open_rows(source: Any, shape: tuple[int, ...] | None = None, key: str | None = None) -> Rows:
    """A Rows source for an array (or array-like) or a path to a .npy, .npz, .csv or .parquet file.

    ``key`` picks the .npz member (default: ``x`` when present, else the only member).
    """
    shape = tuple(shape) if shape is not None else None
    if not isinstance(source, str | Path):
        array = np.asarray(source)
        if array.ndim == 0:
            raise ValueError("a scalar is not a batch of examples; give an array with rows along axis 0")
        return Rows("array", len(array), lambda size: _slices(array, size), shape)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such input file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _npy(path, shape)
    if suffix == ".npz":
        return _npz(path, shape, key)
    if suffix == ".csv":
        return _csv(path, shape)
    if suffix == ".parquet":
        return _parquet(path, shape)
    raise ValueError(f"{path}: unknown file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")


def _slices(array: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(array), size):
        yield np.array(array[start : start + size])  # a copy: memory-mapped files are read a chunk at a time


def _npy(path: Path, shape: tuple[int, ...] | None) -> Rows:
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None
    if array.ndim == 0:
        raise ValueError(f"{path} holds a scalar, not rows of examples")
    return Rows(str(path), len(array), lambda size: _slices(array, size), shape)


def _npz(path: Path, shape: tuple[int, ...] | None, key: str | None) -> Rows:
    with np.load(path) as archive:
        names = list(archive.files)
        if key is None:
            if "x" in names:
                key = "x"
            elif len(names) == 1:
                key = names[0]
            else:
                raise ValueError(f"{path} holds {names}; name the array to read (key / --key)")
        if key not in names:
            raise ValueError(f"{path} has no array {key!r}; it holds {names}")
        array = archive[key]
    if array.ndim == 0:
        raise ValueError(f"{path}[{key}] is a scalar, not rows of examples")
    return Rows(f"{path}[{key}]", len(array), lambda size: _slices(array, size), shape)


def _is_header(line: str) -> bool:
    try:
        [float(field) for field in line.split(",")]
    except ValueError:
        return True
    return False


def _parse(lines: Iterator[str] | list[str]) -> np.ndarray:
    return np.loadtxt(io.StringIO("".join(lines)), delimiter=",", dtype=np.float32, ndmin=2)


def _csv(path: Path, shape: tuple[int, ...] | None) -> Rows:
    with path.open() as f:
        first = next((line for line in f if line.strip()), "")
    header = bool(first) and _is_header(first)
    lines = 0
    with path.open("rb") as f:
        last = b"\n"
        for block in iter(lambda: f.read(1 << 20), b""):
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"
    total = max(0, lines - header)

    def chunks(size: int) -> Iterator[np.ndarray]:
        with path.open() as f:
            numbered = ((i, line) for i, line in enumerate(f, start=1) if line.strip())
            if header:
                next(numbered, None)
            while batch := list(itertools.islice(numbered, size)):
                try:
                    yield _parse(line for _, line in batch)
                except ValueError as error:
                    for number, line in batch:  # name the offending line
                        try:
                            _parse([line])
                        except ValueError as e:
                            raise ValueError(f"{path} line {number}: {e}") from None
                    raise ValueError(f"{path} lines {batch[0][0]}..{batch[-1][0]}: {error}") from None

    return Rows(str(path), total, chunks, shape)


def _parquet(path: Path, shape: tuple[int, ...] | None) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.ParquetFile(path)

    def columns(batch: Any) -> np.ndarray:
        cols = []
        for column in batch.columns:
            values = column.to_numpy(zero_copy_only=False)
            # A list column holds one whole example per row (e.g. 64 pixels).
            cols.append(np.stack(values) if values.dtype == object else values[:, None])
        return np.concatenate(cols, axis=1)

    def chunks(size: int) -> Iterator[np.ndarray]:
        for batch in table.iter_batches(batch_size=size):
            yield columns(batch)

    return Rows(str(path), table.metadata.num_rows, chunks, shape)
