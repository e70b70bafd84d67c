"""What ``kvcluster status`` shows, read from each node actor's Prometheus metrics.

Each node exports its metrics over HTTP when ``cluster.metrics_port`` is set; status asks the
actor for the same exposition text (so it works with the exporter off, or behind a firewall)
and parses it with Prometheus' own parser.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from prometheus_client.parser import text_string_to_metric_families

from kvcluster.deploy import find_nodes


@dataclass(slots=True)
class NodeStatusRow:
    node_id: str
    error: str | None = None
    lookups_hit: float = 0.0
    lookups_miss: float = 0.0
    hit_blocks: dict[str, float] = field(default_factory=dict)
    pages_used: dict[str, float] = field(default_factory=dict)
    pages_total: dict[str, float] = field(default_factory=dict)
    leases: float = 0.0
    migrations: dict[str, float] = field(default_factory=dict)
    registry_errors: float = 0.0

    @property
    def hit_rate(self) -> float:
        total = self.lookups_hit + self.lookups_miss
        return self.lookups_hit / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "hit_rate": self.hit_rate}


def parse_metrics(node_id: str, text: str) -> NodeStatusRow:
    row = NodeStatusRow(node_id)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            if sample.name == "kvcluster_lookups_total":
                if labels.get("result") == "hit":
                    row.lookups_hit = value
                else:
                    row.lookups_miss = value
            elif sample.name == "kvcluster_hit_blocks_total":
                row.hit_blocks[labels["tier"]] = value
            elif sample.name == "kvcluster_tier_pages_used":
                row.pages_used[labels["tier"]] = value
            elif sample.name == "kvcluster_tier_pages_total":
                row.pages_total[labels["tier"]] = value
            elif sample.name == "kvcluster_leases":
                row.leases = value
            elif sample.name == "kvcluster_migrations_total":
                row.migrations[labels["direction"]] = value
            elif sample.name == "kvcluster_registry_errors_total":
                row.registry_errors = value
    return row


def collect_status(namespace: str, timeout_s: float = 10.0) -> list[NodeStatusRow]:
    """Every node's row; a node that fails or does not answer within ``timeout_s`` gets an
    error row. All nodes are asked at once and waited for together, so hung nodes cost one
    timeout in all, not one each (a health check runs this under its own limit)."""
    nodes = sorted(find_nodes(namespace).items())
    asked: dict[str, Any] = {}
    rows: dict[str, NodeStatusRow] = {}
    for node_id, actor in nodes:
        try:
            asked[node_id] = actor.metrics_text.remote()
        except ray.exceptions.RayError as exc:
            rows[node_id] = NodeStatusRow(node_id, error=type(exc).__name__)
    deadline = time.monotonic() + timeout_s
    for node_id, ref in asked.items():
        try:
            text = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            rows[node_id] = NodeStatusRow(node_id, error=type(exc).__name__)
            continue
        rows[node_id] = parse_metrics(node_id, text)
    return [rows[node_id] for node_id, _ in nodes]


def render_status(rows: list[NodeStatusRow]) -> str:
    if not rows:
        return "no kvcluster nodes found (run 'kvcluster up')"
    lines = [f"{'node':<20} {'hit rate':>8} {'lookups':>8} {'leases':>6}  tiers (pages used / total)"]
    for row in rows:
        if row.error is not None:
            lines.append(f"{row.node_id:<20} unavailable: {row.error}")
            continue
        tiers = "  ".join(
            f"{tier} {int(row.pages_used.get(tier, 0))}/{int(total)}"
            for tier, total in sorted(row.pages_total.items())
        )
        lookups = int(row.lookups_hit + row.lookups_miss)
        lines.append(f"{row.node_id:<20} {row.hit_rate:>8.1%} {lookups:>8} {int(row.leases):>6}  {tiers}")
    return "\n".join(lines)
