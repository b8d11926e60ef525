"""``mlserver start FOLDER``, with Triton's ModelConfig answered (runs in the MLServer virtualenv).

    python mlserver_start.py FOLDER MODEL_CONFIG_BIN

MLServer's gRPC server has no ``ModelConfig`` RPC, which Triton's perf_analyzer calls once before it sends
requests; this starts MLServer's own command line after making its gRPC server answer that RPC with the file's
bytes (runtimes/triton_config.py). ``ModelInfer`` stays MLServer's own.
"""

from __future__ import annotations

import sys

import mlserver.grpc.server as grpc_server
from mlserver.cli import main
from triton_config import answer_model_config

if __name__ == "__main__":
    folder, config = sys.argv[1], sys.argv[2]
    with open(config, "rb") as f:
        answer_model_config(grpc_server, f.read())
    sys.argv = ["mlserver", "start", folder]
    sys.exit(main())
