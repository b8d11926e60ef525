"""Read examples chunk by chunk from arrays and files of any size: .npy (memory-mapped), .npz, .csv, .parquet.

A ``Rows`` source knows its row count (for progress bars) and yields float32 chunks of at most ``size`` rows
in file order, so scoring a file never holds more than a few chunks in memory (.npz and in-memory arrays are
the exception: .npz members cannot be memory-mapped). With ``shape`` given, flat rows of product(shape) values
(CSV columns, (N, 64) arrays for 8x8 images) are reshaped to (rows, *shape).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
    id_columns: tuple[str, ...] = ()
    """Columns read as they are (ids, labels, any text), kept beside the rows rather than scored."""
    ids: dict[str, list[Any]] = field(default_factory=dict)
    """The id columns' values, one array per chunk read and not yet taken (take_ids), in row order: numpy str
    arrays from a CSV, pyarrow arrays of the column's own type from Parquet (an int64 id stays int64)."""
    _watchers: list[Callable[[int, np.ndarray], None]] = field(default_factory=list)

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """float32 arrays of at most ``size`` rows, in order; reshaped to (rows, *shape) when shape is set."""
        if size < 1:
            raise ValueError(f"chunk size must be >= 1, got {size}")
        offset = 0
        for chunk in self._chunks(size):
            if len(chunk):
                chunk = self._fit(np.asarray(chunk, dtype=np.float32), offset)
                for watch in self._watchers:
                    watch(offset, chunk)
                yield chunk
                offset += len(chunk)

    def watch(self, callback: Callable[[int, np.ndarray], None]) -> None:
        """Call ``callback(offset, chunk)`` with every chunk as it is read (e.g. to keep the rows an answer
        will refer to: a scoring stream sends chunks on gRPC's thread and hands back scores only)."""
        self._watchers.append(callback)

    def take_ids(self, count: int) -> dict[str, Any]:
        """The id columns' values of the next ``count`` rows not yet taken, removed from ``ids``.

        A scoring stream reads (and so records ids) a few chunks ahead of its answers; taking them answer by
        answer keeps only those few chunks' ids in memory, whatever the file's size.
        """
        out = {}
        for name, parts in self.ids.items():
            taken, have = [], 0
            while have < count:
                if not parts:
                    raise ValueError(f"{self.name}: {count} rows asked of the id column {name!r}, {have} read")
                part = parts.pop(0)
                need = count - have
                if len(part) > need:
                    parts.insert(0, part[need:])
                    part = part[:need]
                taken.append(part)
                have += len(part)
            out[name] = _concat(taken)
        return out

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


def open_rows(source: Any, shape: tuple[int, ...] | None = None, key: str | None = None,
              columns: list[str] | None = None, id_columns: list[str] | None = None) -> Rows:
    """A Rows source for an array (or array-like) or a path to a .npy, .npz, .csv or .parquet file.

    ``key`` picks the .npz member (default: ``x`` when present, else the only member). For a CSV with a header
    or a Parquet file, ``columns`` names the columns that make an example (default: all but the id columns) and
    ``id_columns`` the ones kept as they are (``Rows.ids``), e.g. a record id or a text label.
    """
    shape = tuple(shape) if shape is not None else None
    if columns or id_columns:
        suffix = Path(source).suffix.lower() if isinstance(source, str | Path) else ""
        if suffix not in (".csv", ".parquet"):
            raise ValueError("choosing columns (--columns, --id-column) needs a .csv file with a header or a "
                             f".parquet file, not {source if suffix else 'an array'}")
        return _named(Path(source).expanduser(), shape, list(columns or []), list(id_columns or []))
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
    hint = ("; keep text columns (ids, labels) beside the scores with --id-column NAME, or pick the example's "
            "columns with --columns") if header else ""

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
                            raise ValueError(f"{path} line {number}: {e}{hint}") from None
                    raise ValueError(f"{path} lines {batch[0][0]}..{batch[-1][0]}: {error}") from None

    return Rows(str(path), total, chunks, shape)


def _parquet(path: Path, shape: tuple[int, ...] | None) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.ParquetFile(path)

    def chunks(size: int) -> Iterator[np.ndarray]:
        for batch in table.iter_batches(batch_size=size):
            yield _parquet_values(path, batch, batch.schema.names)

    return Rows(str(path), table.metadata.num_rows, chunks, shape)


