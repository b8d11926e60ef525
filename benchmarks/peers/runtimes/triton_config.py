"""Triton's ModelConfig RPC for a peer that lacks it (runs in the peer's virtualenv; needs only grpc).

Triton's perf_analyzer calls ``ModelConfig`` (and ``ModelStatistics``) once before it sends requests; KServe's
and MLServer's gRPC servers have neither. ``answer_model_config(module, config)`` makes such a server, when it
adds its ``GRPCInferenceService`` servicer, also add a handler that answers ``ModelConfig`` with ``config`` (a
serialised ``ModelConfigResponse`` written by the benchmark, benchmarks/peers/graph.py) and ``ModelStatistics``
with an empty message. ``ModelInfer`` and everything else stay the server's own.
"""

from __future__ import annotations

from typing import Any

import grpc

SERVICE = "/inference.GRPCInferenceService/"
ADD = "add_GRPCInferenceServiceServicer_to_server"


class TritonConfigOnly(grpc.GenericRpcHandler):
    """Answers Triton's ModelConfig with fixed bytes and ModelStatistics with an empty message; nothing else.
    For a grpc.aio server."""

    def __init__(self, config: bytes) -> None:
        self.answers = {SERVICE + "ModelConfig": config, SERVICE + "ModelStatistics": b""}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        answer = self.answers.get(handler_call_details.method)
        if answer is None:
            return None

        async def respond(request: bytes, context: object) -> bytes:  # both peers run grpc.aio servers, whose
            return answer                                              # interceptors await the behaviour

        return grpc.unary_unary_rpc_method_handler(respond)


def answer_model_config(module: Any, config: bytes) -> None:
    """Wrap ``module``'s add-servicer function (the name the server calls) to add TritonConfigOnly beside it."""
    add = getattr(module, ADD)

    def add_both(servicer: object, server: Any) -> None:
        add(servicer, server)
        server.add_generic_rpc_handlers((TritonConfigOnly(config),))

    setattr(module, ADD, add_both)
