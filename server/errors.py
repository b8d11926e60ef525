"""Engine errors, each mapped to one gRPC status by the transport; messages say what to fix."""

from __future__ import annotations


class EngineError(Exception):
    """Base class; ``code`` is the name of the grpc.StatusCode the transport answers with."""

    code = "INTERNAL"


class NotFound(EngineError):
    """Unknown model or version."""

    code = "NOT_FOUND"


class Unsupported(EngineError):
    """The family cannot do this operation (a GAN's likelihood); the message names what it can do."""

    code = "FAILED_PRECONDITION"


class NotReady(EngineError):
    """The model failed to load or is loading."""

    code = "UNAVAILABLE"


class InvalidInput(EngineError):
    """Wrong shape or dtype, NaN/inf, values outside the data domain, bad n or options."""

    code = "INVALID_ARGUMENT"


class QueueFull(EngineError):
    """Too many rows queued; retry later or lower the request size."""

    code = "RESOURCE_EXHAUSTED"
