"""Honest reporting in `evaluate`: the Frechet distance's spread and floor, the energy model's own field and
title, the validation split's NLL, and the VAE's importance-weighted bound at K = 5000 in bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genserve.core.noise import Noise
from genserve.training import vae as vae_mod
from genserve.training.classifier import features, frechet_distance, load_classifier
from genserve.training.data import load_dataset
from genserve.training.ebm import EnergyModel
from genserve.training.evaluate import evaluate, main, picture_title, score
from genserve.training.ppca import PPCA
from genserve.training.vae import VAE


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return load_classifier(cache_dir=tmp_path_factory.mktemp("cache") / "genserve")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def ppca(digits):
    m = PPCA(digits.spec, latent_dim=16)
    m.fit_closed_form(torch.as_tensor(digits.train))
    return m.eval()


def test_frechet_distance_is_a_mean_over_seeds_with_its_spread(ppca, digits, classifier):
    r = evaluate(ppca, digits, n_samples=300, fd_seeds=3, seed=4, classifier=classifier, progress=False)
    assert r["fd_seeds"] == [4, 5, 6] and len(r["frechet_distances"]) == 3
    assert len(set(r["frechet_distances"])) == 3  # different seeds, different samples
    assert r["frechet_distance"] == pytest.approx(np.mean(r["frechet_distances"]), rel=1e-12)
    assert r["frechet_distance_sd"] == pytest.approx(np.std(r["frechet_distances"], ddof=1), rel=1e-12)
    one = evaluate(ppca, digits, n_samples=300, fd_seeds=1, seed=5, classifier=classifier, progress=False,
                   validation=False)
    assert one["frechet_distance"] == pytest.approx(r["frechet_distances"][1], rel=1e-12)  # draw i has seed + i
    assert one["frechet_distance_sd"] is None and one["nll_nats_validation"] is None
    with pytest.raises(ValueError, match="fd_seeds"):
        evaluate(ppca, digits, n_samples=10, fd_seeds=0, classifier=classifier, progress=False)


def test_floor_is_training_images_at_the_sample_size(ppca, digits, classifier):
    r = evaluate(ppca, digits, n_samples=1000, fd_seeds=2, classifier=classifier, progress=False)
    test = features(digits.test, digits.spec, classifier)
    assert r["frechet_floor_n"] == 1000 == len(digits.train)
    assert r["frechet_distance_floor"] == pytest.approx(
        frechet_distance(test, features(digits.train, digits.spec, classifier)), rel=1e-12)
    # 350 validation images sit higher than 1000 training images: the old "floor" was the smaller sample's
    assert r["frechet_distance_floor"] < r["frechet_distance_validation"]
    assert r["frechet_distance_floor"] < r["frechet_distance"]  # pPCA's samples are worse than real digits
    small = evaluate(ppca, digits, n_samples=200, fd_seeds=2, classifier=classifier, progress=False)
    assert small["frechet_floor_n"] == 200 and small["frechet_distance_floor"] > r["frechet_distance_floor"]
    # the validation split's NLL is scored like the test split's
    expected = -float(ppca.log_prob(torch.as_tensor(digits.val), Noise(0)).double().mean())
    assert r["nll_nats_validation"] == pytest.approx(expected, abs=0.3)


def test_energy_model_reports_mean_energy_not_nll(digits, classifier, tmp_path):
    m = EnergyModel(digits.spec, **EnergyModel.profiles["quick"]["arch"]).eval()
    r = evaluate(m, digits, n_samples=50, fd_seeds=2, classifier=classifier, out_dir=tmp_path, progress=False)
    with torch.no_grad():
        energy = -float(m.log_prob(torch.as_tensor(digits.test), Noise(0)).double().mean())
    assert r["likelihood_kind"] == "unnormalized" and r["mean_energy"] == pytest.approx(energy, rel=1e-6)
    assert r["nll_nats"] is None and r["bits_per_dim"] is None
    title = picture_title(r, 0)
    assert "mean energy" in title and "not an NLL" in title and "nats" not in title
    assert r["plots"]["samples"].endswith("ebm_samples.png")


def test_title_names_nll_kind_and_fd_spread(ppca, digits, classifier):
    r = evaluate(ppca, digits, n_samples=100, fd_seeds=2, classifier=classifier, progress=False)
    title = picture_title(r, 0)
    assert f"NLL {r['nll_nats']:.2f} nats (lower bound)" in title
    assert f"{r['frechet_distance']:.2f} \u00b1 {r['frechet_distance_sd']:.2f}" in title and "floor" in title


def test_vae_at_k_5000_is_chunked_and_equals_one_pass(digits, monkeypatch):
    torch.manual_seed(0)
    m = VAE(digits.spec, latent_dim=4, hidden=16, depth=1).eval()
    x = torch.as_tensor(digits.test[:3])
    with torch.no_grad():
        whole = m.log_prob(x, Noise(7), importance_samples=5000)  # 15,000 rows: one chunk
        monkeypatch.setattr(vae_mod, "IW_ROWS", 999)  # now 333 samples per chunk, 16 chunks
        assert m.iw_rows == 999
        chunked = m.log_prob(x, Noise(7), importance_samples=5000)
    assert torch.allclose(whole, chunked, rtol=0, atol=1e-4)
    # the bound tightens with K (in expectation; with 5000 vs 5 draws by a wide margin on a random model)
    few = score(m, digits.test[:3], seed=1, importance_samples=5, progress=False)
    many = score(m, digits.test[:3], seed=1, importance_samples=5000, progress=False)
    assert np.all(np.isfinite(many)) and many.mean() > few.mean()


def test_cli_refuses_k_beyond_the_limit(tmp_path, capsys):
    assert main([str(tmp_path / "x.pt"), "--importance-samples", "100001"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genserve: error: --importance-samples must be at most 100000") and "\n" not in err
    assert main([str(tmp_path / "x.pt"), "--fd-seeds", "0"]) == 2
    assert "--fd-seeds must be at least 1" in capsys.readouterr().err
