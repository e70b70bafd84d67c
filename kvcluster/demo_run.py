"""The demo job behind ``make demo`` / ``kvcluster demo`` (see ``kvcluster.commands.demo``)."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console
from rich.live import Live
from rich.table import Table

from kvcluster.client import KVClient
from kvcluster.config import KVClusterConfig, load_config
from kvcluster.local_cluster import local_cluster
from kvcluster.synthetic_kv import SyntheticKV, chat_workload

logger = logging.getLogger(__name__)

#: Small per-node pools on the embedded defaults, so that eviction and spilling to the host
#: tier happen within a demo-sized workload.
DEMO_BLOCKS_PER_NODE = 3000


@dataclass(frozen=True, slots=True)
class DemoSettings:
    config_path: str | None = None
    nodes: int | None = None
    conversations: int = 150
    turns: int = 6
    #: Distinct system prompts the chats start from. The router keeps each on one node (its
    #: cache affinity) and places each on the ring by its first block, so with only a few
    #: one of three nodes often stayed idle for the run (3 runs of 3 with 4 prompts; 1 of 6
    #: with 12: the requests come one at a time, so no load signal spreads the placements).
    system_prompts: int = 12
    redis_url: str | None = None
    seed: int = 0


@dataclass(slots=True)
class DemoTally:
    requests: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    mismatches: int = 0
    per_node: Counter[str] = field(default_factory=Counter)
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def record(self, name: str, seconds: float) -> None:
        self.latency_ms[name].append(seconds * 1e3)


def demo_config(settings: DemoSettings) -> KVClusterConfig:
    if settings.config_path:
        config = load_config(settings.config_path)
    else:
        config = load_config(None)
        cache = config.cache.model_copy(update={"num_blocks": DEMO_BLOCKS_PER_NODE})
        config = config.model_copy(update={"cache": cache})
    if settings.redis_url:
        config = config.with_env({"KVCLUSTER_REDIS_URL": settings.redis_url})
    if settings.nodes:
        cluster = config.cluster.model_copy(update={"local_nodes": settings.nodes})
        config = config.model_copy(update={"cluster": cluster})
    return config


def replay(client: KVClient, config: KVClusterConfig, settings: DemoSettings, tally: DemoTally,
           on_progress: object = None) -> None:
    kv_model = SyntheticKV(config.model, seed=settings.seed)
    workload = chat_workload(
        conversations=settings.conversations, turns=settings.turns,
        system_prompts=settings.system_prompts, vocab_size=config.model.vocab_size, seed=settings.seed,
    )
    for index, request in enumerate(workload):
        full = np.concatenate([request.prompt, request.response])
        expected = kv_model.kv(full)
        start = time.perf_counter()
        result = client.route_and_lookup(request.prompt)
        tally.record("route_and_lookup", time.perf_counter() - start)
        try:
            start = time.perf_counter()
            cached = client.fetch(result)
            tally.record("fetch", time.perf_counter() - start)
            if not torch.equal(cached, expected[:, :, : cached.shape[2]]):
                tally.mismatches += 1
            start = time.perf_counter()
            client.store(full, expected[:, :, result.matched_tokens :], result=result,
                         generated_tokens=int(request.response.size))  # the reuse policy learns from it
            tally.record("store", time.perf_counter() - start)
        finally:
            client.release(result)
        tally.requests += 1
        tally.prompt_tokens += int(request.prompt.size)
        tally.hit_tokens += result.matched_tokens
        tally.per_node[result.node_id] += 1
        if on_progress is not None and index % 50 == 0:
            on_progress(index, len(workload))  # type: ignore[operator]


def summary_tables(client: KVClient, tally: DemoTally) -> list[Table]:
    totals = Table(title="kvcluster demo")
    totals.add_column("figure")
    totals.add_column("value", justify="right")
    totals.add_row("requests", f"{tally.requests}")
    totals.add_row("prompt tokens", f"{tally.prompt_tokens:,}")
    rate = tally.hit_tokens / tally.prompt_tokens if tally.prompt_tokens else 0.0
    totals.add_row("cached tokens reused", f"{tally.hit_tokens:,} ({rate:.1%})")
    totals.add_row("K/V mismatches", f"{tally.mismatches}")
    for name, values in tally.latency_ms.items():
        p50, p99 = np.percentile(values, [50, 99])
        totals.add_row(f"{name} p50 / p99", f"{p50:.2f} / {p99:.2f} ms")
    nodes = Table(title="nodes")
    for column in ("node", "requests", "hit rate", "device blocks used", "host pages", "evictions"):
        nodes.add_column(column, justify="right" if column != "node" else "left")
    for node_id, stats in sorted(client.node_stats().items()):
        lookups = stats.hits + stats.misses
        host = stats.tiers.get("cpu", {})
        nodes.add_row(
            node_id,
            f"{tally.per_node[node_id]}",
            f"{stats.hits / lookups:.1%}" if lookups else "-",
            f"{stats.blocks_total - stats.blocks_free} / {stats.blocks_total}",
            f"{int(host.get('pages_used', 0))} / {int(host.get('pages_total', 0))}",
            f"{sum(stats.evictions.values())}",
        )
    return [totals, nodes]


def run_demo(settings: DemoSettings) -> int:
    console = Console()
    config = demo_config(settings)
    console.print(f"starting a local Ray cluster of {config.cluster.local_nodes} nodes "
                  f"(registry: {config.registry.backend}) ...")
    started = time.perf_counter()
    with local_cluster(config) as client:
        console.print(f"{len(client.nodes)} node actors up in {time.perf_counter() - started:.1f} s")
        tally = DemoTally()
        with Live(console=console, refresh_per_second=4) as live:
            def progress(index: int, total: int) -> None:
                rate = tally.hit_tokens / tally.prompt_tokens if tally.prompt_tokens else 0.0
                live.update(f"request {index}/{total}  token hit rate {rate:.1%}  "
                            f"mismatches {tally.mismatches}")
            replay(client, config, settings, tally, progress)
        for table in summary_tables(client, tally):
            console.print(table)
    console.print(f"demo finished in {time.perf_counter() - started:.1f} s")
    return 1 if tally.mismatches else 0
