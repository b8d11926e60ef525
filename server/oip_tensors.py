"""Open Inference Protocol tensors: datatypes, each operation's inputs and outputs, and their wire codec.

Inputs travel as typed ``contents`` or as ``raw_input_contents`` (little-endian, row-major); a shape is
checked (at most 64 axes, none negative; server/transport.py) before any array is made of it. Outputs always
travel as ``raw_output_contents``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from genserve.core.manifest import LIKELIHOOD_NAME
from genserve.oip import grpc_service_pb2 as pb
from genserve.oip import model_config_pb2 as mc
from genserve.server.repository import LoadedModel
from genserve.server.transport import check_shape, invalid


@dataclass(frozen=True)
class DType:
    """One OIP datatype: its numpy type (little-endian on the wire), typed-contents field and config enum."""

    numpy: np.dtype
    contents: str | None
    """InferTensorContents field holding its elements; None: only raw bytes carry it."""
    config: int
    """model_config_pb2.DataType value."""


DATATYPES: dict[str, DType] = {
    "BOOL": DType(np.dtype(bool), "bool_contents", mc.TYPE_BOOL),
    "UINT8": DType(np.dtype("<u1"), "uint_contents", mc.TYPE_UINT8),
    "UINT16": DType(np.dtype("<u2"), "uint_contents", mc.TYPE_UINT16),
    "UINT32": DType(np.dtype("<u4"), "uint_contents", mc.TYPE_UINT32),
    "UINT64": DType(np.dtype("<u8"), "uint64_contents", mc.TYPE_UINT64),
    "INT8": DType(np.dtype("<i1"), "int_contents", mc.TYPE_INT8),
    "INT16": DType(np.dtype("<i2"), "int_contents", mc.TYPE_INT16),
    "INT32": DType(np.dtype("<i4"), "int_contents", mc.TYPE_INT32),
    "INT64": DType(np.dtype("<i8"), "int64_contents", mc.TYPE_INT64),
    "FP16": DType(np.dtype("<f2"), None, mc.TYPE_FP16),
    "FP32": DType(np.dtype("<f4"), "fp32_contents", mc.TYPE_FP32),
    "FP64": DType(np.dtype("<f8"), "fp64_contents", mc.TYPE_FP64),
}
NATIVE: dict[str, np.dtype] = {name: d.numpy.newbyteorder("=") for name, d in DATATYPES.items()}
"""Each datatype's numpy type in this machine's byte order (made once: ``newbyteorder`` builds a new dtype)."""
CONTENT_FIELDS = tuple(f.name for f in pb.InferTensorContents.DESCRIPTOR.fields)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an OIP model; ``shape`` has the batch axis (-1) first when ``batched``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    batched: bool = True
    optional: bool = False


def latent_shape(loaded: LoadedModel) -> tuple[int, ...]:
    """Shape of one latent row: (latent_dim,) when the manifest has one, else the data shape (flows)."""
    latent = loaded.manifest.parameters.get("latent_dim")
    return (int(latent),) if latent else tuple(loaded.spec.shape)


def tensor_specs(loaded: LoadedModel, operation: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of ``<model>.<operation>`` for a loaded model version (made once per version and
    operation; callers must not change the lists)."""
    key = ("oip.tensor_specs", operation)
    specs = loaded.derived.get(key)
    if specs is None:
        specs = loaded.derived[key] = _tensor_specs(loaded, operation)
    return specs


def output_datatypes(loaded: LoadedModel, operation: str) -> dict[str, str]:
    """Output name -> OIP datatype of ``<model>.<operation>`` (made once per version and operation)."""
    key = ("oip.output_datatypes", operation)
    datatypes = loaded.derived.get(key)
    if datatypes is None:
        datatypes = loaded.derived[key] = {s.name: s.datatype for s in tensor_specs(loaded, operation)[1]}
    return datatypes


