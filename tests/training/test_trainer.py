"""The trainer: reproducible, resumable, early-stopped, and in step across torchrun ranks; the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from genserve.training.checkpoint import read_checkpoint
from genserve.training.config import build_config
from genserve.training.trainer import train

TINY = {"epochs": 3, "batch_size": 100, "max_minutes": 0.0}
MODEL = "vae"  # a single-loss family with dropout/BatchNorm-free MLPs: quick to train a few epochs


def tiny(model: str = MODEL, **extra):
    return build_config(model, overrides={**TINY, **extra})


def test_same_seed_same_weights_and_resume_equals_uninterrupted(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    train(tiny(), a, progress=False)
    train(tiny(epochs=1), b, progress=False)  # interrupted after one epoch ...
    train(tiny(), b, resume=True, progress=False)  # ... and resumed to three
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    assert [h["epoch"] for h in cb["history"]] == [1, 2, 3]
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    c = tmp_path / "c.pt"
    train(tiny(seed=1), c, progress=False)
    assert any(not torch.equal(v, read_checkpoint(c)["state_dict"][k]) for k, v in ca["state_dict"].items())


def test_checkpoint_holds_config_spec_metrics_and_best_weights(tmp_path):
    out = tmp_path / "m.pt"
    metrics = train(tiny(), out, progress=False)
    ckpt = torch.load(out, weights_only=True)  # no arbitrary unpickling
    assert ckpt["config"]["model"] == MODEL and ckpt["spec"]["levels"] == 17
    vals = [h["val"] for h in ckpt["history"]]
    assert metrics["best_val"] == pytest.approx(min(vals))
    assert ckpt["metrics"]["epochs"] == 3 and "created_at" in ckpt and "code_revision" in ckpt


def test_early_stopping_stops_when_validation_stops_improving(tmp_path):
    # A learning rate this small cannot improve the validation criterion by the required margin.
    metrics = train(tiny(epochs=30, lr=1e-9, patience=2), tmp_path / "m.pt", progress=False)
    assert metrics["epochs"] < 30 and "no better validation" in metrics["stopped"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "genserve.app.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_trains_end_to_end_and_reports_json(tmp_path):
    out = tmp_path / "m.pt"
    r = run_cli("train", MODEL, "--out", str(out), "--set", "epochs=1", "--set", "batch_size=200")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["checkpoint"] == str(out)
    assert "epoch" in r.stderr  # progress lines go to stderr


@pytest.mark.parametrize(
    "args, msg",
    [
        (["train", "pixelcnn", "--out", "x.pt"], "unknown model 'pixelcnn'"),
        (["train", "vae", "--dataset", "cifar", "--out", "x.pt"], "unknown dataset 'cifar'"),
        (["train", "vae", "--set", "lr", "--out", "x.pt"], "write KEY=VALUE"),
        (["train", "vae", "--set", "arch.wings=2", "--out", "x.pt"], "no architecture setting"),
        (["train", "vae", "--set", "model=gan", "--out", "x.pt"], "the model is the first argument"),
        (["train", "vae", "--set", "profile=full", "--out", "x.pt"], "chosen with --profile"),
    ],
)
def test_cli_bad_input_is_one_line(args, msg, tmp_path):
    r = run_cli(*args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_refuses_to_overwrite_a_checkpoint_without_force(tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"an earlier run")
    r = run_cli("train", MODEL, "--out", str(out), "--set", "epochs=1")
    assert r.returncode == 2 and "exists; pass --force" in r.stderr and out.read_bytes() == b"an earlier run"
    r = run_cli("train", MODEL, "--out", str(out), "--set", "epochs=1", "--force", "--quiet")
    assert r.returncode == 0, r.stderr
    assert read_checkpoint(out)["metrics"]


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "genserve.training.cli", MODEL, "--out", str(out), "--quiet",
           "--set", "epochs=2", "--set", "batch_size=100", "--set", "threads=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = read_checkpoint(out)["metrics"]
    assert metrics["ddp_world_size"] == 2
    assert metrics["ddp_max_weight_diff"] == 0.0
