"""MLServer custom runtime running genserve's graph on ONNX Runtime (runs in the MLServer virtualenv).

MLServer (1.7) has no ONNX runtime of its own, so this is the documented custom-runtime route: an ``MLModel``
whose ``predict`` decodes the input with MLServer's ``NumpyCodec``, runs the graph (ort_graph.Graph: genserve's
session options) and encodes each output with the same codec. Batching is MLServer's adaptive batcher
(``max_batch_size`` in requests, ``max_batch_time`` in seconds, set in model-settings.json by the benchmark).
"""

from __future__ import annotations

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from ort_graph import Graph


class OrtRuntime(MLModel):
    async def load(self) -> bool:
        self.graph = Graph(self.settings.parameters.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(next(i for i in payload.inputs if i.name == self.graph.input))
        outputs = self.graph(x.reshape(-1, *self.graph.row_shape))
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(name, a) for name, a in outputs.items()])
