"""Trace replay: parsing, the LRU caches, registry consistency, the policies, the CLI."""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from kvcluster.cli import main
from kvcluster.errors import InvalidArgument
from kvcluster.sim_cache import IndexBlockCache
from routing.config import RegistryConfig
from routing.memory_registry import InMemoryRegistry
from routing.simulator import (
    CacheFactory,
    LRUBlockCache,
    SimulatedCluster,
    SimulationConfig,
    TraceRequest,
    block_keys,
    conversation_ends,
    infinite_cache,
    load_mooncake_trace,
    simulate,
)

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "mooncake_sample.jsonl"


def test_sample_trace_parses() -> None:
    requests = load_mooncake_trace(SAMPLE)
    assert len(requests) == 200
    assert all(a.timestamp_s <= b.timestamp_s for a, b in itertools.pairwise(requests))
    first = requests[0]
    assert first.input_tokens > 0 and first.block_ids and first.timestamp_s > 0
    assert len(load_mooncake_trace(SAMPLE, limit=10)) == 10


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"timestamp": 1}', "not a Mooncake trace record"),
        ("not json", "not a Mooncake trace record"),
        ('{"timestamp": 1, "input_length": -5, "output_length": 1, "hash_ids": [1]}', "negative"),
    ],
)
def test_bad_trace_lines_are_named(tmp_path: Path, line: str, message: str) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n' + line + "\n")
    with pytest.raises(InvalidArgument, match=rf"t.jsonl:2: {message}"):
        load_mooncake_trace(trace)


def test_block_keys_are_the_id_and_a_tag() -> None:
    keys = block_keys([0, 1, 2**40])
    assert keys.dtype.itemsize == 16 and len(set(keys.tolist())) == 3
    assert keys[2].tobytes() == (2**40).to_bytes(8, "little") + b"mooncake"


def test_lru_cache_evicts_tails_first() -> None:
    cache = LRUBlockCache(4)
    assert cache.insert([1, 2, 3]) == ([0, 1, 2], [])
    assert cache.leading_hits([1, 2, 9]) == 2
    # touched deepest first: 1 is the freshest, so the tail 3 goes first
    stored, evicted = cache.insert([1, 2, 5, 6])
    assert stored == [2, 3] and evicted == [(3, 1, 2)]
    assert cache.leading_hits([1, 2, 5, 6]) == 4 and len(cache) == 4
    # a chain longer than the cache keeps its head; the blocks it could not keep never count
    stored, evicted = LRUBlockCache(2).insert([7, 8, 9])
    assert (stored, evicted) == ([0, 1], [])
    with pytest.raises(InvalidArgument):
        LRUBlockCache(0)


@pytest.mark.parametrize("cache_factory", [
    LRUBlockCache,
    functools.partial(IndexBlockCache, policy="reuse"),
    functools.partial(IndexBlockCache, policy="lfu"),
], ids=["lru", "index:reuse", "index:lfu"])
def test_registry_mirrors_every_node_cache(cache_factory: CacheFactory) -> None:
    """After each request, the registry's answer for a node equals that node's cache."""
    requests = load_mooncake_trace(SAMPLE, limit=120)
    registry = InMemoryRegistry(RegistryConfig(index_stride_blocks=1, entry_ttl_s=1e9, node_ttl_s=1e9,
                                               heartbeat_interval_s=1))
    cluster = SimulatedCluster(SimulationConfig(nodes=3), capacity=60, registry=registry,
                               cache_factory=cache_factory)
    rng = np.random.default_rng(0)
    for request in requests:
        cluster.advance(request.timestamp_s)
        node = cluster.node_ids[int(rng.integers(3))]
        cluster.serve(node, request, block_keys(request.block_ids), request.timestamp_s)
        for probe in requests[:40]:
            answer = registry.longest_prefix(block_keys(probe.block_ids))
            for node_id, cache in cluster.caches.items():
                hits = cache.leading_hits(probe.block_ids)
                assert (answer[node_id].num_blocks if node_id in answer else 0) == hits
                assert len(cache) <= 60


def test_infinite_cache_is_the_brute_force() -> None:
    requests = [TraceRequest(0, 1024, 1, (1, 2)), TraceRequest(1, 1500, 1, (1, 2, 3)),
                TraceRequest(2, 300, 1, (4,)), TraceRequest(3, 1100, 1, (1, 5, 3))]
    rate, saved = infinite_cache(requests, 512)
    assert rate == pytest.approx(3 / 9)
    assert saved == 1024 + 512


def test_simulation_on_the_sample() -> None:
    report = simulate(load_mooncake_trace(SAMPLE), SimulationConfig())
    router, rr, rnd, ch = (report.result(p) for p in ("router", "round_robin", "random", "consistent_hash"))
    for result in (router, rr, rnd, ch):
        assert result.requests == 200 and sum(result.requests_per_node) == 200
        assert result.total_blocks == sum(len(r.block_ids) for r in load_mooncake_trace(SAMPLE))
        assert result.hit_rate <= report.infinite_hit_rate
        assert result.tokens_saved <= report.infinite_tokens_saved
    assert rr.requests_per_node == (25,) * 8 and rr.imbalance == 1.0
    assert router.hit_rate >= 3 * rr.hit_rate
    assert router.hit_rate >= ch.hit_rate and router.imbalance < ch.imbalance
    assert router.overhead_us_mean > 0 and router.registry_us_mean > 0
    assert report.capacity_blocks == int(report.unique_blocks * 0.05)
    assert "router" in report.table() and "infinite (1 node)" in report.table()
    with pytest.raises(InvalidArgument):
        simulate(load_mooncake_trace(SAMPLE, limit=5), SimulationConfig(), ["magic"])


