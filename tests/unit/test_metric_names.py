"""Metric names from component counters, and the shared latency histogram."""

from __future__ import annotations

from meshd.metrics.histogram import Histogram
from meshd.metrics.naming import check, family, stat_metric


def test_counter_fields_become_conventional_names() -> None:
    assert stat_metric("meshd_membership", "probes") == "meshd_membership_probes_total"
    assert stat_metric("meshd_membership", "bytes_in") == "meshd_membership_received_bytes_total"
    assert stat_metric("meshd_transport", "tcp_bytes_out") == "meshd_transport_tcp_sent_bytes_total"
    assert (
        stat_metric("meshd_replication", "repair_bytes_received")
        == "meshd_replication_repair_received_bytes_total"
    )
    assert stat_metric("meshd_compaction", "bytes_before") == "meshd_compaction_before_bytes_total"
    assert stat_metric("meshd_storage", "appended_bytes") == "meshd_storage_appended_bytes_total"
    for field in ("bytes_in", "tcp_bytes_out", "bytes_pushed", "probes", "deaths_by_refusal"):
        assert check([(stat_metric("meshd_x", field), "counter")]) == [], field


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    h = Histogram(bounds=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(value)
    samples = list(h.samples("meshd_x_seconds", "help", (("op", "info"),)))
    buckets = {dict(s.labels)["le"]: s.value for s in samples if s.name == "meshd_x_seconds_bucket"}
    assert buckets == {"0.1": 2, "1.0": 4, "+Inf": 5}
    by_name = {s.name: s.value for s in samples if not s.name.endswith("_bucket")}
    assert by_name == {"meshd_x_seconds_sum": 4.65, "meshd_x_seconds_count": 5}
    assert all(("op", "info") in s.labels for s in samples)
    assert {family(s.name, s.kind) for s in samples} == {"meshd_x_seconds"}


def test_an_empty_histogram_still_exports_its_series() -> None:
    samples = list(Histogram(bounds=(1.0,)).samples("meshd_y_seconds", "help"))
    assert [(s.name, s.value) for s in samples] == [
        ("meshd_y_seconds_bucket", 0),
        ("meshd_y_seconds_bucket", 0),
        ("meshd_y_seconds_sum", 0.0),
        ("meshd_y_seconds_count", 0),
    ]
