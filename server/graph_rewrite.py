"""Load-time ONNX rewrite after which a row's outputs do not depend on the rows batched with it (CPU provider).

Two CPU kernels of ONNX Runtime (1.32) give a row results that depend on its place in the batch, in the last bit:

* **Reductions over the last axis** (ReduceSum, ReduceMean) sum each row with Eigen, which starts its SIMD
  packets at the first 16-byte-aligned element of the row. With a row length L that is not a multiple of the
  4-float packet, row r starts at byte 4·L·r, so its alignment, hence the order of the additions, depends on r
  (the pPCA ``log_prob``, RealNVP ``forward`` and VAE ``log_weights`` graphs on 6-feature data: up to 7.6e-6
  nats). MLAS's GEMM accumulates along K in the same order for every row whatever its address, so they are
  run as ``X @ ones[L, 1]``: the same sum, row-independent, about as fast (the constant ``ones`` is prepacked).
* **Eigen's vectorised transcendental functions** (``TAIL_SENSITIVE``: Log, Softplus, ...) compute the last
  ``size % 4`` elements of a tensor with the scalar library function, which rounds differently: the same row
  differs alone (6 elements: 4 vectorised, 2 scalar) and in a batch of 64 (all vectorised). Their input's last
  axis is padded to a multiple of ``SAFE_MULTIPLE`` and the output sliced back, so that no tail exists.

The server imports no ``onnx``: the graph is read and written with a minimal subset of ``onnx.proto``
declared below, in a private descriptor pool. Fields the subset does not name are kept as protobuf unknown
fields and written back unchanged, so the rewritten model differs only in the nodes replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# (message, [(field, number, type, label, message type)]); numbers and types follow onnx/onnx.proto (proto2).
_I64, _I32, _STR, _BYTES, _MSG = (descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
                                  descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
                                  descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                                  descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                                  descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE)
_ONE, _MANY = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_SCHEMA = {
    "ModelProto": [("graph", 7, _MSG, _ONE, "GraphProto"), ("opset_import", 8, _MSG, _MANY, "OperatorSetIdProto")],
    "OperatorSetIdProto": [("domain", 1, _STR, _ONE, ""), ("version", 2, _I64, _ONE, "")],
    "GraphProto": [("node", 1, _MSG, _MANY, "NodeProto"), ("initializer", 5, _MSG, _MANY, "TensorProto"),
                   ("input", 11, _MSG, _MANY, "ValueInfoProto"), ("output", 12, _MSG, _MANY, "ValueInfoProto"),
                   ("value_info", 13, _MSG, _MANY, "ValueInfoProto")],
    "NodeProto": [("input", 1, _STR, _MANY, ""), ("output", 2, _STR, _MANY, ""), ("name", 3, _STR, _ONE, ""),
                  ("op_type", 4, _STR, _ONE, ""), ("attribute", 5, _MSG, _MANY, "AttributeProto"),
                  ("domain", 7, _STR, _ONE, "")],
    "AttributeProto": [("name", 1, _STR, _ONE, ""), ("i", 3, _I64, _ONE, ""), ("t", 5, _MSG, _ONE, "TensorProto"),
                       ("ints", 8, _I64, _MANY, ""), ("type", 20, _I32, _ONE, "")],
    "TensorProto": [("dims", 1, _I64, _MANY, ""), ("data_type", 2, _I32, _ONE, ""),
                    ("int64_data", 7, _I64, _MANY, ""), ("name", 8, _STR, _ONE, ""), ("raw_data", 9, _BYTES, _ONE, "")],
    "ValueInfoProto": [("name", 1, _STR, _ONE, ""), ("type", 2, _MSG, _ONE, "TypeProto")],
    "TypeProto": [("tensor_type", 1, _MSG, _ONE, "TypeTensor")],
    "TypeTensor": [("elem_type", 1, _I32, _ONE, ""), ("shape", 2, _MSG, _ONE, "TensorShapeProto")],
    "TensorShapeProto": [("dim", 1, _MSG, _MANY, "Dimension")],
    "Dimension": [("dim_value", 1, _I64, _ONE, ""), ("dim_param", 2, _STR, _ONE, "")],
}
_PACKED = {("TensorProto", "int64_data")}  # [packed = true] in onnx.proto

_FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}
"""ONNX TensorProto.DataType -> numpy dtype, for the types MatMul and these element-wise ops take."""
_ATTR_INTS = 7
_SUBGRAPH_OPS = {"If", "Loop", "Scan", "SequenceMap"}
SAFE_MULTIPLE = 16
"""A last axis whose length is a multiple of this many elements (64 bytes of float32: any SSE/AVX/AVX-512 packet)
keeps every row's start aligned and leaves no scalar tail."""
REDUCTIONS = ("ReduceSum", "ReduceMean")
"""Reductions over the last axis that are run as a MatMul with ones (ReduceMean: then divided by L)."""
TAIL_SENSITIVE = ("Log", "Softplus", "Mish", "Sin", "Cos", "Atan", "Asin", "Acos")
"""Element-wise ops whose Eigen kernels compute a tensor's last ``size % 4`` elements with the scalar library
function, which differs in the last bit from the vectorised one (ONNX Runtime 1.32 CPU, checked one by one; Exp,
Tanh, Sigmoid, Erf, Sqrt, Pow, Softmax and the other MLAS kernels are not). Their input's last axis is padded
(with ones) to a multiple of ``SAFE_MULTIPLE`` and the result sliced back, so that no tail exists."""


