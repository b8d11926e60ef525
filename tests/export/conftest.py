"""Session fixtures for the export tests: tiny models of every family, trained once and exported once.

Each family is trained for one epoch with a small architecture (one thread), then exported with
``export_checkpoint`` into a session repository; tests share the results. Every family of the registry must
train and export: a failure is an error in every test that asks for that family (the first attempt's exception,
re-raised without exporting again), never a skip or an xfail, so a broken family cannot drop out of the suite.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from genserve.training.registry import MODELS

# Small architectures so that one epoch plus export stays within seconds per family. Keys a family's
# constructor does not take are dropped (families still landing may name their arguments differently).
TINY: dict[str, dict[str, Any]] = {
    "arcnn": {"channels": 16, "layers": 2, "dropout": 0.1},
    "arrnn": {"hidden": 32, "embed": 16, "dropout": 0.1},
    "realnvp": {"coupling_layers": 4, "hidden": 32, "dropout": 0.1},
    "ppca": {"latent_dim": 8},
    "vae": {"latent_dim": 4, "hidden": 32, "importance_samples": 64, "dropout": 0.1},
    "gan": {"latent_dim": 8, "hidden": 32},
    "ebm": {"hidden": 32},
}


def tiny_overrides(name: str, dataset: str = "digits") -> dict[str, Any]:
    """One epoch, one thread; on digits also the TINY architecture (tabular profiles are small already)."""
    from genserve.training.registry import model_class

    if dataset != "digits":
        return {"epochs": 1, "threads": 1, "seed": 0}
    params = inspect.signature(model_class(name).__init__).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    arch = {k: v for k, v in TINY.get(name, {}).items() if takes_any or k in params}
    return {"epochs": 1, "threads": 1, "seed": 0, **{f"arch.{k}": v for k, v in arch.items()}}


@dataclass
class Exported:
    """One family's tiny model, its checkpoint and its exported version folder."""

    name: str
    checkpoint: Path
    version_dir: Path
    model: Any
    manifest: Any
    report: dict[str, Any]
    log: list[str] = field(default_factory=list)

    def runner(self) -> Any:
        from genserve.server.sessions import DirectRunner

        return DirectRunner.from_files({g.name: self.version_dir / g.file for g in self.manifest.graphs})

    def program(self) -> Any:
        """The serving program built from the manifest alone, as the server builds it."""
        from genserve.server.programs import program_from_manifest

        m = self.manifest
        return program_from_manifest(m)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """``get(name, dataset="digits") -> Path``: a one-epoch checkpoint, trained once per session."""
    from genserve.training.config import build_config
    from genserve.training.trainer import train

    root = tmp_path_factory.mktemp("checkpoints")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, dataset: str = "digits") -> Path:
        if (name, dataset) not in cache:
            threads = torch.get_num_threads()
            out = root / f"{dataset}-{name}.pt"
            try:
                cfg = build_config(name, dataset, "quick", overrides=tiny_overrides(name, dataset))
                train(cfg, out, progress=False)
            finally:
                torch.set_num_threads(threads)
            cache[(name, dataset)] = out
        return cache[(name, dataset)]

    return get


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """``get(name) -> Exported``: the family's tiny digits model exported once into a session repository.

    An export that failed is re-raised for every test of that family without exporting again.
    """
    from genserve.core.manifest import MANIFEST, read_manifest
    from genserve.export.repository import export_checkpoint
    from genserve.training.checkpoint import load_checkpoint

    repo = tmp_path_factory.mktemp("repo")
    cache: dict[str, Exported | BaseException] = {}

    def get(name: str) -> Exported:
        if name not in MODELS:
            raise KeyError(f"{name!r} is not a registered family; the registry has {sorted(MODELS)}")
        if name not in cache:
            try:
                ckpt = tiny_checkpoint(name)
                log: list[str] = []
                report: dict[str, Any] = {}
                vdir = export_checkpoint(ckpt, repo, log=log.append, report=report)
                model, _ = load_checkpoint(ckpt)
                cache[name] = Exported(name, ckpt, vdir, model, read_manifest(vdir / MANIFEST), report, log)
            except Exception as e:  # kept so that every test of the family reports the same export failure
                cache[name] = e
        result = cache[name]
        if isinstance(result, BaseException):
            raise result
        return result

    return get
