"""Write a checkpoint into the model repository: REPO/NAME/N/ with checked ONNX graphs and a manifest.

    export_checkpoint("runs/vae.pt", "models")  ->  models/digits-vae/1/{encoder,decoder}.onnx, manifest.json
                                                    models/digits-vae/config.json (serving defaults if absent)

Every graph is exported (dynamo, legacy fallback), checked with onnx.checker, and compared with PyTorch at
batch 1, 7 and 64 (export/parity.py); then the family's serving program runs every operation over ONNX
Runtime and must reproduce the PyTorch model (log-likelihood within 1e-3 nats, the same samples). Any
failure raises before the version folder appears: the version is written to a hidden folder and renamed
into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from genserve.core.manifest import (
    FORMAT_VERSION,
    LIKELIHOOD,
    MANIFEST,
    OPERATION,
    SERVING_CONFIG,
    spec_to_proto,
)
from genserve.v1 import manifest_pb2 as pb

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[1-9][0-9]*$")
DEFAULT_SERVING = {"max_batch_size": 512, "max_queue_delay_ms": 2.0, "max_queue_size": 4096}  # instances: the server's
CHECK_ROWS = 64  # test rows for the operation checks at export time


def versions(model_dir: str | Path) -> list[int]:
    """Whole-number version folders of one model, ascending; [] when the model does not exist."""
    d = Path(model_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and VERSION_RE.match(p.name))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_name(model: Any) -> str:
    """``<dataset>-<model>``, e.g. ``digits-vae``; user-file stems are reduced to safe characters."""
    return f"{name_stem(model.spec.name)}-{model.name}"


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    try:
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        out["genserve"] = version("genserve")
    except Exception:  # not installed as a distribution (running from a source tree)
        pass
    return out


def numeric_metrics(ckpt: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, float]:
    """Finite test-set numbers of the checkpoint's evaluation results and ``extra``, by key (the manifest's
    test_metrics: held-out numbers only, never training ones under that name).

    Evaluation results (``genserve evaluate --json``) may sit in ``ckpt["evaluation"]`` or under
    ``ckpt["metrics"]["test"]`` / ``["evaluation"]``; their keys (``nll_nats``, ``bits_per_dim``, ...) are
    kept unprefixed. Other nested dicts are flattened as ``outer.inner``; booleans and strings are dropped. The
    training numbers of ``ckpt["metrics"]`` (losses, best validation) stay in the checkpoint.
    """
    out: dict[str, float] = {}

    def add(d: Any, prefix: str = "") -> None:
        if not isinstance(d, dict):
            return
        for k, v in d.items():
            if isinstance(v, dict):
                add(v, "" if k in EVALUATION_KEYS else f"{prefix}{k}.")
            elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[f"{prefix}{k}"] = float(v)

    training = ckpt.get("metrics")
    if isinstance(training, dict):
        for key in EVALUATION_KEYS:
            add(training.get(key))
    add(ckpt.get("evaluation"))
    add(extra)
    return out


EVALUATION_KEYS = ("test", "evaluation", "eval")


def _test_rows(ckpt: dict[str, Any], spec: Any) -> np.ndarray | None:
    """Test rows of the training data set, or None when it cannot be loaded here (a moved user file)."""
    from genserve.training.data import load_dataset

    cfg = ckpt.get("config") or {}
    try:
        data = load_dataset(cfg.get("dataset", spec.name), seed=int(cfg.get("seed", 0)),
                            levels=int(cfg.get("levels", 0)))
    except (ValueError, OSError):
        return None
    if tuple(data.spec.shape) != tuple(spec.shape):
        return None
    return np.asarray(data.test, dtype=np.float32)


def serving_program(bound: Any) -> Any:
    """The family's serving program over the bound model's parameters and graph signatures."""
    from genserve.server.programs import GraphSignature, program_class

    sigs = {name: GraphSignature({k: (-1, *v.shape[1:]) for k, v in g.inputs.items()}, tuple(g.outputs))
            for name, g in bound.graphs.items()}
    cls = program_class(bound.family.name)
    return cls(bound.spec, {k: float(v) for k, v in bound.parameters.items()}, sigs)


def _tensor_specs(infos: list[Any]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in infos]


def export_checkpoint(checkpoint: str | Path, repo: str | Path, name: str | None = None,
                      version: int | None = None, fp16: bool = False, force: bool = False,
                      metrics: dict[str, Any] | None = None, log: Any = print,
                      report: dict[str, Any] | None = None, calibration: str | Path | bool | None = None) -> Path:
    """Export a ``genserve train`` checkpoint to ``repo``/NAME/VERSION and return that folder.

    The model goes through ``export_model`` like any user module, with its test split for the checks and its
    own PyTorch operations as the reference for the served ones. NAME defaults to ``<dataset>-<model>``.
    ``calibration``: None calibrates the scores on the validation split of the checkpoint's data set (score
    kinds fitted on its training split; export/calibration.py); a file path on that file's rows; False not at
    all.
    """
    from genserve.training.checkpoint import load_checkpoint

    try:
        model, ckpt = load_checkpoint(checkpoint)
    except RuntimeError as e:  # load_state_dict: weights written by an older or newer version of the model code
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"{checkpoint} does not fit the current model code ({detail}); retrain it or check out "
                         "the code it was trained with") from None
    from genserve.export.calibration import builtin_data, file_data

    if calibration is None:
        cal = builtin_data(ckpt, model.spec)
        if cal is None:
            log("  no calibration: the checkpoint's data set cannot be loaded here; give in-distribution rows "
                "with --calibration FILE for percentiles")
    elif calibration is False:
        cal = None
    else:
        cal = file_data(calibration, model.spec)
    return export_model(model, model.family, model.spec, repo, name=name or default_name(model), version=version,
                        data=_test_rows(ckpt, model.spec), fp16=fp16, force=force, metrics=metrics, log=log,
                        report=report, reference=model, checkpoint=ckpt, source=str(checkpoint), calibration=cal)


def export_model(module: Any, family: str, spec: Any, repo: str | Path, name: str | None = None,
                 version: int | None = None, *, data: np.ndarray | None = None, model_name: str | None = None,
                 fp16: bool = False, force: bool = False, metrics: dict[str, Any] | None = None, log: Any = print,
                 report: dict[str, Any] | None = None, reference: Any = None, checkpoint: dict[str, Any] | None = None,
                 source: str = "", calibration: Any = None) -> Path:
    """Export any ``nn.Module`` that meets ``family``'s contract to ``repo``/NAME/VERSION; returns that folder.

    ``spec`` is the DataSpec (or its dict) of one example; ``data`` real rows (N, *shape) for the contract
    checks and the parity checks (random valid rows when None). The module is checked against its family
    contract (export/contract.py), every graph is exported (dynamo, legacy fallback), checked with
    onnx.checker and compared with PyTorch at batch 1, 7 and 64 (export/parity.py); then the family's serving
    program runs every operation over ONNX Runtime and must reproduce ``reference`` (a model with PyTorch
    operations, the built-ins) or, for a user's module, the same program over the PyTorch graphs. Any failure
    raises ValueError (ContractError, ExportError, ParityError) before anything is written: the version is
    built in a hidden folder and renamed into place when complete. ``version`` defaults to the highest + 1;
    an existing version is refused unless ``force``. ``fp16`` adds float16 graphs (export/fp16.py).
    ``calibration`` (export.calibration.CalibrationData): held-out in-distribution rows to fit the score kinds
    and measure every score's quantiles on, through the program over the exported graphs; None: none (the
    model then serves no score kinds and no percentiles).
    """
    from genserve.core.manifest import write_manifest
    from genserve.core.spec import DataSpec
    from genserve.export.contract import bind, example_data
    from genserve.export.parity import ParityError, check_operations, record_program_feeds
    from genserve.export.torch_runner import ProgramModel, TorchRunner
    from genserve.server.sessions import DirectRunner

    start = time.perf_counter()
    report = report if report is not None else {}
    report["graphs"] = {}
    spec = spec if isinstance(spec, DataSpec) else DataSpec.from_dict(dict(spec))
    rows = _checked_rows(data, spec)
    real_data = rows is not None
    if rows is None:
        rows = example_data(spec, CHECK_ROWS, seed=0).numpy()
    bound = bind(module, family, spec, name=model_name, rows=rows)
    target = name or f"{name_stem(spec.name)}-{bound.name}"
    with new_version(Path(repo), target, version, force) as (model_dir, version, tmp):
        final = model_dir / str(version)
        log(f"exporting {bound.name} ({family}) {('from ' + source + ' ') if source else ''}to {final}")
        program = serving_program(bound)
        torch_run = TorchRunner(bound.graphs)
        latent = bound.parameters.get("latent_dim")
        recorded, errors = record_program_feeds(program, torch_run, rows[:CHECK_ROWS], tuple(bound.operations),
                                                int(latent) if latent else None)
        if errors:
            raise ParityError(f"the {family} serving program fails over the PyTorch graphs of {bound.name}: "
                              f"{errors[0]}")

        graph_specs = []
        for gname, g in bound.graphs.items():
            test_rows = rows if real_data else None
            spec_pb, report["graphs"][gname] = _export_checked(gname, g, tmp, spec, test_rows, recorded.pool(gname),
                                                               fp16, log)
            graph_specs.append(spec_pb)

        files = {s.name: tmp / s.file for s in graph_specs}
        ref = reference if reference is not None else ProgramModel(program, TorchRunner(bound.graphs), bound)
        onnx_run = DirectRunner.from_files(files)
        ops = check_operations(ref, program, onnx_run, rows[:CHECK_ROWS])
        report["operations"] = ops
        against = "PyTorch" if reference is not None else "the same program over the PyTorch graphs"
        log(f"  operations over ONNX Runtime vs {against}: {ops.summary()}")

        exporters = {g: r["exporter"] for g, r in report["graphs"].items()}
        manifest = _manifest(bound, checkpoint or {}, model_dir.name, version, graph_specs, exporters, metrics)
        if calibration is not None:
            from genserve.export.calibration import calibrate

            cal = calibrate(program, onnx_run, spec, bound.likelihood_kind, calibration, tuple(bound.operations))
            cal.apply(manifest)
            report["calibration"] = {"scores": [e.score for e in cal.entries], "seconds": cal.seconds,
                                     "rows": cal.entries[0].rows if cal.entries else 0}
            log(f"  calibration: {cal.summary()}")
        for p in sorted(tmp.iterdir()):
            manifest.provenance.file_sha256[p.name] = sha256_file(p)
        write_manifest(manifest, tmp / MANIFEST)

    report["seconds"] = time.perf_counter() - start
    log(f"wrote {final} ({len(graph_specs)} graphs; operations {', '.join(bound.operations)}) "
        f"in {report['seconds']:.1f} s")
    return final


def name_stem(name: str) -> str:
    """``name`` (a dataset's) made fit for a model name: runs of other characters become '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "data"


def _checked_rows(data: Any, spec: Any) -> np.ndarray | None:
    """``data`` as float32 rows (N, *spec.shape), checked against the spec; ValueError naming the problem."""
    if data is None:
        return None
    rows = np.asarray(data, dtype=np.float32)
    if rows.ndim == 2 and rows.shape[1] == spec.dim and tuple(spec.shape) != (spec.dim,):
        rows = rows.reshape(len(rows), *spec.shape)
    spec.check(rows, "export data")
    return rows


def _target(repo: Path, name: str, version: int | None, force: bool) -> tuple[Path, int]:
    """The model folder and version to write; ValueError for a bad name or an existing version without force."""
    if not NAME_RE.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' and '-', starting "
                         "with a letter or digit")
    model_dir = repo / name
    existing = versions(model_dir)
    version = int(version) if version is not None else (max(existing) + 1 if existing else 1)
    if version < 1:
        raise ValueError(f"version must be a whole number >= 1, got {version}")
    if (model_dir / str(version)).exists() and not force:
        raise ValueError(f"{model_dir / str(version)} already exists; pass --force to overwrite it or --version "
                         f"{max(existing + [version]) + 1} for a new version")
    return model_dir, version


