"""One export graph to one ONNX file: dynamo exporter (legacy fallback), full checker, dynamic batch axis.

Exporter: ``torch.onnx.export(dynamo=True)`` first; the legacy TorchScript exporter (``dynamo=False`` with
``dynamic_axes``) where dynamo fails, and first for graphs with recurrent layers (see ``exporter_order``).
Which exporter wrote each graph, and why, is printed and recorded in the manifest's tool versions.

Opset: graphs are written for ONNX opset ``OPSET`` = 18 of the default domain (ONNX Runtime >= 1.14 runs it;
the issue asks for 17 or newer). The opset actually stored in the file is read back and recorded in the
manifest, so a graph the exporter could not convert to 18 is still described truthfully.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from genserve.training.base import GraphDef

OPSET = 18
EXPORTERS = ("dynamo", "legacy")


class ExportError(ValueError):
    """A graph that could not be exported, named with the exporters' reasons."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output as the ONNX file declares it; ``shape`` has -1 for dynamic axes."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class ExportedGraph:
    """What ``export_graph`` wrote: the file, how (exporter, opset) and its declared inputs and outputs."""

    name: str
    path: Path
    exporter: str
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    seconds: float
    notes: list[str] = field(default_factory=list)
    """Why an exporter was not used (e.g. the dynamo exporter's error before the legacy fallback)."""


def exporter_order(module: nn.Module) -> tuple[tuple[str, ...], str]:
    """Exporters to try for a graph, best first, and why when the order is not the default.

    Dynamo first, except for graphs holding recurrent layers (nn.GRU / nn.LSTM / nn.RNN): torch.export
    decomposes them into one cell per time step (64 cells for digits: 30x the export time, a graph 64x
    larger), while the TorchScript exporter keeps them as one ONNX GRU/LSTM/RNN operator.
    """
    if any(isinstance(m, nn.RNNBase) for m in module.modules()):
        return ("legacy", "dynamo"), "recurrent layer kept as one ONNX RNN operator by the legacy exporter"
    return EXPORTERS, ""


def tensor_infos(values: list[onnx.ValueInfoProto]) -> list[TensorInfo]:
    """Name, numpy dtype name and shape (-1 for symbolic dimensions) of ONNX value infos."""
    out = []
    for v in values:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "undefined"
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        out.append(TensorInfo(v.name, dtype, dims))
    return out


