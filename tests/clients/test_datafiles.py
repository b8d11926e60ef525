"""The client's pure parts, without a server: file readers, PNG writer, seeds, health codec, channel settings."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from genserve.clients.channel import ChannelSettings, GenserveError, service_config
from genserve.clients.datafiles import open_rows
from genserve.clients.images import grid, png_bytes, write_grid
from genserve.clients.messages import chunk_seed, health_request_bytes, health_status
from genserve.core.noise import MAX_SEED

# -- readers ----------------------------------------------------------------------------------------------


def chunks_of(source, size: int, **kw) -> list[np.ndarray]:
    return list(open_rows(source, **kw).chunks(size))


def test_every_format_gives_the_same_rows_in_order(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(1003, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez_compressed(tmp_path / "x.npz", x=x, labels=np.arange(len(x)))
    np.savetxt(tmp_path / "x.csv", x, delimiter=",", fmt="%.9g", header="a,b,c", comments="")
    np.savetxt(tmp_path / "noheader.csv", x, delimiter=",", fmt="%.9g")
    for source in (x, x.tolist(), tmp_path / "x.npy", tmp_path / "x.npz", tmp_path / "x.csv",
                   str(tmp_path / "noheader.csv")):
        rows = open_rows(source)
        assert rows.total == 1003, source
        parts = list(rows.chunks(100))
        assert [len(p) for p in parts] == [100] * 10 + [3]
        assert all(p.dtype == np.float32 for p in parts)
        assert np.array_equal(np.concatenate(parts), x), source


def test_npy_is_memory_mapped_and_chunks_are_copies(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "x.npy", x)
    rows = open_rows(tmp_path / "x.npy")
    first = next(rows.chunks(3))
    assert isinstance(first, np.ndarray) and not isinstance(first, np.memmap) and first.flags.writeable


def test_flat_rows_take_the_models_shape(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 17, size=(50, 8, 8)).astype(np.float32)
    np.savetxt(tmp_path / "flat.csv", images.reshape(50, 64), delimiter=",", fmt="%d")
    got = open_rows(tmp_path / "flat.csv", shape=(8, 8)).read()
    assert got.shape == (50, 8, 8) and np.array_equal(got, images)
    assert open_rows(images, shape=(8, 8)).read().shape == (50, 8, 8)
    assert open_rows(np.arange(5.0), shape=(1,)).read().shape == (5, 1)  # a 1-D array is one value per row
    with pytest.raises(ValueError, match=r"have 64 values each .* shape \(2,\)"):
        open_rows(images, shape=(2,)).read()


def test_csv_details(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("x,y\n1,2\n\n3,4\n5,6")  # header, a blank line, no final newline
    rows = open_rows(path)
    assert np.array_equal(rows.read(), [[1, 2], [3, 4], [5, 6]])
    path.write_text("1.5,2\n3,-4e3\n")
    assert np.array_equal(open_rows(path).read(), [[1.5, 2], [3, -4000]])
    path.write_text("1,2\n3,4,5\n")
    with pytest.raises(ValueError, match="a.csv line"):
        open_rows(path).read()


def test_npz_member_choice(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", data=np.ones((4, 2)))
    np.savez(tmp_path / "two.npz", a=np.ones((4, 2)), b=np.zeros((3, 2)))
    assert open_rows(tmp_path / "one.npz").total == 4
    assert open_rows(tmp_path / "two.npz", key="b").total == 3
    with pytest.raises(ValueError, match=r"holds \['a', 'b'\]"):
        open_rows(tmp_path / "two.npz")
    with pytest.raises(ValueError, match="no array 'c'"):
        open_rows(tmp_path / "two.npz", key="c")


def test_unreadable_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError):
        open_rows(tmp_path / "missing.npy")
    (tmp_path / "x.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match="unknown file type .txt"):
        open_rows(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="scalar"):
        open_rows(np.float32(3))
    with pytest.raises(ValueError, match="chunk size"):
        next(open_rows(np.ones((3, 2))).chunks(0))
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match="needs pyarrow"):
        open_rows(tmp_path / "x.parquet")


def test_parquet_columns_and_list_columns(tmp_path: Path) -> None:
    import pyarrow as pa  # the dev extra installs it; a missing one is a failure, not a skip
    import pyarrow.parquet as pq
    x = np.random.default_rng(2).normal(size=(300, 2)).astype(np.float32)
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1]}), tmp_path / "cols.parquet")
    assert np.array_equal(open_rows(tmp_path / "cols.parquet").read(), x)
    images = np.arange(300 * 4, dtype=np.float32).reshape(300, 4)
    pq.write_table(pa.table({"pixels": list(images)}), tmp_path / "list.parquet")
    rows = open_rows(tmp_path / "list.parquet", shape=(2, 2))
    assert rows.total == 300 and np.array_equal(rows.read(), images.reshape(300, 2, 2))


# -- PNG --------------------------------------------------------------------------------------------------


def read_png(data: bytes) -> np.ndarray:
    """A minimal PNG reader (8-bit grey or RGB, filter 0): checks the signature and every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color = header[:4]
    channels = {0: 1, 2: 3}[color]
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * channels)
    assert depth == 8 and (raw[:, 0] == 0).all()
    pixels = raw[:, 1:].reshape(height, width, channels)
    return pixels[..., 0] if channels == 1 else pixels


