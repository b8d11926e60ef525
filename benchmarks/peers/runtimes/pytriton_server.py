"""Triton Inference Server through PyTriton running genserve's graph on ONNX Runtime (runs in the PyTriton venv).

    python pytriton_server.py SPEC_JSON MODEL_NAME HTTP_PORT GRPC_PORT METRICS_PORT MAX_BATCH_SIZE DELAY_US [INSTANCES]

PyTriton starts the Triton server binary shipped in its wheel; Triton's dynamic batcher merges requests up to
``max_batch_size`` rows or ``max_queue_delay_microseconds``, then hands the batch to this Python callable
(``@batch``: one array of the stacked rows), which runs one graph call. Triton's own ONNX Runtime backend is
not in the wheel (only the Python backend is), so the graph runs in this process with genserve's session
options (ort_graph.Graph). INSTANCES (default 1) binds that many callables, each with a session of its own:
PyTriton runs each as a model instance of its own, so batches can run on that many cores at once.
"""

from __future__ import annotations

import sys

import numpy as np
from ort_graph import Graph
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def main() -> None:
    spec, name, http_port, grpc_port, metrics_port, max_batch_size, delay_us = sys.argv[1:8]
    instances = int(sys.argv[8]) if len(sys.argv) > 8 else 1
    graph = Graph(spec)

    def instance(run: Graph) -> object:
        @batch
        def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
            return run(inputs[run.input])
        return infer

    infer = [instance(graph if i == 0 else Graph(spec)) for i in range(instances)]

    config = TritonConfig(http_port=int(http_port), grpc_port=int(grpc_port), metrics_port=int(metrics_port),
                          log_verbose=0)
    # no endpoint behind PyTriton's access token: Triton's perf_analyzer reads the statistics endpoint (gRPC
    # requests cannot carry the token from perf_analyzer), and the server listens on loopback only
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind(model_name=name, infer_func=infer if instances > 1 else infer[0],
                    inputs=[Tensor(name=graph.input, dtype=np.float32, shape=graph.row_shape)],
                    outputs=[Tensor(name=o, dtype=np.float32, shape=tuple(graph.output_row_shapes[o]))
                             for o in graph.outputs],
                    config=ModelConfig(max_batch_size=int(max_batch_size),
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=int(delay_us))))
        triton.serve()


if __name__ == "__main__":
    main()