class _NoCache:
    """A node cache that never keeps anything."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def __len__(self) -> int:
        return 0

    def leading_hits(self, ids: Sequence[int]) -> int:
        return 0

    def insert(self, ids: Sequence[int], generated_tokens: int | None = None,
               ) -> tuple[list[int], list[tuple[int, int, int]]]:
        return [], []

    def end(self, ids: Sequence[int], keep: int) -> None:
        pass


def test_the_node_cache_is_pluggable() -> None:
    requests = load_mooncake_trace(SAMPLE, limit=50)
    report = simulate(requests, SimulationConfig(nodes=2), ["router", "round_robin"], cache_factory=_NoCache)
    assert [r.hit_blocks for r in report.results] == [0, 0]
    assert report.infinite_hit_rate > 0 and sum(report.result("router").requests_per_node) == 50
    cluster = SimulatedCluster(SimulationConfig(nodes=2), capacity=7, registry=None, cache_factory=_NoCache)
    assert all(isinstance(c, _NoCache) and c.capacity == 7 for c in cluster.caches.values())


def test_simulation_config_is_validated() -> None:
    with pytest.raises(InvalidArgument):
        SimulationConfig(nodes=0)
    with pytest.raises(InvalidArgument):
        SimulationConfig(capacity_fraction=0)


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--trace", str(SAMPLE), "--limit", "60", "--nodes", "4",
                 "--policies", "router,round_robin", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == 60 and set(report["policies"]) == {"router", "round_robin"}
    assert sum(report["policies"]["router"]["requests_per_node"]) == 60
    assert report["config"]["nodes"] == 4


def test_cli_replays_with_the_engine_s_index(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--trace", str(SAMPLE), "--policies", "router", "--json"]
    assert main([*args, "--node-cache", "index:reuse"]) == 0
    reuse = json.loads(capsys.readouterr().out)["policies"]["router"]
    assert main([*args, "--node-cache", "index:lru"]) == 0
    lru = json.loads(capsys.readouterr().out)["policies"]["router"]
    assert lru["hit_rate"] > 0 and reuse["hit_rate"] > 0 and lru != reuse
    assert main([*args, "--node-cache", "index:mru"]) == 2
    assert "unknown eviction policy 'mru'" in capsys.readouterr().err
    assert main([*args, "--node-cache", "arc"]) == 2
    assert "--node-cache must be lru or index:POLICY" in capsys.readouterr().err
    assert main([*args, "--node-cache", "index:lru+ttl"]) == 2
    assert "has no use for a TTL" in capsys.readouterr().err


def test_cli_table_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--trace", str(SAMPLE), "--limit", "30", "--policies", "random"]) == 0
    assert "random" in capsys.readouterr().out
    assert main(["simulate", "--trace", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_conversation_ends_on_a_hand_built_trace() -> None:
    requests = [
        TraceRequest(0, 1024, 1, (1, 2)),  # conversation A begins (nothing seen before)
        TraceRequest(1, 700, 1, (1, 3)),  # B: shares block 1 only, so its own conversation
        TraceRequest(2, 1600, 1, (1, 2, 4, 5)),  # A continued: starts with (1, 2), r0's full blocks
        TraceRequest(3, 600, 1, (6, 7)),  # C, alone
        TraceRequest(4, 2000, 1, (1, 2, 4, 8)),  # A again (r2's full blocks are (1, 2, 4))
        TraceRequest(5, 1536, 1, (1, 2, 9)),  # A edited from r0's end: r4 was not the last
    ]
    # request -> its conversation's first request; B's first found block 1, so nothing later
    # shares more of B than that
    assert conversation_ends(requests, 512) == {1: 1, 3: 3, 5: 0}
    assert conversation_ends(requests[:5], 512) == {1: 1, 3: 3, 4: 0}


@pytest.mark.parametrize("cache_factory", [LRUBlockCache, functools.partial(IndexBlockCache, policy="lru")])
def test_session_ends_make_room_with_ended_conversations_first(cache_factory: CacheFactory) -> None:
    requests = [
        TraceRequest(0, 1536, 1, (10, 11, 12)),  # B, continued at the end
        TraceRequest(1, 1536, 1, (1, 2, 3)),  # A, more recent than B, never continued
        TraceRequest(2, 1536, 1, (20, 21, 22)),  # C: needs room for three blocks
        TraceRequest(3, 2048, 1, (10, 11, 12, 13)),  # B's next turn
    ]
    config = {"nodes": 1, "capacity_fraction": 0.6}  # 10 unique blocks: the node holds 6
    plain = simulate(requests, SimulationConfig(**config), ["round_robin"], cache_factory=cache_factory)
    ended = simulate(requests, SimulationConfig(**config, session_ends=True), ["round_robin"],
                     cache_factory=cache_factory)
    assert plain.capacity_blocks == 6
    assert plain.result("round_robin").hit_blocks == 0  # C took B's room: A was more recent
    assert ended.result("round_robin").hit_blocks == 3  # A had ended, so C took A's


def test_cli_session_ends(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--trace", str(SAMPLE), "--policies", "router", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--session-ends"]) == 0
    ended = json.loads(capsys.readouterr().out)
    assert (plain["config"]["session_ends"], ended["config"]["session_ends"]) == (False, True)
    assert ended["policies"]["router"]["hit_rate"] > plain["policies"]["router"]["hit_rate"]