@contextmanager
def new_version(repo: Path, name: str, version: int | None, force: bool) -> Iterator[tuple[Path, int, Path]]:
    """Build a model version in a hidden folder beside its place: yields (model folder, version, that folder).

    ``version`` None is the highest + 1; an existing version is refused unless ``force`` (ValueError, before
    anything is written). When the block ends without an error the folder is renamed into place (an old
    version, with ``force``, swapped out, then removed) and the model gets the default config.json if it has
    none; when it raises, nothing is left behind, not even an empty model folder, and no server sees a half-
    written version.
    """
    model_dir, version = _target(repo, name, version, force)
    model_dir.mkdir(parents=True, exist_ok=True)
    stage = model_dir / f".{version}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield model_dir, version, stage
        final = model_dir / str(version)
        if final.exists():
            old = model_dir / f".{version}.old-{os.getpid()}"
            final.rename(old)
            stage.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if model_dir.exists() and not any(model_dir.iterdir()):  # a failed first export leaves no empty folder
            model_dir.rmdir()
    config = model_dir / SERVING_CONFIG
    if not config.exists():
        config.write_text(json.dumps(DEFAULT_SERVING, indent=2) + "\n")


def _export_checked(gname: str, g: Any, folder: Path, spec: Any, test_rows: np.ndarray | None,
                    recorded: dict[str, np.ndarray] | None, fp16: bool, log: Any) -> tuple[pb.GraphSpec, dict]:
    """Export one graph with the first exporter whose file passes the checks and parity; its GraphSpec."""
    from genserve.export.onnx_export import export_graph, exporter_order, set_inference_mode
    from genserve.export.parity import ParityError, check_graph_parity, graph_input_sets, onnx_session

    t0 = time.perf_counter()
    set_inference_mode(g.module)
    input_sets, source = graph_input_sets(gname, g, spec, test_rows, recorded)
    order, why_order = exporter_order(g.module)
    failures = []
    for exporter in order:
        try:
            exported = export_graph(gname, g, folder / f"{gname}.onnx", exporters=(exporter,))
            parity = check_graph_parity(gname, g, onnx_session(exported.path), input_sets)
            break
        except ValueError as e:  # ExportError or ParityError: the next exporter may do better
            failures.append(f"{exporter}: {e}")
    else:
        raise ParityError(f"graph {gname!r} failed with every exporter: " + " | ".join(failures))
    note = f" ({order[0]} failed: {failures[0]})" if failures else (f" ({why_order})" if why_order else "")
    log(f"  {gname}: opset {exported.opset}, {exported.exporter} exporter, parity max|ORT-PyTorch| "
        f"{parity.max_abs_error:.2g} at batch 1/7/64 on {source} and random inputs, "
        f"{time.perf_counter() - t0:.1f} s{note}")
    graph = pb.GraphSpec(name=gname, file=exported.path.name, inputs=_tensor_specs(exported.inputs),
                         outputs=_tensor_specs(exported.outputs), opset=exported.opset,
                         sha256=sha256_file(exported.path))
    rec = {"exporter": exported.exporter, "opset": exported.opset, "parity_max_abs": parity.max_abs_error,
           "parity_checks": parity.checks, "real_inputs": source, "fallback": failures}
    if fp16:
        from genserve.export.fp16 import export_fp16

        half = export_fp16(exported.path, folder / f"{gname}.fp16.onnx", g, input_sets)
        graph.fp16_file, graph.fp16_sha256 = half.path.name, sha256_file(half.path)
        rec["fp16_rel_error"] = half.max_rel_error
        kept = f"; kept in float32: {', '.join(half.float32_ops)}" if half.float32_ops else ""
        log(f"  {gname} fp16: max|fp16-PyTorch|/(1+max|PyTorch|) {half.max_rel_error:.2g} "
            f"(tolerance {half.tolerance:g}){kept}")
    rec["seconds"] = time.perf_counter() - t0
    return graph, rec


