"""`genserve score`'s tables without a server: streamed CSV/Parquet writing, all-or-nothing files, ids taken
chunk by chunk, and the explanation picture drawn from arrays."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from genserve.clients.datafiles import open_rows
from genserve.clients.images import write_explanation
from genserve.clients.score_tables import TableWriter, read_table_chunks, table_format


def chunks(n: int, size: int):
    rng = np.random.default_rng(0)
    for start in range(0, n, size):
        stop = min(n, start + size)
        yield {"id": np.asarray([f"r,{i}" if i % 3 == 0 else f"r{i}" for i in range(start, stop)]),
               "row": np.arange(start, stop, dtype=np.int64),
               "log_prob_nats": rng.normal(size=stop - start),
               "bits_per_dim": np.full(stop - start, np.nan),
               "flag": np.arange(start, stop) % 2 == 0}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_table_written_in_chunks_reads_back_whole(tmp_path: Path, suffix: str) -> None:
    import pyarrow.parquet as pq

    path = tmp_path / "deep" / f"scores{suffix}"
    parts = list(chunks(1000, 300))
    with TableWriter(path) as table:
        for part in parts:
            table.write(part)
            assert not path.exists()  # nothing at the output path until the table is complete
    assert table.rows == 1000 and path.exists() and [p.name for p in path.parent.iterdir()] == [path.name]
    expected = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if suffix == ".parquet":
        got = pq.read_table(path)
        assert got.column_names == list(expected)
        assert got.schema.field("row").type == "int64" and got.schema.field("flag").type == "bool"
        assert got.column("id").to_pylist() == expected["id"].tolist()
        assert np.array_equal(got.column("log_prob_nats").to_numpy(), expected["log_prob_nats"])
        assert got.column("bits_per_dim").null_count == 1000  # missing, not NaN
        assert got.column("flag").to_pylist() == expected["flag"].tolist()
    else:
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
        assert list(records[0]) == list(expected)
        assert [r["id"] for r in records] == expected["id"].tolist()  # "r,0" quoted and read back
        assert np.allclose([float(r["log_prob_nats"]) for r in records], expected["log_prob_nats"], rtol=1e-8)
        assert {r["bits_per_dim"] for r in records} == {""}
        assert [r["flag"] for r in records] == ["1" if f else "0" for f in expected["flag"]]
    back = list(read_table_chunks(path, size=400))
    assert [len(c["row"]) for c in back] == [400, 400, 200]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_failed_run_leaves_no_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"scores{suffix}"
    with pytest.raises(RuntimeError, match="the stream broke"), TableWriter(path) as table:
        for i, part in enumerate(chunks(1000, 300)):
            if i == 2:
                raise RuntimeError("the stream broke")
            table.write(part)
    assert list(tmp_path.iterdir()) == []


def test_table_format_and_mismatched_chunks(tmp_path: Path) -> None:
    assert table_format("-") == "csv" and table_format("a/B.PARQUET") == "parquet"
    with pytest.raises(ValueError, match=r"use a \.csv or \.parquet file name"):
        table_format("scores.json")
    with pytest.raises(ValueError, match="a chunk of columns"), TableWriter(tmp_path / "t.csv") as table:
        table.write({"a": np.zeros(2)})
        table.write({"b": np.zeros(2)})
    with pytest.raises(ValueError, match="no rows"), TableWriter(tmp_path / "t.csv"):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_ids_are_taken_answer_by_answer_across_chunk_boundaries(tmp_path: Path, suffix: str) -> None:
    """The reader records ids a few chunks ahead; take_ids hands back exactly the next rows' ids, and a
    Parquet id keeps its type (int64 stays int64)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(1).normal(size=(250, 2)).astype(np.float32)
    ids = np.arange(1000, 1250)
    path = tmp_path / f"records{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"id": ids, "a": x[:, 0], "b": x[:, 1]}), path, row_group_size=70)
    else:
        np.savetxt(path, np.column_stack([ids, x]), delimiter=",", header="id,a,b", comments="", fmt="%.9g")
    rows = open_rows(path, shape=(2,), id_columns=["id"])
    seen = []
    rows.watch(lambda offset, chunk: seen.append((offset, len(chunk))))
    read = list(rows.chunks(60))
    assert np.allclose(np.concatenate(read), x) and seen[0] == (0, 60) and sum(n for _, n in seen) == 250
    taken = [rows.take_ids(n)["id"] for n in (45, 100, 5, 100)]
    values = [t.to_pylist() if suffix == ".parquet" else t.astype(int).tolist() for t in taken]
    assert sum(values, []) == ids.tolist()
    if suffix == ".parquet":
        assert taken[0].type == pa.int64()
    with pytest.raises(ValueError, match="1 rows asked"):
        rows.take_ids(1)


def test_bad_cells_are_named(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "short.csv").write_text("id,a,b\n1,0.5,0.1\n2,0.3\n")
    with pytest.raises(ValueError, match=r"line 3: 2 fields where the header names 3 \(id, a, b\)"):
        open_rows(tmp_path / "short.csv", id_columns=["id"]).read()
    (tmp_path / "text.csv").write_text("id,a,b\n1,0.5,0.1\n2,0.3,high\n")
    with pytest.raises(ValueError, match=r"line 3, column 'b': 'high' is not a number"):
        open_rows(tmp_path / "text.csv", id_columns=["id"]).read()
    pq.write_table(pa.table({"a": [1.0, 2.0], "b": ["x", "y"]}), tmp_path / "text.parquet")
    with pytest.raises(ValueError, match=r"column 'b' holds string, not numbers; name it with --id-column"):
        open_rows(tmp_path / "text.parquet").read()


def test_explanation_png_has_one_panel_pair_per_row(tmp_path: Path) -> None:
    import matplotlib.image

    rng = np.random.default_rng(3)
    images = rng.integers(0, 17, size=(6, 8, 8)).astype(np.float32)
    maps = rng.gamma(2.0, 1.0, size=(6, 8, 8))
    path = write_explanation(tmp_path / "why.png", images, maps, [f"row {i}\nlog p -{i}" for i in range(6)], 0, 16)
    picture = matplotlib.image.imread(path)
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 300
    # the heat maps are in colour (inferno), the inputs grey: the picture is not grey
    assert np.abs(picture[..., 0] - picture[..., 2]).max() > 0.3
    with pytest.raises(ValueError, match="same non-empty"):
        write_explanation(tmp_path / "bad.png", images, maps[:, :4], ["t"] * 6)
