"""Open Inference Protocol HTTP/JSON bodies ⇄ the OIP protobuf messages the gRPC face runs on.

An HTTP inference request becomes the same ``inference.ModelInferRequest`` a gRPC client would send (every
input as ``raw_input_contents``, little-endian), so the two faces share one code path and answer the same bytes.

Request body: a JSON object (KServe v2 REST) — ``id``, ``parameters``, ``inputs`` (``name``, ``shape``,
``datatype``, ``data`` as a flat or nested list, row-major), ``outputs`` (``name``, ``parameters``). With
Triton's binary tensor data extension the JSON is followed by raw tensors: the header
``Inference-Header-Content-Length`` gives the JSON's length and an input's ``parameters.binary_data_size``
the length of its bytes, in the order of ``inputs``. Outputs come back as JSON ``data`` unless the request
parameter ``binary_data_output`` or an output's ``binary_data`` asks for raw bytes after the JSON (the
response then carries the same header).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from genserve.oip import grpc_service_pb2 as pb
from genserve.server.oip_models import parameter_value
from genserve.server.oip_tensors import DATATYPES
from genserve.server.transport import check_shape, invalid

HEADER_LENGTH = "inference-header-content-length"
"""Triton's binary tensor data extension: the length of the JSON part of a body."""
BINARY_PARAMETERS = ("binary_data_output",)
"""Request parameters of the HTTP protocol itself (not passed on to the model)."""


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """(the JSON object, the binary part after it) of an inference request body."""
    binary = memoryview(b"")
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise invalid(f"header Inference-Header-Content-Length is {header_length!r}, not a length") from None
        if not 0 <= length <= len(body):
            raise invalid(f"header Inference-Header-Content-Length is {length}, but the body has {len(body)} bytes")
        body, binary = body[:length], memoryview(body)[length:]
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the request body is not JSON ({e}); send an inference request object (KServe v2 REST)"
                      ) from None
    return _object(document, "the request body"), binary


def _parameter(key: str, value: Any) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise invalid(f"parameter {key!r} = {value} does not fit int64")
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    raise invalid(f"parameter {key!r} must be a bool, number or string, got {type(value).__name__}")


def _flatten(data: Any) -> list[Any]:
    """The elements of a flat or nested JSON list, row-major."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _json_array(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """The JSON ``data`` of an input as an array of its datatype; element types and count checked."""
    values = _flatten(data)
    count = math.prod(shape)
    if len(values) != count:
        raise invalid(f"input {name!r}: data has {len(values)} elements, but shape {list(shape)} needs {count}")
    dtype = DATATYPES[datatype].numpy
    if dtype.kind == "b":
        if not all(isinstance(v, bool) for v in values):
            raise invalid(f"input {name!r} is BOOL: its data must be true/false")
        return np.array(values, dtype=bool)
    if dtype.kind in "iu":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise invalid(f"input {name!r} is {datatype}: its data must be integers")
        info = np.iinfo(dtype)
        if values and not info.min <= min(values) <= max(values) <= info.max:
            raise invalid(f"input {name!r}: data has values outside the range of {datatype}")
        return np.array(values, dtype=dtype)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise invalid(f"input {name!r} is {datatype}: its data must be numbers")
    # Through float64, as the gRPC face's typed contents go: the same float32 for the same decimal text.
    return np.array(values, dtype=np.float64).astype(dtype)


def infer_request(document: dict[str, Any], binary: memoryview, model: str, version: str) -> pb.ModelInferRequest:
    """The ModelInferRequest of an HTTP inference request (JSON object and binary part); INVALID_ARGUMENT when
    it is not one. Returns it with the HTTP-only parameter ``binary_data_output`` removed."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in document:
        if not isinstance(document["id"], str):
            raise invalid("id must be a string")
        request.id = document["id"]
    for key, value in _object(document.get("parameters", {}), "parameters").items():
        if key not in BINARY_PARAMETERS:
            request.parameters[key].CopyFrom(_parameter(key, value))
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise invalid("inputs must be a list of tensors ({name, shape, datatype, data})")
    offset = 0
    for i, tensor in enumerate(inputs):
        tensor = _object(tensor, f"inputs[{i}]")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str):
            raise invalid(f"inputs[{i}] needs a name (a string)")
        if datatype not in DATATYPES:
            raise invalid(f"input {name!r} has datatype {datatype!r}; use one of {', '.join(DATATYPES)} "
                          "(FP32 for data and latents)")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise invalid(f"input {name!r} needs a shape (a list of integers)")
        shape_t = check_shape(tuple(shape), f"input {name!r}")
        size = _object(tensor.get("parameters", {}), f"input {name!r} parameters").get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise invalid(f"input {name!r} has both data and binary_data_size; send one of them")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
                raise invalid(f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary) - offset} "
                              "bytes left after the JSON (header Inference-Header-Content-Length)")
            raw = bytes(binary[offset:offset + size])
            offset += size
        elif "data" in tensor:
            raw = _json_array(tensor["data"], datatype, shape_t, name).astype(
                DATATYPES[datatype].numpy, copy=False).tobytes()
        else:
            raise invalid(f"input {name!r} has no data (or binary_data_size)")
        request.inputs.append(pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape))
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise invalid(f"the body has {len(binary) - offset} bytes after the JSON and the binary inputs it names")
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise invalid("outputs must be a list of {name, parameters}")
    for i, output in enumerate(outputs):
        output = _object(output, f"outputs[{i}]")
        if not isinstance(output.get("name"), str):
            raise invalid(f"outputs[{i}] needs a name (a string)")
        request.outputs.append(pb.ModelInferRequest.InferRequestedOutputTensor(name=output["name"]))
    return request


def binary_outputs(document: dict[str, Any]) -> set[str] | bool:
    """The outputs to send as raw bytes: True for all of them (``binary_data_output``), else their names."""
    parameters = document.get("parameters") or {}
    everything = parameters.get("binary_data_output", False)
    if not isinstance(everything, bool):
        raise invalid("parameter 'binary_data_output' must be true or false")
    named = set()
    for output in document.get("outputs") or []:
        flag = (output.get("parameters") or {}).get("binary_data", everything)
        if not isinstance(flag, bool):
            raise invalid(f"output {output.get('name')!r}: parameter 'binary_data' must be true or false")
        if flag:
            named.add(output["name"])
    return everything if not document.get("outputs") else named


def infer_response(response: pb.ModelInferResponse, binary: set[str] | bool) -> tuple[bytes, int | None]:
    """(the response body, the JSON part's length when raw outputs follow it, else None)."""
    outputs, chunks = [], []
    for meta, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        tensor: dict[str, Any] = {"name": meta.name, "datatype": meta.datatype, "shape": list(meta.shape)}
        if binary is True or (binary is not False and meta.name in binary):
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = np.frombuffer(raw, dtype=DATATYPES[meta.datatype].numpy).tolist()
        outputs.append(tensor)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    document["parameters"] = {k: parameter_value(v) for k, v in response.parameters.items()}
    document["outputs"] = outputs
    text = json.dumps(document).encode()
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)
