"""The contract: the .proto files, their generated stubs beside them (genserve.v1, genserve.oip) and the codegen."""
