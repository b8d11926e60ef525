"""The Open Inference Protocol endpoint, called with Triton's own client (tritonclient[grpc] from PyPI).

A real server on a free loopback port serves the test repository; every operation of every model is the
OIP model ``<model>.<operation>``, and its answers must be EQUAL (bit for bit) to what genserve's own API
(GenerativeService through the genserve.v1 stubs) answers for the same inputs and seed.
"""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc  # noqa: E402  (the dev extra installs it)
from supervised import Supervised
from tritonclient.grpc import model_config_pb2 as triton_mc  # noqa: E402
from tritonclient.grpc import service_pb2 as triton_pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as triton_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from genserve.core.manifest import LIKELIHOOD_NAME, OPERATION_NAME
from genserve.core.tensors import from_proto, to_proto
from genserve.export.repository import DEFAULT_SERVING
from genserve.server.app import BackgroundServer, grpc_options
from genserve.server.config import ServerConfig
from genserve.v1 import service_pb2, service_pb2_grpc

VAE = "digits-vae"
SEED = 20250131


@pytest.fixture(scope="module", params=[1, 2], ids=["1 process", "2 processes"])
def server(repo_dir: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The same server in one process, and as `genserve serve --processes 2` (issue 17: every API test runs
    against both)."""
    if request.param == 2:
        log = tmp_path_factory.mktemp("processes") / "server.log"
        with Supervised(repo_dir, log, "--threads", "1", "--max-batch-size", "64", "--max-queue-delay-ms",
                        "2") as srv:
            yield srv
        return
    cfg = ServerConfig(repo=repo_dir, host="127.0.0.1", port=0, metrics_port=0, provider="cpu",
                       intra_op_threads=1, max_batch_size=64, max_queue_delay_ms=2.0, workers=2, grace_s=5.0)
    with BackgroundServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer):
    c = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def channel(server: BackgroundServer):
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=grpc_options(64))
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def genserve(channel: grpc.Channel) -> service_pb2_grpc.GenerativeServiceStub:
    """genserve's own API, the reference every OIP answer must equal."""
    return service_pb2_grpc.GenerativeServiceStub(channel)


@pytest.fixture(scope="module")
def triton_stub(channel: grpc.Channel) -> triton_grpc.GRPCInferenceServiceStub:
    """tritonclient's generated stub, for requests its high-level client cannot make (typed contents)."""
    return triton_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def catalog(genserve: service_pb2_grpc.GenerativeServiceStub, repo_dir: Path) -> dict[str, service_pb2.ModelInfo]:
    """Every ready model of the repository: name -> its GetModel answer (manifest included)."""
    models = genserve.ListModels(service_pb2.ListModelsRequest()).models
    ready = {m.name: genserve.GetModel(service_pb2.GetModelRequest(model=m.name)) for m in models
             if m.state == service_pb2.MODEL_STATE_READY}
    if VAE not in ready:  # the VAE has every operation; without it most of these tests mean nothing
        failed = (repo_dir / "FAILED.txt").read_text() if (repo_dir / "FAILED.txt").exists() else ""
        pytest.fail(f"{VAE} is not served from the test repository; export failures: {failed or 'none'}")
    return ready


def operations(info: service_pb2.ModelInfo) -> list[str]:
    return [OPERATION_NAME[op] for op in info.manifest.operations]


def with_operation(catalog: dict[str, service_pb2.ModelInfo], operation: str) -> list[str]:
    names = [name for name, info in catalog.items() if operation in operations(info)]
    assert names, f"the test repository has no model with {operation}"
    return names


def latent_shape(info: service_pb2.ModelInfo) -> list[int]:
    latent = info.manifest.parameters.get("latent_dim")
    return [int(latent)] if latent else list(info.manifest.data.shape)


def tensor(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    t = tc.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def n_input(n: int) -> tc.InferInput:
    return tensor("N", np.array([n], dtype=np.int64), "INT64")


def data_rows(genserve: service_pb2_grpc.GenerativeServiceStub, model: str, n: int = 5) -> np.ndarray:
    """Valid rows of the model's data (its own samples: in the data domain whatever the data set)."""
    response = genserve.Sample(service_pb2.SampleRequest(model=model, n=n, seed=7))
    return from_proto(response.samples)


def status_of(error: InferenceServerException) -> str:
    return str(error.status())


# ---------------------------------------------------------------------------------------------------------------
# Health, metadata, configuration


def test_server_live_ready_and_metadata(client, server: BackgroundServer) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "genserve"
    assert meta.version and meta.version != "unknown"
    assert {"model_configuration", "statistics", "parameters"} <= set(meta.extensions)


def test_every_operation_is_an_addressable_model(client, catalog) -> None:
    index = client.get_model_repository_index()
    listed = {(m.name, m.version, m.state) for m in index.models}
    expected = {(f"{name}.{op}", str(v), "READY") for name, info in catalog.items() for op in operations(info)
                for v in info.versions}
    assert listed == expected
    for name, info in catalog.items():
        for op in operations(info):
            assert client.is_model_ready(f"{name}.{op}")
            assert client.is_model_ready(f"{name}.{op}", model_version=str(info.version))
            assert not client.is_model_ready(f"{name}.{op}", model_version="99")
        assert not client.is_model_ready(name)  # the bare model is not an OIP model: its operations are
    assert not client.is_model_ready("no-such-model.sample")
    assert not client.is_model_ready(f"{VAE}.train")


def test_model_metadata_describes_each_operation(client, catalog) -> None:
    for name, info in catalog.items():
        data = list(info.manifest.data.shape)
        latent = latent_shape(info)
        unnormalized = LIKELIHOOD_NAME[info.manifest.capabilities.likelihood] in ("unnormalized", "none")
        expected = {
            "sample": ([("N", "INT64", [1])], [("samples", "FP32", [-1, *data])]
                       + ([("latents", "FP32", [-1, *latent])] if "latent_dim" in info.manifest.parameters
                          else [])),
            "log_likelihood": ([("x", "FP32", [-1, *data])], [("log_prob", "FP64", [-1])]
                               + ([] if unnormalized else [("bits_per_dim", "FP64", [-1])])
                               + score_outputs(info.manifest)),
            "encode": ([("x", "FP32", [-1, *data])], [("z", "FP32", [-1, *latent])]),
            "decode": ([("z", "FP32", [-1, *latent])], [("x", "FP32", [-1, *data])]),
        }
        for op in operations(info):
            meta = client.get_model_metadata(f"{name}.{op}")
            assert meta.name == f"{name}.{op}"
            assert meta.platform == "genserve"
            assert list(meta.versions) == [str(v) for v in info.versions]
            got = ([(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
                   [(t.name, t.datatype, list(t.shape)) for t in meta.outputs])
            assert got == expected[op], f"{name}.{op}"


def score_outputs(manifest) -> list[tuple[str, str, list[int]]]:
    """log_likelihood's outputs when asked for (docs/scoring.md): score kinds, percentiles of the calibrated
    scores, and per-dimension terms for the families that have them."""
    calibrated = {c.score for c in manifest.calibration}
    kinds = [k.name for k in manifest.score_kinds]
    out = [(f"score_{k}", "FP64", [-1]) for k in kinds]
    out += [("percentile", "FP64", [-1])] if "log_prob" in calibrated else []
    out += [(f"percentile_{k}", "FP64", [-1]) for k in kinds if k in calibrated]
    if manifest.family in ("autoregressive", "linear_gaussian", "latent_variable"):
        out.append(("per_dimension", "FP64", [-1, *manifest.data.shape]))
    return out


def test_model_config_is_tritons_message(client, catalog) -> None:
    info = catalog[VAE]
    q = int(info.manifest.parameters["latent_dim"])
    config = client.get_model_config(f"{VAE}.encode").config
    assert isinstance(config, triton_mc.ModelConfig)  # decoded by tritonclient's own descriptors
    assert (config.name, config.platform, config.backend) == (f"{VAE}.encode", "genserve", "onnxruntime")
    # the model's config.json as export wrote it
    assert config.max_batch_size == info.serving.max_batch_size == DEFAULT_SERVING["max_batch_size"]
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", triton_mc.TYPE_FP32, [8, 8])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("z", triton_mc.TYPE_FP32, [q])]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.dynamic_batching.default_queue_policy.max_queue_size == info.serving.max_queue_size
    auto = 2 if len(os.sched_getaffinity(0)) >= 2 else 1  # instances = 0 (auto): two sharing the CPU session
    assert info.serving.instances == auto
    assert [(g.kind, g.count) for g in config.instance_group] == [(triton_mc.ModelInstanceGroup.KIND_CPU, auto)]
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["family"] == "latent_variable" and params["model"] == "vae"
    assert params["operation"] == "encode" and params["latent_dim"] == str(q)
    assert params["likelihood_kind"] == "lower_bound"

    sample = client.get_model_config(f"{VAE}.sample", as_json=True)["config"]
    assert sample.get("max_batch_size", 0) == 0  # sampling takes a count, not a batch of rows
    assert sample["input"] == [{"name": "N", "data_type": "TYPE_INT64", "dims": ["1"], "optional": True}]
    assert [o["name"] for o in sample["output"]] == ["samples", "latents"]
    assert [o["dims"] for o in sample["output"]] == [["-1", "8", "8"], ["-1", str(q)]]


# ---------------------------------------------------------------------------------------------------------------
# Inference equals genserve's own API


def test_sample_equals_genserve(client, genserve, catalog) -> None:
    for name in with_operation(catalog, "sample"):
        reference = genserve.Sample(service_pb2.SampleRequest(model=name, n=6, seed=SEED, temperature=0.8,
                                                              return_latents=True))
        result = client.infer(f"{name}.sample", [n_input(6)], parameters={"seed": SEED, "temperature": 0.8})
        np.testing.assert_array_equal(result.as_numpy("samples"), from_proto(reference.samples), err_msg=name)
        assert result.as_numpy("samples").dtype == np.float32
        if reference.HasField("latents"):
            np.testing.assert_array_equal(result.as_numpy("latents"), from_proto(reference.latents))
        assert result.get_response().parameters["seed"].int64_param == SEED
        assert result.get_response().model_version == str(reference.model_version)

        # The count as a request parameter instead of the input N; only the asked-for output comes back.
        by_param = client.infer(f"{name}.sample", [], parameters={"seed": SEED, "temperature": 0.8, "n": 6},
                                outputs=[tc.InferRequestedOutput("samples")])
        np.testing.assert_array_equal(by_param.as_numpy("samples"), from_proto(reference.samples))
        assert by_param.as_numpy("latents") is None

    # No seed: the server draws one and returns it; sending it back reproduces the samples.
    first = client.infer(f"{VAE}.sample", [n_input(3)])
    seed = first.get_response().parameters["seed"].int64_param
    again = client.infer(f"{VAE}.sample", [n_input(3)], parameters={"seed": seed})
    np.testing.assert_array_equal(first.as_numpy("samples"), again.as_numpy("samples"))


def test_log_likelihood_equals_genserve(client, genserve, catalog) -> None:
    for name in with_operation(catalog, "log_likelihood"):
        x = data_rows(genserve, name)
        reference = genserve.LogLikelihood(service_pb2.LogLikelihoodRequest(model=name, x=to_proto(x), seed=SEED))
        result = client.infer(f"{name}.log_likelihood", [tensor("x", x, "FP32")], parameters={"seed": SEED})
        np.testing.assert_array_equal(result.as_numpy("log_prob"), from_proto(reference.log_prob), err_msg=name)
        assert result.as_numpy("log_prob").dtype == np.float64
        if reference.HasField("bits_per_dim"):
            np.testing.assert_array_equal(result.as_numpy("bits_per_dim"), from_proto(reference.bits_per_dim))
        kind = result.get_response().parameters["likelihood_kind"].string_param
        assert kind == LIKELIHOOD_NAME[reference.kind]

    # The VAE's importance-weighted bound with a chosen number of importance samples.
    x = data_rows(genserve, VAE)
    reference = genserve.LogLikelihood(service_pb2.LogLikelihoodRequest(model=VAE, x=to_proto(x), seed=3,
                                                                        importance_samples=16))
    result = client.infer(f"{VAE}.log_likelihood", [tensor("x", x, "FP32")],
                          parameters={"seed": 3, "importance_samples": 16})
    np.testing.assert_array_equal(result.as_numpy("log_prob"), from_proto(reference.log_prob))
    other = client.infer(f"{VAE}.log_likelihood", [tensor("x", x, "FP32")],
                         parameters={"seed": 3, "importance_samples": 2})
    assert not np.array_equal(other.as_numpy("log_prob"), result.as_numpy("log_prob"))  # the parameter is used


def test_encode_and_decode_equal_genserve(client, genserve, catalog) -> None:
    """Both APIs give the same codes and reconstructions, drawn or not; where an operation is deterministic,
    both refuse sample=True with INVALID_ARGUMENT. The VAE draws in both, pPCA when decoding."""
    drawn = set()
    cases = [(name, "encode", "x", "z", data_rows(genserve, name)) for name in with_operation(catalog, "encode")]
    cases += [(name, "decode", "z", "x",
               np.random.default_rng(0).standard_normal((4, *latent_shape(catalog[name]))).astype(np.float32))
              for name in with_operation(catalog, "decode")]
    for name, op, field, out, data in cases:
        for sample in (False, True):
            call = genserve.Encode if op == "encode" else genserve.Decode
            message = service_pb2.EncodeRequest if op == "encode" else service_pb2.DecodeRequest
            try:
                reference = from_proto(getattr(call(message(model=name, seed=SEED, sample=sample,
                                                            **{field: to_proto(data)})), out))
            except grpc.RpcError as e:
                assert sample and e.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, op, e.details())
                with pytest.raises(InferenceServerException, match="deterministic") as info:
                    client.infer(f"{name}.{op}", [tensor(field, data, "FP32")],
                                 parameters={"seed": SEED, "sample": sample})
                assert status_of(info.value) == str(grpc.StatusCode.INVALID_ARGUMENT)
                continue
            result = client.infer(f"{name}.{op}", [tensor(field, data, "FP32")],
                                  parameters={"seed": SEED, "sample": sample})
            np.testing.assert_array_equal(result.as_numpy(out), reference, err_msg=f"{name}.{op}")
            drawn |= {(name.removeprefix("digits-"), op)} if sample else set()
    assert {("vae", "encode"), ("vae", "decode"), ("ppca", "decode")} <= drawn, drawn


def test_typed_contents_equal_raw_contents(client, triton_stub, genserve) -> None:
    x = data_rows(genserve, VAE, n=3)
    raw = client.infer(f"{VAE}.log_likelihood", [tensor("x", x, "FP32")], parameters={"seed": 1})

    def typed(datatype: str, field: str, values: np.ndarray) -> triton_pb.ModelInferRequest:
        request = triton_pb.ModelInferRequest(model_name=f"{VAE}.log_likelihood")
        request.parameters["seed"].int64_param = 1
        t = request.inputs.add(name="x", datatype=datatype, shape=list(x.shape))
        getattr(t.contents, field).extend(values.reshape(-1).tolist())
        return request

    for request in (typed("FP32", "fp32_contents", x), typed("INT64", "int64_contents", x.astype(np.int64)),
                    typed("FP64", "fp64_contents", x.astype(np.float64))):
        response = triton_stub.ModelInfer(request)
        assert [o.name for o in response.outputs] == ["log_prob", "bits_per_dim"]
        log_prob = np.frombuffer(response.raw_output_contents[0], dtype="<f8")
        np.testing.assert_array_equal(log_prob, raw.as_numpy("log_prob"))

    request = triton_pb.ModelInferRequest(model_name=f"{VAE}.sample")
    request.parameters["seed"].int64_param = 5
    request.inputs.add(name="N", datatype="INT64", shape=[1]).contents.int64_contents.append(2)
    response = triton_stub.ModelInfer(request)
    samples = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(response.outputs[0].shape)
    reference = genserve.Sample(service_pb2.SampleRequest(model=VAE, n=2, seed=5))
    np.testing.assert_array_equal(samples, from_proto(reference.samples))


def test_stream_infer_answers_each_request_in_order(client, genserve) -> None:
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for k in range(3):
            client.async_stream_infer(f"{VAE}.sample", [n_input(2)], request_id=str(k), parameters={"seed": k})
        client.async_stream_infer(f"{VAE}.sample", [], request_id="bad")  # no N: fails, the stream goes on
        client.async_stream_infer(f"{VAE}.sample", [n_input(1)], request_id="last", parameters={"seed": 9})
        got = [answers.get(timeout=30) for _ in range(5)]
    finally:
        client.stop_stream()
    for k, (result, error) in enumerate(got[:3]):
        assert error is None
        assert result.get_response().id == str(k)
        reference = genserve.Sample(service_pb2.SampleRequest(model=VAE, n=2, seed=k))
        np.testing.assert_array_equal(result.as_numpy("samples"), from_proto(reference.samples))
    assert got[3][0] is None and "needs the number of samples" in str(got[3][1])
    assert got[4][1] is None and got[4][0].get_response().id == "last"


def test_tritons_final_response_flag_is_taken_and_honoured(client, triton_stub, genserve) -> None:
    """Triton's clients send ``triton_enable_empty_final_response`` (perf_analyzer on every request): a unary
    request with it is answered as without it, and a stream marks each answer ``triton_final_response``."""
    request = triton_pb.ModelInferRequest(model_name=f"{VAE}.sample")
    request.inputs.add(name="N", datatype="INT64", shape=[1]).contents.int64_contents.append(2)
    request.parameters["seed"].int64_param = 3
    request.parameters["triton_enable_empty_final_response"].bool_param = False
    response = triton_stub.ModelInfer(request)
    samples = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(response.outputs[0].shape)
    reference = genserve.Sample(service_pb2.SampleRequest(model=VAE, n=2, seed=3))
    np.testing.assert_array_equal(samples, from_proto(reference.samples))
    assert "triton_final_response" not in response.parameters

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(f"{VAE}.sample", [n_input(2)], request_id="flagged", parameters={"seed": 3},
                                  enable_empty_final_response=True)
        client.async_stream_infer(f"{VAE}.sample", [n_input(2)], request_id="plain", parameters={"seed": 3})
        got = [answers.get(timeout=30) for _ in range(2)]
    finally:
        client.stop_stream()
    assert [error for _, error in got] == [None, None]
    flagged, plain = (result.get_response() for result, _ in got)
    assert flagged.id == "flagged" and flagged.parameters["triton_final_response"].bool_param is True
    assert plain.id == "plain" and "triton_final_response" not in plain.parameters
    np.testing.assert_array_equal(got[0][0].as_numpy("samples"), from_proto(reference.samples))


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def test_statistics_count_inferences(client, genserve) -> None:
    name = f"{VAE}.encode"

    def stats() -> triton_pb.ModelStatistics:
        entries = client.get_inference_statistics(name).model_stats
        assert [(e.name, e.version) for e in entries] == [(name, "1")]
        return entries[0]

    before = stats()
    x = data_rows(genserve, VAE, n=4)
    started_ms = time.time() * 1000
    for seed in range(2):
        client.infer(name, [tensor("x", x, "FP32")], parameters={"seed": seed})
    with pytest.raises(InferenceServerException):
        client.infer(name, [tensor("x", x + 100, "FP32")])  # outside the data domain: a failed request
    after = stats()
    s0, s1 = before.inference_stats, after.inference_stats
    assert after.inference_count - before.inference_count == 8  # rows
    assert s1.success.count - s0.success.count == 2
    assert s1.fail.count - s0.fail.count == 1
    assert s1.success.ns > s0.success.ns and s1.fail.ns > s0.fail.ns
    for part in ("compute_input", "compute_infer", "compute_output"):
        assert getattr(s1, part).count == s1.success.count
        assert getattr(s1, part).ns > getattr(s0, part).ns
    assert s1.compute_infer.ns - s0.compute_infer.ns <= s1.success.ns - s0.success.ns
    assert after.execution_count > before.execution_count  # ONNX Runtime calls of the model's graphs
    assert s1.queue.count > s0.queue.count
    assert after.last_inference >= started_ms - 1000

    everything = client.get_inference_statistics().model_stats
    index = client.get_model_repository_index().models
    assert {(e.name, e.version) for e in everything} == {(m.name, m.version) for m in index}
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("no-such-model.encode")
    assert status_of(info.value) == str(grpc.StatusCode.NOT_FOUND)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def _x() -> np.ndarray:
    return np.zeros((2, 8, 8), np.float32)


ERRORS = [
    ("digits-vae.sampel", [], {}, "NOT_FOUND", r"'<model>\.<operation>'.*'digits-vae\.sample'"),
    ("no-such-model.sample", [], {}, "NOT_FOUND", "no model named 'no-such-model'"),
    (f"{VAE}.encode", [("x", _x(), "FP32")], {}, None, None),  # the control: this one works
    (f"{VAE}.encode", [("y", _x(), "FP32")], {}, "INVALID_ARGUMENT", "has no input 'y'; its inputs are x"),
    (f"{VAE}.encode", [], {}, "INVALID_ARGUMENT", r"needs input 'x' \(FP32 \[-1, 8, 8\]\)"),
    (f"{VAE}.encode", [("x", _x()[:, :4], "FP32")], {}, "INVALID_ARGUMENT", r"shape \(2, 4, 8\)"),
    (f"{VAE}.encode", [("x", _x() + 0.5, "FP32")], {}, "INVALID_ARGUMENT", "not an integer level"),
    (f"{VAE}.encode", [("x", _x(), "FP32")], {"temprature": 0.5}, "INVALID_ARGUMENT",
     "does not take the request parameter.*'temprature'.*seed, sample"),
    (f"{VAE}.encode", [("x", _x(), "FP32")], {"seed": -1}, "INVALID_ARGUMENT", r"parameter 'seed': -1 is outside"),
    (f"{VAE}.encode", [("x", _x(), "FP32")], {"sample": 1}, "INVALID_ARGUMENT", "must be a bool"),
    (f"{VAE}.sample", [], {}, "INVALID_ARGUMENT", "needs the number of samples"),
    (f"{VAE}.sample", [("N", np.array([2], np.int64), "INT64")], {"n": 2}, "INVALID_ARGUMENT", "not both"),
    (f"{VAE}.sample", [("N", np.array([0], np.int64), "INT64")], {}, "INVALID_ARGUMENT", "n: 0 samples asked for"),
    (f"{VAE}.sample", [("N", np.array([1.5], np.float32), "FP32")], {}, "INVALID_ARGUMENT", "one integer"),
    (f"{VAE}.sample", [("N", np.array([2], np.int64), "INT64")], {"temperature": -1.0}, "INVALID_ARGUMENT",
     "temperature"),
    (f"{VAE}.sample", [("N", np.array([2], np.int64), "INT64")], {"langevin_steps": 5}, "INVALID_ARGUMENT",
     "langevin_steps: does not apply to sample of digits-vae"),
    (f"{VAE}.log_likelihood", [("x", _x(), "FP32")], {"importance_samples": 0}, "INVALID_ARGUMENT",
     "importance_samples: 0 is outside 1..5000"),
    (f"{VAE}.log_likelihood", [("x", _x(), "FP32")], {"importance_samples": 1e300}, "INVALID_ARGUMENT",
     "'importance_samples' must be an integer"),
    (f"{VAE}.decode", [("z", np.zeros((2, 3), np.float32), "FP32")], {}, "INVALID_ARGUMENT", "latent codes"),
]


@pytest.mark.parametrize(("model", "inputs", "params", "code", "message"), ERRORS,
                         ids=[f"{i}-{e[0]}-{e[3]}" for i, e in enumerate(ERRORS)])
def test_errors_are_statuses_with_clear_messages(client, model, inputs, params, code, message) -> None:
    tensors = [tensor(name, array, datatype) for name, array, datatype in inputs]
    if code is None:
        client.infer(model, tensors, parameters=params)
        return
    with pytest.raises(InferenceServerException, match=message) as info:
        client.infer(model, tensors, parameters=params)
    assert status_of(info.value) == str(getattr(grpc.StatusCode, code))


def test_malformed_tensors_are_refused(triton_stub) -> None:
    def request(**fields) -> triton_pb.ModelInferRequest:
        r = triton_pb.ModelInferRequest(model_name=f"{VAE}.encode")
        r.inputs.add(name="x", datatype=fields.pop("datatype", "FP32"), shape=fields.pop("shape", [1, 8, 8]))
        for key, value in fields.items():
            getattr(r, key).extend(value)
        return r

    cases = [
        (request(raw_input_contents=[b"\0" * 10]), r"10 bytes, but shape \[1, 8, 8\] of FP32 needs 256"),
        (request(raw_input_contents=[b"", b""]), "2 entries for 1 inputs"),
        (request(datatype="BYTES", raw_input_contents=[b"\0" * 256]), "datatype 'BYTES'"),
        (request(datatype="FP16"), "no typed contents field"),
        (request(shape=[1, -8, 8], raw_input_contents=[b""]), "must be >= 0"),
    ]
    wrong_field = request()
    wrong_field.inputs[0].contents.int64_contents.extend([0] * 64)
    cases.append((wrong_field, "put its elements in contents.fp32_contents, not int64_contents"))
    few = request()
    few.inputs[0].contents.fp32_contents.extend([0.0] * 63)
    cases.append((few, "has 63 elements, but shape"))
    for r, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            triton_stub.ModelInfer(r)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in info.value.details() or __import__("re").search(message, info.value.details())


def test_a_shape_of_more_than_64_axes_is_invalid_argument_not_internal(triton_stub, caplog) -> None:
    """Bug: the raw bytes were reshaped outside the ValueError handler, so 65+ axes answered INTERNAL with a
    traceback in the log. Now the shape is checked before any array is made of it."""
    r = triton_pb.ModelInferRequest(model_name=f"{VAE}.encode")
    r.inputs.add(name="x", datatype="FP32", shape=[2] + [1] * 64)
    r.raw_input_contents.append(b"\0" * 8)
    with pytest.raises(grpc.RpcError) as info:
        triton_stub.ModelInfer(r)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "65 axes, more than the 64" in info.value.details() and "send the rows" in info.value.details()
    assert not [rec for rec in caplog.records if rec.levelno >= 40], "no traceback for a client's mistake"


def test_garbage_in_the_middle_of_a_stream_is_invalid_argument(channel, triton_stub) -> None:
    """Bug: a message of ModelStreamInfer that did not parse was re-raised unmapped (UNKNOWN with a traceback).
    Now the requests before it are answered and the stream ends with INVALID_ARGUMENT naming the message."""
    good = triton_pb.ModelInferRequest(model_name=f"{VAE}.sample")
    good.parameters["n"].int64_param = 2
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
    answers = []
    with pytest.raises(grpc.RpcError) as info:
        answers.extend(stream(iter([good.SerializeToString(), b"\xff" * 7]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "not valid protobuf" in info.value.details()
    assert len(answers) == 1 and not triton_pb.ModelStreamInferResponse.FromString(answers[0]).error_message
    assert triton_stub.ServerLive(triton_pb.ServerLiveRequest()).live


def test_an_operation_the_family_lacks_is_not_a_model(client, catalog) -> None:
    lacking = [(name, op) for name, info in catalog.items() for op in ("encode", "log_likelihood")
               if op not in operations(info)]
    assert lacking, "the test repository lost its GAN and EBM: every model has encode and log_likelihood"
    name, op = lacking[0]
    with pytest.raises(InferenceServerException, match=rf"without a {op} operation; its models are: {name}\.")\
            as info:
        client.get_model_metadata(f"{name}.{op}")
    assert status_of(info.value) == str(grpc.StatusCode.NOT_FOUND)


def test_deadline_and_timeout_parameter(client) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer(f"{VAE}.sample", [n_input(50000)], parameters={"seed": 1}, timeout=1)  # microseconds
    assert status_of(info.value) == str(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert client.is_server_live()  # and the server goes on


# ---------------------------------------------------------------------------------------------------------------
# Protocol: the same wire format as Triton's protos, reflection, one process with tritonclient


def _assert_same_fields(ours, theirs, where: str) -> None:
    for field in ours.fields:
        other = theirs.fields_by_name.get(field.name)
        assert other is not None, f"{where}.{field.name} is not in Triton's {theirs.full_name}"
        assert (field.number, field.type, field.is_repeated) == (other.number, other.type, other.is_repeated), \
            f"{where}.{field.name}"
        if field.message_type is not None:
            assert field.message_type.full_name == other.message_type.full_name, f"{where}.{field.name}"
            _assert_same_fields(field.message_type, other.message_type, f"{where}.{field.name}")
        if field.enum_type is not None:
            theirs_values = {v.name: v.number for v in other.enum_type.values}
            assert {v.name: v.number for v in field.enum_type.values}.items() <= theirs_values.items()
        if field.containing_oneof is not None:
            assert field.containing_oneof.name == other.containing_oneof.name


def test_protos_match_tritons_descriptors() -> None:
    from genserve.oip import grpc_service_pb2, model_config_pb2

    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
        assert (method.client_streaming, method.server_streaming) == (other.client_streaming,
                                                                     other.server_streaming)
    for module, triton_module in ((grpc_service_pb2, triton_pb), (model_config_pb2, triton_mc)):
        for name, message in module.DESCRIPTOR.message_types_by_name.items():
            _assert_same_fields(message, triton_module.DESCRIPTOR.message_types_by_name[name], name)
    # Two sets of `inference.*` descriptors live in this process: genserve.oip's in a pool of its own.
    assert grpc_service_pb2.DESCRIPTOR.pool is not triton_pb.DESCRIPTOR.pool


def test_reflection_describes_the_inference_service(channel: grpc.Channel) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(channel)
    assert {"inference.GRPCInferenceService", "genserve.v1.GenerativeService"} <= set(db.get_services())
    found = db.FindFileContainingSymbol("inference.ModelInferRequest")
    assert found.name == "genserve/oip/grpc_service.proto"
    assert "genserve/oip/model_config.proto" in found.dependency
    # genserve's own API still resolves: reflection looks in genserve.oip's pool, then in the default one.
    assert db.FindFileContainingSymbol("genserve.v1.GenerativeService").name == "genserve/v1/service.proto"
