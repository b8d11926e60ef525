"""Shared server fixtures: a tiny model repository with every registered family, and a server config for it.

``repo_dir`` holds ``digits-<model>`` for every registered family, plus ``moons-ppca`` (continuous data); a
family that fails to train or export is an error for every test that uses the repository, never a smaller
repository. Models are briefly trained (pPCA in closed form, the others a few optimisation steps): the numbers
need not be good, only real. The repository is built once and cached under .pytest_cache keyed by the
training/export source, so later runs start in a second. Tests that change a repository take ``repo_copy`` (a
private copy), never ``repo_dir`` itself.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from genserve.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
TRAIN_STEPS = 5  # a few steps move the weights off their initialisation; quality is not the point here


def available_models() -> list[str]:
    """Every registered family: each must train and export (a failure fails the suite, see build_repository)."""
    from genserve.training.registry import MODELS

    return list(MODELS)


COMMON_SOURCES = ("core/*.py", "training/base.py", "export/onnx_export.py", "export/repository.py",
                  "export/calibration.py", "server/programs/*.py")
"""Sources that shape every exported folder; with the model's own training module they key the
cache. Other edits (trainer, parity checks) keep cached folders; delete .pytest_cache/d/genserve_models to
force a rebuild (CI starts without a cache)."""


def _module_file(module: str) -> Path:
    """genserve.training.vae -> training/vae.py (the package folders are mapped into genserve.*)."""
    parts = module.split(".")[1:]
    return ROOT.joinpath(*parts[:-1], parts[-1] + ".py")


def _cache_key(model_name: str, dataset: str) -> str:
    """Changes when anything that shapes this model's exported folder changes (its own sources included)."""
    import onnx
    import onnxruntime
    import torch

    from genserve.training.registry import MODELS

    h = hashlib.sha256(f"{torch.__version__} {onnx.__version__} {onnxruntime.__version__} {dataset}".encode())
    files = {f for pattern in COMMON_SOURCES for f in ROOT.glob(pattern)}
    files.add(_module_file(MODELS[model_name].split(":")[0]))
    for f in sorted(files):
        h.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
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
    ckpt = repo / f".{name}-{version}.pt"
    save_checkpoint(ckpt, model, config=cfg.to_dict(), metrics={}, code_revision="test",
                    created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        export_checkpoint(ckpt, repo, name=name, version=version, log=lambda *a: None)
    finally:
        ckpt.unlink()


JOBS = [("ppca", "moons", "moons-ppca")]
"""Extra models besides ``digits-<model>`` for every registered family: (model, dataset, name)."""


def build_repository(repo: Path, cache: Path | None = None) -> None:
    """Export every registered family into ``repo``; raises RuntimeError naming each model that failed.

    With ``cache``, each model folder is kept there under a key of its sources and reused while they stay
    the same, so editing one family re-exports only that family.
    """
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    repo.mkdir(parents=True, exist_ok=True)
    failed = {}
    jobs = [(m, "digits", f"digits-{m}") for m in available_models()] + JOBS
    for model_name, dataset, name in jobs:
        cached = cache / f"{name}-{_cache_key(model_name, dataset)}" if cache else None
        if cached is not None and (cached / name).is_dir():
            shutil.copytree(cached / name, repo / name)
            continue
        try:
            build = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=cache)) if cache else repo
            export_model(model_name, dataset, build, name)
        except Exception as e:  # collected, so that one run names every broken family
            if cache is not None:
                shutil.rmtree(build, ignore_errors=True)
            failed[name] = f"{type(e).__name__}: {e}"
            continue
        if cached is not None:
            for old in cache.glob(f"{name}-*"):
                if old != build:
                    shutil.rmtree(old, ignore_errors=True)
            try:
                build.rename(cached)  # atomic: a concurrent pytest sees the whole folder or none
            except OSError:
                shutil.rmtree(build, ignore_errors=True)
            shutil.copytree(cached / name, repo / name)
    if failed:
        raise RuntimeError("models failed to train or export (every family must; see tests/server/conftest.py):\n"
                           + "\n".join(f"{name}: {error}" for name, error in failed.items()))


@pytest.fixture(scope="session")
def repo_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only model repository: ``digits-<model>`` per registered family and ``moons-ppca``."""
    cache = Path(request.config.cache.mkdir("genserve_models"))
    repo = tmp_path_factory.mktemp("repository")
    build_repository(repo, cache)
    return repo


@pytest.fixture(scope="session")
def repo_models(repo_dir: Path) -> list[str]:
    """Model names in ``repo_dir``, sorted."""
    return sorted(p.name for p in repo_dir.iterdir() if p.is_dir())


@pytest.fixture
def repo_copy(repo_dir: Path, tmp_path: Path) -> Path:
    """A private copy of ``repo_dir`` that a test may change (new versions, corrupt files, config.json)."""
    dst = tmp_path / "repo"
    shutil.copytree(repo_dir, dst)
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
    build_repository(Path(sys.argv[1]))
    print(f"{time.perf_counter() - t:.1f}s")