def _messages() -> dict[str, type]:
    fdp = descriptor_pb2.FileDescriptorProto(name="genserve_onnx_subset.proto", package="genserve_onnx_subset",
                                             syntax="proto2")
    for name, fields in _SCHEMA.items():
        msg = fdp.message_type.add(name=name)
        for field, number, ftype, label, type_name in fields:
            f = msg.field.add(name=field, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = f".genserve_onnx_subset.{type_name}"
            if (name, field) in _PACKED:
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()  # private: never clashes with onnx's own classes in one process
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"genserve_onnx_subset.{name}"))
            for name in _SCHEMA}


_M = _messages()


@dataclass(frozen=True)
class Rewrite:
    """What ``row_independent_model`` did to one graph."""

    model: bytes
    """The serialized model (the input bytes themselves when nothing changed)."""
    reductions: int
    """Reductions replaced by a MatMul."""
    elementwise: int
    """Tail-sensitive element-wise ops wrapped in a pad and a slice."""
    unfixed: tuple[str, ...]
    """Names of tail-sensitive nodes left as they were (their input's rank or last dimension is not in the
    graph's value infos); such a graph needs its calls padded to whole packets of rows."""


def row_independent_model(model_bytes: bytes) -> Rewrite:
    """The model with every alignment-sensitive reduction run as a MatMul and every tail-sensitive element-wise
    op run on a padded last axis; see the module docstring and ``Rewrite``."""
    model = _M["ModelProto"].FromString(model_bytes)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    types = {v.name: v.type.tensor_type for v in (*graph.input, *graph.value_info, *graph.output)}
    consts = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value" and a.HasField("t"):
                    consts[n.output[0]] = a.t
    out = _Builder(opset)
    reductions = elementwise = 0
    unfixed: list[str] = []
    for n in graph.node:
        if n.domain not in ("", "ai.onnx"):
            out.nodes.append(n)
        elif n.op_type in REDUCTIONS and (plan := _reduction(n, opset, types, consts)) is not None:
            out.reduction(n, *plan)
            reductions += 1
        elif n.op_type in TAIL_SENSITIVE:
            shape = _static_shape(types.get(n.input[0]) if n.input else None)
            if shape == [] or shape and shape[-1] is not None and shape[-1] % SAFE_MULTIPLE == 0:
                out.nodes.append(n)  # a scalar, or whole packets in every row
            elif shape is None or shape[-1] is None or opset < 13 or len(n.input) != 1:
                unfixed.append(n.name or n.output[0])
                out.nodes.append(n)
            else:
                out.padded(n, len(shape), shape[-1], _FLOAT_TYPES[types[n.input[0]].elem_type])
                elementwise += 1
        else:
            out.nodes.append(n)
    if not reductions and not elementwise:
        return Rewrite(model_bytes, 0, 0, tuple(unfixed))
    del graph.node[:]
    graph.node.extend(out.nodes)
    used = {i for n in out.nodes for i in n.input} | {o.name for o in graph.output}
    if any(n.op_type in _SUBGRAPH_OPS for n in out.nodes):
        used |= out.dropped  # a subgraph (not parsed here) may read them
    kept = [t for t in graph.initializer if t.name not in out.dropped or t.name in used]  # the axes no one reads
    del graph.initializer[:]
    graph.initializer.extend(kept + out.initializers)
    return Rewrite(model.SerializeToString(), reductions, elementwise, tuple(unfixed))