def model_opset(model: onnx.ModelProto) -> int:
    """Opset of the default ONNX domain in ``model``."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def set_inference_mode(module: nn.Module) -> None:
    """BatchNorm uses running statistics and dropout is off in every exported graph."""
    module.eval()
    still = [n for n, m in module.named_modules() if m.training]
    if still:  # eval() recurses, so this only trips on modules that override train()
        raise ExportError(f"submodules {still} stay in training mode after eval(); export needs eval mode")


def _dynamic_shapes(module: nn.Module, names: list[str]) -> dict[str, object]:
    """torch.export dynamic_shapes keyed by forward's parameter names: axis 0 of every input is ``batch``.

    A ``forward(*args)`` (``Lambda``) takes one tuple of per-input specs under the varargs' name.
    """
    batch = torch.export.Dim("batch")
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind not in (p.VAR_KEYWORD, p.KEYWORD_ONLY)]
    spec: dict[str, object] = {}
    remaining = list(names)
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            spec[p.name] = tuple({0: batch} for _ in remaining)
            remaining = []
            break
        if not remaining:
            break
        spec[p.name] = {0: batch}
        remaining.pop(0)
    if remaining:
        raise ExportError(f"forward{inspect.signature(module.forward)} takes fewer inputs than {names}")
    return spec


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' chatter (progress prints, deprecation warnings, torchvision notices)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                                  "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


_REGISTRIES: dict[Any, Any] = {}


@contextlib.contextmanager
def _reuse_registry():
    """Build the dynamo exporter's op registry once per process and opset, not once per graph.

    torch 2.13 rebuilds it for every export, re-reading the source of ~500 onnxscript functions (6 of the
    12 s one small graph took here). Nothing is registered into it (no custom translations), so reusing it
    changes nothing in the output; if torch's internals move, exports simply run uncached.
    """
    try:
        from torch.onnx._internal.exporter import _registration

        cls = _registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def cached(_cls: Any, *args: Any, **kwargs: Any) -> Any:
        key = (_cls, args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = original.__func__(_cls, *args, **kwargs)
        return _REGISTRIES[key]

    cls.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        cls.from_torchlib = original


def _run_exporter(exporter: str, graph: GraphDef, path: Path, opset: int) -> None:
    names, outputs = list(graph.inputs), list(graph.outputs)
    args = tuple(graph.inputs.values())
    with _quiet(), _reuse_registry():
        if exporter == "dynamo":
            torch.onnx.export(graph.module, args, str(path), input_names=names, output_names=outputs,
                              dynamic_shapes=_dynamic_shapes(graph.module, names), dynamo=True,
                              external_data=False, opset_version=opset, verbose=False)
        else:
            axes = {n: {0: "batch"} for n in names + outputs}
            torch.onnx.export(graph.module, args, str(path), input_names=names, output_names=outputs,
                              dynamic_axes=axes, dynamo=False, opset_version=opset, do_constant_folding=True)


def _validate(graph: GraphDef, model: onnx.ModelProto) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Full ONNX check, input/output names as declared, batch axis dynamic on every input and output."""
    onnx.checker.check_model(model, full_check=True)
    ins, outs = tensor_infos(list(model.graph.input)), tensor_infos(list(model.graph.output))
    if [i.name for i in ins] != list(graph.inputs):
        raise ExportError(f"ONNX inputs {[i.name for i in ins]} differ from the graph's {list(graph.inputs)}")
    if [o.name for o in outs] != list(graph.outputs):
        raise ExportError(f"ONNX outputs {[o.name for o in outs]} differ from the graph's {graph.outputs}")
    fixed = [t.name for t in ins + outs if not t.shape or t.shape[0] != -1]
    if fixed:
        raise ExportError(f"batch axis is not dynamic for {fixed}")
    return ins, outs


def export_graph(name: str, graph: GraphDef, path: str | Path, opset: int = OPSET,
                 exporters: tuple[str, ...] = EXPORTERS) -> ExportedGraph:
    """Write ``graph`` to ``path`` with the first exporter that succeeds and passes the checks.

    The dynamo exporter (``torch.export``) is tried first; where it fails (data-dependent control flow, an
    unsupported op, a checker error) the legacy TorchScript exporter with ``dynamic_axes`` is tried and the
    reason is kept in ``notes``. Raises ExportError naming the graph and every exporter's error.
    """
    path = Path(path)
    set_inference_mode(graph.module)
    shared = sorted(set(graph.inputs) & set(graph.outputs))
    if shared:  # ONNX graphs are in SSA form: a value name is produced once, so no output may echo an input
        raise ExportError(f"graph {name!r} uses {shared} as both input and output names; ONNX needs distinct "
                          f"names, e.g. {shared[0]!r} in and {shared[0] + '_next'!r} out")
    notes: list[str] = []
    for exporter in exporters:
        if exporter not in EXPORTERS:
            raise ValueError(f"unknown exporter {exporter!r}; use {EXPORTERS}")
        start = time.perf_counter()
        path.unlink(missing_ok=True)
        try:
            _run_exporter(exporter, graph, path, opset)
            model = onnx.load(str(path))
            ins, outs = _validate(graph, model)
        except Exception as e:  # any exporter failure: try the next one, then report all
            notes.append(f"{exporter} exporter failed: {_first_line(e)}")
            continue
        return ExportedGraph(name, path, exporter, model_opset(model), ins, outs,
                             time.perf_counter() - start, notes)
    path.unlink(missing_ok=True)
    raise ExportError(f"graph {name!r} could not be exported: {'; '.join(notes)}")


def _first_line(e: BaseException) -> str:
    """A one-line reason: the exception type and the most telling line of its message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    summary = next((ln for ln in lines if "Error" in ln or "error" in ln), lines[0] if lines else "")
    return f"{type(e).__name__}: {summary[:300]}"
