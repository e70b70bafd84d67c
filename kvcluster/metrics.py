"""Prometheus metrics of one node, added as a wrapper around the node engine.

Each node owns a private ``CollectorRegistry`` (no global state: several nodes in one process,
as in tests and the in-process cluster, keep separate counters). ``InstrumentedNode`` wraps a
``NodeEngine`` and records, per call, what the engine returns, so the engine itself carries
no metrics code (STYLE: cross-cutting concerns as wrappers). Occupancy and tier gauges are
read from the engine's stats when scraped, never updated on the hot path.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kvcluster.kv_payload import KVPages, KVPayload
from kvcluster.node_types import LookupReply, NodeStats, StoreReply

if TYPE_CHECKING:
    from kvcluster.node_engine import NodeEngine

LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 0.1, 1.0)


class _StatsCollector(Collector):
    """Gauges computed from ``NodeEngine.stats()`` at scrape time."""

    def __init__(self, node: NodeEngine) -> None:
        self._node = node

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._node.stats()
        blocks = GaugeMetricFamily("kvcluster_device_blocks", "Device-tier blocks", labels=["node", "state"])
        blocks.add_metric([stats.node_id, "used"], stats.blocks_total - stats.blocks_free)
        blocks.add_metric([stats.node_id, "free"], stats.blocks_free)
        yield blocks
        pages = GaugeMetricFamily("kvcluster_tier_pages_used", "Pages used per tier", labels=["node", "tier"])
        capacity = GaugeMetricFamily("kvcluster_tier_pages_total", "Page capacity per tier", labels=["node", "tier"])
        for tier, values in stats.tiers.items():
            pages.add_metric([stats.node_id, tier], values.get("pages_used", 0))
            capacity.add_metric([stats.node_id, tier], values.get("pages_total", 0))
        yield pages
        yield capacity
        leases = GaugeMetricFamily("kvcluster_leases", "Live leases", labels=["node"])
        leases.add_metric([stats.node_id], stats.leases)
        yield leases


class _FrozenObjectsCollector(Collector):
    """The objects ``gc.freeze`` moved out of the collector's reach, read at scrape time."""

    def __init__(self, node_id: str) -> None:
        self._node_id = node_id

    def collect(self) -> Iterator[GaugeMetricFamily]:
        frozen = GaugeMetricFamily("kvcluster_gc_frozen_objects",
                                   "Objects frozen out of garbage collection at start-up", labels=["node"])
        frozen.add_metric([self._node_id], gc.get_freeze_count())
        yield frozen


class NodeMetrics:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.registry = CollectorRegistry(auto_describe=True)
        self.lookups = Counter(
            "kvcluster_lookups", "Prefix lookups by result", ["node", "result"], registry=self.registry
        )
        self.hit_blocks = Counter(
            "kvcluster_hit_blocks", "Blocks matched by tier", ["node", "tier"], registry=self.registry
        )
        self.lookup_seconds = Histogram(
            "kvcluster_lookup_seconds", "Node-side lookup latency", ["node"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.stored_tokens = Counter(
            "kvcluster_stored_tokens", "New tokens stored", ["node"], registry=self.registry
        )
        self.migrations = Counter(
            "kvcluster_migrations", "Prefix migrations by direction", ["node", "direction"],
            registry=self.registry,
        )
        self.migration_seconds = Histogram(
            "kvcluster_migration_seconds", "Node-side time of a prefix export or import",
            ["node", "direction"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry_errors = Counter(
            "kvcluster_registry_errors", "Failed registry calls", ["node"], registry=self.registry
        )
        self.gc_pause_seconds = Histogram(
            "kvcluster_gc_pause_seconds", "Pauses of Python's cyclic garbage collector in the "
            "node's process, by generation (only for a node that owns its process)",
            ["node", "generation"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._server: Any = None
        self._gc_callback: Callable[[str, dict[str, int]], None] | None = None

    def watch_gc(self) -> None:
        """Time every collection of this process's garbage collector (``gc.callbacks`` is
        per process: only a node that owns its process calls this; :meth:`close` undoes it)."""
        if self._gc_callback is not None:
            return
        started = [0.0]
        pauses = {generation: self.gc_pause_seconds.labels(self.node_id, str(generation)) for generation in range(3)}

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                pauses[info["generation"]].observe(time.perf_counter() - started[0])

        self._gc_callback = on_gc
        gc.callbacks.append(on_gc)
        self.registry.register(_FrozenObjectsCollector(self.node_id))

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self, port: int) -> None:
        """Export on ``port`` (0 picks a free one) in a daemon thread."""
        self._server, _ = start_http_server(port, registry=self.registry)

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_port)

    def close(self) -> None:
        if self._gc_callback is not None:
            gc.callbacks.remove(self._gc_callback)
            self._gc_callback = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class InstrumentedNode:
    """``NodeEngine``'s data-path methods, each recorded in :class:`NodeMetrics`."""

    def __init__(self, node: NodeEngine, metrics: NodeMetrics) -> None:
        self.node = node
        self.metrics = metrics
        metrics.registry.register(_StatsCollector(node))
        node.set_registry_error_hook(metrics.registry_errors.labels(node.node_id).inc)

    def lookup(self, tokens: Any, namespace: str = "default") -> LookupReply:
        start = time.perf_counter()
        reply = self.node.lookup(tokens, namespace)
        node_id = self.node.node_id
        self.metrics.lookup_seconds.labels(node_id).observe(time.perf_counter() - start)
        self.metrics.lookups.labels(node_id, "hit" if reply.matched_tokens else "miss").inc()
        for tier, count in reply.blocks_per_tier.items():
            if count:
                self.metrics.hit_blocks.labels(node_id, tier).inc(count)
        return reply

    def store(self, tokens: Any, payload: KVPayload | None, namespace: str = "default",
              lease_id: str | None = None, generated_tokens: int | None = None) -> StoreReply:
        reply = self.node.store(tokens, payload, namespace, lease_id, generated_tokens)
        self.metrics.stored_tokens.labels(self.node.node_id).inc(reply.new_tokens)
        return reply

    def import_prefix(self, tokens: Any, payload: KVPages | None, namespace: str = "default") -> StoreReply:
        start = time.perf_counter()
        reply = self.node.import_prefix(tokens, payload, namespace)
        node_id = self.node.node_id
        self.metrics.migration_seconds.labels(node_id, "in").observe(time.perf_counter() - start)
        self.metrics.migrations.labels(node_id, "in").inc()
        return reply

    def export_pinned(self, tokens: Any, namespace: str = "default") -> tuple[KVPages | None, str | None]:
        start = time.perf_counter()
        pages, lease_id = self.node.export_pinned(tokens, namespace)
        if pages is not None:
            node_id = self.node.node_id
            self.metrics.migration_seconds.labels(node_id, "out").observe(time.perf_counter() - start)
            self.metrics.migrations.labels(node_id, "out").inc()
        return pages, lease_id

    def stats(self) -> NodeStats:
        return self.node.stats()
