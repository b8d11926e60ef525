"""Engine errors, each mapped to one gRPC status by the transport; messages say what to fix.

Each error kind also has a stable ``reason`` (UPPER_SNAKE): the transport sends it as the ``ErrorInfo.reason``
of the status details (and in an HTTP error's JSON), so clients can branch on it without parsing messages.
Reasons are part of the API: add new ones, never rename one (docs/errors.md lists them).
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class; ``code`` is the name of the grpc.StatusCode the transport answers with, ``reason`` the
    stable ErrorInfo reason."""

    code = "INTERNAL"
    reason = "INTERNAL_ERROR"


class NotFound(EngineError):
    """Unknown model or version."""

    code = "NOT_FOUND"
    reason = "MODEL_NOT_FOUND"


class Unsupported(EngineError):
    """The family cannot do this operation (a GAN's likelihood); the message names what it can do."""

    code = "FAILED_PRECONDITION"
    reason = "OPERATION_NOT_SUPPORTED"


class NotReady(EngineError):
    """The model failed to load or is loading."""

    code = "UNAVAILABLE"
    reason = "MODEL_NOT_READY"


class InvalidInput(EngineError):
    """Wrong shape or dtype, NaN/inf, values outside the data domain, bad n or options.

    ``field`` names the request field at fault (the message starts with it); a face that nests the field
    (SampleStream's ``sample.n``) re-words it with ``detail``."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"

    def __init__(self, detail: str, field: str = "") -> None:
        super().__init__(f"{field}: {detail}" if field else detail)
        self.field = field
        self.detail = detail


class QueueFull(EngineError):
    """Too many rows queued; retry later or lower the request size."""

    code = "RESOURCE_EXHAUSTED"
    reason = "QUEUE_FULL"
