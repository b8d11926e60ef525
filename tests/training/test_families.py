"""One contract for every family (as zuko's test_flows does for every flow): the same checks, all seven models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genserve.core.noise import Noise
from genserve.training.base import LIKELIHOOD_KINDS, OPERATIONS, GenerativeModel
from genserve.training.checkpoint import load_checkpoint, save_checkpoint
from genserve.training.config import build_config
from genserve.training.data import load_dataset
from genserve.training.registry import MODELS, model_class
from genserve.training.trainer import build_model

DIGITS = load_dataset("digits")
MOONS = load_dataset("moons", seed=0)


def make(name: str, data=DIGITS) -> GenerativeModel:
    torch.manual_seed(0)
    cfg = build_config(name, data.spec.name if data is not DIGITS else "digits")
    model = build_model(cfg, data.spec)
    if model.closed_form:
        model.fit_closed_form(torch.as_tensor(data.train))
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def name(request) -> str:
    return request.param


def test_declares_the_protocol(name):
    cls = model_class(name)
    assert cls.name == name
    assert cls.likelihood_kind in LIKELIHOOD_KINDS
    assert set(cls.operations) <= set(OPERATIONS) and "sample" in cls.operations
    assert ("log_likelihood" in cls.operations) == (cls.likelihood_kind != "none")
    assert {"quick", "full"} <= set(cls.profiles)
    assert cls.capabilities.training in ("stable", "unstable")


def test_a_few_steps_lower_the_loss(name):
    x = torch.as_tensor(DIGITS.train[:128])
    if model_class(name).closed_form:  # fitted in one step: the fit must beat the unfitted model
        unfitted = build_model(build_config(name), DIGITS.spec)
        unfitted.log_sigma2.fill_(np.log(25.0))
        unfitted.precision.copy_(torch.eye(64) / 25.0)
        unfitted.logdet.fill_(64 * np.log(25.0))
        assert make(name).loss(x) < unfitted.loss(x) - 10.0
        return
    model = make(name)
    opts = model.make_optimizers(1e-3, 0.0)
    model.train()
    first = model.training_step(x, opts, 0.0)
    logs = [model.training_step(x, opts, 0.0) for _ in range(40)]
    assert all(np.isfinite(v) for log in logs for v in log.values())
    if type(model).training_step is GenerativeModel.training_step:
        assert logs[-1]["loss"] < first["loss"] - 1.0  # nats per image on a fixed batch


def test_samples_live_in_the_data_domain_and_follow_the_seed(name):
    model = make(name).eval()
    with torch.no_grad():
        a, b, c = (model.sample(6, Noise(s)) for s in (1, 1, 2))
    assert a.shape == (6, 8, 8)
    DIGITS.spec.check(a.numpy())
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_log_prob_of_integer_images_is_a_log_probability(name):
    model = make(name).eval()
    if "log_likelihood" not in model.operations:
        with pytest.raises(NotImplementedError, match="supports"):
            model.log_prob(torch.as_tensor(DIGITS.test[:4]), Noise(0))
        return
    with torch.no_grad():
        lp = model.log_prob(torch.as_tensor(DIGITS.test[:16]), Noise(0))
    assert lp.shape == (16,) and torch.isfinite(lp).all()
    if model.likelihood_kind in ("exact", "lower_bound"):
        assert (lp <= 0).all()  # log P(x) of a discrete image, or a lower bound on it


def test_undeclared_operations_raise_and_declared_ones_run(name):
    model = make(name).eval()
    x = torch.as_tensor(DIGITS.test[:3])
    with torch.no_grad():
        for op in ("encode", "decode"):
            if op not in model.operations:
                with pytest.raises(NotImplementedError):
                    getattr(model, op)(x)
        if "encode" in model.operations:
            z = model.encode(x)
            assert z.shape[0] == 3 and torch.isfinite(z).all()
        if "decode" in model.operations:
            q = int(getattr(model, "latent_dim", model.spec.dim))
            DIGITS.spec.check(model.decode(torch.randn(3, q)).numpy())


def test_checkpoint_round_trip(name, tmp_path):
    model = make(name).eval()
    save_checkpoint(tmp_path / "m.pt", model, config={"model": name}, metrics={})
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["model"] == name and type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(model.sample(4, Noise(3)), loaded.sample(4, Noise(3)))
        if "log_likelihood" in model.operations:
            x = torch.as_tensor(DIGITS.test[:4])
            assert torch.allclose(model.log_prob(x, Noise(0)), loaded.log_prob(x, Noise(0)))


def test_contract_graphs_run_on_their_examples(name):
    from genserve.export.contract import bind

    model = make(name).eval()
    graphs = bind(model, model.family, model.spec).graphs
    assert graphs
    with torch.no_grad():
        for gname, g in graphs.items():
            out = g.module(*g.inputs.values())
            out = out if isinstance(out, tuple) else (out,)
            assert len(out) == len(g.outputs), gname
            assert all(o.shape[0] == next(iter(g.inputs.values())).shape[0] for o in out), gname


def test_trains_on_continuous_tabular_data(name):
    model = make(name, MOONS)
    x = torch.as_tensor(MOONS.train[:256])
    if not model.closed_form:
        opts = model.make_optimizers(1e-3, 0.0)
        model.train()
        for _ in range(5):
            logs = model.training_step(x, opts, 0.0)
        assert all(np.isfinite(v) for v in logs.values())
    model.eval()
    with torch.no_grad():
        s = model.sample(50, Noise(0))
        assert s.shape == (50, 2) and torch.isfinite(s).all()
        if "log_likelihood" in model.operations:
            assert torch.isfinite(model.log_prob(torch.as_tensor(MOONS.test[:32]), Noise(0))).all()
