"""Generated protobuf and gRPC stubs of genserve.v1 (do not edit: python -m genserve.protos.codegen)."""