def _manifest(model: Any, ckpt: dict[str, Any], name: str, version: int, graphs: list[pb.GraphSpec],
              exporters: dict[str, str], metrics: dict[str, Any] | None) -> pb.ModelManifest:
    """The manifest of a bound model (export.contract.Bound)."""
    from genserve.training.trainer import code_revision

    caps = model.capabilities
    m = pb.ModelManifest(
        format_version=FORMAT_VERSION, name=name, version=version, family=model.family.name, model=model.name,
        description=_description(model, ckpt), data=spec_to_proto(model.spec), graphs=graphs,
        capabilities=pb.Capabilities(training_stability=caps.training,
                                     likelihood=LIKELIHOOD[model.likelihood_kind],
                                     sampling_speed=caps.sampling, compression=caps.compression,
                                     representation=bool(caps.representation)),
        operations=[OPERATION[op] for op in model.operations],
    )
    for k, v in model.program_parameters().items():
        m.parameters[k] = float(v)
    for k, v in numeric_metrics(ckpt, metrics).items():
        m.test_metrics[k] = v
    prov = m.provenance
    prov.training_config_json = json.dumps(ckpt.get("config", {}), sort_keys=True)
    prov.code_revision = str(ckpt.get("code_revision") or code_revision())
    prov.created_at.GetCurrentTime()
    tools = tool_versions()
    tools["exporter"] = ", ".join(f"{g}: torch.onnx {e}" for g, e in exporters.items())
    tools["export_code_revision"] = code_revision()
    prov.tool_versions.update(tools)
    return m


def _description(model: Any, ckpt: dict[str, Any]) -> str:
    cfg = ckpt.get("config") or {}
    trained = ckpt.get("created_at", "")
    parts = [f"{model.name} ({model.capabilities.group}) on {model.spec.name}"]
    if cfg:
        parts.append(f"profile {cfg.get('profile', '?')}")
    if model.arch:
        parts.append(", ".join(f"{k}={v}" for k, v in sorted(model.arch.items())))
    if trained:
        parts.append(f"trained {trained}")
    return "; ".join(parts)
