"""Generated stubs of the Open Inference Protocol (protobuf package ``inference``; python -m genserve.protos.codegen).

``POOL`` holds their descriptors instead of protobuf's default pool, so these modules and tritonclient's (or
KServe's) stubs, which define the same ``inference.*`` symbols, can be imported into one process.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
"""The descriptor pool of genserve.oip.grpc_service_pb2 and genserve.oip.model_config_pb2."""
