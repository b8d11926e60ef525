"""Evaluation: NLL against closed forms, Frechet distance mathematics, the classifier, pictures and CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.training import classifier as clf_mod
from genserve.training.base import Capabilities, GenerativeModel
from genserve.training.checkpoint import save_checkpoint
from genserve.training.classifier import (
    ClassifierConfig,
    digits_test_accuracy,
    features,
    frechet_distance,
    load_classifier,
    train_classifier,
)
from genserve.training.data import load_dataset
from genserve.training.evaluate import add_parser, evaluate, evaluate_checkpoint, main, to_json
from genserve.training.ppca import PPCA


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """An XDG cache home of our own, so tests neither read nor fill the user's ~/.cache."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def classifier(cache_home):
    return load_classifier(cache_dir=cache_home / "genserve")  # trains once (~5-10 s), then cached


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def ppca(digits):
    m = PPCA(digits.spec, latent_dim=16)
    m.fit_closed_form(torch.as_tensor(digits.train))
    return m.eval()


@pytest.fixture(scope="module")
def ppca_checkpoint(ppca, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ppca_digits.pt"
    save_checkpoint(path, ppca, config={"model": "ppca", "dataset": "digits", "seed": 0}, metrics={})
    return path


# ---- likelihood ---------------------------------------------------------------------------------------
def test_ppca_nll_equals_minus_mean_log_prob_and_closed_form(ppca, digits, classifier):
    r = evaluate(ppca, digits, seed=3, n_samples=50, batch_size=1000, classifier=classifier, progress=False)
    test = torch.as_tensor(digits.test)
    expected = -float(ppca.log_prob(test, Noise(3)).double().mean())  # one batch: the same noise draws
    assert r["nll_nats"] == pytest.approx(expected, rel=1e-9)
    assert r["bits_per_dim"] == pytest.approx(r["nll_nats"] / (64 * math.log(2)), rel=1e-12)
    assert r["likelihood_kind"] == "lower_bound" and r["n_test"] == len(digits.test) == 447
    assert 150 < r["nll_nats"] < 160

    # The one-draw dequantisation bound in closed form: y = x + u, u ~ U[0,1)^D has mean x + 1/2 and covariance
    # I/12, so E_u[(y-mu)^T P (y-mu)] = (x + 1/2 - mu)^T P (x + 1/2 - mu) + tr(P)/12. Its Monte-Carlo estimate
    # (one draw per image, batched) must agree within its error; the log-mean-exp over the model's default
    # draws is a tighter bound, so its NLL lies below.
    P, mu = ppca.precision.double(), ppca.mu.double()
    d = test.reshape(len(test), -1).double() + 0.5 - mu
    maha = ((d @ P) * d).sum(1) + torch.trace(P) / 12
    exact = float((0.5 * (64 * math.log(2 * math.pi) + ppca.logdet.double() + maha)).mean())
    one = evaluate(ppca, digits, seed=0, n_samples=50, classifier=classifier, progress=False, dequant_draws=1,
                   fd_seeds=1, validation=False)
    assert one["dequant_draws"] == 1 and one["nll_nats"] == pytest.approx(exact, abs=0.3)
    assert r["dequant_draws"] == ppca.dequant_draws > 1 and r["nll_nats"] < exact - 0.3


class Stub(GenerativeModel):
    """A 2-D model with a known log_prob that records the options it was given."""

    name = "stub"
    family = "energy"
    likelihood_kind = "unnormalized"
    operations = ("sample", "log_likelihood")
    capabilities = Capabilities("energy-based", "stable", "unnormalized", "slow", "rather not", True)

    def __init__(self, spec: DataSpec, kind: str = "unnormalized") -> None:
        super().__init__(spec)
        self.likelihood_kind = kind
        self.seen: list[int | None] = []

    def log_prob(self, x, noise, importance_samples=None):
        self.seen.append(importance_samples)
        return -(x**2).sum(1)  # -energy

    def sample(self, n, noise, temperature=1.0, **options):
        return torch.from_numpy(noise.normal(n, 2))


def test_options_reach_only_models_that_name_them_and_kinds_are_kept():
    data = load_dataset("moons", seed=0)
    stub = Stub(data.spec)
    r = evaluate(stub, data, n_samples=100, importance_samples=7, progress=False)
    assert set(stub.seen) == {7} and r["importance_samples"] == 7
    assert r["likelihood_kind"] == "unnormalized"  # the mean energy is reported in its own field, and marked
    assert r["mean_energy"] == pytest.approx(float((data.test.astype(np.float64) ** 2).sum(1).mean()), rel=1e-6)
    assert r["mean_energy_validation"] == pytest.approx(float((data.val.astype(np.float64) ** 2).sum(1).mean()),
                                                        rel=1e-6)
    assert r["nll_nats"] is None and r["bits_per_dim"] is None and r["nll_nats_validation"] is None

    none = Stub(data.spec, kind="none")
    r = evaluate(none, data, n_samples=100, progress=False)
    assert none.seen == [] and r["nll_nats"] is None and r["bits_per_dim"] is None
    assert r["likelihood_kind"] == "none" and r["frechet_distance"] > 0
    assert json.loads(json.dumps(r))["nll_nats"] is None


class Broken(Stub):
    def log_prob(self, x, noise, importance_samples=None):
        return torch.full((x.shape[0],), -math.inf)

    def sample(self, n, noise, temperature=1.0, **options):
        return torch.full((n, 2), math.nan)


def test_non_finite_results_are_null_and_warned(tmp_path):
    data = load_dataset("moons", seed=0)
    r = evaluate(Broken(data.spec, kind="exact"), data, n_samples=20, out_dir=tmp_path, progress=False)
    assert r["nll_nats"] is None and r["frechet_distance"] is None and len(r["warnings"]) == 2
    assert r["plots"] == {}  # no picture of NaNs
    assert json.loads(to_json({**r, "x": math.inf}), parse_constant=pytest.fail)["x"] is None


# ---- Frechet distance ---------------------------------------------------------------------------------
def test_frechet_distance_mathematics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    b = rng.normal(size=(400, 5)) * 2 + 1
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    # 1-D: (m_a - m_b)^2 + (s_a - s_b)^2 exactly, with the unbiased standard deviations np.cov uses.
    x, y = a[:, :1], b[:, :1]
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    # A shift c of one set moves only the mean term: FD(a, a + c) = |c|^2.
    c = np.arange(5.0)
    assert frechet_distance(a, a + c) == pytest.approx(float(c @ c), rel=1e-8)
    # Collapsed samples (singular covariance) still give a finite number.
    assert math.isfinite(frechet_distance(a, np.ones((100, 5))))
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :3])


