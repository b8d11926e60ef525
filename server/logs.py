"""Server logs: text or one JSON object per line, and the access log (one line per finished request).

``configure(level, fmt)`` sets up the root logger on stderr: ``text`` (``time LEVEL logger: message``) or
``json`` (``{"time", "level", "logger", "message", ...}`` with the record's structured fields, the form log
collectors such as Loki, Elasticsearch or Cloud Logging parse without rules). The access log is the logger
``genserve.access``: with ``access_log`` on, every finished request (any face) logs one line with its method,
model, rows, status code, latency and a request id (the client's ``x-request-id`` when the face has it).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

ACCESS = logging.getLogger("genserve.access")
FIELDS = ("method", "model", "rows", "code", "latency_ms", "request_id", "worker")
"""Structured fields a record may carry (``extra=``); the JSON form writes them as keys."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (RFC 3339, UTC), level, logger, message, the FIELDS it has, and the
    exception's text when there is one."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = value
        if self.worker is not None:
            doc.setdefault("worker", self.worker)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str = "INFO", fmt: str = "text", worker: int | None = None) -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text`` or ``json``); ``worker``: the process of --processes N."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = "" if worker is None else f"[{worker}]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
