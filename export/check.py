"""`genserve repo check DIR`: validate a model repository, one line per model saying OK or what is wrong.

Per version it checks what the server relies on: the manifest parses (the folders, not the manifest, name the
model and version), the data spec and operations are valid, a serving program exists for the model, every
graph file (and fp16 variant) exists with the manifest's sha256, loads and passes onnx.checker, and declares
exactly the inputs and outputs (names, dtypes, shapes) the manifest lists; every file listed in the provenance
has its sha256.
Needs onnx (and onnxruntime, when installed, to open each graph as the server would); never torch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genserve.core.manifest import (
    MANIFEST,
    OPERATION_NAME,
    SERVING_CONFIG,
    read_manifest,
    read_serving_config,
)
from genserve.core.manifest import spec_from_proto as _spec_from_proto

VERSION_RE = re.compile(r"^[1-9][0-9]*$")


@dataclass
class ModelReport:
    """The verdict on one model folder: its good versions, operations, and the problems found."""

    name: str
    versions: list[int] = field(default_factory=list)
    operations: dict[int, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.ok:
            latest = max(self.versions)
            vs = ", ".join(map(str, self.versions))
            return (f"{self.name}: OK  versions {vs} (default {latest}); "
                    f"operations {', '.join(self.operations[latest])}")
        return f"{self.name}: BROKEN  {'; '.join(self.problems)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensors(values) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, numpy dtype name, shape with -1 for symbolic dims) of ONNX value infos (no torch needed)."""
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "undefined"
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        out.append((v.name, dtype, dims))
    return out


def _declared(specs) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, t.dtype, tuple(t.shape)) for t in specs]


