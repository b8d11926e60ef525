"""Models this project did not write, exported with ``export_model`` and served by the real server.

Three modules from outside the package: a zuko masked autoregressive flow (its inverse is a fixed-point loop,
which the server runs pass by pass), a convolutional VAE on 16x16 binary images and a small causal Transformer
over the 256 pixels of the same images, with a key/value cache as the state of its one-step graph. Each is
checked through gRPC: its family's operations answer with the numbers of the PyTorch module, seeded samples
repeat alone or merged with concurrent requests, and the operations it lacks are FAILED_PRECONDITION.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))
import zuko  # noqa: E402  (the dev extra installs it)
from own_flow import ZukoMAF, train  # noqa: E402
from user_models import ConvVAE, TransformerAR, binary_digits_16, fit  # noqa: E402

BIN16 = {"name": "binary16", "shape": [16, 16], "kind": "discrete", "levels": 2}


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The three modules, trained a little, and a repository holding their exports."""
    from genserve.export.repository import export_model
    from genserve.training.data import load_dataset

    torch.set_num_threads(1)
    repo = tmp_path_factory.mktemp("own") / "repo"
    moons = load_dataset("moons", seed=0)
    torch.manual_seed(0)
    flow = train(zuko.flows.MAF(2, transforms=2, hidden_features=(32, 32)), torch.as_tensor(moons.train), steps=150)
    train16, test16 = binary_digits_16()
    torch.manual_seed(0)
    vae = fit(ConvVAE(size=16, levels=2, latent_dim=8, channels=8), train16, steps=60)
    torch.manual_seed(0)
    ar = fit(TransformerAR(256, 2, d=16, heads=2, layers=1), train16, steps=40)
    quiet = lambda *a: None  # noqa: E731
    plane = {**moons.spec.to_dict(), "mean": [], "std": []}
    export_model(ZukoMAF(flow), "flow", plane, repo, name="moons-maf", data=moons.test, model_name="zuko-maf",
                 log=quiet)
    export_model(vae, "latent_variable", BIN16, repo, name="bin16-vae", data=test16, model_name="conv-vae", log=quiet)
    export_model(ar, "autoregressive", BIN16, repo, name="bin16-transformer", data=test16,
                 model_name="transformer", log=quiet)
    return {"repo": repo, "flow": flow, "vae": vae, "ar": ar, "moons": moons, "test16": test16}


@pytest.fixture(scope="module")
def client(own: dict) -> Iterator:
    from genserve.clients.client import Client
    from genserve.server.app import BackgroundServer
    from genserve.server.config import ServerConfig

    config = ServerConfig(repo=own["repo"], host="127.0.0.1", port=0, metrics_port=0, provider="cpu",
                          intra_op_threads=1, inter_op_threads=1, max_batch_size=64, max_queue_delay_ms=2.0,
                          max_queue_size=4096, workers=2, grace_s=2.0)
    with BackgroundServer(config) as srv, Client(f"127.0.0.1:{srv.port}") as c:
        yield c


def test_the_repository_holds_graphs_and_manifests_only(own: dict) -> None:
    from genserve.export.check import check_repository

    reports = {r.name: r for r in check_repository(own["repo"])}
    assert all(r.ok for r in reports.values()), [r.line() for r in reports.values()]
    files = {p.suffix for p in own["repo"].rglob("*") if p.is_file()}
    assert files <= {".onnx", ".json"}  # no user Python, no pickles: the server runs graphs
    names = {p.name for p in (own["repo"] / "moons-maf" / "1").iterdir()}
    assert {"forward.onnx", "inverse_pass_0.onnx", "inverse_pass_1.onnx"} <= names


def test_zuko_flow_log_likelihood_equals_zukos_own(own: dict, client) -> None:
    x = own["moons"].test[:200]
    with torch.no_grad():
        want = own["flow"]().log_prob(torch.as_tensor(x)).numpy()
    got = client.log_likelihood("moons-maf", x).log_prob
    assert np.abs(got - want).max() <= 1e-4