def _named(path: Path, shape: tuple[int, ...] | None, columns: list[str], id_columns: list[str]) -> Rows:
    """Rows of the named ``columns`` of a CSV with a header or a Parquet file, ``id_columns`` kept as text."""
    if not path.is_file():
        raise FileNotFoundError(f"no such input file: {path}")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ModuleNotFoundError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.ParquetFile(path)
        names, total = list(table.schema_arrow.names), table.metadata.num_rows
    else:
        with path.open(newline="") as f:
            names = next(csv.reader(f), [])
        if not names or not _is_header(",".join(names)):
            raise ValueError(f"{path}: choosing columns needs a header line naming them")
        total = _csv(path, None).total
    unknown = [c for c in [*columns, *id_columns] if c not in names]
    if unknown:
        raise ValueError(f"{path} has no column {', '.join(map(repr, unknown))}; it has: {', '.join(names)}")
    features = columns or [n for n in names if n not in id_columns]
    rows = Rows(str(path), total, lambda size: iter(()), shape, tuple(id_columns))
    rows.ids = {c: [] for c in id_columns}

    def parquet_chunks(size: int) -> Iterator[np.ndarray]:
        for batch in table.iter_batches(batch_size=size, columns=[*features, *id_columns]):
            for c in id_columns:
                rows.ids[c].append(batch.column(c))
            yield _parquet_values(path, batch, features)

    feature_at = [names.index(c) for c in features]
    id_at = [names.index(c) for c in id_columns]

    def csv_chunks(size: int) -> Iterator[np.ndarray]:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            number = 1
            while batch := list(itertools.islice(reader, size)):
                batch = [record for record in batch if record]  # blank lines
                values = np.empty((len(batch), len(feature_at)), np.float32)
                for i, record in enumerate(batch):
                    number += 1
                    if len(record) != len(names):
                        raise ValueError(f"{path} line {number}: {len(record)} fields where the header names "
                                         f"{len(names)} ({', '.join(names)})")
                    try:
                        values[i] = [float(record[j]) for j in feature_at]
                    except ValueError:
                        bad = next(j for j in feature_at if not _is_number(record[j]))
                        raise ValueError(f"{path} line {number}, column {names[bad]!r}: {record[bad]!r} is not a "
                                         "number; name text columns with --id-column to keep them, or pick the "
                                         "example's columns with --columns") from None
                for c, j in zip(id_columns, id_at, strict=True):
                    rows.ids[c].append(np.asarray([record[j] for record in batch], dtype=str))
                yield values

    rows._chunks = parquet_chunks if path.suffix.lower() == ".parquet" else csv_chunks
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parquet_values(path: Path, batch: Any, features: list[str]) -> np.ndarray:
    """The ``features`` columns of a Parquet record batch side by side as float32 (rows, values).

    A list column holds one whole example per row (e.g. 64 pixels); a text column is refused, naming it.
    """
    import pyarrow as pa

    cols = []
    for c in features:
        column = batch.column(c)
        kind = column.type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            values = column.to_numpy(zero_copy_only=False)
            if column.null_count:
                raise ValueError(f"{path}: column {c!r} has empty (null) rows; every row needs its values")
            lengths = {len(v) for v in values}
            if len(lengths) > 1:
                raise ValueError(f"{path}: the lists of column {c!r} have {sorted(lengths)} values; every row "
                                 "needs the same number")
            cols.append(np.stack(values) if len(values) else np.zeros((0, 0), np.float32))
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            cols.append(column.to_numpy(zero_copy_only=False)[:, None])
        else:
            raise ValueError(f"{path}: column {c!r} holds {kind}, not numbers; name it with --id-column to keep it "
                             "beside the scores, or pick the example's columns with --columns")
    return np.concatenate(cols, axis=1).astype(np.float32)


def _concat(parts: list[Any]) -> Any:
    """Consecutive pieces of an id column as one: numpy arrays, or pyarrow arrays / chunked arrays."""
    if parts and not isinstance(parts[0], np.ndarray):
        import pyarrow as pa

        chunks = [c for p in parts for c in (p.chunks if isinstance(p, pa.ChunkedArray) else [p])]
        return pa.concat_arrays(chunks) if chunks else pa.array([], type=parts[0].type)
    return np.concatenate(parts) if parts else np.zeros(0, str)
