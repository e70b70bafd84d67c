"""Reclaiming the records of forgotten incarnations, and incarnation ids that wrap around.

A restarted node that does not re-announce everything its old incarnation published leaves
records behind in families that other nodes keep alive. They never match (the incarnation is
forgotten), but they must be reclaimed, and a recycled incarnation id must never adopt them.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import redis

from routing.block_hashing import BlockHashArray, BlockHasher
from routing.config import RegistryConfig
from routing.memory_registry import InMemoryRegistry
from routing.redis_registry import RedisPrefixRegistry, parse_node_record
from routing.registry import (
    MAX_INCARNATIONS,
    BlockEvent,
    EventBatch,
    NodeLoad,
    PrefixHolding,
    PrefixRegistry,
    Tier,
)
from tests.routing.conftest import RedisServer, RegistryEnv

HASHER = BlockHasher("xxh3_128", 4, b"reclaim", "test-model")
_prefixes = itertools.count()


def chain(seed: int, blocks: int = 8) -> BlockHashArray:
    return HASHER.hash_chain(np.arange(blocks * 4, dtype=np.int32) + seed * 1_000_000)


def store(full: BlockHashArray, start: int, stop: int) -> BlockEvent:
    return BlockEvent.stored(full[start:stop], Tier.GPU, first_position=start, family=full[0].tobytes())


class Node:
    """A node's side of the protocol: its epoch and its batch numbers."""

    def __init__(self, registry: PrefixRegistry, node_id: str, previous_epoch: int = 0) -> None:
        self.registry = registry
        self.node_id = node_id
        self.epoch = registry.register_node(node_id, previous_epoch=previous_epoch)
        self.seq = 0

    def publish(self, *events: BlockEvent) -> None:
        self.seq += 1
        self.registry.publish(EventBatch(self.node_id, self.epoch, self.seq, events))

    def restart(self) -> Node:
        return Node(self.registry, self.node_id, previous_epoch=self.epoch)

    def heartbeat(self) -> bool:
        return self.registry.heartbeat(self.node_id, self.epoch, NodeLoad())


# --- white-box helpers: which incarnation a node has, and steering the id counter ---------


def incarnation_of(env: RegistryEnv, registry: PrefixRegistry, node_id: str) -> int:
    if isinstance(registry, InMemoryRegistry):
        return registry._nodes[node_id].incarnation
    assert isinstance(registry, RedisPrefixRegistry) and env.raw is not None
    return redis_incarnation_of(env.raw, registry, node_id)


def redis_incarnation_of(raw: redis.Redis, registry: RedisPrefixRegistry, node_id: str) -> int:
    record = raw.hget(f"{registry.config.key_prefix}:{{nodes}}", node_id)
    assert isinstance(record, bytes)
    parsed = parse_node_record(record)
    assert parsed is not None
    return parsed[1]


def wrap_counter_to(env: RegistryEnv, registry: PrefixRegistry, incarnation: int) -> None:
    """Make ``incarnation`` the next id the allocator tries, as after the counter wrapped."""
    if isinstance(registry, InMemoryRegistry):
        registry._next_incarnation = incarnation - 1
        return
    assert isinstance(registry, RedisPrefixRegistry) and env.raw is not None
    # the script takes (INCR - 1) % 65535 + 1: three laps later, the next INCR lands on it
    env.raw.set(f"{registry.config.key_prefix}:{{nodes}}:next", 3 * MAX_INCARNATIONS + incarnation - 1)


# --- wrap-around: every backend ----------------------------------------------------------


