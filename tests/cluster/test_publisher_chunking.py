"""The registry publisher sends bounded batches: a re-announce (or any flush) of more than
``max_batch_ops`` checkpoint operations goes out as consecutive batches, each applied by
itself, and a failure midway is repaired by the next resync like any failed publish."""

from __future__ import annotations

import threading
import time
from typing import Any

import fakeredis
import numpy as np
import pytest
import redis

from kvcluster.errors import RegistryUnavailable
from kvcluster.registry_publisher import RegistryPublisher
from routing.block_hashing import BLOCK_HASH_DTYPE, BlockHashArray, BlockHasher
from routing.config import RegistryConfig
from routing.memory_registry import InMemoryRegistry
from routing.redis_registry import RedisPrefixRegistry
from routing.registry import (
    BlockEvent,
    EventBatch,
    NodeLoad,
    PrefixRegistry,
    PublishResult,
    PublishStatus,
    Tier,
    flatten_events,
)

HASHER = BlockHasher("xxh3_128", 4)
STRIDE = 4
LIMIT = 32


def chain(i: int, blocks: int) -> BlockHashArray:
    return HASHER.hash_chain(np.arange(4 * blocks, dtype=np.int32) + 1_000_000 * i)


class Recording:
    """Fault injection and recording as a wrapper: notes every batch's (epoch, seq, ops) and
    makes the ``fail_call``-th publish from now fail (raise, or answer ``fail_status``)."""

    def __init__(self, inner: PrefixRegistry) -> None:
        self.inner = inner
        self.batches: list[tuple[int, int, int]] = []
        self.fail_call: int | None = None
        self.fail_status: PublishStatus | None = None
        self.after_publish: Any = None  # called with the call number after a publish applied
        self._calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def publish(self, batch: EventBatch) -> PublishResult:
        self._calls += 1
        if self.fail_call is not None and self._calls >= self.fail_call:
            self.fail_call = None
            if self.fail_status is not None:
                return PublishResult(self.fail_status, 0)
            raise RegistryUnavailable("publish timed out")
        self.batches.append((batch.epoch, batch.seq, len(flatten_events(batch.events, STRIDE))))
        result = self.inner.publish(batch)
        if self.after_publish is not None:
            self.after_publish(self._calls)
        return result

    def arm(self, calls_from_now: int, status: PublishStatus | None = None) -> None:
        self.fail_call = self._calls + calls_from_now
        self.fail_status = status


def make_registry(backend: str, config: RegistryConfig) -> PrefixRegistry:
    if backend == "memory":
        return InMemoryRegistry(config)
    return RedisPrefixRegistry(config, client=fakeredis.FakeRedis())


