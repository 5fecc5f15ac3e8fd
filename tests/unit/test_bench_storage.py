"""The pure helpers of bench.storage and bench.storage_engines (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

from bench.storage import bucket_delta, bucket_quantile, targets
from bench.storage_engines import MeshdLog, Sqlite, make_records


def test_bucket_quantile_is_the_upper_bound_of_the_bucket_holding_it() -> None:
    buckets = [(0.001, 10), (0.01, 90), (0.1, 99), (float("inf"), 100)]
    assert bucket_quantile(buckets, 0.05) == 0.001
    assert bucket_quantile(buckets, 0.5) == 0.01
    assert bucket_quantile(buckets, 0.99) == 0.1
    assert bucket_quantile(buckets, 1.0) == float("inf")
    assert bucket_quantile([(0.001, 0), (float("inf"), 0)], 0.5) is None


def test_bucket_delta_subtracts_the_earlier_scrape() -> None:
    before = [(0.001, 5), (float("inf"), 7)]
    after = [(0.001, 8), (float("inf"), 12)]
    assert bucket_delta(after, before) == [(0.001, 3), (float("inf"), 5)]


def test_targets_judge_what_ran_and_say_what_was_not_judged() -> None:
    result = {
        "writes": {
            "majority_throughput_ratio": 0.4,
            "majority_p99_ratio": 0.7,
            "local_throughput_ratio": 0.9,
        },
        "restart": {"restart_ready_s": 3.0, "agents": 1000, "state_docs": 100},
        "restart-1gb": {"restart_1gb_ready_s": 10.0, "state_bytes": 2 * 10**9},
    }
    found = targets(result)
    assert found["majority_throughput_ratio"]["met"] is False  # a miss is printed as a miss
    assert found["majority_p99_ratio"]["met"] is True
    assert found["local_throughput_ratio"]["met"] is True
    assert found["restart_ready_s"]["met"] is None  # smaller than the target's size
    assert found["restart_1gb_ready_s"]["met"] is True
    assert "rss_growth_ratio" not in found  # not measured: not reported


def test_engines_read_back_what_they_committed(tmp_path: Path) -> None:
    records = make_records(30)
    assert all(doc.startswith("state/d") and update for doc, update in records)
    for engine, directory in ((MeshdLog(), tmp_path / "log"), (Sqlite("FULL"), tmp_path / "db")):
        engine.open(directory)
        engine.commit(records[:10])
        engine.commit(records[10:])
        engine.close()
        assert engine.read_all(directory) == len(records)