def test_a_recycled_incarnation_never_adopts_stale_records(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a, b = Node(registry, "a"), Node(registry, "b")
    full = chain(1)
    a.publish(store(full, 0, 6))
    stale = incarnation_of(registry_env, registry, "a")
    a = a.restart()  # re-announces nothing of this family: blocks 0..5 of `stale` stay behind
    b.publish(store(full, 0, 1))  # b keeps the family alive (and rewrites block 0 only)
    assert registry.longest_prefix(full) == {"b": PrefixHolding(1, 1, 0, 0)}
    # the id counter comes round to the forgotten id just as node c registers
    wrap_counter_to(registry_env, registry, stale)
    c = Node(registry, "c")
    c.publish(store(full, 0, 3))
    # c holds 3 blocks; blocks 3..5 of the old incarnation must not extend it to 6
    assert registry.longest_prefix(full) == {
        "b": PrefixHolding(1, 1, 0, 0),
        "c": PrefixHolding(3, 3, 0, 0),
    }
    registry.sweep()  # type: ignore[attr-defined]
    assert registry.stats().entries == 1 + 3


def test_a_forgotten_id_is_reissued_once_its_records_are_gone(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a, b = Node(registry, "a"), Node(registry, "b")
    full = chain(2)
    a.publish(store(full, 0, 6))
    b.publish(store(full, 0, 1))
    stale = incarnation_of(registry_env, registry, "a")
    assert registry.purge_node("a") is True  # purging sweeps: the id's records are gone
    assert registry.stats().entries == 1
    wrap_counter_to(registry_env, registry, stale)
    c = Node(registry, "c")
    assert incarnation_of(registry_env, registry, "c") == stale
    c.publish(store(full, 0, 2))
    assert registry.longest_prefix(full) == {"b": PrefixHolding(1, 1, 0, 0), "c": PrefixHolding(2, 2, 0, 0)}


# --- Redis: the incremental sweep on the heartbeat ----------------------------------------


def make(raw: redis.Redis, **overrides: object) -> RedisPrefixRegistry:
    config = RegistryConfig(key_prefix=f"rc{next(_prefixes)}", index_stride_blocks=1, **overrides)  # type: ignore[arg-type]
    return RedisPrefixRegistry(config, client=raw)


def family_records(raw: redis.Redis, registry: RedisPrefixRegistry, full: BlockHashArray) -> dict[bytes, set[int]]:
    """block key -> incarnations holding it, read straight from the family hash."""
    out: dict[bytes, set[int]] = {}
    for field, value in raw.hgetall(registry.family_key("default", full[0].tobytes())).items():
        if isinstance(field, bytes) and isinstance(value, bytes) and len(field) == 16:
            out[field] = {int.from_bytes(value[o : o + 2], "big") for o in range(0, len(value), 3)}
    return out


def restart_with_partial_reannounce(
    registry: RedisPrefixRegistry, families: int, kept: int
) -> tuple[list[BlockHashArray], Node, Node]:
    """a publishes ``families`` chains of 8 blocks; b holds their first 2 blocks and keeps
    them alive; a restarts and re-announces only the first ``kept`` chains."""
    a, b = Node(registry, "a"), Node(registry, "b")
    chains = [chain(100 + i) for i in range(families)]
    a.publish(*(store(full, 0, 8) for full in chains))
    b.publish(*(store(full, 0, 2) for full in chains))
    a = a.restart()
    a.publish(*(store(full, 0, 8) for full in chains[:kept]))
    b.publish(*(store(full, 0, 2) for full in chains))  # b refreshes every family
    return chains, a, b


def test_heartbeats_reclaim_what_a_restarted_node_did_not_reannounce(raw: redis.Redis) -> None:
    registry = make(raw)
    chains, a, b = restart_with_partial_reannounce(registry, families=12, kept=5)
    live = {redis_incarnation_of(raw, registry, n) for n in ("a", "b")}
    lookups = [registry.longest_prefix(full) for full in chains]
    assert lookups[0] == {"a": PrefixHolding(8, 8, 0, 0), "b": PrefixHolding(2, 2, 0, 0)}
    assert lookups[-1] == {"b": PrefixHolding(2, 2, 0, 0)}
    # before: the 7 chains a did not re-announce still hold its old records (blocks 2..7;
    # b's re-publish stripped blocks 0..1), each field of them a dead incarnation's
    dead_fields = [f for full in chains[5:] for f, incs in family_records(raw, registry, full).items()
                   if not incs <= live]
    assert len(dead_fields) == 7 * 6
    assert registry.stats().entries == 5 * 8 + 12 * 2 + 7 * 6
    for _ in range(2):
        assert a.heartbeat() and b.heartbeat()
    # after: nothing of the old incarnation is left, and every answer is the same
    for full in chains:
        assert all(incs <= live for incs in family_records(raw, registry, full).values())
    for full in chains[5:]:
        assert raw.hlen(registry.family_key("default", full[0].tobytes())) == 2 + 1  # + marker
    assert registry.stats().entries == 5 * 8 + 12 * 2
    assert [registry.longest_prefix(full) for full in chains] == lookups


def test_each_sweep_step_does_bounded_work(raw: redis.Redis) -> None:
    registry = make(raw)
    chains, _, _ = restart_with_partial_reannounce(registry, families=30, kept=0)
    garbage = 30 * 6
    removed = []
    for _ in range(100):
        removed.append(registry.sweep_step(budget=40))
        if sum(removed) == garbage:
            break
    # a step reads at most ~budget fields, so reclaiming 30 x 9 fields takes several steps
    assert sum(removed) == garbage
    assert len(removed) >= 5
    assert max(removed) <= 40
    assert registry.stats().entries == 30 * 2
    assert all(registry.longest_prefix(full) == {"b": PrefixHolding(2, 2, 0, 0)} for full in chains)


def test_families_left_with_nothing_are_deleted(raw: redis.Redis) -> None:
    registry = make(raw, entry_ttl_s=60)
    a = Node(registry, "a")
    full = chain(7)
    a.publish(store(full, 0, 8))
    a = a.restart()
    key = registry.family_key("default", full[0].tobytes())
    assert raw.exists(key)
    assert a.heartbeat() and a.heartbeat()
    assert not raw.exists(key)


@pytest.mark.redis
def test_register_sweeps_when_every_free_id_awaits_a_sweep(redis_server: RedisServer) -> None:
    """All 65535 ids forgotten but not yet swept: registering runs a sweep, then succeeds.
    (Real Redis only: trying 65,535 ids in fakeredis' Lua takes seconds.)"""
    raw = redis_server.client()
    registry = make(raw)
    prefix = registry.config.key_prefix
    raw.hset(f"{prefix}:{{nodes}}:retired", mapping={i: 0 for i in range(1, MAX_INCARNATIONS + 1)})
    node = Node(registry, "a")
    assert registry.heartbeat("a", node.epoch, NodeLoad()) is True
    assert raw.hlen(f"{prefix}:{{nodes}}:retired") == 0
    raw.close()


@pytest.mark.redis
def test_reclaiming_frees_redis_memory(redis_server: RedisServer) -> None:
    raw = redis_server.client()
    registry = make(raw)
    chains, _, _ = restart_with_partial_reannounce(registry, families=10, kept=0)
    keys = [registry.family_key("default", full[0].tobytes()) for full in chains]

    def usage() -> int:
        return sum(int(raw.memory_usage(key, samples=0) or 0) for key in keys)

    before = usage()
    registry.sweep_step()
    assert usage() < before * 0.6  # 3 of 9 fields are left in each family (2 blocks + marker)
    raw.close()


def test_a_family_replaced_by_garbage_mid_pass_does_not_stall_the_sweep(raw: redis.Redis) -> None:
    registry = make(raw)
    a = Node(registry, "a")
    big, other = chain(8, blocks=600), chain(9)
    a.publish(store(big, 0, 600), store(other, 0, 8))
    a = a.restart()
    registry.sweep_step(budget=100)  # the pass is now part-way through one of the families
    for full in (big, other):  # whichever it is, it turns into garbage
        raw.set(registry.family_key("default", full[0].tobytes()), b"junk")
    for _ in range(20):
        registry.sweep_step(budget=100)
    assert registry.sweep() == 0
    assert registry.malformed_skipped >= 2
