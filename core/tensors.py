"""Convert numpy arrays to and from genserve.v1.Tensor: shape, dtype name, raw little-endian C-order bytes."""

from __future__ import annotations

import math

import numpy as np

from genserve.v1.service_pb2 import Tensor

# The dtype names the wire format allows; each maps to its little-endian numpy dtype.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}


def to_proto(array: np.ndarray) -> Tensor:
    """Encode an array of any byte order and memory layout as a Tensor; ValueError for unsupported dtypes."""
    array = np.asarray(array)
    name = array.dtype.name
    if name not in DTYPES:
        raise ValueError(
            f"cannot encode dtype {array.dtype!s} as a Tensor; supported dtypes: {', '.join(DTYPES)}"
        )
    # astype to the little-endian dtype is free when the array already is little-endian and C-contiguous.
    data = np.ascontiguousarray(array.astype(DTYPES[name], copy=False)).tobytes()
    return Tensor(shape=array.shape, dtype=name, data=data)


def from_proto(tensor: Tensor, *, writable: bool = True) -> np.ndarray:
    """Decode a Tensor into an array of its shape and dtype, in native byte order.

    Raises ValueError naming the problem when the dtype is unknown, a dimension is negative, or the byte
    length is not product(shape) * itemsize. With writable=False the result is a read-only view of the bytes
    (no copy) where the byte order allows it.
    """
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {tensor.dtype!r}; expected one of: {', '.join(DTYPES)}")
    shape = tuple(int(dim) for dim in tensor.shape)
    for axis, dim in enumerate(shape):
        if dim < 0:
            raise ValueError(f"tensor shape {list(shape)} has negative dimension {dim} at axis {axis}")
    count = math.prod(shape)  # Python ints: no overflow for absurd shapes
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(
            f"tensor data has {len(tensor.data)} bytes but shape {list(shape)} of {tensor.dtype} needs"
            f" {expected} ({count} elements x {dtype.itemsize} bytes)"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    native = array.astype(dtype.newbyteorder("="), copy=False)
    if writable and not native.flags.writeable:
        native = native.copy()
    return native