def test_fid_real_splits_small_noise_large(digits, classifier):
    test = features(digits.test, digits.spec, classifier)
    assert test.shape == (447, 64)
    real = frechet_distance(test, features(digits.val, digits.spec, classifier))
    noise = np.random.default_rng(0).integers(0, 17, size=(1000, 8, 8)).astype(np.float32)
    fake = frechet_distance(test, features(noise, digits.spec, classifier))
    assert real < 5 and fake > 20 * real


# ---- the digit classifier -----------------------------------------------------------------------------
def test_classifier_is_deterministic():
    config = ClassifierConfig(epochs=2, seed=5)  # the full 20 epochs behave alike; two are enough to show it
    a, b = train_classifier(config).state_dict(), train_classifier(config).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rng = torch.get_rng_state()
    train_classifier(ClassifierConfig(epochs=1))
    assert torch.equal(rng, torch.get_rng_state())  # the caller's random stream is left alone


def test_classifier_is_accurate_and_cached(classifier, cache_home, monkeypatch):
    assert digits_test_accuracy(classifier) > 0.95
    files = list((cache_home / "genserve").glob("digits-classifier-*.pt"))
    assert len(files) == 1 and ClassifierConfig().key() in files[0].name

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been used")

    monkeypatch.setattr(clf_mod, "train_classifier", no_training)
    again = load_classifier(cache_dir=cache_home / "genserve")
    a, b = classifier.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ClassifierConfig(epochs=21).key() != ClassifierConfig().key()


# ---- pictures -----------------------------------------------------------------------------------------
def test_png_grid_next_to_checkpoint(ppca_checkpoint, classifier):
    from PIL import Image

    r = evaluate_checkpoint(ppca_checkpoint, n_samples=100, classifier=classifier, progress=False)
    path = ppca_checkpoint.parent / "ppca_digits_samples.png"
    assert r["plots"]["samples"] == str(path) and r["checkpoint"] == str(ppca_checkpoint)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 20  # a picture, not a blank canvas
    assert r["frechet_distance"] > r["frechet_distance_validation"]  # pPCA samples are worse than real digits


def test_scatter_for_2d_data(tmp_path):
    from PIL import Image

    data = load_dataset("moons", seed=1)
    m = PPCA(data.spec, latent_dim=1)
    m.fit_closed_form(torch.as_tensor(data.train))
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, m, config={"model": "ppca", "dataset": "moons", "seed": 1}, metrics={})
    r = evaluate_checkpoint(ckpt, n_samples=200, out_dir=tmp_path / "pics", progress=False)
    assert r["likelihood_kind"] == "exact" and r["frechet_features"] == "normalised_values"
    expected = -float(m.log_prob(torch.as_tensor(data.test), Noise(0)).double().mean())  # continuous: exact
    assert r["nll_nats"] == pytest.approx(expected, rel=1e-6)
    with Image.open(r["plots"]["samples"]) as im:
        assert im.format == "PNG"
    assert r["plots"]["samples"].startswith(str(tmp_path / "pics"))


# ---- command line -------------------------------------------------------------------------------------
def test_cli_json_prints_one_object(ppca_checkpoint, cache_home, classifier, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    rc = main([str(ppca_checkpoint), "--json", "--samples", "100", "--seed", "1", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and len(out.strip().splitlines()) == 1
    r = json.loads(out)
    for key in ("nll_nats", "bits_per_dim", "likelihood_kind", "frechet_distance", "n_test",
                "seconds_scoring", "seconds_sampling"):
        assert key in r
    assert 150 < r["nll_nats"] < 160 and r["frechet_distance"] > 0 and r["seed"] == 1


def test_cli_table(ppca_checkpoint, cache_home, classifier, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    assert main([str(ppca_checkpoint), "--samples", "50", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nats/example (lower bound" in out and "Frechet distance" in out and "floor" in out


@pytest.mark.parametrize("kind", ["missing", "garbage", "foreign", "bad-flag"])
def test_cli_bad_input_is_one_line_exit_2(kind, tmp_path, capsys):
    path = tmp_path / "x.pt"
    argv = [str(path)]
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "bad-flag":
        argv += ["--samples", "0"]
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genserve: error: ") and "Traceback" not in captured.err


def test_add_parser_is_cheap_and_wired():
    import argparse

    parser = argparse.ArgumentParser(prog="genserve")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "c.pt", "--json", "--importance-samples", "600"])
    assert args.importance_samples == 600 and args.json and args.handler.__name__ == "run"
    code = "import sys, genserve.training.evaluate; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"  # the CLI can list subcommands without paying for torch
