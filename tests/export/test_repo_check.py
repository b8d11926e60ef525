"""`genserve repo check`: every kind of damage is reported in one line per model, and exit code 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genserve.app.cli import main as cli
from genserve.core.manifest import MANIFEST
from genserve.export.check import check_repository


@pytest.fixture
def repo(exported, tmp_path) -> Path:
    """A copy of the session's exported pPCA as REPO/digits-ppca/{1,2}, free to damage."""
    e = exported("ppca")
    root = tmp_path / "repo"
    shutil.copytree(e.version_dir.parent, root / "digits-ppca")
    src = root / "digits-ppca" / e.version_dir.name
    if src.name != "1":
        src.rename(root / "digits-ppca" / "1")
    second = root / "digits-ppca" / "2"
    shutil.copytree(root / "digits-ppca" / "1", second)
    manifest = json.loads((second / MANIFEST).read_text())
    manifest["version"] = "2"
    (second / MANIFEST).write_text(json.dumps(manifest))
    return root


def _check(repo: Path, capsys) -> tuple[int, list[str]]:
    code = cli(["repo", "check", str(repo)])
    return code, capsys.readouterr().out.strip().splitlines()


def _manifest(repo: Path, v: int = 2) -> tuple[Path, dict]:
    path = repo / "digits-ppca" / str(v) / MANIFEST
    return path, json.loads(path.read_text())


def test_valid_repository_lists_versions_and_operations(repo, capsys):
    code, lines = _check(repo, capsys)
    assert code == 0
    assert lines == ["digits-ppca: OK  versions 1, 2 (default 2); "
                     "operations sample, log_likelihood, encode, decode"]


def test_missing_graph(repo, capsys):
    (repo / "digits-ppca" / "2" / "encoder.onnx").unlink()
    code, lines = _check(repo, capsys)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("digits-ppca: BROKEN")
    assert "v2: graph 'encoder' (encoder.onnx) is missing" in lines[0]


def test_checksum_mismatch(repo, capsys):
    with open(repo / "digits-ppca" / "2" / "generator.onnx", "ab") as f:
        f.write(b"\0")
    code, lines = _check(repo, capsys)
    assert code == 1 and "v2: graph 'generator' (generator.onnx) sha256 mismatch" in lines[0]


def test_manifest_that_does_not_parse(repo, capsys):
    (repo / "digits-ppca" / "1" / MANIFEST).write_text('{"format_version": 1, "graphs": [')
    code, lines = _check(repo, capsys)
    assert code == 1 and "v1: manifest does not parse" in lines[0]


def test_manifest_with_unknown_key(repo, capsys):
    path, m = _manifest(repo)
    m["colour"] = "blue"
    path.write_text(json.dumps(m))
    code, lines = _check(repo, capsys)
    assert code == 1 and "v2: manifest does not parse" in lines[0] and "colour" in lines[0]


def test_onnx_file_that_does_not_load(repo, capsys):
    """Garbage whose checksum was updated too: the file itself is reported, not the checksum."""
    import hashlib

    bad = b"not an onnx model"
    (repo / "digits-ppca" / "2" / "encoder.onnx").write_bytes(bad)
    path, m = _manifest(repo)
    digest = hashlib.sha256(bad).hexdigest()
    next(g for g in m["graphs"] if g["name"] == "encoder")["sha256"] = digest
    m["provenance"]["file_sha256"]["encoder.onnx"] = digest
    path.write_text(json.dumps(m))
    code, lines = _check(repo, capsys)
    assert code == 1 and "v2: graph 'encoder' (encoder.onnx) does not load as ONNX" in lines[0]


def test_inputs_disagreeing_with_manifest(repo, capsys):
    path, m = _manifest(repo)
    g = next(g for g in m["graphs"] if g["name"] == "generator")
    g["inputs"][0]["name"] = "latent"
    g["outputs"][0]["shape"] = [-1, 64]
    path.write_text(json.dumps(m))
    code, lines = _check(repo, capsys)
    assert code == 1
    assert "v2: graph 'generator' (generator.onnx) inputs [z:float32[-1, 8], eps:float32[-1, 64]] disagree " \
           "with the manifest's [latent:float32[-1, 8], eps:float32[-1, 64]]" in lines[0]
    assert "outputs [x:float32[-1, 8, 8]] disagree" in lines[0]


def test_the_folders_decide_name_and_version_and_other_folders_are_refused(repo, capsys):
    path, m = _manifest(repo)
    m["version"], m["name"] = "7", "other"  # a copied folder: its manifest still names where it came from
    path.write_text(json.dumps(m))
    code, lines = _check(repo, capsys)
    assert code == 0 and "other" not in lines[0] and "version 7" not in lines[0]
    (repo / "digits-ppca" / "latest").mkdir()
    code, lines = _check(repo, capsys)
    assert code == 1 and "folder 'latest' is not a whole-number version" in lines[0]


def test_unknown_family_and_bad_serving_config(repo, capsys):
    path, m = _manifest(repo)
    m["family"] = "diffusion"
    path.write_text(json.dumps(m))
    (repo / "digits-ppca" / "config.json").write_text('{"max_batch_size": "many"}')
    code, lines = _check(repo, capsys)
    assert code == 1
    assert "v2: no serving program for family 'diffusion'" in lines[0]
    assert "config.json: serving config does not parse" in lines[0]


def test_one_line_per_model_broken_beside_ok(repo, capsys):
    shutil.copytree(repo / "digits-ppca", repo / "digits-ppca-copy")
    for v in ("1", "2"):
        path = repo / "digits-ppca-copy" / v / MANIFEST
        m = json.loads(path.read_text())
        m["name"] = "digits-ppca-copy"
        path.write_text(json.dumps(m))
    (repo / "digits-ppca" / "1" / "log_prob.onnx").unlink()
    code, lines = _check(repo, capsys)
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith("digits-ppca: BROKEN  v1: graph 'log_prob' (log_prob.onnx) is missing")
    assert lines[1].startswith("digits-ppca-copy: OK  versions 1, 2")


def test_not_a_repository(tmp_path, capsys):
    assert cli(["repo", "check", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no models"):
        check_repository(tmp_path)


def test_check_needs_no_torch(repo):
    """The check runs where only onnx and onnxruntime are installed (torch blocked from importing)."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from genserve.export.check import check_repository\n"
            f"r = check_repository({str(repo)!r}); print(r[0].line()); sys.exit(0 if r[0].ok else 1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("digits-ppca: OK")
