"""Pixel orderings of autoregressive models: which flat position of an image is generated at each step.

An AR model factorises p(x) = prod_t p(x_{pi(t)} | x_{pi(<t)}) over a permutation pi of the D flat positions
(row-major over the data shape). The orders here move whole pixels and keep 2-D neighbourhoods, so a masked
convolution or a row buffer run on the permuted image works unchanged; the C channels of a pixel stay in turn.

    raster     row by row, left to right (the default; pi is the identity)
    transpose  column by column, top to bottom (square images)
    flip_h     row by row, right to left
    flip_v     rows from the bottom up, left to right
    rot180     rows from the bottom up, right to left (raster reversed)

Training and serving share this module: a model records its order as the manifest parameter ``order`` (the
index in ``ORDERS``, absent for raster), and the server samples position ``positions[t]`` at step t.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

ORDERS = ("raster", "transpose", "flip_h", "flip_v", "rot180")
"""Named orders; a manifest stores the index (parameters["order"]), so keep this tuple append-only."""


def check_order(order: str, shape: tuple[int, ...]) -> None:
    """ValueError unless ``order`` is a named order that applies to data of ``shape``."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "raster":
        return
    if not 2 <= len(shape) <= 3:
        raise ValueError(f"order {order!r} permutes the pixels of images (H, W) or (H, W, C), not data of shape "
                         f"{shape}; use raster")
    if order == "transpose" and shape[0] != shape[1]:
        raise ValueError(f"order 'transpose' needs square images (the permuted image keeps the shape), got {shape}")


def order_positions(shape: tuple[int, ...], order: str) -> np.ndarray:
    """(D,) int64: the flat position (row-major over ``shape``) generated at each step t of ``order``."""
    check_order(order, shape)
    D = int(np.prod(shape))
    if order == "raster":
        return np.arange(D, dtype=np.int64)
    idx = np.arange(D, dtype=np.int64).reshape(shape[0], shape[1], -1)  # (H, W, C)
    idx = {"transpose": idx.transpose(1, 0, 2), "flip_h": idx[:, ::-1], "flip_v": idx[::-1],
           "rot180": idx[::-1, ::-1]}[order]
    return np.ascontiguousarray(idx).reshape(-1)


def order_name(params: Mapping[str, float]) -> str:
    """The order a manifest's parameters record (``order``: index in ``ORDERS``; raster when absent)."""
    code = params.get("order", 0.0)
    if code != int(code) or not 0 <= int(code) < len(ORDERS):
        raise ValueError(f"manifest parameter order is {code}; expected an index 0..{len(ORDERS) - 1} into "
                         f"{', '.join(ORDERS)}")
    return ORDERS[int(code)]
