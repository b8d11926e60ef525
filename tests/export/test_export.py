"""Export station: every family exported with parity, the serving programs reproduce PyTorch, the repository.

Family tests run over the registry: a tiny model of each family (one epoch) is exported once per session
(tests/export/conftest.py); then the family's serving program, built from the manifest alone and run on
ONNX Runtime, must give PyTorch's log-likelihoods on the whole digits test split within 1e-3 nats per
example, the same samples for the same seed, and the same encodings and decodings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from genserve.app.cli import main as cli
from genserve.core.manifest import MANIFEST, OPERATION, read_manifest
from genserve.core.noise import Noise
from genserve.export.contract import bind
from genserve.export.onnx_export import OPSET, export_graph
from genserve.export.parity import (
    BATCH_SIZES,
    FLIP_FRACTION,
    LL_ATOL,
    ParityError,
    check_graph_parity,
    onnx_session,
)
from genserve.server.programs.base import run_sync
from genserve.training.base import GraphDef, Lambda
from genserve.training.data import load_dataset
from genserve.training.registry import MODELS

FAMILIES = list(MODELS)


@pytest.fixture(scope="module")
def digits_test() -> np.ndarray:
    return load_dataset("digits").test  # rows [1350:], (447, 8, 8) integer levels


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- every family ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_graphs_checked_at_every_batch_size(exported, family):
    """Every graph passed the ONNX checker and ORT-vs-PyTorch parity at batch 1, 7 and 64, real and random."""
    e = exported(family)
    assert [g.name for g in e.manifest.graphs] == list(bind(e.model, e.model.family, e.model.spec).graphs)
    for g in e.manifest.graphs:
        rep = e.report["graphs"][g.name]
        seen = {(label, b) for label, b, _, _ in rep["parity_checks"]}
        assert seen == {(label, b) for label in ("real", "random") for b in BATCH_SIZES}
        assert all(np.isfinite(err) for *_, err in rep["parity_checks"])  # each within ATOL + RTOL * scale
        assert g.opset >= 17 and g.sha256 == _sha256(e.version_dir / g.file)
        for t in list(g.inputs) + list(g.outputs):
            assert t.shape[0] == -1 and t.dtype == "float32", (g.name, t)


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest_declares_what_the_family_does(exported, family):
    e = exported(family)
    m, model = e.manifest, e.model
    assert (m.family, m.model) == (model.family, model.name)
    assert list(m.operations) == [OPERATION[op] for op in model.operations]
    own = {k: v for k, v in m.parameters.items() if not k.startswith("score.")}  # score.*: calibration's fits
    assert own == pytest.approx(bind(model, model.family, model.spec).program_parameters())
    assert set(model.operations) <= set(e.program().operations)
    assert m.capabilities.training_stability == model.capabilities.training
    assert m.capabilities.representation == model.capabilities.representation


@pytest.mark.parametrize("family", FAMILIES)
def test_log_likelihood_matches_pytorch(exported, family, digits_test):
    """Whole digits test split: |log p_ORT - log p_PyTorch| <= 1e-3 nats per example, same Noise seed."""
    e = exported(family)
    if "log_likelihood" not in e.model.operations:
        assert OPERATION["log_likelihood"] not in e.manifest.operations
        with pytest.raises(NotImplementedError):
            e.model.log_prob(torch.from_numpy(digits_test[:2]), Noise(0))
        return
    with torch.no_grad():
        want = e.model.log_prob(torch.from_numpy(digits_test), Noise(5)).double().numpy()
    got = run_sync(e.program().log_likelihood(e.runner(), digits_test, Noise(5))).astype(np.float64)
    assert got.shape == (len(digits_test),)
    assert np.isfinite(want).all() and want.mean() < 0  # log-probabilities of 64 17-level pixels
    assert np.abs(got - want).max() <= LL_ATOL, f"max |diff| {np.abs(got - want).max():.3g} nats"


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_match_pytorch(exported, family):
    """Same seed, same samples: exactly, except at most FLIP_FRACTION of values (float32 at a CDF edge)."""
    e = exported(family)
    n = 32
    want = e.model.sample(n, Noise(11)).detach().numpy()
    got = run_sync(e.program().sample(e.runner(), n, Noise(11))).x
    assert got.shape == want.shape == (n, 8, 8)
    assert set(np.unique(got)) <= set(range(17))  # the data domain: integer levels
    assert (got != want).mean() <= FLIP_FRACTION
    other = run_sync(e.program().sample(e.runner(), n, Noise(12))).x
    assert (other != got).any()  # the seed matters


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_decode_match_pytorch(exported, family, digits_test):
    e = exported(family)
    ops, x = e.model.operations, digits_test[:64]
    z = None
    if "encode" in ops:
        with torch.no_grad():
            want = e.model.encode(torch.from_numpy(x), Noise(3)).numpy()
        got = run_sync(e.program().encode(e.runner(), x, Noise(3)))
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
        z = want[:16]
    if "decode" in ops:
        if z is None:
            z = Noise(4).normal(16, int(e.manifest.parameters["latent_dim"]))
        with torch.no_grad():
            want = e.model.decode(torch.from_numpy(z), Noise(4)).numpy()
        got = run_sync(e.program().decode(e.runner(), z, Noise(4)))
        assert got.shape == want.shape == (16, 8, 8)
        assert (got != want).mean() <= FLIP_FRACTION  # rounded to levels; a midpoint tie may flip
    if not {"encode", "decode"} & set(ops):
        assert not {OPERATION["encode"], OPERATION["decode"]} & set(e.manifest.operations)


# ---- the station -------------------------------------------------------------------------------------------
def test_cli_export_versions_force_fp16_and_config(tiny_checkpoint, tmp_path, capsys):
    ckpt, repo = tiny_checkpoint("ppca"), tmp_path / "repo"
    metrics = tmp_path / "eval.json"
    metrics.write_text(json.dumps({"nll_nats": 123.5, "bits_per_dim": 2.78, "likelihood_kind": "exact"}))
    assert cli(["export", str(ckpt), "--repo", str(repo), "--metrics", str(metrics)]) == 0
    out = capsys.readouterr().out
    assert all(f"  {g}: opset {OPSET}" in out for g in ("log_prob", "encoder", "generator")), out
    v1 = repo / "digits-ppca" / "1"
    m = read_manifest(v1 / MANIFEST)
    assert (m.name, m.version, m.model) == ("digits-ppca", 1, "ppca")
    assert m.test_metrics["nll_nats"] == 123.5 and "best_val" not in m.test_metrics  # a training number
    config = repo / "digits-ppca" / "config.json"
    assert json.loads(config.read_text()) == {"max_batch_size": 512, "max_queue_delay_ms": 2.0,
                                              "max_queue_size": 4096}  # instances: the server's (auto)

    # an existing version is refused without --force, with one line saying what to do
    assert cli(["export", str(ckpt), "--repo", str(repo), "--version", "1"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and len(err.strip().splitlines()) == 1

    # default version is highest + 1; the user's config.json is kept
    config.write_text('{"max_batch_size": 8}\n')
    assert cli(["export", str(ckpt), "--repo", str(repo), "--fp16"]) == 0
    assert json.loads(config.read_text()) == {"max_batch_size": 8}
    m2 = read_manifest(repo / "digits-ppca" / "2" / MANIFEST)
    assert m2.version == 2
    for g in m2.graphs:  # float16 variants: checked, hashed, float32 at the boundary
        half = repo / "digits-ppca" / "2" / g.fp16_file
        assert g.fp16_file == f"{g.name}.fp16.onnx" and g.fp16_sha256 == _sha256(half)
        sess = onnx_session(half)
        assert [i.type for i in sess.get_inputs()] == ["tensor(float)"] * len(g.inputs)

    # --force rewrites version 1 in place
    before = (v1 / MANIFEST).read_text()
    assert cli(["export", str(ckpt), "--repo", str(repo), "--version", "1", "--force"]) == 0
    assert sorted(p.name for p in (repo / "digits-ppca").iterdir()) == ["1", "2", "config.json"]
    after = json.loads((v1 / MANIFEST).read_text())
    assert after["provenance"]["created_at"] != json.loads(before)["provenance"]["created_at"]


def test_manifest_checksums_and_provenance(exported):
    e = exported("ppca")
    m = e.manifest
    files = sorted(p.name for p in e.version_dir.iterdir() if p.name != MANIFEST)
    assert sorted(m.provenance.file_sha256) == files
    assert all(m.provenance.file_sha256[f] == _sha256(e.version_dir / f) for f in files)
    config = json.loads(m.provenance.training_config_json)
    assert config["model"] == "ppca" and config["dataset"] == "digits" and config["epochs"] == 1
    assert m.provenance.code_revision and m.provenance.created_at.seconds > 0
    assert {"torch", "onnx", "onnxruntime"} <= set(m.provenance.tool_versions)
    assert list(m.data.shape) == [8, 8] and m.data.levels == 17 and m.data.high == 16
    assert not m.HasField("serving")  # serving settings live in config.json beside the model, one source
    serving = json.loads((e.version_dir.parent / "config.json").read_text())
    assert serving["max_batch_size"] == 512 and "instances" not in serving


def test_continuous_data_export(tiny_checkpoint, tmp_path):
    """Tabular rows: the manifest carries mean/std; log-likelihood and samples still match PyTorch."""
    from genserve.export.repository import export_checkpoint
    from genserve.server.programs import program_from_manifest
    from genserve.server.sessions import DirectRunner
    from genserve.training.checkpoint import load_checkpoint

    ckpt = tiny_checkpoint("ppca", "moons")
    vdir = export_checkpoint(ckpt, tmp_path, log=lambda s: None)
    assert vdir == tmp_path / "moons-ppca" / "1"
    m = read_manifest(vdir / MANIFEST)
    assert len(m.data.mean) == len(m.data.std) == 2 and not m.data.HasField("low")
    model, _ = load_checkpoint(ckpt)
    program = program_from_manifest(m)
    runner = DirectRunner.from_files({g.name: vdir / g.file for g in m.graphs})
    x = load_dataset("moons").test
    with torch.no_grad():
        want = model.log_prob(torch.from_numpy(x), Noise(0)).numpy()
    got = run_sync(program.log_likelihood(runner, x, Noise(0)))
    assert np.abs(got - want).max() <= LL_ATOL
    s_torch = model.sample(50, Noise(9)).numpy()
    s_ort = run_sync(program.sample(runner, 50, Noise(9))).x
    assert np.allclose(s_ort, s_torch, rtol=1e-4, atol=1e-4)


class _Affine(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.fill_(scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x)
        return y, y.sum(-1)


def test_parity_error_names_graph_batch_and_output(tmp_path):
    graph = GraphDef(_Affine(0.5), {"x": torch.randn(4, 3)}, ["y", "total"])
    exported = export_graph("affine", graph, tmp_path / "affine.onnx")
    assert exported.exporter == "dynamo" and exported.inputs[0].shape == (-1, 3)
    pool = {"x": np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)}
    ok = check_graph_parity("affine", graph, onnx_session(exported.path), {"real": pool})
    assert ok.max_abs_error < 1e-6 and len(ok.checks) == 2 * len(BATCH_SIZES)
    other = GraphDef(_Affine(0.5 + 1e-3), graph.inputs, graph.outputs)  # differs by ~1e-3 per output
    with pytest.raises(ParityError, match=r"graph 'affine' output 'y' at batch 1 \(real inputs\)"):
        check_graph_parity("affine", other, onnx_session(exported.path), {"real": pool})


class _DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export refuses it, tracing freezes one branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x * 3


def test_dynamo_failure_falls_back_to_legacy_and_parity_catches_the_frozen_branch(tmp_path):
    graph = GraphDef(_DataDependent(), {"x": torch.ones(4, 3)}, ["y"])
    exported = export_graph("branchy", graph, tmp_path / "branchy.onnx")
    assert exported.exporter == "legacy" and exported.notes[0].startswith("dynamo exporter failed")
    negative = {"x": -np.ones((64, 3), dtype=np.float32)}
    with pytest.raises(ParityError, match="graph 'branchy' output 'y' at batch 1"):
        check_graph_parity("branchy", graph, onnx_session(exported.path), {"real": negative})


def test_graph_reusing_an_input_name_as_output_is_refused(tmp_path):
    from genserve.export.onnx_export import ExportError

    graph = GraphDef(Lambda(nn.Identity(), lambda x, h: (x + h, h * 2)),
                     {"x": torch.randn(2, 3), "h": torch.randn(2, 3)}, ["y", "h"])
    with pytest.raises(ExportError, match=r"graph 'step' uses \['h'\] as both input and output"):
        export_graph("step", graph, tmp_path / "step.onnx")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli(["export", str(tmp_path / "nope.pt"), "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


def test_bad_name_refused(tiny_checkpoint, tmp_path, capsys):
    assert cli(["export", str(tiny_checkpoint("ppca")), "--repo", str(tmp_path), "--name", "../evil"]) == 2
    assert "model name" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_failed_export_leaves_no_version(tiny_checkpoint, tmp_path, monkeypatch):
    """A failing graph raises, naming it, before the version folder appears (written aside, then renamed)."""
    from genserve.export import repository
    from genserve.export.onnx_export import ExportError

    def broken(name, *args, **kwargs):
        raise ExportError(f"graph {name!r} could not be exported: injected")

    monkeypatch.setattr("genserve.export.onnx_export.export_graph", broken)
    with pytest.raises(ParityError, match="graph 'log_prob' failed with every exporter"):
        repository.export_checkpoint(tiny_checkpoint("ppca"), tmp_path, log=lambda s: None)
    assert not (tmp_path / "digits-ppca").exists()


def test_new_version_installs_only_a_finished_folder(tmp_path):
    """``new_version`` (export and the mixture build): a block that raises leaves no version and no empty model
    folder; one that ends installs its folder with the default config.json; an existing version is refused,
    then replaced under ``force`` (the old files gone, config.json kept)."""
    from genserve.export.repository import new_version

    with pytest.raises(RuntimeError, match="half way"):
        with new_version(tmp_path, "m", None, False) as (model_dir, version, stage):
            (stage / "a.onnx").write_text("x")
            raise RuntimeError("half way")
    assert not (tmp_path / "m").exists()
    with new_version(tmp_path, "m", None, False) as (model_dir, version, stage):
        assert version == 1 and not (model_dir / "1").exists()
        (stage / "a.onnx").write_text("one")
    assert (tmp_path / "m" / "1" / "a.onnx").read_text() == "one"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "max_batch_size": 7}))
    with pytest.raises(ValueError, match="already exists; pass --force"):
        with new_version(tmp_path, "m", 1, False):
            pass
    with new_version(tmp_path, "m", 1, True) as (_, _, stage):
        (stage / "b.onnx").write_text("two")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "config.json"]
    assert sorted(p.name for p in (tmp_path / "m" / "1").iterdir()) == ["b.onnx"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["max_batch_size"] == 7


def test_fp16_variant_of_a_flow_within_stated_tolerance(exported, digits_test, tmp_path):
    """float16 copies of RealNVP's graphs agree with PyTorch to 1e-2 * (1 + max|PyTorch|) on test digits."""
    from genserve.export.fp16 import FP16_RTOL, export_fp16
    from genserve.export.parity import drawn_inputs

    e = exported("realnvp")
    rng = np.random.default_rng(0)
    for name, graph in bind(e.model, e.model.family, e.model.spec).graphs.items():
        pool = drawn_inputs(graph, e.model.spec, 256, rng, digits_test.reshape(len(digits_test), -1))
        half = export_fp16(e.version_dir / f"{name}.onnx", tmp_path / f"{name}.fp16.onnx", graph, {"real": pool})
        assert half.max_rel_error <= FP16_RTOL and half.path.stat().st_size > 0
        assert half.path.stat().st_size < (e.version_dir / f"{name}.onnx").stat().st_size  # weights halved


def test_batchnorm_and_dropout_export_in_inference_mode(tmp_path):
    """A graph handed over in training mode is exported with running statistics and without dropout."""
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    with torch.no_grad():
        net(torch.randn(256, 3) * 3 + 1)  # move the running statistics away from their initial values
    graph = GraphDef(net.train(), {"x": torch.randn(4, 3)}, ["y"])
    exported = export_graph("bn", graph, tmp_path / "bn.onnx")
    assert not any(m.training for m in net.modules())
    pool = {"x": np.random.default_rng(1).standard_normal((64, 3)).astype(np.float32)}
    report = check_graph_parity("bn", graph, onnx_session(exported.path), {"real": pool})
    assert report.max_abs_error < 1e-5  # at batch 1 too: no batch statistics, no random masks