class Node:
    """What the node engine holds and announces: one stored event per block (as
    ``NodeEngine._all_held_blocks`` does) for 20 chains of 50 blocks, plus one 300-block
    chain held as a single event (75 checkpoints, more than the limit by itself)."""

    CHAINS = {i: chain(i, 50) for i in range(20)} | {99: chain(99, 300)}

    def __init__(self, registry: Recording) -> None:
        self.held: list[BlockEvent] = []
        for i, hashes in self.CHAINS.items():
            if i == 99:
                self.held.append(BlockEvent.stored(hashes, Tier.CPU))
                continue
            family = hashes[0].tobytes()
            self.held.extend(
                BlockEvent.stored(hashes[p : p + 1], Tier.NVME, first_position=p, family=family)
                for p in range(hashes.size)
            )
        config = RegistryConfig(index_stride_blocks=STRIDE, max_batch_ops=LIMIT)
        self.publisher = RegistryPublisher(
            "n0", registry, config, load=NodeLoad,  # type: ignore[arg-type]
            announce_all=lambda: list(self.held), clock=time.monotonic,
        )

    @property
    def ops(self) -> int:
        return sum(hashes.size // STRIDE for hashes in self.CHAINS.values())  # 20*12 + 75 = 315


def assert_holds_exactly_what_was_announced(registry: PrefixRegistry, node: Node) -> None:
    for hashes in Node.CHAINS.values():
        holding = registry.longest_prefix(hashes)
        assert set(holding) == {"n0"}
        assert holding["n0"].num_blocks == hashes.size // STRIDE * STRIDE
    stats = registry.stats()
    assert (stats.blocks, stats.entries) == (node.ops, node.ops)


def assert_bounded_and_consecutive(batches: list[tuple[int, int, int]], epoch: int, ops: int) -> None:
    mine = [(seq, n) for e, seq, n in batches if e == epoch]
    assert [seq for seq, _ in mine] == list(range(1, len(mine) + 1))
    assert all(n <= LIMIT for _, n in mine), [n for _, n in mine]
    assert sum(n for _, n in mine) == ops  # every checkpoint exactly once
    assert len(mine) >= -(-ops // LIMIT)


@pytest.mark.parametrize("backend", ["memory", "fakeredis"])
def test_a_large_re_announce_goes_out_in_bounded_consecutive_batches(backend: str) -> None:
    config = RegistryConfig(index_stride_blocks=STRIDE)
    registry = Recording(make_registry(backend, config))
    node = Node(registry)
    assert node.publisher.register()
    assert node.publisher.errors == 0
    assert_bounded_and_consecutive(registry.batches, node.publisher.epoch, node.ops)
    assert_holds_exactly_what_was_announced(registry.inner, node)
    # The data path too: a flush of one event over the limit is split, numbering continues.
    sent = len(registry.batches)
    long_chain = chain(7, 200)
    node.publisher.add(BlockEvent.stored(long_chain, Tier.GPU))
    assert node.publisher.flush()
    assert [(seq, n) for _, seq, n in registry.batches[sent:]] == [
        (sent + 1, 32), (sent + 2, 18)]
    assert registry.inner.longest_prefix(long_chain)["n0"].num_blocks == 200


@pytest.mark.parametrize("backend", ["memory", "fakeredis"])
@pytest.mark.parametrize("failure", [None, PublishStatus.RESYNC, PublishStatus.OUT_OF_WINDOW],
                         ids=["unreachable", "resync", "out_of_window"])
def test_a_failure_on_the_kth_batch_schedules_a_resync_that_recovers(
    backend: str, failure: PublishStatus | None
) -> None:
    config = RegistryConfig(index_stride_blocks=STRIDE)
    registry = Recording(make_registry(backend, config))
    node = Node(registry)
    registry.arm(3, failure)  # batches 1 and 2 are applied, the third fails
    assert not node.publisher.register()
    assert node.publisher.errors == 1
    assert [(seq, n) for _, seq, n in registry.batches] == [(1, LIMIT), (2, LIMIT)]
    assert registry.fail_call is None  # the rest of the re-announce was not sent
    node.publisher.add(BlockEvent.stored(chain(5, 8), Tier.GPU))
    assert not node.publisher.flush()  # dropped: the resync's re-announce covers it
    assert len(registry.batches) == 2
    node.publisher.tick()  # next heartbeat period: a new epoch, the whole re-announce again
    epoch = node.publisher.epoch
    assert epoch == 2 and node.publisher.errors == 1
    assert_bounded_and_consecutive(registry.batches, epoch, node.ops)
    assert_holds_exactly_what_was_announced(registry.inner, node)
    # Nothing was counted twice: the next flush carries just its own event, next in sequence.
    sent = len(registry.batches)
    node.publisher.add(BlockEvent.stored(chain(6, 8), Tier.GPU))
    assert node.publisher.flush()
    assert registry.batches[sent:] == [(epoch, sum(e == epoch for e, _, _ in registry.batches), 2)]
    assert registry.batches[-1][1] == registry.batches[-2][1] + 1


def test_a_re_registration_during_a_multi_batch_flush_supersedes_its_remaining_batches() -> None:
    config = RegistryConfig(index_stride_blocks=STRIDE)
    registry = Recording(InMemoryRegistry(config))
    node = Node(registry)
    assert node.publisher.register()
    sent = len(registry.batches)
    maintenance = threading.Thread(target=node.publisher.register)

    def re_register_after_the_first_batch(call: int) -> None:
        if call == sent + 1:
            # The maintenance thread re-registers (a heartbeat answered "unknown node")
            # while this flush is between its batches; its re-announce waits for this flush.
            maintenance.start()
            deadline = time.monotonic() + 10
            while node.publisher.epoch == 1 and time.monotonic() < deadline:
                time.sleep(0.001)

    registry.after_publish = re_register_after_the_first_batch
    node.held.append(BlockEvent.stored(chain(8, 200), Tier.GPU))  # 50 ops: 2 batches
    node.publisher.add(node.held[-1])
    assert node.publisher.flush()  # superseded by the re-announce, not failed
    maintenance.join(10)
    assert node.publisher.epoch == 2
    # Nothing after the first batch went out with the fenced epoch, so no publish failed.
    assert [seq for e, seq, _ in registry.batches[sent:] if e == 1] == [sent + 1]
    assert node.publisher.errors == 0
    assert_bounded_and_consecutive(registry.batches, 2, node.ops + 50)


def test_events_without_checkpoints_ride_along_at_no_cost() -> None:
    config = RegistryConfig(index_stride_blocks=STRIDE)
    registry = Recording(InMemoryRegistry(config))
    node = Node(registry)
    node.held = []
    assert node.publisher.register()  # nothing to announce: no batch
    hashes = chain(3, 3 * LIMIT * STRIDE)
    family = hashes[0].tobytes()
    for p in range(hashes.size):  # 3 * LIMIT checkpoints among 4x as many events
        node.publisher.add(BlockEvent.stored(hashes[p : p + 1], Tier.GPU, first_position=p, family=family))
    assert node.publisher.flush()
    assert [n for _, _, n in registry.batches] == [LIMIT] * 3


@pytest.mark.redis
@pytest.mark.slow
def test_a_node_with_120k_checkpoints_resyncs_against_real_redis(redis_server: Any) -> None:
    """The review's failure: one batch of ~100K ops ran ~1 s in one Lua call, past the
    client's 0.5 s socket timeout, so the node re-registered every tick and never showed."""
    config = RegistryConfig(backend="redis", url=redis_server.url, index_stride_blocks=1)
    assert config.socket_timeout_s == 0.5 and config.max_batch_ops == 4096
    registry = RedisPrefixRegistry(config)
    keys = np.frombuffer(np.random.default_rng(7).bytes(16 * 120_000), dtype=BLOCK_HASH_DTYPE)
    # 60K two-block chains: many small families, a costly kind of op for the publish script
    # (and under the 65,535 families one unbounded batch could name at all)
    held = [BlockEvent.stored(keys[i : i + 2], Tier.NVME) for i in range(0, keys.size, 2)]
    publisher = RegistryPublisher("big", registry, config, load=NodeLoad,
                                  announce_all=lambda: held, clock=time.monotonic)
    probe = redis.Redis.from_url(redis_server.url)
    # log every command that runs for 200 ms or more (commands inside a script are logged
    # too, but each of those takes microseconds)
    probe.config_set("slowlog-log-slower-than", 200_000)
    probe.slowlog_reset()
    scripts_before = probe.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    try:
        assert publisher.register(), "the re-announce timed out"
        assert publisher.errors == 0
        # 4,096 ops run for ~10-55 ms; the one unbounded batch of 120K ops ran ~0.4-1 s
        assert probe.slowlog_get(10) == []
        scripts = probe.info("commandstats")["cmdstat_evalsha"]["calls"] - scripts_before
        assert scripts >= -(-120_000 // 4096)
        assert registry.stats().blocks == keys.size
        for chain_keys in (keys[:2], keys[-2:]):
            assert registry.longest_prefix(chain_keys)["big"].nvme_blocks == 2
    finally:
        probe.config_set("slowlog-log-slower-than", 10_000)  # the default
        probe.slowlog_reset()
        probe.close()
        registry.clear_namespace("default")
        registry.close()
