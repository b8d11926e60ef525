"""The model repository's on-disk contract: layout, manifest JSON, and DataSpec <-> protobuf.

    REPO/NAME/config.json          per-model serving settings (ServingConfig JSON), optional
    REPO/NAME/N/manifest.json      ModelManifest JSON (protobuf json_format), N a whole number
    REPO/NAME/N/<graph>.onnx       one ONNX file per graph named in the manifest

A model's default version is its highest N. Export writes these files, the server reads them.
"""

from __future__ import annotations

import math
from pathlib import Path

from google.protobuf import json_format

from genserve.core.spec import DataSpec
from genserve.v1 import manifest_pb2 as pb

MANIFEST = "manifest.json"
SERVING_CONFIG = "config.json"
FORMAT_VERSION = 1

LIKELIHOOD = {
    "exact": pb.LIKELIHOOD_KIND_EXACT,
    "lower_bound": pb.LIKELIHOOD_KIND_LOWER_BOUND,
    "unnormalized": pb.LIKELIHOOD_KIND_UNNORMALIZED,
    "none": pb.LIKELIHOOD_KIND_NONE,
}
LIKELIHOOD_NAME = {v: k for k, v in LIKELIHOOD.items()}
OPERATION = {
    "sample": pb.OPERATION_SAMPLE,
    "log_likelihood": pb.OPERATION_LOG_LIKELIHOOD,
    "encode": pb.OPERATION_ENCODE,
    "decode": pb.OPERATION_DECODE,
}
OPERATION_NAME = {v: k for k, v in OPERATION.items()}


def spec_to_proto(spec: DataSpec) -> pb.DataSpec:
    msg = pb.DataSpec(
        name=spec.name,
        shape=list(spec.shape),
        kind=pb.DOMAIN_DISCRETE if spec.discrete else pb.DOMAIN_CONTINUOUS,
        levels=spec.levels,
        mean=list(spec.mean),
        std=list(spec.std),
        dtype="float32",
        columns=list(spec.columns),
    )
    if math.isfinite(spec.low):
        msg.low = spec.low
    if math.isfinite(spec.high):
        msg.high = spec.high
    return msg


def spec_from_proto(msg: pb.DataSpec) -> DataSpec:
    """The manifest's data spec as a DataSpec; ValueError when it is not a valid one."""
    kind = {pb.DOMAIN_DISCRETE: "discrete", pb.DOMAIN_CONTINUOUS: "continuous"}.get(msg.kind)
    if kind is None:
        raise ValueError("data.kind is unspecified; expected DOMAIN_DISCRETE or DOMAIN_CONTINUOUS")
    return DataSpec(
        name=msg.name,
        shape=tuple(msg.shape),
        kind=kind,
        levels=msg.levels,
        low=msg.low if msg.HasField("low") else -math.inf,
        high=msg.high if msg.HasField("high") else math.inf,
        mean=tuple(msg.mean),
        std=tuple(msg.std),
        columns=tuple(msg.columns),
    )


def read_manifest(path: str | Path) -> pb.ModelManifest:
    """Parse a manifest.json; ValueError naming the file and the problem when it does not parse."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read manifest ({e.strerror or e})") from None
    try:
        msg = json_format.Parse(text, pb.ModelManifest())
    except (json_format.ParseError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: manifest does not parse: {str(e)[:300]}") from None
    if msg.format_version != FORMAT_VERSION:
        raise ValueError(f"{path}: manifest format_version {msg.format_version}, this genserve reads {FORMAT_VERSION}")
    return msg


def write_manifest(msg: pb.ModelManifest, path: str | Path) -> None:
    Path(path).write_text(json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=2) + "\n")


def read_serving_config(path: str | Path) -> pb.ServingConfig:
    """A model's config.json (ServingConfig JSON); an empty config when the file is absent."""
    path = Path(path)
    if not path.exists():
        return pb.ServingConfig()
    try:
        return json_format.Parse(path.read_text(), pb.ServingConfig())
    except (json_format.ParseError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: serving config does not parse: {str(e)[:300]}") from None