def test_zuko_flow_density_integrates_to_one(client) -> None:
    lo, hi, n = (-3.0, -2.5), (4.0, 3.0), 300
    gx, gy = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    grid = np.stack(np.meshgrid(gx, gy, indexing="ij"), -1).reshape(-1, 2).astype(np.float32)
    lp = np.concatenate([client.log_likelihood("moons-maf", grid[i:i + 30000]).log_prob
                         for i in range(0, len(grid), 30000)])
    cell = (gx[1] - gx[0]) * (gy[1] - gy[0])
    assert abs(float(np.exp(lp.astype(np.float64)).sum() * cell) - 1.0) <= 0.01


def test_zuko_flow_samples_invert_its_transform(own: dict, client) -> None:
    x, z = client.sample("moons-maf", 64, seed=5, return_latents=True)
    with torch.no_grad():
        back = own["flow"]().transform(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(back, z, atol=1e-3)  # the served passes invert zuko's transform
    code = client.encode("moons-maf", x)
    np.testing.assert_allclose(client.decode("moons-maf", code), x, atol=1e-4)


def test_conv_vae_answers_every_operation(own: dict, client) -> None:
    x = own["test16"][:20]
    lp = client.log_likelihood("bin16-vae", x).log_prob
    assert lp.shape == (20,) and np.all(lp < 0) and np.isfinite(lp).all()
    z = client.encode("bin16-vae", x)
    assert z.shape == (20, 8)
    with torch.no_grad():
        np.testing.assert_allclose(z, own["vae"].encoder(torch.as_tensor(x))[0].numpy(), atol=1e-4)
    out = client.decode("bin16-vae", z)
    assert out.shape == (20, 16, 16) and set(np.unique(out)) <= {0.0, 1.0}
    s = client.sample("bin16-vae", 8, seed=3)
    assert s.shape == (8, 16, 16) and set(np.unique(s)) <= {0.0, 1.0}


def test_transformer_scores_exactly_and_samples_with_its_cache(own: dict, client) -> None:
    x = own["test16"][:16]
    with torch.no_grad():
        logp = torch.log_softmax(own["ar"].conditionals(torch.as_tensor(x)), -1)
        want = logp.gather(-1, torch.as_tensor(x).reshape(16, -1, 1).long()).sum((1, 2)).numpy()
    np.testing.assert_allclose(client.log_likelihood("bin16-transformer", x).log_prob, want, atol=1e-3)
    info = client.info("bin16-transformer")
    assert info.family == "autoregressive"
    s = client.sample("bin16-transformer", 4, seed=11)
    assert s.shape == (4, 16, 16) and set(np.unique(s)) <= {0.0, 1.0}


@pytest.mark.parametrize("model", ["moons-maf", "bin16-vae", "bin16-transformer"])
def test_seeded_samples_repeat_alone_and_merged_with_concurrent_requests(client, model: str) -> None:
    alone = {seed: client.sample(model, 3, seed=seed) for seed in range(6)}
    with ThreadPoolExecutor(6) as pool:
        merged = dict(zip(range(6), pool.map(lambda s: client.sample(model, 3, seed=s), range(6)), strict=True))
    for seed in range(6):
        np.testing.assert_array_equal(merged[seed], alone[seed])
    assert not np.array_equal(alone[0], alone[1])


@pytest.mark.parametrize(("model", "operation"), [("bin16-transformer", "encode"), ("bin16-transformer", "decode")])
def test_operations_a_family_lacks_are_failed_precondition(own: dict, client, model: str, operation: str) -> None:
    from genserve.clients.channel import GenserveError

    arg = own["test16"][:2] if operation == "encode" else np.zeros((2, 4), np.float32)
    with pytest.raises(GenserveError) as err:
        getattr(client, operation)(model, arg)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert operation in err.value.message and "sample" in err.value.message  # names what it can do instead
