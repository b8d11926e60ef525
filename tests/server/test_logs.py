"""Structured logs: the JSON form (one object per line, with the record's fields) and the access log, one line
per finished request on every face with method, model, rows, code, latency and a request id."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import grpc
import numpy as np
import pytest

from genserve.clients.client import Client
from genserve.server.app import BackgroundServer
from genserve.server.logs import JsonFormatter, configure


def test_json_lines_carry_the_fields_and_the_exception() -> None:
    formatter = JsonFormatter(worker=1)
    record = logging.LogRecord("genserve.access", logging.INFO, __file__, 1, "Sample %s", ("x",), None)
    record.model, record.rows, record.code = "digits-vae", 4, "OK"
    doc = json.loads(formatter.format(record))
    assert doc["message"] == "Sample x" and doc["level"] == "INFO" and doc["logger"] == "genserve.access"
    assert (doc["model"], doc["rows"], doc["code"], doc["worker"]) == ("digits-vae", 4, "OK", 1)
    assert doc["time"].endswith("+00:00")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    assert "RuntimeError: boom" in json.loads(formatter.format(record))["exception"]
    with pytest.raises(ValueError, match="text or json"):
        configure("INFO", "xml")


def test_the_access_log_has_one_line_per_request(engine_config, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="genserve.access")
    x = np.full((3, 8, 8), 2.0, np.float32)
    with BackgroundServer(replace(engine_config, access_log=True)) as srv, \
            Client(f"127.0.0.1:{srv.port}") as client:
        client.log_likelihood("digits-ppca", x, seed=1)
        with pytest.raises(Exception):  # noqa: B017 - any refusal: it is logged with its code
            client.log_likelihood("no-such-model", x, seed=1)
    lines = [r for r in caplog.records if r.name == "genserve.access"]
    ok = next(r for r in lines if r.code == "OK" and r.method == "LogLikelihood")
    assert ok.model == "digits-ppca" and ok.rows == 3 and ok.latency_ms > 0 and len(ok.request_id) == 16
    assert any(r.code == grpc.StatusCode.NOT_FOUND.name and r.model == "no-such-model" for r in lines)