def _tensor_specs(loaded: LoadedModel, operation: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    data = tuple(int(d) for d in loaded.spec.shape)
    latent = latent_shape(loaded)
    if operation == "sample":
        outputs = [TensorSpec("samples", "FP32", (-1, *data))]
        if loaded.manifest.parameters.get("latent_dim"):
            outputs.append(TensorSpec("latents", "FP32", (-1, *latent)))
        return [TensorSpec("N", "INT64", (1,), batched=False, optional=True)], outputs
    if operation == "log_likelihood":
        outputs = [TensorSpec("log_prob", "FP64", (-1,))]
        if LIKELIHOOD_NAME.get(loaded.likelihood_kind, "exact") not in ("unnormalized", "none"):
            outputs.append(TensorSpec("bits_per_dim", "FP64", (-1,)))
        return [TensorSpec("x", "FP32", (-1, *data))], outputs + score_outputs(loaded)
    if operation == "encode":
        return [TensorSpec("x", "FP32", (-1, *data))], [TensorSpec("z", "FP32", (-1, *latent))]
    return [TensorSpec("z", "FP32", (-1, *latent))], [TensorSpec("x", "FP32", (-1, *data))]


PERCENTILE = "percentile"
"""The output holding log_prob's percentile; ``percentile_<kind>`` a score kind's."""
SCORE_PREFIX, PERCENTILE_PREFIX = "score_", "percentile_"
PER_DIMENSION = "per_dimension"


def score_outputs(loaded: LoadedModel) -> list[TensorSpec]:
    """log_likelihood's outputs beside log_prob, produced when asked for (by request parameter or by naming
    them): ``score_<kind>`` per score kind, ``percentile`` and ``percentile_<kind>`` when calibrated,
    ``per_dimension`` [-1, *data] when the family gives it."""
    data = tuple(int(d) for d in loaded.spec.shape)
    manifest = loaded.manifest
    calibrated = {c.score for c in manifest.calibration}
    out = [TensorSpec(SCORE_PREFIX + k.name, "FP64", (-1,), optional=True) for k in manifest.score_kinds]
    if "log_prob" in calibrated:
        out.append(TensorSpec(PERCENTILE, "FP64", (-1,), optional=True))
    out += [TensorSpec(PERCENTILE_PREFIX + k.name, "FP64", (-1,), optional=True)
            for k in manifest.score_kinds if k.name in calibrated]
    if hasattr(loaded.program, "log_likelihood_terms"):
        out.append(TensorSpec(PER_DIMENSION, "FP64", (-1, *data), optional=True))
    return out


def decode_inputs(request: pb.ModelInferRequest, specs: list[TensorSpec], model: str) -> dict[str, np.ndarray]:
    """The request's input tensors as arrays, checked against the model's inputs."""
    known = {s.name: s for s in specs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one "
                      "per input, in the order of `inputs`, or none and use each input's `contents`")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in known:
            raise invalid(f"{model} has no input {tensor.name!r}; its inputs are {', '.join(known)}")
        if tensor.name in out:
            raise invalid(f"input {tensor.name!r} is given twice")
        out[tensor.name] = decode_tensor(tensor, raw[i] if raw else None)
    for s in specs:
        if not s.optional and s.name not in out:
            want = f"{s.datatype} [{', '.join(map(str, s.shape))}]"
            raise invalid(f"{model} needs input {s.name!r} ({want}); the request has "
                          f"{', '.join(out) or 'no inputs'}")
    return out


def decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    """One InferInputTensor (with its raw bytes, if raw contents are used) as a native-endian array."""
    name = tensor.name
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise invalid(f"input {name!r} has datatype {tensor.datatype!r}; use one of {', '.join(DATATYPES)} "
                      "(FP32 for data and latents)")
    shape = check_shape(tuple(tensor.shape), f"input {name!r}")  # a repeated int64: Python ints
    count = math.prod(shape)
    given = [f for f in CONTENT_FIELDS if len(getattr(tensor.contents, f))] if tensor.HasField("contents") else []
    if raw is not None:
        if given:
            raise invalid(f"input {name!r} has both `contents` and raw_input_contents; send one of them")
        want = count * dtype.numpy.itemsize
        if len(raw) != want:
            raise invalid(f"input {name!r}: raw contents have {len(raw)} bytes, but shape {list(shape)} of "
                          f"{tensor.datatype} needs {want}")
        return np.frombuffer(raw, dtype=dtype.numpy).reshape(shape).astype(NATIVE[tensor.datatype])
    if dtype.contents is None:
        raise invalid(f"input {name!r} is {tensor.datatype}, which has no typed contents field; send it in "
                      "raw_input_contents")
    wrong = [f for f in given if f != dtype.contents]
    if wrong:
        raise invalid(f"input {name!r} is {tensor.datatype}: put its elements in contents.{dtype.contents}, "
                      f"not {', '.join(wrong)}")
    values = getattr(tensor.contents, dtype.contents)
    if len(values) != count:
        raise invalid(f"input {name!r}: contents.{dtype.contents} has {len(values)} elements, but shape "
                      f"{list(shape)} needs {count}")
    wide = np.asarray(values)
    array = wide.astype(NATIVE[tensor.datatype])
    if wide.dtype.kind in "iu" and not np.array_equal(array, wide):
        raise invalid(f"input {name!r}: contents.{dtype.contents} has values outside the range of "
                      f"{tensor.datatype}")
    return array.reshape(shape)


def encode_output(name: str, datatype: str, array: np.ndarray) -> tuple[pb.ModelInferResponse.InferOutputTensor,
                                                                           bytes]:
    """An output tensor's metadata and its raw bytes (little-endian, row-major)."""
    wire = np.ascontiguousarray(np.asarray(array).astype(DATATYPES[datatype].numpy, copy=False))
    meta = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(wire.shape))
    return meta, wire.tobytes()

