"""Benchmark of routing: block hashing, the Redis registry's lookups and memory, the simulator.

    .venv/bin/python -m benchmarks.bench_routing [--quick] [--trace FILE]

Every figure has a same-run baseline beside it:

- hashing a 32,768-token prompt at block size 16 (2,048 blocks), xxh3_128 and sha256: the
  production path (the native chain, one C call for the whole prompt) against the plain
  per-block loop (slice, convert, hash per block) computing the same keys, and the Python
  fast loop used without the extension (one vectorised split of all blocks, then one C call
  per block); for sha256 on a CPU with SHA extensions, also the libcrypto engine;
- ``longest_prefix`` of a 32K-token prompt on a real redis-server on loopback (started here on
  a free port), p50 over interleaved calls, against a PING round trip measured interleaved in
  the same loop (same conditions); with the default index stride (16 blocks: 128 probes; the
  target applies) and with stride 1 (every block: 2,048 probes; shown for scale). Eight nodes
  are registered; one holds the whole prompt, or eight hold overlapping prefixes of it;
- registry memory per (block, node) entry with 1M blocks over 8 nodes (pipelined publish,
  one holder per block, and 500K blocks with two holders each; chains of 2,048 blocks, one
  family each): the growth of ``used_memory`` and the sum of ``MEMORY USAGE`` of the family
  hashes, per entry, right after the bulk load (hash tables still mid-rehash count too),
  against one plain Redis string key per (block, node) entry (the naive layout) measured on
  100K entries;
- the simulator on the shared trace (``../shared/traces/synthetic_trace.jsonl``, if present)
  with 8 nodes each caching 5% of the unique blocks: the router's hit rate against
  round-robin's and an infinite single cache's, its load imbalance against consistent
  hashing's, and its routing overhead per request against consistent hashing's. Beside them,
  one LRU cache with the 8 nodes' capacity put together (no routing at all): the ceiling of
  any routing over per-node LRU caches (``benchmarks/cache_policy_study.py`` compares cache
  policies at that size); the same nodes caching in the engine's index under ``reuse``; and
  the router on each half of the trace replayed alone, against consistent hashing. Last, the
  router's replay with each conversation ended by its client after its last request
  (``ChatSession.end()``; the trace has no conversation ids, so the ends are derived from the
  whole trace): what that signal is worth, beside the same replay without it.

Targets (issue 5): hashing <= 200 us; lookup p50 <= 3x PING; <= 100 bytes per entry;
simulator hit rate >= 95% of infinite and >= 3x round-robin, imbalance <= 1.10, overhead
<= 50 us per request.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from benchmarks.report_table import print_table
from kvcluster.sim_cache import IndexBlockCache
from routing.block_hashing import BlockHashArray, BlockHasher
from routing.config import RegistryConfig
from routing.redis_registry import RedisPrefixRegistry
from routing.registry import BlockEvent, EventBatch, Tier
from routing.simulator import (
    LRUBlockCache,
    SimulationConfig,
    TraceRequest,
    load_mooncake_trace,
    simulate,
)

Row = dict[str, Any]
PROMPT_TOKENS = 32_768
BLOCK = 16
DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "synthetic_trace.jsonl"


def _median_us(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples) * 1e6)


def bench_hashing(quick: bool) -> list[Row]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128_000, PROMPT_TOKENS).astype(np.int32)
    rows = []
    for algorithm in ("xxh3_128", "sha256"):
        hasher = BlockHasher(algorithm, BLOCK, b"bench-salt", "bench-model")  # type: ignore[arg-type]
        python = BlockHasher(algorithm, BLOCK, b"bench-salt", "bench-model", native=False)  # type: ignore[arg-type]
        assert np.array_equal(hasher.hash_chain(tokens), hasher.hash_chain_reference(tokens))
        assert np.array_equal(hasher.hash_chain(tokens), python.hash_chain(tokens))
        form = f"native extension, {hasher.engine}" if hasher.is_native else "extension not built: Python loop"
        fast = _median_us(functools.partial(hasher.hash_chain, tokens), 50 if quick else 300)
        python_loop = _median_us(functools.partial(python.hash_chain, tokens), 20 if quick else 100)
        loop = _median_us(functools.partial(hasher.hash_chain_reference, tokens), 10 if quick else 40)
        rows.append({
            "name": f"hash 32K-token prompt, {algorithm} (2,048 blocks, {form})",
            "value": fast, "unit": "us",
            "baseline": "plain per-block loop, same keys", "baseline_value": loop,
            "target": "<= 200", "met": fast <= 200,
        })
        if hasher.engine == "sha-ni":
            rows.append(_libcrypto_chain_row(tokens, fast, quick))
        rows.append({
            "name": f"hash 32K-token prompt, {algorithm}, Python fast loop (no extension)",
            "value": python_loop, "unit": "us",
            "baseline": "plain per-block loop, same keys", "baseline_value": loop,
            "target": "-", "met": None,
        })
    return rows


def _libcrypto_chain_row(tokens: np.ndarray, sha_ni_us: float, quick: bool) -> Row:
    """The same SHA-256 chain through libcrypto, one call per block (the engine used on CPUs
    without SHA extensions): the baseline of the SHA-NI engine's overlapped compressions."""
    from routing import _chainhash  # type: ignore[attr-defined]

    start = BlockHasher("sha256", BLOCK, b"bench-salt", "bench-model").root()
    whole = tokens[: tokens.size // BLOCK * BLOCK]
    width = 4 * BLOCK
    assert _chainhash.chain(2, start, whole, width) == _chainhash.chain(1, start, whole, width)
    libcrypto = _median_us(functools.partial(_chainhash.chain, 2, start, whole, width), 50 if quick else 300)
    return {
        "name": "hash 32K-token prompt, sha256, libcrypto engine (one library call per block)",
        "value": libcrypto, "unit": "us",
        "baseline": "SHA-NI engine, same keys", "baseline_value": sha_ni_us,
        "target": "-", "met": None,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    """A throwaway redis-server on a free loopback port, no persistence."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    subprocess.run([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--daemonize", "yes"], check=True, capture_output=True)
    probe = redis.Redis(port=port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    try:
        yield port
    finally:
        subprocess.run([cli, "-p", str(port), "shutdown", "nosave"], capture_output=True, timeout=10)


def _registry(port: int, stride: int, prefix: str) -> RedisPrefixRegistry:
    return RedisPrefixRegistry(RegistryConfig(
        backend="redis", url=f"redis://127.0.0.1:{port}/0", index_stride_blocks=stride,
        key_prefix=prefix, entry_ttl_s=3600, heartbeat_interval_s=30, node_ttl_s=3600,
    ))


def bench_lookup(port: int, quick: bool) -> list[Row]:
    """Scenarios: one node holds the whole prompt (the router keeps a prefix on one node, so
    the common case), or eight nodes hold overlapping prefixes of it (2048, 1024, ... 16
    blocks: 255 holder records to walk at stride 16). Other families sit in the registry."""
    rng = np.random.default_rng(1)
    hasher = BlockHasher("xxh3_128", BLOCK)
    prompt = hasher.hash_chain(rng.integers(0, 128_000, PROMPT_TOKENS).astype(np.int32))
    client = redis.Redis(port=port)
    rows = []
    for stride, holders in ((16, 1), (16, 8), (1, 1), (1, 8)):
        registry = _registry(port, stride, f"lk{stride}x{holders}")
        nodes = [f"node-{i}" for i in range(8)]
        epochs = {n: registry.register_node(n) for n in nodes}
        batches = []
        for i, node in enumerate(nodes):
            events = []
            if i < holders:
                held = prompt[: 2048 >> i]
                events.append(BlockEvent.stored(held, Tier.GPU if i % 2 == 0 else Tier.CPU))
            for _ in range(4):  # other families the registry holds besides
                other = hasher.hash_chain(rng.integers(0, 128_000, 8192).astype(np.int32))
                events.append(BlockEvent.stored(other, Tier.GPU))
            batches.append(EventBatch(node, epochs[node], 1, tuple(events)))
        registry.publish_many(batches)
        answer = registry.longest_prefix(prompt)
        assert answer["node-0"].num_blocks == 2048 and len(answer) == holders
        client.ping()
        lookups, pings = [], []
        for _ in range((100 if quick else 1000) // (4 if stride == 1 else 1)):
            start = time.perf_counter()
            client.ping()
            pings.append(time.perf_counter() - start)
            start = time.perf_counter()
            registry.longest_prefix(prompt)
            lookups.append(time.perf_counter() - start)
        lookup_us, ping_us = float(np.median(lookups) * 1e6), float(np.median(pings) * 1e6)
        label = "1 holder" if holders == 1 else f"{holders} overlapping holders"
        rows.append({
            "name": f"longest_prefix 32K prompt, stride {stride} ({2048 // stride} probes), "
                    f"{label}, p50",
            "value": lookup_us, "unit": "us",
            "baseline": "PING p50, interleaved", "baseline_value": ping_us,
            "target": f"<= 3x PING = {3 * ping_us:.0f} us" if stride == 16 else "-",
            "met": lookup_us <= 3 * ping_us if stride == 16 else None,
        })
        rows.append({
            "name": f"  ratio to PING, stride {stride}, {label}",
            "value": lookup_us / ping_us, "unit": "x",
            "target": "<= 3" if stride == 16 else "-",
            "met": lookup_us <= 3 * ping_us if stride == 16 else None,
        })
    return rows


def _publish_blocks(registry: RedisPrefixRegistry, blocks: int, holders: int, rng: np.random.Generator) -> int:
    """Publish ``blocks`` random block keys (chains of 2,048) with ``holders`` nodes each."""
    nodes = [f"node-{i}" for i in range(8)]
    epochs = {n: registry.register_node(n) for n in nodes}
    seqs = dict.fromkeys(nodes, 0)
    chain_len = 2048
    pending: list[EventBatch] = []
    for c in range(blocks // chain_len):
        chain: BlockHashArray = np.frombuffer(rng.bytes(chain_len * 16), dtype="V16")
        for h in range(holders):
            node = nodes[(c + h) % len(nodes)]
            seqs[node] += 1
            pending.append(EventBatch(node, epochs[node], seqs[node], (BlockEvent.stored(chain, Tier.GPU),)))
        if len(pending) >= 16:
            registry.publish_many(pending)
            pending = []
    registry.publish_many(pending)
    return (blocks // chain_len) * chain_len * holders


def bench_memory(port: int, quick: bool) -> list[Row]:
    client = redis.Redis(port=port)
    rng = np.random.default_rng(2)
    total = 100_000 if quick else 1_000_000
    naive_n = 20_000 if quick else 100_000
    client.flushall()
    base = int(client.info("memory")["used_memory"])
    pipe = client.pipeline(transaction=False)
    for i in range(naive_n):
        # the naive layout: one string key per (block, node): key = prefix + block hex + node
        pipe.set(f"naive:{rng.bytes(16).hex()}:{i % 8}", b"\x00")
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    naive = (int(client.info("memory")["used_memory"]) - base) / naive_n
    rows = []
    for holders in (1, 2):
        client.flushall()
        base = int(client.info("memory")["used_memory"])
        registry = _registry(port, 1, f"mem{holders}")
        start = time.perf_counter()
        entries = _publish_blocks(registry, total // holders, holders, rng)
        seconds = time.perf_counter() - start
        grown = int(client.info("memory")["used_memory"]) - base
        stats = registry.stats()
        assert stats.entries == entries, (stats.entries, entries)
        per_entry = grown / entries
        rows.append({
            "name": f"registry memory per (block, node) entry, {entries:,} entries, "
                    f"{holders} holder(s) per block (used_memory growth)",
            "value": per_entry, "unit": "bytes",
            "baseline": "one string key per entry", "baseline_value": naive,
            "target": "<= 100", "met": per_entry <= 100,
        })
        if stats.bytes is not None:
            rows.append({
                "name": f"  same, MEMORY USAGE of the family hashes, {holders} holder(s)",
                "value": stats.bytes / entries, "unit": "bytes",
                "baseline": "one string key per entry", "baseline_value": naive,
                "target": "<= 100", "met": stats.bytes / entries <= 100,
            })
        rows.append({
            "name": f"  pipelined publish rate, {holders} holder(s)",
            "value": entries / seconds, "unit": "entries/s",
        })
    client.flushall()
    return rows


def single_lru_hit_rate(requests: list[TraceRequest], capacity: int) -> float:
    """Block hit rate of one LRU cache of ``capacity`` blocks serving every request."""
    cache = LRUBlockCache(capacity)
    hits = total = 0
    for request in requests:
        hits += cache.leading_hits(request.block_ids)
        total += len(request.block_ids)
        cache.insert(request.block_ids)
    return hits / total if total else 0.0


def bench_simulator(trace: Path | None, quick: bool) -> list[Row]:
    if trace is None or not trace.is_file():
        return [{"name": "simulator on the shared trace", "value": "skipped: trace not found"}]
    requests = load_mooncake_trace(trace, limit=1000 if quick else None)
    report = simulate(requests, SimulationConfig(nodes=8, capacity_fraction=0.05))
    router, rr, ch = (report.result(p) for p in ("router", "round_robin", "consistent_hash"))
    inf = report.infinite_hit_rate
    pooled = single_lru_hit_rate(requests, report.config.nodes * report.capacity_blocks)
    label = f"{report.requests} requests, 8 nodes x 5%"
    reuse_rows = engine_reuse_rows(requests, report.config, 100 * router.hit_rate / inf)
    return [
        {"name": f"simulator hit rate, router ({label})", "value": 100 * router.hit_rate, "unit": "%",
         "baseline": "round-robin", "baseline_value": 100 * rr.hit_rate,
         "target": ">= 3x round-robin", "met": router.hit_rate >= 3 * rr.hit_rate},
        {"name": "  router hit rate / infinite single cache", "value": 100 * router.hit_rate / inf,
         "unit": "%", "baseline": "infinite cache hit rate", "baseline_value": 100 * inf,
         "target": ">= 95", "met": router.hit_rate >= 0.95 * inf},
        {"name": "  one LRU cache of the 8 nodes' capacity together / infinite",
         "value": 100 * pooled / inf, "unit": "%",
         "baseline": "router / infinite", "baseline_value": 100 * router.hit_rate / inf},
        {"name": "  consistent hashing hit rate / infinite", "value": 100 * ch.hit_rate / inf,
         "unit": "%", "baseline": "infinite cache hit rate", "baseline_value": 100 * inf},
        {"name": "  load imbalance (max/mean requests per node), router", "value": router.imbalance,
         "unit": "x", "baseline": "consistent hashing", "baseline_value": ch.imbalance,
         "target": "<= 1.10", "met": router.imbalance <= 1.10},
        {"name": "  routing overhead per request (excl. registry), router", "value": router.overhead_us_mean,
         "unit": "us", "baseline": "consistent-hash pick", "baseline_value": ch.overhead_us_mean,
         "target": "<= 50", "met": router.overhead_us_mean <= 50},
        {"name": "  tokens saved, router", "value": router.tokens_saved, "unit": "tokens",
         "baseline": "infinite single cache", "baseline_value": report.infinite_tokens_saved},
        *reuse_rows,
        *session_end_rows(requests, report.config, 100 * router.hit_rate / inf, reuse_rows[0]["value"]),
        *half_trace_rows(requests, report.config),
    ]


def half_trace_rows(requests: list[TraceRequest], config: SimulationConfig) -> list[Row]:
    """The router on each half of the trace replayed alone (each node caching 5% of that
    half's unique blocks): a check that what the router's defaults were chosen on, the
    whole trace, is not all they are good for."""
    rows: list[Row] = []
    middle = len(requests) // 2
    for name, part in (("first", requests[:middle]), ("second", requests[middle:])):
        report = simulate(part, config, ("router", "consistent_hash"))
        router, ch = report.result("router"), report.result("consistent_hash")
        inf = report.infinite_hit_rate
        rows += [
            {"name": f"  {name} half of the trace alone ({len(part)} requests): router / infinite",
             "value": 100 * router.hit_rate / inf, "unit": "%",
             "baseline": "consistent hashing / infinite", "baseline_value": 100 * ch.hit_rate / inf},
            {"name": f"  {name} half: load imbalance, router", "value": router.imbalance, "unit": "x",
             "baseline": "consistent hashing", "baseline_value": ch.imbalance,
             "target": "<= 1.10", "met": router.imbalance <= 1.10},
        ]
    return rows


def engine_reuse_rows(requests: list[TraceRequest], config: SimulationConfig, lru_share: float) -> list[Row]:
    """The same replay with each node caching in the node engine's own prefix index under
    its ``reuse`` policy (told each request's generated length), as ``kvcluster simulate
    --node-cache index:reuse`` runs it."""
    report = simulate(requests, config, ("router",), cache_factory=functools.partial(IndexBlockCache, policy="reuse"))
    router = report.result("router")
    return [
        {"name": "  router, nodes on the engine's index with the reuse policy / infinite",
         "value": 100 * router.hit_rate / report.infinite_hit_rate, "unit": "%",
         "baseline": "router with the simulator's LRU nodes / infinite", "baseline_value": lru_share,
         "target": ">= 95", "met": router.hit_rate >= 0.95 * report.infinite_hit_rate},
        {"name": "  load imbalance, router with reuse nodes", "value": router.imbalance, "unit": "x",
         "baseline": "-", "target": "<= 1.10", "met": router.imbalance <= 1.10},
    ]


def session_end_rows(requests: list[TraceRequest], config: SimulationConfig, lru_share: float,
                     reuse_share: float) -> list[Row]:
    """The router's replay with clients that end their conversations (``ChatSession.end()``),
    the ends derived from the whole trace (``kvcluster simulate --session-ends``): what the
    signal is worth, not a figure for the trace as it stands, which carries no such signal."""
    ended = replace(config, session_ends=True)
    lru = simulate(requests, ended, ("router",)).result("router")
    reuse_report = simulate(requests, ended, ("router",),
                            cache_factory=functools.partial(IndexBlockCache, policy="reuse"))
    reuse = reuse_report.result("router")
    inf = reuse_report.infinite_hit_rate
    return [
        {"name": "  with session ends from clients: router, LRU nodes / infinite",
         "value": 100 * lru.hit_rate / inf, "unit": "%",
         "baseline": "the same without session ends", "baseline_value": lru_share},
        {"name": "  with session ends from clients: router, reuse nodes / infinite",
         "value": 100 * reuse.hit_rate / inf, "unit": "%",
         "baseline": "the same without session ends", "baseline_value": reuse_share},
    ]


def run(quick: bool = False, trace: Path | None = DEFAULT_TRACE) -> list[Row]:
    rows = bench_hashing(quick)
    # The simulator runs before the memory benchmark fills this process's heap (its routing
    # overhead would otherwise include collections of objects that are not its own).
    rows += bench_simulator(trace, quick)
    with redis_server() as port:
        rows += bench_lookup(port, quick)
        rows += bench_memory(port, quick)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations, 100K entries, 1,000 requests")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake-format trace")
    args = parser.parse_args()
    print_table(run(quick=args.quick, trace=args.trace))


if __name__ == "__main__":
    main()
