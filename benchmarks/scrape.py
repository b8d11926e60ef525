"""The server's own view of a measurement window: its /metrics scraped before and after, histogram deltas.

The split follows perf_analyzer's server-side breakdown: per request, the time its submissions waited in the
graph batch queues (``genserve_queue_wait_seconds``), the time of the ONNX Runtime calls they were in
(``genserve_inference_duration_seconds``, each call counted once per submission it carried, since every
submission waits for its whole call), and the rest of the server's request time (``genserve_request_duration_
seconds``: gRPC, proto <-> numpy, the family program's numpy work).
"""

from __future__ import annotations

import re
import urllib.request
from collections import defaultdict

Series = dict[tuple[str, frozenset], float]
"""(sample name, frozenset of (label, value)) -> value."""

_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Series:
    """Prometheus text exposition -> series values (comments and unparsable lines are skipped)."""
    out: Series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = value
    return out


def fetch(url: str, timeout: float = 5.0) -> Series:
    """Scrape ``url`` (``http://host:port/metrics``); an empty result when it cannot be reached."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return parse(r.read().decode())
    except OSError:
        return {}


def total(series: Series, name: str, **match: str) -> float:
    """Sum of ``name`` over the series whose labels include ``match``."""
    want = set(match.items())
    return sum(v for (n, labels), v in series.items() if n == name and want <= labels)


def by_label(series: Series, name: str, label: str, **match: str) -> dict[str, float]:
    """``name`` summed per value of ``label`` (e.g. per graph) over the series that include ``match``."""
    want = set(match.items())
    out: dict[str, float] = defaultdict(float)
    for (n, labels), v in series.items():
        if n == name and want <= labels:
            key = dict(labels).get(label)
            if key is not None:
                out[key] += v
    return dict(out)


def split(before: Series, after: Series, model: str, method: str, wall_s: float) -> dict:
    """The server's account of the window for ``model`` and RPC ``method`` (e.g. ``LogLikelihood``).

    Seconds are means per request; ``ort_busy`` is the share of the window the model's graph calls were
    running (above 1.0 with several instances); ``rows_per_call`` is the mean dynamic batch size.
    """
    if not before or not after:
        return {"available": False}

    def d(name: str, **match: str) -> float:
        return total(after, name, **match) - total(before, name, **match)

    requests = d("genserve_request_duration_seconds_count", model=model, method=method)
    request_s = d("genserve_request_duration_seconds_sum", model=model, method=method)
    waits = d("genserve_queue_wait_seconds_count", model=model)
    wait_s = d("genserve_queue_wait_seconds_sum", model=model)
    calls = d("genserve_inference_duration_seconds_count", model=model)
    infer_s = d("genserve_inference_duration_seconds_sum", model=model)
    rows = d("genserve_batch_size_rows_sum", model=model)
    carried = d("genserve_batch_requests_sum", model=model)  # sum over calls of the submissions each carried
    per_graph_calls = {g: after_v - by_label(before, "genserve_inference_duration_seconds_count", "graph",
                                             model=model).get(g, 0.0)
                       for g, after_v in by_label(after, "genserve_inference_duration_seconds_count", "graph",
                                                  model=model).items()}
    if requests <= 0:
        return {"available": True, "requests": 0}
    mean_call = infer_s / calls if calls else 0.0
    queue = wait_s / requests
    # Each submission waits for its whole call; submissions carried per call times the call's mean time.
    compute = (carried * mean_call) / requests if calls else 0.0
    server = request_s / requests
    return {
        "available": True,
        "requests": requests,
        "server_request_s": server,
        "queue_s": queue,
        "compute_s": compute,
        "other_s": max(server - queue - compute, 0.0),
        "submissions_per_request": waits / requests,
        "calls": calls,
        "calls_per_s": calls / wall_s,
        "calls_per_graph": {g: v for g, v in per_graph_calls.items() if v > 0},
        "mean_call_s": mean_call,
        "rows_per_call": rows / calls if calls else 0.0,
        "requests_per_call": carried / calls if calls else 0.0,
        "ort_busy": infer_s / wall_s,
    }
