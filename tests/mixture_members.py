"""A small mixture for the tests: two briefly trained arrnn (seeds 0 and 1) and a pPCA on digits.

Each member is exported alone (``digits-member<k>``) and the three as one mixture (``digits-mix``, built with the
`genserve mixture` command), so tests can compare the mixture's answers with its members' own served ones. The
folder is built once and cached under .pytest_cache, keyed by the sources that shape it (like the server
tests' repository, tests/server/conftest.py); later runs copy it in a second.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = [("arrnn", 0), ("arrnn", 1), ("ppca", 0)]
"""(model, seed): two of one family (weights near even) and a pPCA (a lower bound, with a draws option)."""
TRAIN_STEPS = 5
MIXTURE = "digits-mix"
SOURCES = ("core/*.py", "server/programs/*.py", "export/*.py", "training/base.py", "training/checkpoint.py",
           "training/autoregressive.py", "training/arrnn.py", "training/ppca.py", "tests/mixture_members.py")


def member_name(k: int) -> str:
    return f"digits-member{k}"


def _key() -> str:
    import onnx
    import onnxruntime
    import torch

    h = hashlib.sha256(f"{torch.__version__} {onnx.__version__} {onnxruntime.__version__}".encode())
    for f in sorted({f for pattern in SOURCES for f in ROOT.glob(pattern)}):
        h.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def checkpoint(model_name: str, seed: int, path: Path, steps: int = TRAIN_STEPS, dataset: str = "digits") -> Path:
    """A ``genserve train``-style checkpoint of ``model_name`` after ``steps`` optimisation steps (pPCA: its
    closed form; 0 steps: untrained)."""
    import torch

    from genserve.training.checkpoint import save_checkpoint
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
    elif steps:
        optimizers = model.make_optimizers(cfg.lr, cfg.weight_decay)
        model.train()
        for step in range(steps):
            model.training_step(x[step * 64:(step + 1) * 64], optimizers, cfg.grad_clip)
    save_checkpoint(path, model.eval(), config=cfg.to_dict(), metrics={}, code_revision="test",
                    created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return path


def build(out: Path) -> None:
    """out/checkpoints/*.pt, out/repo/digits-member<k>/1 and out/repo/digits-mix/1, out/report.json."""
    from genserve.app.cli import main
    from genserve.export.repository import export_checkpoint

    (out / "checkpoints").mkdir(parents=True)
    ckpts = [checkpoint(m, s, out / "checkpoints" / f"{m}-{s}.pt") for m, s in MEMBERS]
    for k, c in enumerate(ckpts):
        export_checkpoint(c, out / "repo", name=member_name(k), log=lambda *a: None)
    code = main(["mixture", *map(str, ckpts), "--repo", str(out / "repo"), "--name", MIXTURE, "--min-weight", "0",
                 "--json", str(out / "report.json")])
    if code != 0:
        raise RuntimeError(f"genserve mixture exited with {code}")


def cached(cache: Path, dst: Path) -> Path:
    """The built folder copied to ``dst`` (built into ``cache`` first when its key changed); returns ``dst``."""
    folder = cache / f"mixture-{_key()}"
    if not (folder / "report.json").is_file():
        build_dir = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            build(build_dir)
            for old in cache.glob("mixture-*"):
                shutil.rmtree(old, ignore_errors=True)
            build_dir.rename(folder)  # atomic: a concurrent run sees the whole folder or none
        except OSError:
            pass
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    shutil.copytree(folder, dst)
    return dst


def report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())
