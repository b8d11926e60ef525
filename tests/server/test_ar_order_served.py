"""Autoregressive models in other pixel orders served through a real server: LogLikelihood is training's
log_prob, Sample is training's sample for the same seed (step t draws the order's position t)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from ports import free_port

from genserve.core.noise import Noise
from genserve.core.tensors import from_proto, to_proto
from genserve.export.repository import export_model
from genserve.server.app import BackgroundServer
from genserve.server.config import ServerConfig
from genserve.training.arcnn import CausalConvAR
from genserve.training.arrnn import RecurrentAR
from genserve.training.data import load_dataset
from genserve.v1 import service_pb2 as pb
from genserve.v1 import service_pb2_grpc

MODELS = {
    "digits-arcnn-rot180": (CausalConvAR, {"channels": 8, "layers": 1, "logistic": 2, "order": "rot180"}),
    "digits-arrnn-transpose": (RecurrentAR, {"hidden": 8, "layers": 1, "embed": 4, "above": True,
                                             "order": "transpose"}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    data = load_dataset("digits")
    repo = tmp_path_factory.mktemp("orders")
    built = {}
    for name, (cls, arch) in MODELS.items():
        torch.manual_seed(0)
        m = cls(data.spec, **arch)
        with torch.no_grad():  # far from initialisation: sharp, position-dependent conditionals
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
        m.eval()
        export_model(m, m.family, data.spec, repo, name=name, data=data.test[:64], reference=m, log=lambda s: None)
        built[name] = m
    return repo, built, np.asarray(data.test[:30], dtype=np.float32)


@pytest.fixture(scope="module")
def stub(models):
    cfg = ServerConfig(repo=models[0], port=0, metrics_port=free_port(), provider="cpu", max_batch_size=64,
                       max_queue_delay_ms=5.0, workers=2, grace_s=5.0)
    with BackgroundServer(cfg) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        yield service_pb2_grpc.GenerativeServiceStub(channel)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_served_log_likelihood_is_trainings_log_prob(stub, models, name: str) -> None:
    _, built, x = models
    r = stub.LogLikelihood(pb.LogLikelihoodRequest(model=name, x=to_proto(x), seed=0))
    with torch.no_grad():
        want = built[name].log_prob(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(from_proto(r.log_prob), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_served_samples_are_trainings_samples(stub, models, name: str) -> None:
    _, built, _ = models
    got = from_proto(stub.Sample(pb.SampleRequest(model=name, n=5, seed=123)).samples)
    want = built[name].sample(5, Noise(123)).numpy()
    np.testing.assert_array_equal(got, want)
