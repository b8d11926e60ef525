"""Training plugins: a user's model class, registered by entry point or named by --factory, is trained, resumed,
evaluated, exported and served through the genserve command line like a built-in.

The plugin (tests/training/plugin_fixture, a tiny affine-coupling flow) is installed with a real ``pip install``
into a temporary folder that the commands get on PYTHONPATH: importlib.metadata finds its entry point exactly as
in site-packages, and the shared environment is never changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from genserve.training.checkpoint import load_checkpoint, read_checkpoint
from genserve.training.registry import ENTRY_POINT_GROUP, model_class, model_names

FIXTURE = Path(__file__).parent / "plugin_fixture"
QUICK = ["--dataset", "moons", "--quiet", "--set", "threads=1"]


def pip_install(source: Path, target: Path) -> Path:
    """``pip install`` a package folder into ``target`` (not site-packages); returns ``target``."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--no-index", "--target", str(target), str(source)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return target


def write_package(root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """A package folder as a user writes one: pyproject.toml with genserve.models entry points, and modules."""
    pkg = name.replace("-", "_")
    (root / pkg).mkdir(parents=True)
    (root / pkg / "__init__.py").write_text("")
    for module, text in modules.items():
        (root / pkg / f"{module}.py").write_text(textwrap.dedent(text))
    eps = "\n".join(f'{k} = "{v}"' for k, v in entry_points.items())
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=69"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "0.1.0"

        [project.entry-points."{ENTRY_POINT_GROUP}"]
        """) + eps + f'\n\n[tool.setuptools]\npackages = ["{pkg}"]\n')
    return root


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """A folder holding the installed tinyflow plugin (genserve-tinyplugin) and its dist-info."""
    src = tmp_path_factory.mktemp("src") / "plugin"
    shutil.copytree(FIXTURE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = pip_install(src, tmp_path_factory.mktemp("site"))
    assert (site / "genserve_tinyplugin-0.1.0.dist-info" / "entry_points.txt").exists()
    return site


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory) -> Path:
    """Installed plugins that must be refused: one whose module does not import, one named like a built-in."""
    src = write_package(tmp_path_factory.mktemp("src") / "bad", "genserve-badplugins",
                        {"brokenflow": "genserve_badplugins.broken:Flow", "vae": "genserve_badplugins.shadow:VAE"},
                        {"broken": "import genserve_no_such_dependency\n", "shadow": "VAE = None\n"})
    return pip_install(src, tmp_path_factory.mktemp("badsite"))


@pytest.fixture
def on_path(monkeypatch):
    """``on_path(folder)`` puts an installed folder on sys.path for this test; its modules are unloaded after."""
    before = set(sys.modules)

    def add(folder: Path) -> None:
        monkeypatch.syspath_prepend(str(folder))

    yield add
    for name in set(sys.modules) - before:
        if name.startswith(("genserve_tinyplugin", "genserve_badplugins", "my_models")):
            del sys.modules[name]


def genserve(*args: str, path: list[Path] = (), check: bool = True,
             torchrun: bool = False) -> subprocess.CompletedProcess:
    """Run the genserve command line in a fresh interpreter with ``path`` folders on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    if path:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in path)
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "genserve.training.cli", *args[1:]]
    else:
        cmd = [sys.executable, "-m", "genserve.app.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert r.returncode == 0, f"{' '.join(args)}:\n{r.stderr[-3000:]}"
    return r


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ---- an entry-point plugin, end to end --------------------------------------------------------------
def test_plugin_trains_resumes_evaluates_exports_and_serves(plugin_site, tmp_path, on_path):
    ckpt, repo = tmp_path / "tiny.pt", tmp_path / "repo"
    out = last_json(genserve("train", "tinyflow", *QUICK, "--set", "epochs=2", "--out", str(ckpt),
                             path=[plugin_site]).stdout)
    assert out["epochs"] == 2 and np.isfinite(out["best_val"])
    saved = read_checkpoint(ckpt)
    assert saved["model"] == "tinyflow"
    assert saved["origin"] == {"entry_point": "tinyflow", "value": "genserve_tinyplugin.model:TinyFlow"}

    # resume: the run continues from its last epoch with its optimizer state
    out = last_json(genserve("train", "tinyflow", *QUICK, "--set", "epochs=3", "--resume", "--out", str(ckpt),
                             path=[plugin_site]).stdout)
    assert out["epochs"] == 3
    assert [h["epoch"] for h in read_checkpoint(ckpt)["history"]] == [1, 2, 3]

    ev = last_json(genserve("evaluate", str(ckpt), "--json", "--samples", "200", "--out-dir", str(tmp_path),
                            path=[plugin_site]).stdout)
    assert ev["model"] == "tinyflow" and ev["likelihood_kind"] == "exact"
    assert np.isfinite(ev["nll_nats"]) and np.isfinite(ev["frechet_distance"])

    genserve("export", str(ckpt), "--repo", str(repo), "--name", "tiny", path=[plugin_site])
    manifest = json.loads((repo / "tiny" / "1" / "manifest.json").read_text())
    assert manifest["family"].lower().endswith("flow")

    # The server runs the graphs only: no plugin on its path. The PyTorch model is the reference.
    on_path(plugin_site)
    model, _ = load_checkpoint(ckpt)
    assert type(model).__module__ == "genserve_tinyplugin.model"
    from genserve.core.noise import Noise
    from genserve.training.data import load_dataset

    x = load_dataset("moons").test[:50]
    with torch.no_grad():
        want_ll = model.log_prob(torch.from_numpy(x), Noise(0)).numpy()
        want_x = model.sample(16, Noise(7)).numpy()
        want_z = model.encode(torch.from_numpy(x)).numpy()
    with served(repo) as client:
        ll = client.log_likelihood("tiny", x, seed=0)
        np.testing.assert_allclose(ll.log_prob, want_ll, atol=1e-4)
        assert ll.kind == "exact"
        np.testing.assert_allclose(client.sample("tiny", 16, seed=7), want_x, atol=1e-4)
        z = client.encode("tiny", x)
        np.testing.assert_allclose(z, want_z, atol=1e-4)
        np.testing.assert_allclose(client.decode("tiny", z), x, atol=1e-3)


class served:
    """A genserve server over ``repo`` on a free loopback port, with a client: ``with served(repo) as client``."""

    def __init__(self, repo: Path) -> None:
        from genserve.server.app import BackgroundServer
        from genserve.server.config import ServerConfig

        cfg = ServerConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=0, provider="cpu", intra_op_threads=1,
                           inter_op_threads=1, max_batch_size=64, max_queue_delay_ms=2.0, max_queue_size=4096,
                           workers=2, grace_s=2.0)
        self.server = BackgroundServer(cfg)

    def __enter__(self):
        from genserve.clients.client import Client

        srv = self.server.__enter__()
        self.client = Client(f"127.0.0.1:{srv.port}")
        return self.client.__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            self.client.__exit__(*exc)
        finally:
            self.server.__exit__(*exc)


