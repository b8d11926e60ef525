"""One ONNX graph in ONNX Runtime as genserve runs it: 1 intra-op and 1 inter-op thread, sequential, no spinning.

Shared by the peer servers' runtimes (MLServer, KServe, PyTriton). It runs inside each peer's own virtualenv,
so it imports only numpy and onnxruntime (no genserve). ``spec`` is the JSON written by benchmarks.peers.graph:
the graph file, the request's input name, constant inputs (e.g. a flow's ``u`` = 1/2 per element, as genserve's
encode feeds it) and the outputs to answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session_options() -> ort.SessionOptions:
    """genserve's CPU settings (server/sessions.py): 1 + 1 threads, sequential execution, spinning off."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class Graph:
    """``Graph(spec_path)(x) -> {output name: array}`` for a batch ``x`` of rows (float32)."""

    def __init__(self, spec_path: str | Path) -> None:
        self.spec = json.loads(Path(spec_path).read_text())
        self.session = ort.InferenceSession(self.spec["graph"], session_options(), providers=["CPUExecutionProvider"])
        self.input = self.spec["input"]
        self.outputs = list(self.spec["outputs"])
        self.constants = {name: (float(value), list(shape)) for name, (value, shape) in self.spec["constants"].items()}
        self.row_shape = tuple(self.spec["row_shape"])
        self.output_row_shapes = {k: tuple(v) for k, v in self.spec["output_row_shapes"].items()}

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = len(x)
        feeds = {self.input: x}
        for name, (value, shape) in self.constants.items():
            feeds[name] = np.full((n, *shape), value, dtype=np.float32)
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))