def test_png_bytes_round_trip() -> None:
    grey = np.random.default_rng(3).integers(0, 256, size=(7, 11)).astype(np.uint8)
    assert np.array_equal(read_png(png_bytes(grey)), grey)
    rgb = np.random.default_rng(4).integers(0, 256, size=(5, 3, 3)).astype(np.uint8)
    assert np.array_equal(read_png(png_bytes(rgb)), rgb)
    with pytest.raises(ValueError):
        png_bytes(grey.astype(np.float32))


def test_grid_layout_and_grey_levels(tmp_path: Path) -> None:
    images = np.zeros((5, 2, 3), dtype=np.float32)
    images[1] = 16  # white
    images[2, 0, 0] = 8  # one mid-grey pixel
    g = grid(images, low=0, high=16, scale=2, pad=1)
    cols, rows = 3, 2  # ceil(sqrt(5)) columns
    assert g.shape == (rows * (2 * 2 + 1) + 1, cols * (3 * 2 + 1) + 1)
    tile = lambda i: g[1 + (i // cols) * 5:1 + (i // cols) * 5 + 4, 1 + (i % cols) * 7:1 + (i % cols) * 7 + 6]  # noqa: E731
    assert (tile(0) == 0).all() and (tile(1) == 255).all()
    assert (tile(2)[:2, :2] == 128).all() and tile(2)[2:, :].max() == 0  # one pixel blown up to 2x2
    assert g[0, :].tolist() == [128] * g.shape[1]  # padding
    path = write_grid(tmp_path / "g.png", images, 0, 16, scale=2)
    assert np.array_equal(read_png(path.read_bytes()), grid(images, 0, 16, scale=2))
    try:  # matplotlib, when present, reads the same picture
        import matplotlib.image

        assert np.allclose(matplotlib.image.imread(path) * 255, grid(images, 0, 16, scale=2), atol=0.5)
    except ModuleNotFoundError:
        pass
    with pytest.raises(ValueError):
        grid(np.zeros((3, 4)))


# -- seeds, health codec, channel settings ------------------------------------------------------------------


def test_chunk_seeds() -> None:
    assert chunk_seed(123, 0) == 123
    seeds = {chunk_seed(123, offset) for offset in range(0, 100_000, 4096)}
    assert len(seeds) == 25 and all(0 <= s <= MAX_SEED for s in seeds)
    assert chunk_seed(123, 4096) == chunk_seed(123, 4096) != chunk_seed(124, 4096)


def test_health_messages_match_the_standard_ones() -> None:
    from grpc_health.v1 import health_pb2  # grpcio-health-checking: the serve and dev extras
    for service in ("", "digits-vae", "x" * 300):  # 300 bytes needs a two-byte length
        assert health_request_bytes(service) == health_pb2.HealthCheckRequest(service=service).SerializeToString()
    for status in (0, 1, 2, 3):
        data = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert health_status(data) == status


def test_service_config_carries_grpcs_retry_policy() -> None:
    config = service_config(4, (0.5, 5.0), None)
    (method,) = config["methodConfig"]
    assert {"service": "genserve.v1.GenerativeService"} in method["name"]
    assert method["retryPolicy"] == {"maxAttempts": 5, "initialBackoff": "0.500s", "maxBackoff": "5.000s",
                                     "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    assert "loadBalancingConfig" not in config
    assert service_config(0, (0.5, 5.0), "round_robin") == {"loadBalancingConfig": [{"round_robin": {}}],
                                                            "healthCheckConfig": {"serviceName": ""}}
    with pytest.raises(ValueError):
        service_config(1, (2.0, 1.0), None)

    settings = ChannelSettings.build(["127.0.0.1:1", "127.0.0.1:2"], token="abc", max_message_mb=8)
    options = dict(settings.options)
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 8 * 2**20
    assert json.loads(options["grpc.service_config"])["loadBalancingConfig"] == [{"round_robin": {}}]
    assert settings.metadata == (("authorization", "Bearer abc"),)
    assert settings.credentials is None
    assert dict(ChannelSettings.build("h:1", retries=0).options)["grpc.enable_retries"] == 0


def test_genserve_error_reads_like_the_status() -> None:
    import grpc

    e = GenserveError(grpc.StatusCode.NOT_FOUND, "no model named 'x'", "Sample")
    assert isinstance(e, Exception) and e.code == grpc.StatusCode.NOT_FOUND
    assert str(e) == "NOT_FOUND: no model named 'x' (Sample)"
