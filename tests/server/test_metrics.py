"""The server's own histogram (``ScrapedHistogram``, kept in plain numbers and turned into samples when scraped)
against prometheus_client's ``Histogram``: the same observations give the same exposition text, byte for byte."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from genserve.server.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Metrics, ScrapedHistogram, histogram


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, BATCH_BUCKETS])
def test_a_scraped_histogram_exposes_what_prometheus_clients_histogram_does(buckets) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry(auto_describe=True)
    h = Histogram("genserve_x", "what x is", ["model", "graph"], buckets=buckets, registry=theirs)
    s = ScrapedHistogram("genserve_x", "what x is", ["model", "graph"], buckets, ours)
    rng = random.Random(7)
    values = [*buckets, 0.0, -1.0, buckets[-1] * 2, math.inf]  # on every bound, below and above them all
    values += [rng.expovariate(1 / buckets[len(buckets) // 2]) for _ in range(1000)]
    for v in values:
        for labels, scale in ((("a", "f"), 1.0), (("b", "g"), 3.0)):
            h.labels(*labels).observe(v * scale)
            s.labels(*labels).observe(v * scale)
    assert generate_latest(ours) == generate_latest(theirs)
    assert ours.get_sample_value("genserve_x_count", {"model": "a", "graph": "f"}) == len(values)


def test_nan_lands_in_no_bucket_and_makes_the_sum_nan_as_in_prometheus_client() -> None:
    registry = CollectorRegistry()
    s = ScrapedHistogram("genserve_y", "y", ["model"], (1.0, 2.0), registry)
    s.labels("m").observe(1.5)
    s.labels("m").observe(math.nan)
    assert registry.get_sample_value("genserve_y_count", {"model": "m"}) == 1
    assert math.isnan(registry.get_sample_value("genserve_y_sum", {"model": "m"}))


def test_a_wrong_label_count_and_unsorted_buckets_are_refused() -> None:
    s = ScrapedHistogram("genserve_z", "z", ["model", "graph"], (1.0,), None)
    with pytest.raises(ValueError, match="takes labels"):
        s.labels("only-one")
    with pytest.raises(ValueError, match="sorted"):
        ScrapedHistogram("genserve_w", "w", ["model"], (2.0, 1.0), None)


def test_a_duplicate_name_in_one_registry_is_refused() -> None:
    registry = CollectorRegistry(auto_describe=True)
    ScrapedHistogram("genserve_v", "v", ["model"], (1.0,), registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Histogram("genserve_v", "v", ["model"], buckets=(1.0,), registry=registry)


def test_the_server_uses_prometheus_clients_histogram_under_processes(monkeypatch, tmp_path) -> None:
    """``--processes N`` keeps its values in prometheus_client's multiprocess files: there the histograms are
    prometheus_client's own, which write them; in one process they are scraped ones."""
    assert isinstance(Metrics().batch_size, ScrapedHistogram)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert isinstance(histogram("genserve_u", "u", ["model"], (1.0,), CollectorRegistry()), Histogram)
