"""Serving station: gRPC server on ONNX Runtime with dynamic batching and Prometheus metrics."""
