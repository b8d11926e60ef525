"""Shared server fixtures: a tiny model repository with every family that exists, and a server config for it.

``repo_dir`` holds ``digits-<model>`` for every family whose training class and serving program import and
export, plus ``moons-ppca`` (continuous data); at least ``digits-ppca``. Models are briefly trained (pPCA in
closed form, the others a few optimisation steps): the numbers need not be good, only real. The repository is
built once and cached under .pytest_cache keyed by the training/export source, so later runs start in a
second. Tests that change a repository take ``repo_copy`` (a private copy), never ``repo_dir`` itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import time
import warnings
from pathlib import Path

import pytest
from genserve.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
TRAIN_STEPS = 5  # a few steps move the weights off their initialisation; quality is not the point here


def available_models() -> list[str]:
    """Families whose training class and serving program both exist (the others are still being written)."""
    from genserve.server.programs import PROGRAMS
    from genserve.training.registry import MODELS

    out = []
    for name in MODELS:
        mod_train, mod_prog = MODELS[name].split(":")[0], PROGRAMS.get(name, ":").split(":")[0]
        if mod_prog and importlib.util.find_spec(mod_train) and importlib.util.find_spec(mod_prog):
            out.append(name)
    return out


def _source_key() -> str:
    import onnx
    import onnxruntime
    import torch

    h = hashlib.sha256(f"{torch.__version__} {onnx.__version__} {onnxruntime.__version__}".encode())
    for folder in ("core", "training", "export", "server/programs"):
        for f in sorted((ROOT / folder).glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def _train(model_name: str, dataset: str, seed: int = 0):
    """A briefly trained model and its config (pPCA: its closed form)."""
    import torch
    from genserve.training.config import build_config
    from genserve.training.data import load_dataset
    from genserve.training.trainer import build_model

    torch.set_num_threads(1)
    cfg = build_config(model_name, dataset, "quick", overrides={"seed": seed, "epochs": 1})
    data = load_dataset(dataset, seed=seed)
    torch.manual_seed(seed)
    model = build_model(cfg, data.spec)
    x = torch.as_tensor(data.train)
    if model.closed_form:
        model.fit_closed_form(x)
    else:
        optimizers = model.make_optimizers(cfg.lr, cfg.weight_decay)
        model.train()
        for step in range(TRAIN_STEPS):
            model.training_step(x[step * 64:(step + 1) * 64], optimizers, cfg.grad_clip)
    return model.eval(), cfg


def export_model(model_name: str, dataset: str, repo: Path, name: str, version: int = 1,
                 seed: int = 0) -> None:
    """Train briefly and export ``model_name`` on ``dataset`` as ``repo/name/version``."""
    from genserve.export.repository import export_checkpoint
    from genserve.training.checkpoint import save_checkpoint

    model, cfg = _train(model_name, dataset, seed)
    ckpt = repo.parent / f"{name}-{version}.pt"
    save_checkpoint(ckpt, model, config=cfg.to_dict(), metrics={}, code_revision="test",
                    created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    export_checkpoint(ckpt, repo, name=name, version=version, log=lambda *a: None)
    ckpt.unlink()


def build_repository(repo: Path) -> dict[str, str]:
    """Export every available family into ``repo``; returns {model name: error} for those that failed."""
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    repo.mkdir(parents=True, exist_ok=True)
    failed = {}
    jobs = [(m, "digits", f"digits-{m}") for m in available_models()] + [("ppca", "moons", "moons-ppca")]
    for model_name, dataset, name in jobs:
        try:
            export_model(model_name, dataset, repo, name)
        except Exception as e:  # a family still being written must not take the other fixtures down
            if model_name == "ppca":
                raise
            shutil.rmtree(repo / name, ignore_errors=True)
            failed[model_name] = f"{type(e).__name__}: {str(e)[:300]}"
    return failed


@pytest.fixture(scope="session")
def repo_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only model repository: ``digits-<model>`` per available family and ``moons-ppca``."""
    key = _source_key()
    cache = Path(request.config.cache.mkdir("genserve_repo"))
    target = cache / key
    if not target.exists():
        for old in cache.iterdir():  # one cached repository at a time
            shutil.rmtree(old, ignore_errors=True)
        tmp = tmp_path_factory.mktemp("build") / "repo"
        failed = build_repository(tmp)
        (tmp / "FAILED.txt").write_text("".join(f"{k}: {v}\n" for k, v in failed.items()))
        try:
            tmp.rename(target)
        except OSError:  # another pytest process on another filesystem or a concurrent build
            if not target.exists():
                shutil.copytree(tmp, target)
    return target


@pytest.fixture(scope="session")
def repo_models(repo_dir: Path) -> list[str]:
    """Model names in ``repo_dir``, sorted."""
    return sorted(p.name for p in repo_dir.iterdir() if p.is_dir())


@pytest.fixture
def repo_copy(repo_dir: Path, tmp_path: Path) -> Path:
    """A private copy of ``repo_dir`` that a test may change (new versions, corrupt files, config.json)."""
    dst = tmp_path / "repo"
    shutil.copytree(repo_dir, dst, ignore=shutil.ignore_patterns("FAILED.txt"))
    return dst


@pytest.fixture
def engine_config(repo_dir: Path) -> ServerConfig:
    """Settings for in-process tests: loopback, free ports, CPU, 2 ms batching window, 64-row batches."""
    return ServerConfig(repo=repo_dir, host="127.0.0.1", port=0, metrics_port=0, provider="cpu",
                        intra_op_threads=1, inter_op_threads=1, max_batch_size=64, max_queue_delay_ms=2.0,
                        max_queue_size=4096, workers=2, grace_s=5.0)


if __name__ == "__main__":  # build a repository by hand: python tests/server/conftest.py OUT
    import sys

    t = time.perf_counter()
    print(build_repository(Path(sys.argv[1])), f"{time.perf_counter() - t:.1f}s")
