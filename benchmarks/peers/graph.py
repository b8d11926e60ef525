"""The graph a peer serves for ``<model>.<operation>``: genserve's own graph file and the feeds genserve gives it.

A peer has no family program, so each benchmarked operation is one graph call whose extra inputs are
constants: a flow's ``encode`` runs ``forward`` with ``u`` = 1/2 for discrete data (the centre of the cell, as
server/programs/flow.py feeds it) and answers ``z``. Operations that need more than one call, or noise, are
refused with a message (``sample``, ``log_likelihood`` with dequantisation draws, ...).

The graph is written as genserve loads it: through ``row_independent_model`` (server/graph_rewrite.py), which
leaves every digits graph byte for byte as exported, so all servers run the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from genserve.core.manifest import read_manifest

GRAPHS = {
    ("flow", "encode"): ("forward", "x", "z"),
    ("flow", "decode"): ("inverse", "z", "x"),
    ("ppca", "encode"): ("encoder", "x", "z"),
    ("vae", "decode"): ("decoder", "z", None),
}
"""(family, operation) -> (graph, request input, answered output; None: every output of the graph)."""


@dataclass(frozen=True)
class PeerGraph:
    """What every server runs for one OIP model, written as JSON for the peers' runtimes (runtimes/ort_graph.py)."""

    model: str
    operation: str
    graph: str
    """Path of the .onnx file the peers load."""
    input: str
    row_shape: list[int]
    """Shape of one row of the input (the request is [rows, *row_shape] FP32)."""
    outputs: list[str]
    output_row_shapes: dict[str, list[int]]
    """Shape of one row of each output; -1 marks an axis the graph leaves open."""
    constants: dict[str, tuple[float, list[int]]]
    """Inputs filled with a constant: name -> (value, shape of one row)."""

    @property
    def oip_name(self) -> str:
        return f"{self.model}.{self.operation}"

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path


def triton_model_config(graph: PeerGraph, max_batch_size: int) -> bytes:
    """A serialised ``ModelConfigResponse`` (Triton's ModelConfig RPC) describing ``graph`` with a batch axis: what
    Triton's perf_analyzer reads before it sends a request. A peer without that RPC answers these bytes."""
    from genserve.oip import grpc_service_pb2 as pb
    from genserve.oip import model_config_pb2 as mc

    config = mc.ModelConfig(name=graph.oip_name, platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    config.input.add(name=graph.input, data_type=mc.TYPE_FP32, dims=graph.row_shape)
    for name in graph.outputs:
        config.output.add(name=name, data_type=mc.TYPE_FP32, dims=graph.output_row_shapes[name])
    return pb.ModelConfigResponse(config=config).SerializeToString()


def model_version_dir(repo: Path, model: str) -> Path:
    """The highest numeric version folder of ``model`` in ``repo``."""
    versions = [p for p in (repo / model).iterdir() if p.is_dir() and p.name.isdigit()] if (repo / model).is_dir() \
        else []
    if not versions:
        raise ValueError(f"{repo / model}: no version folder (a model repository holds <model>/<version>/)")
    return max(versions, key=lambda p: int(p.name))


def peer_graph(repo: str | Path, model: str, operation: str, out_dir: str | Path) -> PeerGraph:
    """Resolve ``model``'s graph for ``operation`` from its manifest and write it (as genserve loads it) to
    ``out_dir``; ValueError when the operation is not a single graph call."""
    from genserve.server.graph_rewrite import row_independent_model

    folder = model_version_dir(Path(repo), model)
    manifest = read_manifest(folder / "manifest.json")
    key = (manifest.family, operation)
    if key not in GRAPHS:
        raise ValueError(f"{model} is a {manifest.family} model: its {operation!r} is not one graph call with "
                         f"constant extra inputs; the peers can serve {', '.join(f'{f}.{o}' for f, o in GRAPHS)}")
    name, wanted_input, wanted_output = GRAPHS[key]
    graph = next((g for g in manifest.graphs if g.name == name), None)
    if graph is None:
        raise ValueError(f"{folder}/manifest.json lists no {name!r} graph (has: "
                         f"{', '.join(g.name for g in manifest.graphs)})")
    constants: dict[str, tuple[float, list[int]]] = {}
    row_shape: list[int] = []
    for spec in graph.inputs:
        if spec.name == wanted_input:
            row_shape = list(spec.shape[1:])
        elif key == ("flow", "encode") and spec.name == "u" and manifest.data.levels:
            constants["u"] = (0.5, list(spec.shape[1:]))  # the centre of each cell, as genserve's encode
        else:
            raise ValueError(f"{name} input {spec.name!r} has no constant the peers could feed")
    outputs = [o for o in graph.outputs if wanted_output is None or o.name == wanted_output]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{model}.{operation}.onnx"
    src = folder / graph.file
    if any(folder.glob(graph.file + ".data")) or any(folder.glob("*.data")):
        raise ValueError(f"{src} keeps its weights in an external data file; the peers load a single file")
    target.write_bytes(row_independent_model(src.read_bytes()).model)
    return PeerGraph(model=model, operation=operation, graph=str(target), input=wanted_input, row_shape=row_shape,
                     outputs=[o.name for o in outputs],
                     output_row_shapes={o.name: list(o.shape[1:]) for o in outputs}, constants=constants)
