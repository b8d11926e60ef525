"""Image grids as PNG files, written with numpy and zlib alone (no Pillow); explanation grids with matplotlib."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np


def grid(
    images: np.ndarray,
    low: float | None = None,
    high: float | None = None,
    scale: int = 4,
    columns: int | None = None,
    pad: int = 1,
) -> np.ndarray:
    """Tile (N, H, W) images into one uint8 grey image, each pixel blown up to scale x scale.

    Values map linearly from [low, high] to 0..255 (default: the batch's own min and max; pass 0 and
    levels-1 for discrete data so grey levels mean the same in every grid). Tiles are separated by ``pad``
    pixels of mid grey, in a near-square layout unless ``columns`` is given.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3 or not images.size:
        raise ValueError(f"a grid needs a non-empty (N, H, W) batch of images, got shape {images.shape}")
    lo = float(images.min()) if low is None else float(low)
    hi = float(images.max()) if high is None else float(high)
    span = hi - lo if hi > lo else 1.0
    pixels = np.clip(np.rint((images - lo) / span * 255), 0, 255).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w = pixels.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        out[top : top + h, left : left + w] = pixels[i]
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit greyscale (H, W) or RGB (H, W, 3) uint8 image as PNG file bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"PNG needs a uint8 (H, W) or (H, W, 3) image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    color = 0 if image.ndim == 2 else 2
    rows = image.reshape(height, -1)
    # Each scanline starts with filter type 0 (none).
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def write_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.write_bytes(png_bytes(image))
    return path


def write_grid(
    path: str | Path, images: np.ndarray, low: float | None = None, high: float | None = None, scale: int = 4
) -> Path:
    """Write (N, H, W) images as one PNG grid; returns the path."""
    return write_png(path, grid(images, low, high, scale))


def write_explanation(
    path: str | Path,
    images: np.ndarray,
    maps: np.ndarray,
    titles: list[str],
    low: float | None = None,
    high: float | None = None,
    columns: int = 4,
) -> Path:
    """A PNG grid of rows to explain: each image (grey) beside its heat map of per-dimension -log p terms.

    ``images`` (N, H, W) or (N, H, W, C) in data units, shown on [low, high] (default: their own range);
    ``maps`` the same shape in nats per dimension (channels are summed: one term per pixel); ``titles`` one
    line or two per row (e.g. its id and score). The maps share one colour scale and one colour bar, so the
    rows can be compared. Drawn with matplotlib (an optional dependency of the client: pip install matplotlib).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise ValueError("drawing explanations (--explain) needs matplotlib: pip install matplotlib") from None
    images, maps = np.asarray(images, dtype=np.float64), np.asarray(maps, dtype=np.float64)
    if images.shape != maps.shape or images.ndim not in (3, 4) or not len(images):
        raise ValueError(f"images {images.shape} and per-dimension maps {maps.shape}: expected the same non-empty "
                         "(N, H, W) or (N, H, W, C) shape")
    if len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    if images.ndim == 4:
        maps = maps.sum(axis=3)
        images = images.mean(axis=3) if images.shape[3] != 3 else images
    lo = float(images.min()) if low is None else float(low)
    hi = float(images.max()) if high is None else float(high)
    shown = np.clip((images - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    vmin, vmax = float(np.nanmin(maps)), float(np.nanmax(maps))
    n = len(images)
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    height = 1.6 * rows + 0.7
    figure = Figure(figsize=(2.6 * cols + 0.9, height), dpi=110)
    FigureCanvasAgg(figure)
    grid_spec = figure.add_gridspec(rows, 2 * cols, left=0.02, right=0.88, top=1 - 0.62 / height,
                                    bottom=0.03, wspace=0.08, hspace=0.6)
    heat = None
    for i in range(n):
        r, c = divmod(i, cols)
        left = figure.add_subplot(grid_spec[r, 2 * c])
        left.imshow(shown[i], cmap=None if shown[i].ndim == 3 else "gray", vmin=0, vmax=1,
                    interpolation="nearest")
        right = figure.add_subplot(grid_spec[r, 2 * c + 1])
        heat = right.imshow(maps[i], cmap="inferno", vmin=vmin, vmax=vmax, interpolation="nearest")
        for axis in (left, right):
            axis.set_xticks([])
            axis.set_yticks([])
        left.set_title(titles[i], fontsize=6.5, loc="left", x=0.0)
    bar = figure.add_axes((0.9, 0.1, 0.02, 0.8))
    figure.colorbar(heat, cax=bar).set_label("-log p per pixel (nats)", fontsize=8)
    bar.tick_params(labelsize=7)
    figure.suptitle("most anomalous rows: input | where its -log p comes from", fontsize=9, y=1 - 0.08 / height)
    path = Path(path)
    figure.savefig(path, format="png")
    return path