def test_plugin_trains_under_torchrun_with_ranks_in_step(plugin_site, tmp_path):
    """The plugin's forward is not its loss: the trainer calls loss through DDP, and ranks stay in step."""
    ckpt = tmp_path / "ddp.pt"
    genserve("train", "tinyflow", *QUICK, "--set", "epochs=2", "--out", str(ckpt), path=[plugin_site],
             torchrun=True)
    metrics = read_checkpoint(ckpt)["metrics"]
    assert metrics["ddp_world_size"] == 2
    assert metrics["ddp_max_weight_diff"] == 0.0


def test_registry_lists_plugins_after_the_builtins_and_imports_them_lazily(plugin_site, on_path):
    on_path(plugin_site)
    names = model_names()
    assert names[:7] == ["arcnn", "arrnn", "realnvp", "ppca", "vae", "gan", "ebm"] and "tinyflow" in names[7:]
    assert "genserve_tinyplugin.model" not in sys.modules  # listing imports nothing
    cls = model_class("tinyflow")
    assert cls.__name__ == "TinyFlow" and cls.family == "flow"
    with pytest.raises(ValueError, match=r"unknown model 'nope'; choose one of: arcnn, .*ebm; plugins: .*tinyflow"):
        model_class("nope")


# ---- --factory ----------------------------------------------------------------------------------------
def test_factory_from_pythonpath_trains_and_its_checkpoint_is_rebuilt(tmp_path, on_path):
    """``--factory my_models:build`` (a function returning the class) from a module on PYTHONPATH; the
    checkpoint names the class and is rebuilt where the module imports, refused clearly where it does not."""
    code = tmp_path / "code"
    code.mkdir()
    source = (FIXTURE / "genserve_tinyplugin" / "model.py").read_text()
    (code / "my_models.py").write_text(source + "\n\ndef build():\n    return TinyFlow\n")
    ckpt = tmp_path / "f.pt"
    out = last_json(genserve("train", "--factory", "my_models:build", *QUICK, "--set", "epochs=1",
                             "--out", str(ckpt), path=[code]).stdout)
    assert out["epochs"] == 1
    saved = read_checkpoint(ckpt)
    assert saved["origin"] == {"factory": "my_models:TinyFlow"}
    assert saved["config"]["factory"] == "my_models:build" and saved["config"]["model"] == "tinyflow"

    ev = last_json(genserve("evaluate", str(ckpt), "--json", "--samples", "100", "--out-dir", str(tmp_path),
                            path=[code]).stdout)
    assert np.isfinite(ev["nll_nats"])

    r = genserve("evaluate", str(ckpt), "--json", check=False)  # the module is not importable here
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "module 'my_models' does not import" in r.stderr and "PYTHONPATH" in r.stderr

    on_path(code)
    model, _ = load_checkpoint(ckpt)
    assert type(model).__module__ == "my_models"


