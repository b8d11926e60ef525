"""`genserve mixture` (export/mixture.py): EM weights, member checks, and the entry it writes.

The built mixture comes from tests/mixture_members.py (two briefly trained arrnn and a pPCA on digits); the
serving side is tested in tests/server/test_mixture.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixture_members  # noqa: E402

from genserve.app.cli import main  # noqa: E402
from genserve.core.manifest import LIKELIHOOD_NAME, read_manifest  # noqa: E402
from genserve.export.mixture import fit_weights, load_members, mixture_nll  # noqa: E402


@pytest.fixture(scope="session")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = Path(request.config.cache.mkdir("genserve_mixture"))
    return mixture_members.cached(cache, tmp_path_factory.mktemp("mixture") / "built")


def test_em_recovers_the_weights_of_a_known_mixture() -> None:
    """Rows drawn from 0.3 p_0 + 0.7 p_1 (two known categorical densities): EM finds weights near (0.3, 0.7),
    and no other weight on a grid scores the rows better."""
    rng = np.random.default_rng(0)
    p = np.array([[0.6, 0.3, 0.05, 0.05], [0.05, 0.15, 0.4, 0.4]])
    member = rng.random(20000) < 0.7
    x = np.array([rng.choice(4, p=p[int(m)]) for m in member])
    scores = np.log(p[:, x])
    w = fit_weights(scores)
    assert w.shape == (2,) and abs(w.sum() - 1) < 1e-12
    assert abs(w[1] - 0.7) < 0.03
    best = mixture_nll(w, scores)
    for a in np.linspace(0.01, 0.99, 99):
        assert best <= mixture_nll(np.array([a, 1 - a]), scores) + 1e-9


def test_the_mixture_entry_lists_its_members_and_scores_no_worse_than_they(built: Path) -> None:
    report = mixture_members.report(built)
    m = read_manifest(built / "repo" / mixture_members.MIXTURE / "1" / "manifest.json")
    assert m.family == "mixture" and [mm.prefix for mm in m.members] == ["m0", "m1", "m2"]
    assert [mm.model for mm in m.members] == [name for name, _ in mixture_members.MEMBERS]
    weights = np.array([mm.weight for mm in m.members])
    assert (weights > 0).all() and abs(weights.sum() - 1) < 1e-9
    assert np.allclose(weights, report["weights"])
    # the weakest member's kind: the arrnn are exact, the pPCA on integer images is a lower bound
    assert [LIKELIHOOD_NAME[mm.likelihood] for mm in m.members] == ["exact", "exact", "lower_bound"]
    assert LIKELIHOOD_NAME[m.capabilities.likelihood] == "lower_bound"
    assert {g.name.split("/")[0] for g in m.graphs} == {"m0", "m1", "m2"}
    assert {g.name for g in m.graphs if g.name.startswith("m0/")} == {"m0/logits", "m0/step"}
    for g in m.graphs:
        assert (built / "repo" / mixture_members.MIXTURE / "1" / g.file).is_file()
    # EM maximises the validation likelihood over the weights, and each member alone is one choice of them
    members = report["members"]
    assert report["validation_nll_nats"] <= min(mm["validation_nll_nats"] for mm in members) + 1e-9
    assert m.test_metrics["nll_nats"] == pytest.approx(report["test_nll_nats"])
    assert m.test_metrics["m2.nll_nats"] == pytest.approx(members[2]["test_nll_nats"])


def test_repo_check_accepts_the_mixture(built: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["repo", "check", str(built / "repo")]) == 0
    out = capsys.readouterr().out
    assert f"{mixture_members.MIXTURE}: OK" in out and "operations sample, log_likelihood" in out


def test_repo_check_refuses_a_mixture_the_server_could_not_load(built: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    import json
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(built / "repo" / mixture_members.MIXTURE, repo / mixture_members.MIXTURE)
    path = repo / mixture_members.MIXTURE / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["members"][0]["weight"] = 0.9 + float(manifest["members"][0]["weight"])  # no longer sums to 1
    path.write_text(json.dumps(manifest))
    assert main(["repo", "check", str(repo)]) != 0
    assert "mixture weights must be > 0 and sum to 1" in capsys.readouterr().out


def test_members_without_a_likelihood_or_on_other_data_are_refused(built: Path, tmp_path: Path) -> None:
    arrnn = built / "checkpoints" / "arrnn-0.pt"
    gan = mixture_members.checkpoint("gan", 0, tmp_path / "gan.pt", steps=0)
    with pytest.raises(ValueError, match="likelihood is none; a mixture needs members with exact or lower-bound"):
        load_members([arrnn, gan])
    moons = mixture_members.checkpoint("ppca", 0, tmp_path / "moons.pt", dataset="moons")
    with pytest.raises(ValueError, match="must share one data spec"):
        load_members([arrnn, moons])


def test_the_command_refuses_bad_input_in_one_line(built: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    arrnn = str(built / "checkpoints" / "arrnn-0.pt")
    assert main(["mixture", arrnn, "--repo", str(tmp_path), "--min-weight", "1.5"]) == 2
    assert "min_weight must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert main(["mixture", arrnn, "--repo", str(built / "repo"), "--name", mixture_members.MIXTURE,
                 "--version", "1"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in (built / "repo" / mixture_members.MIXTURE).iterdir())
