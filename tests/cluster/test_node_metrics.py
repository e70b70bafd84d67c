"""The node's process-level metrics: garbage-collector pauses (only for a node that owns its
process, as a Ray node actor does)."""

from __future__ import annotations

import gc

from kvcluster.metrics import NodeMetrics


def _sample(metrics: NodeMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"node": metrics.node_id, **labels})
    return 0.0 if value is None else value


def test_watch_gc_times_each_collection_by_generation_and_close_stops_it() -> None:
    metrics = NodeMetrics("n0")
    before = len(gc.callbacks)
    metrics.watch_gc()
    metrics.watch_gc()  # idempotent: one callback
    assert len(gc.callbacks) == before + 1
    try:
        gc.collect(2)
        gc.collect(1)
        assert _sample(metrics, "kvcluster_gc_pause_seconds_count", generation="2") == 1
        assert _sample(metrics, "kvcluster_gc_pause_seconds_count", generation="1") == 1
        assert 0 < _sample(metrics, "kvcluster_gc_pause_seconds_sum", generation="2") < 10
        assert _sample(metrics, "kvcluster_gc_frozen_objects") == gc.get_freeze_count()
    finally:
        metrics.close()
    assert len(gc.callbacks) == before
    gc.collect(2)
    assert _sample(metrics, "kvcluster_gc_pause_seconds_count", generation="2") == 1


def test_a_node_that_does_not_own_its_process_reports_no_gc_metrics() -> None:
    metrics = NodeMetrics("n1")
    gc.collect()
    assert _sample(metrics, "kvcluster_gc_pause_seconds_count", generation="2") == 0
    assert "kvcluster_gc_frozen_objects" not in metrics.exposition()
