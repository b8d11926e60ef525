"""The grpc.aio floor: the most requests/s a Python server built on grpc.aio can answer on this machine.

    python grpc_floor.py SPEC_JSON MODEL_NAME GRPC_PORT MODEL_CONFIG_BIN

Not a peer and never the best peer (``benchmarks.peers --floor``): a reference that shows how much of a cell
gRPC's Python server itself takes. It runs in genserve's own environment (grpcio, numpy, onnxruntime and the OIP
messages of ``genserve.oip``) and answers the Open Inference Protocol calls a load generator makes (ServerLive,
ServerReady, ServerMetadata, ModelReady, ModelMetadata, Triton's ModelConfig and ModelStatistics, ModelInfer).

``ModelInfer`` takes the request's bytes as they came off the wire and answers from a table keyed by them: a
request seen before gets the bytes answered then, without being parsed and without running anything. A request
not seen before is parsed, run through the graph exactly as the peers run it (runtimes/ort_graph.py) and its
answer kept (up to ``KEPT`` distinct requests). Both load generators repeat one request per cell, so after the
first every request costs gRPC's own work and one dictionary look-up: a server written on grpc.aio in Python
that does anything at all answers fewer.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import numpy as np
from ort_graph import Graph

from genserve.oip import grpc_service_pb2 as pb

SERVICE = "/inference.GRPCInferenceService/"
KEPT = 256
"""Distinct requests whose answers are kept; a further one is answered (run again each time), not kept."""


class Floor(grpc.GenericRpcHandler):
    """The handlers: fixed answers for the metadata calls, the table of answers for ModelInfer."""

    def __init__(self, graph: Graph, name: str, model_config: bytes) -> None:
        self.graph, self.name = graph, name
        metadata = pb.ModelMetadataResponse(name=name, versions=["1"], platform="onnxruntime_onnx")
        metadata.inputs.add(name=graph.input, datatype="FP32", shape=[-1, *graph.row_shape])
        for out in graph.outputs:
            metadata.outputs.add(name=out, datatype="FP32", shape=[-1, *graph.output_row_shapes[out]])
        self.fixed = {
            "ServerLive": pb.ServerLiveResponse(live=True).SerializeToString(),
            "ServerReady": pb.ServerReadyResponse(ready=True).SerializeToString(),
            "ServerMetadata": pb.ServerMetadataResponse(name="grpc-floor", version="0").SerializeToString(),
            "ModelMetadata": metadata.SerializeToString(),
            "ModelConfig": model_config,
            "ModelStatistics": b"",
        }
        self.answers: dict[bytes, bytes] = {}
        self.handlers = {SERVICE + method: grpc.unary_unary_rpc_method_handler(self._fixed(answer))
                         for method, answer in self.fixed.items()}
        self.handlers[SERVICE + "ModelReady"] = grpc.unary_unary_rpc_method_handler(self.model_ready)
        self.handlers[SERVICE + "ModelInfer"] = grpc.unary_unary_rpc_method_handler(self.model_infer)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.handlers.get(handler_call_details.method)  # None: UNIMPLEMENTED

    @staticmethod
    def _fixed(answer: bytes):  # noqa: ANN205 - a grpc.aio unary behaviour
        async def respond(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return answer

        return respond

    async def model_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = pb.ModelReadyRequest.FromString(request).name
        return pb.ModelReadyResponse(ready=name == self.name).SerializeToString()

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        answer = self.answers.get(request)
        if answer is not None:
            return answer
        try:
            answer = self.run(pb.ModelInferRequest.FromString(request))
        except (ValueError, KeyError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if len(self.answers) < KEPT:
            self.answers[request] = answer
        return answer

    def run(self, request: pb.ModelInferRequest) -> bytes:
        """The serialised answer of one request, computed: its one input run through the graph."""
        if request.model_name != self.name:
            raise KeyError(f"no model {request.model_name!r} here (serving {self.name!r})")
        if len(request.inputs) != 1 or request.inputs[0].name != self.graph.input:
            raise ValueError(f"send one input, {self.graph.input!r}")
        if request.raw_input_contents:
            x = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
        else:
            x = np.asarray(request.inputs[0].contents.fp32_contents, dtype=np.float32)
        outputs = self.graph(x.reshape(-1, *self.graph.row_shape))
        response = pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id)
        for out, a in outputs.items():
            response.outputs.add(name=out, datatype="FP32", shape=list(a.shape))
            response.raw_output_contents.append(np.ascontiguousarray(a, dtype="<f4").tobytes())
        return response.SerializeToString()


async def serve(graph: Graph, name: str, port: int, model_config: bytes) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 2**20),
                                      ("grpc.max_send_message_length", 64 * 2**20)])
    server.add_generic_rpc_handlers((Floor(graph, name, model_config),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"grpc-floor serving {name} on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    spec_path, model_name, grpc_port, config_path = sys.argv[1:5]
    asyncio.run(serve(Graph(spec_path), model_name, int(grpc_port), Path(config_path).read_bytes()))