# ---- errors, each one line ------------------------------------------------------------------------
def run_cli(capsys, *args: str) -> tuple[int, str]:
    from genserve.app.cli import main

    code = main(["train", *args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(("args", "message"), [
    (["--factory", "no_colon_here"], "write package.module:Class"),
    (["--factory", "genserve_no_such_module:Model"], "module 'genserve_no_such_module' does not import"),
    (["--factory", "genserve.training.vae:NoSuchClass"], "has no attribute 'NoSuchClass'"),
    (["--factory", "genserve.core.spec:DataSpec"], "not a subclass of genserve.training.base.GenerativeModel"),
    (["--factory", "genserve.training.base:GenerativeModel"], "lacks or has invalid class attributes"),
    (["vae", "--factory", "genserve.training.vae:VAE"], "not both"),
    ([], "name a model"),
])
def test_bad_factory_or_model_is_one_line(capsys, tmp_path, args, message):
    code, err = run_cli(capsys, *args, "--out", str(tmp_path / "x.pt"))
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.pt").exists()


def test_factory_class_without_its_pytorch_operations_is_refused_before_training(capsys, tmp_path, on_path):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""\
        from genserve.training.base import GenerativeModel
        from genserve_tinyplugin_source import TinyFlow


        class OnlyContract(TinyFlow):
            log_prob = GenerativeModel.log_prob
            encode = GenerativeModel.encode
        """))
    shutil.copy(FIXTURE / "genserve_tinyplugin" / "model.py", tmp_path / "genserve_tinyplugin_source.py")
    on_path(tmp_path)
    code, err = run_cli(capsys, "--factory", "my_models:OnlyContract", "--dataset", "moons",
                        "--out", str(tmp_path / "x.pt"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "does not implement log_prob (for log_likelihood), encode (for encode)" in err
    assert not (tmp_path / "x.pt").exists()


def test_plugin_that_does_not_import_is_named_with_its_error(bad_site, capsys, tmp_path, on_path):
    on_path(bad_site)
    code, err = run_cli(capsys, "brokenflow", "--out", str(tmp_path / "x.pt"))
    warning, error = err.strip().splitlines()  # the same site holds a refused plugin named "vae"
    assert code == 2 and "Traceback" not in err and warning.startswith("genserve: warning:"), err
    err = error
    assert "model plugin 'brokenflow' could not be imported" in err
    assert "'brokenflow = genserve_badplugins.broken:Flow'" in err and "genserve-badplugins 0.1.0" in err
    assert "ModuleNotFoundError: No module named 'genserve_no_such_dependency'" in err


def test_plugin_named_like_a_builtin_is_refused(bad_site, capsys, tmp_path, on_path):
    on_path(bad_site)
    from genserve.training.vae import VAE

    assert model_class("vae") is VAE and "vae" not in model_names()[7:]
    code, err = run_cli(capsys, "vae", "--set", "no_such_setting=1", "--out", str(tmp_path / "x.pt"))
    assert code == 2
    assert "genserve: warning: entry point 'vae = genserve_badplugins.shadow:VAE'" in err
    assert "is refused: 'vae' is a built-in model" in err


def test_checkpoint_of_a_plugin_that_is_not_installed_is_refused_clearly(plugin_site, tmp_path, on_path):
    on_path(plugin_site)
    from genserve.core.spec import DataSpec
    from genserve.training.checkpoint import save_checkpoint

    spec = DataSpec.from_dict(load_dataset_spec())
    save_checkpoint(tmp_path / "p.pt", model_class("tinyflow")(spec))
    sys.path.remove(str(plugin_site))
    with pytest.raises(ValueError, match="model plugin 'tinyflow' .* which is not installed: no entry point"):
        load_checkpoint(tmp_path / "p.pt")


def load_dataset_spec() -> dict:
    from genserve.training.data import load_dataset

    return load_dataset("moons").spec.to_dict()


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    """Loading stays weights-only: a checkpoint carrying a pickled object is refused before any code runs."""
    path = tmp_path / "evil.pt"
    torch.save({"format": "genserve-checkpoint/1", "model": "tinyflow",
                "origin": {"entry_point": "tinyflow"}, "payload": Path("anything")}, path)
    with pytest.raises(ValueError, match="is not a readable genserve checkpoint"):
        load_checkpoint(path)