class _Builder:
    """The new node list and the initializers the replacements need."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self.dropped: set[str] = set()

    def const(self, name: str, a: np.ndarray) -> str:
        self.initializers.append(_tensor(name, a))
        return name

    def reduction(self, n, x: str, length: int, dtype: type, keepdims: bool, mean: bool) -> None:
        """ReduceSum(x, [-1]) = x @ ones[L, 1] (then / L for ReduceMean, squeezed unless keepdims)."""
        self.dropped.update(n.input[1:])
        y, base = n.output[0], n.name or n.output[0]
        ones = self.const(f"{y}__ones", np.ones((length, 1), dtype))
        steps = [("MatMul", [x, ones])]
        if mean:
            steps.append(("Div", [self.const(f"{y}__length", np.array(length, dtype))]))
        if not keepdims:
            if self.opset >= 13:
                steps.append(("Squeeze", [self.const(f"{y}__axes", np.array([-1], np.int64))]))
            else:
                steps.append(("Squeeze", []))
        prev = None
        for k, (op, args) in enumerate(steps):
            out = y if k == len(steps) - 1 else f"{y}__{op.lower()}"
            node = _node(op, args if prev is None else [prev, *args], [out], f"{base}__{op.lower()}")
            if op == "Squeeze" and self.opset < 13:
                node.attribute.add(name="axes", ints=[-1], type=_ATTR_INTS)
            self.nodes.append(node)
            prev = out

    def padded(self, n, rank: int, length: int, dtype: type) -> None:
        """op(x) = Slice(op(Pad(x, last axis to a multiple of SAFE_MULTIPLE, with ones)), last axis [0, L))."""
        y, base = n.output[0], n.name or n.output[0]
        pads = np.zeros(2 * rank, np.int64)
        pads[-1] = -length % SAFE_MULTIPLE
        self.nodes.append(_node("Pad", [n.input[0], self.const(f"{y}__pads", pads),
                                        self.const(f"{y}__one", np.array(1, dtype))], [f"{y}__padded_in"],
                                f"{base}__pad"))
        inner = _M["NodeProto"]()
        inner.CopyFrom(n)
        del inner.input[:], inner.output[:]
        inner.input.append(f"{y}__padded_in")
        inner.output.append(f"{y}__padded_out")
        self.nodes.append(inner)
        self.nodes.append(_node("Slice", [f"{y}__padded_out", self.const(f"{y}__start", np.array([0], np.int64)),
                                          self.const(f"{y}__stop", np.array([length], np.int64)),
                                          self.const(f"{y}__axis", np.array([-1], np.int64))], [y],
                                f"{base}__slice"))


def _static_shape(t) -> list[int | None] | None:
    """Dimensions (None where symbolic) of a float tensor type, or None when its rank or type is unknown."""
    if t is None or t.elem_type not in _FLOAT_TYPES or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _reduction(n, opset: int, types: dict, consts: dict) -> tuple[str, int, type, bool, bool] | None:
    """(input, L, dtype, keepdims, mean) when node ``n`` reduces an alignment-sensitive last axis, else None."""
    if not n.input:
        return None
    attrs = {a.name: a for a in n.attribute}
    if "noop_with_empty_axes" in attrs and attrs["noop_with_empty_axes"].i:
        return None
    shape = _static_shape(types.get(n.input[0]))
    if not shape or shape[-1] is None:
        return None
    axes_as_input = n.op_type == "ReduceSum" and opset >= 13 or opset >= 18
    if axes_as_input:
        axes = _ints(consts[n.input[1]]) if len(n.input) > 1 and n.input[1] in consts else None
    else:
        axes = list(attrs["axes"].ints) if "axes" in attrs else None
    if axes is None or len(axes) != 1 or axes[0] not in (-1, len(shape) - 1):
        return None
    length = shape[-1]
    if length < 4 or length % SAFE_MULTIPLE == 0:
        return None  # shorter than a packet: summed one by one; a whole number of packets: every row aligned
    keepdims = attrs["keepdims"].i if "keepdims" in attrs else 1
    return n.input[0], length, _FLOAT_TYPES[types[n.input[0]].elem_type], bool(keepdims), n.op_type == "ReduceMean"


def _ints(t) -> list[int] | None:
    if t.data_type != 7:  # INT64
        return None
    if t.raw_data:
        return np.frombuffer(t.raw_data, "<i8").tolist()
    return list(t.int64_data)


def _tensor(name: str, a: np.ndarray):
    code = {np.dtype(v): k for k, v in _FLOAT_TYPES.items()} | {np.dtype(np.int64): 7}
    return _M["TensorProto"](name=name, dims=a.shape, data_type=code[a.dtype],
                             raw_data=a.astype(a.dtype.newbyteorder("<")).tobytes())


def _node(op: str, inputs: list[str], outputs: list[str], name: str):
    return _M["NodeProto"](op_type=op, input=inputs, output=outputs, name=name)
