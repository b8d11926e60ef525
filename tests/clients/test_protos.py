"""Contract tests: generated stubs are current, the tensor codec round-trips, manifests survive JSON."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format

from genserve.core.tensors import DTYPES, from_proto, to_proto
from genserve.protos import codegen
from genserve.v1 import manifest_pb2, service_pb2, service_pb2_grpc

# ----------------------------------------------------------------------------------------------------------
# Generated stubs


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    fresh = codegen.generate(tmp_path)
    assert fresh, "codegen produced no files"
    checked_in = codegen.GENERATED_ROOT / codegen.PROTO_PACKAGE
    fresh_names = sorted(path.name for path in fresh)
    current_names = sorted(path.name for path in codegen._generated_files(checked_in))
    hint = "stubs are stale: run `python -m genserve.protos.codegen` and commit protos/genserve"
    assert fresh_names == current_names, hint
    differing = [path.name for path in fresh if not filecmp.cmp(path, checked_in / path.name, shallow=False)]
    assert not differing, f"{hint} (differs: {differing})"
    assert codegen.stale_files() == []


def test_stale_check_notices_edited_missing_and_extra_stubs(tmp_path: Path) -> None:
    codegen.regenerate(tmp_path)
    folder = tmp_path / codegen.PROTO_PACKAGE
    assert codegen.stale_files(tmp_path) == []
    (folder / "service_pb2.pyi").write_text("# edited by hand\n")
    (folder / "manifest_pb2_grpc.py").unlink()
    (folder / "removed_pb2.py").write_text("")
    assert codegen.stale_files(tmp_path) == ["manifest_pb2_grpc.py", "removed_pb2.py", "service_pb2.pyi"]
    codegen.regenerate(tmp_path)
    assert codegen.stale_files(tmp_path) == []
    assert codegen.main(["--check", "--out", str(tmp_path)]) == 0


def test_generated_stubs_expose_the_service() -> None:
    methods = {method.name for method in service_pb2.DESCRIPTOR.services_by_name["GenerativeService"].methods}
    assert methods == {
        "ListModels",
        "GetModel",
        "Sample",
        "SampleStream",
        "LogLikelihood",
        "LogLikelihoodStream",
        "Encode",
        "Decode",
        "ReloadRepository",
        "LoadModel",
        "UnloadModel",
    }
    assert hasattr(service_pb2_grpc, "GenerativeServiceStub")
    assert hasattr(service_pb2_grpc, "add_GenerativeServiceServicer_to_server")
    # Shared enums are defined once, in the manifest, and used by the API.
    kind = service_pb2.LogLikelihoodResponse.DESCRIPTOR.fields_by_name["kind"]
    assert kind.enum_type is manifest_pb2.DESCRIPTOR.enum_types_by_name["LikelihoodKind"]


def test_optional_fields_track_presence() -> None:
    request = service_pb2.SampleRequest(model="digits-ebm", n=4)
    assert not request.HasField("seed")
    assert not request.HasField("temperature")
    assert not request.HasField("langevin_steps")
    request.seed = 0  # zero is a real seed, distinct from "unset"
    assert request.HasField("seed")


# ----------------------------------------------------------------------------------------------------------
# Tensor codec


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(3, 8, 8), (5, 2), (7,), (), (0, 4)])
def test_tensor_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 50).astype(dtype)
    tensor = to_proto(array)
    assert tensor.dtype == dtype
    assert list(tensor.shape) == list(shape)
    assert len(tensor.data) == array.size * array.dtype.itemsize
    decoded = from_proto(service_pb2.Tensor.FromString(tensor.SerializeToString()))
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)
    assert decoded.flags.writeable


def test_tensor_bytes_are_little_endian_c_order() -> None:
    array = np.array([[1, 2], [3, 4]], dtype=">i4").T  # big-endian and Fortran-ordered
    tensor = to_proto(array)
    assert tensor.data == np.array([[1, 3], [2, 4]], dtype="<i4").tobytes()
    assert tensor.dtype == "int32"
    np.testing.assert_array_equal(from_proto(tensor), array)


def test_tensor_read_only_view() -> None:
    tensor = to_proto(np.arange(6, dtype=np.float32).reshape(2, 3))
    view = from_proto(tensor, writable=False)
    np.testing.assert_array_equal(view, np.arange(6).reshape(2, 3))
    writable = from_proto(tensor)
    writable[0, 0] = 42.0  # a writable result never aliases the message's bytes
    np.testing.assert_array_equal(from_proto(tensor), np.arange(6).reshape(2, 3))


def test_to_proto_rejects_unsupported_dtypes() -> None:
    with pytest.raises(ValueError, match="complex128"):
        to_proto(np.zeros(3, dtype=np.complex128))
    with pytest.raises(ValueError, match="object"):
        to_proto(np.array([None, 1], dtype=object))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (
            service_pb2.Tensor(shape=[2, 3], dtype="float32", data=bytes(20)),
            r"20 bytes .* \[2, 3\] of float32 needs 24",
        ),
        (service_pb2.Tensor(shape=[2], dtype="float64", data=bytes(24)), "24 bytes .* needs 16"),
        (service_pb2.Tensor(shape=[2], dtype="float128", data=bytes(32)), "unknown tensor dtype 'float128'"),
        (service_pb2.Tensor(shape=[2], dtype="", data=bytes(8)), "unknown tensor dtype ''"),
        (service_pb2.Tensor(shape=[2, -1], dtype="uint8", data=b""), "negative dimension -1 at axis 1"),
    ],
    ids=["short", "long", "unknown-dtype", "empty-dtype", "negative-dim"],
)
def test_from_proto_rejects_malformed_tensors(tensor: service_pb2.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_proto(tensor)


# ----------------------------------------------------------------------------------------------------------
# Manifest JSON


def _vae_manifest() -> manifest_pb2.ModelManifest:
    """A complete manifest, as export would write for a VAE on 8x8 digits."""
    manifest = manifest_pb2.ModelManifest(
        format_version=1,
        name="digits-vae",
        version=3,
        family="latent_variable",
        model="vae",
        description="VAE on 8x8 digits, 17 levels",
        data=manifest_pb2.DataSpec(
            name="digits",
            shape=[8, 8],
            kind=manifest_pb2.DOMAIN_DISCRETE,
            levels=17,
            low=0.0,
            high=16.0,
            dtype="float32",
        ),
        graphs=[
            manifest_pb2.GraphSpec(
                name=role,
                file=f"{role}.onnx",
                inputs=[manifest_pb2.TensorSpec(name=inp, dtype="float32", shape=in_shape)],
                outputs=[manifest_pb2.TensorSpec(name=out, dtype="float32", shape=[-1, 16]) for out in outs],
                opset=20,
                sha256="ab" * 32,
            )
            for role, inp, in_shape, outs in [
                ("encoder", "x", [-1, 8, 8], ["mu", "logvar"]),
                ("decoder", "z", [-1, 16], ["logits"]),
            ]
        ],
        capabilities=manifest_pb2.Capabilities(
            training_stability="stable",
            likelihood=manifest_pb2.LIKELIHOOD_KIND_LOWER_BOUND,
            sampling_speed="fast",
            compression="lossy",
            representation=True,
        ),
        operations=[
            manifest_pb2.OPERATION_SAMPLE,
            manifest_pb2.OPERATION_LOG_LIKELIHOOD,
            manifest_pb2.OPERATION_ENCODE,
            manifest_pb2.OPERATION_DECODE,
        ],
        parameters={"latent_dim": 16, "importance_samples": 64},
        test_metrics={"nll_nats": 91.25, "bits_per_dim": 2.057},
        provenance=manifest_pb2.Provenance(
            training_config_json='{"epochs": 50, "lr": 0.001}',
            code_revision="e4b3c77",
            file_sha256={"encoder.onnx": "ab" * 32, "decoder.onnx": "cd" * 32},
            tool_versions={"torch": "2.13.0", "onnx": "1.23.2"},
        ),
        serving=manifest_pb2.ServingConfig(max_batch_size=64, max_queue_delay_ms=2.0, provider="auto"),
    )
    manifest.provenance.created_at.FromJsonString("2025-01-31T12:00:00Z")
    return manifest


@pytest.mark.parametrize("preserve_names", [True, False])
def test_manifest_json_round_trip(preserve_names: bool) -> None:
    manifest = _vae_manifest()
    text = json_format.MessageToJson(manifest, preserving_proto_field_name=preserve_names)
    assert ("test_metrics" in text) is preserve_names
    assert '"LIKELIHOOD_KIND_LOWER_BOUND"' in text
    assert '"2025-01-31T12:00:00Z"' in text
    parsed = json_format.Parse(text, manifest_pb2.ModelManifest())
    assert parsed == manifest
    assert parsed.data.HasField("low")  # 0.0 set explicitly survives as "set", unlike a plain double
    assert list(parsed.data.shape) == [8, 8]


def test_manifest_json_refuses_unknown_keys() -> None:
    with pytest.raises(json_format.ParseError, match="max_batch"):
        json_format.Parse('{"max_batch": 8}', manifest_pb2.ServingConfig())


def test_serving_config_tracks_presence() -> None:
    config = json_format.Parse('{"max_queue_delay_ms": 0, "instances": 2}', manifest_pb2.ServingConfig())
    assert config.HasField("max_queue_delay_ms")  # an explicit 0 ms means "never wait", not "use the default"
    assert config.max_queue_delay_ms == 0.0
    assert not config.HasField("max_batch_size")
    merged = manifest_pb2.ServingConfig(max_batch_size=64, max_queue_delay_ms=5.0)
    merged.MergeFrom(config)  # later layers override field by field
    assert (merged.max_batch_size, merged.max_queue_delay_ms, merged.instances) == (64, 0.0, 2)
