"""KServe's Python model server running genserve's graph on ONNX Runtime (runs in the KServe virtualenv).

    python kserve_server.py SPEC_JSON MODEL_NAME --http_port P --grpc_port Q [--model_config BIN]

A custom ``kserve.Model`` (the documented route for a Python predictor): ``predict`` reads the input with
``InferInput.as_numpy`` and answers ``InferResponse`` with raw outputs (KServe answers raw when the request was
raw). KServe's Python server has no dynamic batcher, so each request is one graph call; ``predict`` is a plain
function, which KServe calls on its event loop (a ~1 ms call: cheaper than a thread hand-off). Per-request
logging is off: by default KServe logs each request's latency and each gRPC call's method at INFO; genserve
logs at WARNING here.

``--model_config BIN``: KServe has no ``ModelConfig`` RPC, which Triton's perf_analyzer calls once before it sends
requests; with this file (a serialised ``ModelConfigResponse``, benchmarks/peers/graph.py) the gRPC server
answers that RPC with it, and ``ModelStatistics`` with an empty answer. ``ModelInfer`` stays KServe's own.
"""

from __future__ import annotations

import logging
import sys

import kserve
import kserve.protocol.grpc.interceptors as interceptors
import kserve.protocol.grpc.server as grpc_server
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from ort_graph import Graph
from triton_config import answer_model_config

DATATYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64"}


class OrtModel(kserve.Model):
    def __init__(self, name: str, spec: str) -> None:
        super().__init__(name)
        self.spec = spec
        self.load()

    def load(self) -> bool:
        self.graph = Graph(self.spec)
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        """The model's metadata (ModelMetadata), as a deployment declares it: a batch axis, then one row."""
        return [{"name": self.graph.input, "datatype": "FP32", "shape": [-1, *self.graph.row_shape]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": name, "datatype": "FP32", "shape": [-1, *self.graph.output_row_shapes[name]]}
                for name in self.graph.outputs]

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        x = payload.get_input_by_name(self.graph.input).as_numpy()
        outputs = []
        for name, a in self.graph(x.reshape(-1, *self.graph.row_shape)).items():
            out = InferOutput(name=name, shape=list(a.shape), datatype=DATATYPES[str(a.dtype)])
            out.set_data_from_numpy(a, binary_data=payload.use_binary_outputs)
            outputs.append(out)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id,
                             use_binary_outputs=payload.use_binary_outputs)


if __name__ == "__main__":
    spec_path, model_name = sys.argv[1], sys.argv[2]
    ports = dict(zip(sys.argv[3::2], sys.argv[4::2], strict=True))
    if "--model_config" in ports:
        with open(ports["--model_config"], "rb") as f:
            answer_model_config(grpc_server.grpc_predict_v2_pb2_grpc, f.read())
    server = kserve.ModelServer(http_port=int(ports["--http_port"]), grpc_port=int(ports["--grpc_port"]), workers=1,
                                enable_grpc=True, enable_latency_logging=False)
    quiet = logging.getLogger("kserve.per_request")
    quiet.setLevel(logging.WARNING)  # set on a logger of our own: uvicorn's dictConfig resets "kserve"'s level
    interceptors.logger = quiet  # its "grpc method: ..." line at INFO on every call
    server.start([OrtModel(model_name, spec_path)])