def _check_onnx(path: Path, graph, where: str, fp16: bool = False) -> list[str]:
    """Problems of one ONNX file against its GraphSpec (empty when it is fine)."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # DecodeError, ValidationError, ...: the file is not a usable graph
        first = str(e).splitlines()[0][:120] if str(e) else ""
        return [f"{where} does not load as ONNX ({type(e).__name__}: {first})"]
    problems = []
    for kind, got, want in (("inputs", model.graph.input, graph.inputs), ("outputs", model.graph.output,
                                                                           graph.outputs)):
        g, w = _tensors(got), _declared(want)
        if g != w:
            problems.append(f"{where} {kind} {_fmt(g)} disagree with the manifest's {_fmt(w)}")
    if not fp16 and not problems:
        problems += _check_session(path, where)
    return problems


def _check_session(path: Path, where: str) -> list[str]:
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        return []
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unloadable graphs
        return [f"{where} does not load in ONNX Runtime ({str(e).splitlines()[0][:120]})"]
    return []


def _fmt(ts: list[tuple[str, str, tuple[int, ...]]]) -> str:
    return "[" + ", ".join(f"{n}:{d}{list(s)}" for n, d, s in ts) + "]"


def check_version(model_dir: Path, version: int) -> tuple[list[str], list[str]]:
    """(problems, operations) of MODEL/VERSION; problems are prefixed with ``v{version}``."""
    vdir = model_dir / str(version)
    tag = f"v{version}"
    try:
        m = read_manifest(vdir / MANIFEST)
    except ValueError as e:
        if not (vdir / MANIFEST).exists():
            return [f"{tag}: {MANIFEST} is missing"], []
        return [f"{tag}: {str(e).replace(str(vdir / MANIFEST) + ': ', '')}"], []
    problems = []
    # The folders decide a version's name and number (a copied version folder serves under its new number, as
    # in Triton's repository), so a manifest that names another is no problem.
    try:
        _spec_from_proto(m.data)
    except (ValueError, TypeError) as e:
        problems.append(f"{tag}: data spec is invalid ({e})")
    ops = [OPERATION_NAME.get(o, f"unknown({o})") for o in m.operations]
    if not ops:
        problems.append(f"{tag}: manifest lists no operations")
    if any(o.startswith("unknown") for o in ops):
        problems.append(f"{tag}: unknown operations {ops}")
    problems += _check_program(m.family, m.model, ops, tag)
    problems += _check_composite(m, tag)
    problems += _check_calibration(m, tag)
    if not m.graphs:
        problems.append(f"{tag}: manifest lists no graphs")
    for g in m.graphs:
        for file, digest, fp16 in ((g.file, g.sha256, False), (g.fp16_file, g.fp16_sha256, True)):
            if fp16 and not file:
                continue
            where = f"{tag}: graph {g.name!r} ({file})"
            path = vdir / file
            if not file or not path.is_file():
                problems.append(f"{where} is missing")
                continue
            actual = _sha256(path)
            if actual != digest:
                problems.append(f"{where} sha256 mismatch: manifest {digest[:12]}..., file {actual[:12]}...")
                continue
            problems += _check_onnx(path, g, where, fp16)
    for rel, digest in sorted(m.provenance.file_sha256.items()):
        path = vdir / rel
        if not path.is_file():
            problems.append(f"{tag}: {rel} listed in provenance is missing")
        elif _sha256(path) != digest and not any(rel in (g.file, g.fp16_file) for g in m.graphs):
            problems.append(f"{tag}: {rel} sha256 mismatch with provenance")
    return problems, ops


def _check_calibration(m, tag: str) -> list[str]:
    """Score kinds and calibration entries the server can use: every calibrated score is log_prob or a listed
    kind; probabilities increase from 0 to 1; quantiles are finite, as many, and do not decrease."""
    kinds = {k.name for k in m.score_kinds}
    problems = []
    for c in m.calibration:
        where = f"{tag}: calibration of {c.score!r}"
        p, q = np.asarray(c.probabilities, dtype=float), np.asarray(c.quantiles, dtype=float)
        if c.score != "log_prob" and c.score not in kinds:
            problems.append(f"{where} names no score kind of the manifest ({', '.join(sorted(kinds)) or 'none'})")
        if len(p) < 2 or len(p) != len(q):
            problems.append(f"{where} has {len(p)} probabilities and {len(q)} quantiles; it needs as many, >= 2")
            continue
        if p[0] != 0 or p[-1] != 1 or (np.diff(p) <= 0).any():
            problems.append(f"{where}: probabilities must increase from 0 to 1")
        if not np.isfinite(q).all() or (np.diff(q) < 0).any():
            problems.append(f"{where}: quantiles must be finite and non-decreasing")
    if m.score_kinds and "log_prob" not in {c.score for c in m.calibration} and m.calibration:
        problems.append(f"{tag}: calibration lacks log_prob")
    return problems


def _check_composite(m, tag: str) -> list[str]:
    """A mixture's members as the server reads them (prefixes, graphs, likelihoods, weights > 0 summing to 1):
    its program is built from the manifest here, so a bad member fails the check, not the load."""
    from genserve.server.programs import COMPOSITES, program_from_manifest

    if m.family not in COMPOSITES:
        return []
    try:
        program_from_manifest(m)
    except ValueError as e:
        return [f"{tag}: {str(e).splitlines()[0]}"]
    return []


def _check_program(family: str, model: str, ops: list[str], tag: str) -> list[str]:
    """The server must have a program for the model's family, supporting every listed operation."""
    try:
        from genserve.server.programs import program_class

        cls = program_class(family, model)
    except (ValueError, ModuleNotFoundError, AttributeError) as e:
        return [f"{tag}: no serving program for family {family!r} ({str(e).splitlines()[0]})"]
    missing = [o for o in ops if o in OPERATION_NAME.values() and o not in cls.operations]
    return [f"{tag}: serving program {cls.__name__} lacks operations {missing}"] if missing else []


def check_model(model_dir: str | Path) -> ModelReport:
    """Check every version folder of one model, and its config.json."""
    model_dir = Path(model_dir)
    report = ModelReport(model_dir.name)
    entries = sorted(p for p in model_dir.iterdir() if not p.name.startswith("."))
    for p in entries:
        if p.is_dir() and not VERSION_RE.match(p.name):
            report.problems.append(f"folder {p.name!r} is not a whole-number version")
    try:
        read_serving_config(model_dir / SERVING_CONFIG)
    except ValueError as e:
        report.problems.append(str(e).replace(str(model_dir) + "/", ""))
    found = sorted(int(p.name) for p in entries if p.is_dir() and VERSION_RE.match(p.name))
    if not found:
        report.problems.append("no version folders (expected NAME/1/manifest.json, ...)")
    for v in found:
        problems, ops = check_version(model_dir, v)
        report.problems += problems
        if not problems:
            report.versions.append(v)
            report.operations[v] = ops
    return report


def check_repository(repo: str | Path) -> list[ModelReport]:
    """Reports for every model folder of ``repo``, by name; ValueError when ``repo`` is not a folder."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ValueError(f"model repository {repo} does not exist or is not a folder")
    models = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        raise ValueError(f"model repository {repo} holds no models; export one with `genserve export`")
    return [check_model(p) for p in models]
