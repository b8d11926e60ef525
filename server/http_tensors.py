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

Refusals are INVALID_ARGUMENT with the field at fault as a field violation, named by its JSON path
(``inputs[0].datatype``, ``parameters.seed``; the binary extension's header as ``Inference-Header-Content-Length``);
a body that is not JSON has the reason MALFORMED_JSON. Non-finite floats in an answer's JSON are the strings
"NaN", "Infinity" and "-Infinity" (protobuf's JSON mapping; bare NaN tokens are not JSON); a request's ``data``
may use the same strings, or the bare tokens Python writes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
import numpy as np

from genserve.oip import grpc_service_pb2 as pb
from genserve.server.oip_models import parameter_value
from genserve.server.oip_tensors import DATATYPES
from genserve.server.transport import Failure, Violation, check_shape, invalid

HEADER_LENGTH = "inference-header-content-length"
"""Triton's binary tensor data extension: the length of the JSON part of a body."""
BINARY_PARAMETERS = ("binary_data_output",)
"""Request parameters of the HTTP protocol itself (not passed on to the model)."""
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""Protobuf's JSON strings for the floats JSON has no numbers for."""


def _bad(message: str, field: str) -> Failure:
    """INVALID_ARGUMENT with ``field`` (a JSON path; "" the whole body) as its field violation; the message is
    left as written."""
    return Failure(grpc.StatusCode.INVALID_ARGUMENT, message, violations=(Violation(field, message),) if field else ())


def _object(value: Any, what: str, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object, got {type(value).__name__}; send an object {{...}}", field)
    return value


def parse_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """(the JSON object, the binary part after it) of an inference request body."""
    binary = memoryview(b"")
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise _bad(f"header Inference-Header-Content-Length is {header_length!r}, not a length; give the "
                       "length in bytes of the JSON part of the body", "Inference-Header-Content-Length") from None
        if not 0 <= length <= len(body):
            raise _bad(f"header Inference-Header-Content-Length is {length}, but the body has {len(body)} bytes; "
                       "give the length in bytes of the JSON part of the body", "Inference-Header-Content-Length")
        body, binary = body[:length], memoryview(body)[length:]
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise invalid(f"the request body is not JSON ({e}); send an inference request object (KServe v2 REST)",
                      reason="MALFORMED_JSON") from None
    return _object(document, "the request body", ""), binary


def _parameter(key: str, value: Any) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise _bad(f"parameter {key!r} = {value} does not fit int64; use a number in -2**63..2**63-1",
                       f"parameters.{key}")
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    raise _bad(f"parameter {key!r} must be a bool, number or string, got {type(value).__name__}; use one of those",
               f"parameters.{key}")


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


def _json_array(data: Any, datatype: str, shape: tuple[int, ...], name: str, field: str) -> np.ndarray:
    """The JSON ``data`` of an input as an array of its datatype; element types and count checked."""
    values = _flatten(data)
    count = math.prod(shape)
    if len(values) != count:
        raise _bad(f"input {name!r}: data has {len(values)} elements, but shape {list(shape)} needs {count}; "
                   "send one element per entry of the shape, row-major", field)
    dtype = DATATYPES[datatype].numpy
    if dtype.kind == "b":
        if not all(isinstance(v, bool) for v in values):
            raise _bad(f"input {name!r} is BOOL: its data must be true/false; send JSON booleans", field)
        return np.array(values, dtype=bool)
    if dtype.kind in "iu":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise _bad(f"input {name!r} is {datatype}: its data must be integers; send whole numbers", field)
        info = np.iinfo(dtype)
        if values and not info.min <= min(values) <= max(values) <= info.max:
            raise _bad(f"input {name!r}: data has values outside the range of {datatype}; use "
                       f"{info.min}..{info.max}", field)
        return np.array(values, dtype=dtype)
    if any(isinstance(v, str) for v in values):
        values = [NON_FINITE.get(v, v) if isinstance(v, str) else v for v in values]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise _bad(f"input {name!r} is {datatype}: its data must be numbers; send numbers (or \"NaN\", "
                   "\"Infinity\", \"-Infinity\")", field)
    # Through float64, as the gRPC face's typed contents go: the same float32 for the same decimal text.
    try:
        wide = np.array(values, dtype=np.float64)
    except OverflowError:  # an integer beyond float64 (10**400)
        raise _bad(f"input {name!r} has a number beyond the range of {datatype}; send numbers within it",
                   field) from None
    return wide.astype(dtype)


def infer_request(document: dict[str, Any], binary: memoryview, model: str, version: str) -> pb.ModelInferRequest:
    """The ModelInferRequest of an HTTP inference request (JSON object and binary part); INVALID_ARGUMENT when
    it is not one. Returns it with the HTTP-only parameter ``binary_data_output`` removed."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in document:
        if not isinstance(document["id"], str):
            raise _bad("id must be a string; send the request id as a JSON string", "id")
        request.id = document["id"]
    for key, value in _object(document.get("parameters", {}), "parameters", "parameters").items():
        if key not in BINARY_PARAMETERS:
            request.parameters[key].CopyFrom(_parameter(key, value))
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise _bad("inputs must be a list of tensors; send [{name, shape, datatype, data}, ...]", "inputs")
    offset = 0
    for i, tensor in enumerate(inputs):
        at = f"inputs[{i}]"
        tensor = _object(tensor, at, at)
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str):
            raise _bad(f"{at} needs a name (a string); the model's metadata lists its inputs", f"{at}.name")
        if datatype not in DATATYPES:
            raise _bad(f"input {name!r} has datatype {datatype!r}; use one of {', '.join(DATATYPES)} "
                       "(FP32 for data and latents)", f"{at}.datatype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise _bad(f"input {name!r} needs a shape (a list of integers); send the rows along axis 0, then "
                       "the model's data shape", f"{at}.shape")
        try:
            shape_t = check_shape(tuple(shape), f"input {name!r}")
        except Failure as e:
            raise _bad(e.message, f"{at}.shape") from None
        size = _object(tensor.get("parameters", {}), f"input {name!r} parameters", f"{at}.parameters").get(
            "binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise _bad(f"input {name!r} has both data and binary_data_size; send one of them", f"{at}.data")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
                raise _bad(f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary) - offset} "
                           "bytes left after the JSON (header Inference-Header-Content-Length); give each input's "
                           "length in bytes", f"{at}.parameters.binary_data_size")
            raw = bytes(binary[offset:offset + size])
            offset += size
        elif "data" in tensor:
            raw = _json_array(tensor["data"], datatype, shape_t, name, f"{at}.data").astype(
                DATATYPES[datatype].numpy, copy=False).tobytes()
        else:
            raise _bad(f"input {name!r} has no data (or binary_data_size); send its elements as data",
                       f"{at}.data")
        request.inputs.append(pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape))
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise _bad(f"the body has {len(binary) - offset} bytes after the JSON and the binary inputs it names; "
                   "give each input's binary_data_size, and the JSON's length in the header",
                   "Inference-Header-Content-Length")
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise _bad("outputs must be a list; send [{name, parameters}, ...] or leave it out", "outputs")
    for i, output in enumerate(outputs):
        output = _object(output, f"outputs[{i}]", f"outputs[{i}]")
        if not isinstance(output.get("name"), str):
            raise _bad(f"outputs[{i}] needs a name (a string); the model's metadata lists its outputs",
                       f"outputs[{i}].name")
        request.outputs.append(pb.ModelInferRequest.InferRequestedOutputTensor(name=output["name"]))
    return request


def binary_outputs(document: dict[str, Any]) -> set[str] | bool:
    """The outputs to send as raw bytes: True for all of them (``binary_data_output``), else their names."""
    parameters = document.get("parameters") or {}
    everything = parameters.get("binary_data_output", False)
    if not isinstance(everything, bool):
        raise _bad("parameter 'binary_data_output' must be true or false; use a JSON boolean",
                   "parameters.binary_data_output")
    named = set()
    for i, output in enumerate(document.get("outputs") or []):
        parameters = _object(output.get("parameters") or {}, f"outputs[{i}].parameters", f"outputs[{i}].parameters")
        flag = parameters.get("binary_data", everything)
        if not isinstance(flag, bool):
            raise _bad(f"output {output.get('name')!r}: parameter 'binary_data' must be true or false; use a "
                       "JSON boolean",
                       f"outputs[{i}].parameters.binary_data")
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
            tensor["data"] = _json_data(np.frombuffer(raw, dtype=DATATYPES[meta.datatype].numpy))
        outputs.append(tensor)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    document["parameters"] = {k: parameter_value(v) for k, v in response.parameters.items()}
    document["outputs"] = outputs
    text = json.dumps(document, allow_nan=False).encode()
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)


def _json_data(array: np.ndarray) -> list[Any]:
    """An output's elements for JSON: non-finite floats as "NaN", "Infinity", "-Infinity" (bare tokens are not
    JSON)."""
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return array.tolist()
    return [v if math.isfinite(v) else ("NaN" if v != v else "Infinity" if v > 0 else "-Infinity")
            for v in array.tolist()]
