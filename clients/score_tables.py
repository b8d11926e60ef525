"""The tables `genserve score` writes: columns streamed chunk by chunk to CSV or Parquet, whole or not at all.

A table goes to a temporary file beside its final path and is renamed into place only when every row is in
(``TableWriter`` as a context manager): a run that fails half way leaves no file at the output path that a
pipeline could take for a complete one. CSV on stdout (path "-") streams as it goes; a consumer of a pipe sees
the command's exit status instead.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = {".csv": "csv", ".parquet": "parquet"}


def table_format(path: str | Path) -> str:
    """"csv" or "parquet", from the output path's suffix ("-": CSV on stdout)."""
    if str(path) == "-":
        return "csv"
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--out {path}: the suffix chooses the format; use a .csv or .parquet file name "
                         "(or - for CSV on stdout)")
    return FORMATS[suffix]


def _is_arrow(values: Any) -> bool:
    return not isinstance(values, np.ndarray) and hasattr(values, "to_pylist")


def _csv_cells(values: Any) -> list[str]:
    """One column as CSV cells: floats with 9 significant digits (float32 round-trips), flags as 0/1, text
    quoted where it needs to be, missing values (None, NaN in a column of optional values) empty."""
    if _is_arrow(values):
        values = np.asarray(["" if v is None else str(v) for v in values.to_pylist()], dtype=object)
    values = np.asarray(values)
    if values.dtype == bool:
        return np.where(values, "1", "0").tolist()
    if values.dtype.kind == "f":
        cells = np.char.mod("%.9g", values).astype(object)
        cells[np.isnan(values)] = ""
        return cells.tolist()
    if values.dtype.kind in "iu":
        return values.astype(str).tolist()
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([str(v)] for v in values)
    return text.getvalue().splitlines()


def _arrow_array(values: Any) -> Any:
    import pyarrow as pa

    if _is_arrow(values):
        return values
    values = np.asarray(values)
    if values.dtype.kind == "f":  # NaN marks a missing value (e.g. bits_per_dim of an unnormalized model)
        return pa.array(values, mask=np.isnan(values))
    if values.dtype.kind in "US":
        return pa.array(values.tolist(), type=pa.string())
    return pa.array(values)


class TableWriter:
    """Chunks of columns (name -> (rows,) array) appended to a .csv or .parquet table, or CSV on stdout.

    Every chunk must carry the same columns in the same order. Use it as a context manager: leaving the block
    normally publishes the file (an atomic rename); leaving it by an exception removes the partial file.
    """

    def __init__(self, path: str | Path) -> None:
        self.format = table_format(path)
        self.stdout = str(path) == "-"
        self.path = None if self.stdout else Path(path)
        self.rows = 0
        self._columns: list[str] | None = None
        self._file: Any = None
        self._parquet: Any = None
        self._temp: Path | None = None
        if self.format == "parquet":
            try:
                import pyarrow.parquet  # noqa: F401
            except ModuleNotFoundError:
                raise ValueError(f"--out {path}: writing Parquet needs pyarrow (pip install pyarrow)") from None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
            os.close(fd)
            self._temp = Path(temp)

    def write(self, columns: dict[str, Any]) -> None:
        """Append one chunk of rows."""
        names = list(columns)
        if self._columns is None:
            self._columns = names
        elif names != self._columns:
            raise ValueError(f"a chunk of columns {names} where the table has {self._columns}")
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns of different lengths in one chunk: {lengths}")
        count = next(iter(lengths.values()), 0)
        if self.format == "csv":
            self._write_csv(columns, names)
        else:
            self._write_parquet(columns, names)
        self.rows += count

    def _write_csv(self, columns: dict[str, Any], names: list[str]) -> None:
        if self._file is None:
            self._file = sys.stdout if self.stdout else open(self._temp, "w", newline="")  # noqa: SIM115
            header = io.StringIO()
            csv.writer(header, lineterminator="\n").writerow(names)
            self._file.write(header.getvalue())
        cells = [_csv_cells(values) for values in columns.values()]
        self._file.writelines(",".join(fields) + "\n" for fields in zip(*cells, strict=True))

    def _write_parquet(self, columns: dict[str, Any], names: list[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        batch = pa.table({name: _arrow_array(values) for name, values in columns.items()})
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._temp, batch.schema)
        elif batch.schema != self._parquet.schema:
            # A column that was all missing in the first chunk (null type) and has values now, or the reverse.
            batch = batch.cast(self._parquet.schema)
        self._parquet.write_table(batch)

    def close(self) -> Path | None:
        """Finish the table and move it into place; returns its path (None for stdout)."""
        if self._columns is None:
            raise ValueError("no rows were written")
        if self._parquet is not None:
            self._parquet.close()
        if self._file is not None and not self.stdout:
            self._file.close()
        if self.stdout:
            sys.stdout.flush()
            return None
        os.replace(self._temp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial table."""
        with contextlib.suppress(Exception):
            if self._parquet is not None:
                self._parquet.close()
        if self._file is not None and not self.stdout:
            self._file.close()
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, kind: type | None, *rest: object) -> None:
        if kind is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


def read_table_chunks(path: Path, size: int = 65536) -> Iterator[dict[str, Any]]:
    """A table that TableWriter wrote, back in chunks of columns: Parquet columns as pyarrow arrays, CSV
    columns as the cells' text (numbers are not parsed back: the second pass of --quantile copies them)."""
    if table_format(path) == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=size):
            yield {name: batch.column(name) for name in batch.schema.names}
        return
    with open(path, newline="") as f:
        reader = csv.reader(f)
        names = next(reader)
        while block := [record for _, record in zip(range(size), reader, strict=False)]:
            yield {name: np.asarray([r[i] for r in block], dtype=object) for i, name in enumerate(names)}
