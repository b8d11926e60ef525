"""Image grids as PNG files, written with numpy and zlib alone (no matplotlib, no Pillow)."""

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
