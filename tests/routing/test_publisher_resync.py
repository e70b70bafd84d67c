"""The registry publisher against real registries: a registry that lost batches of this epoch
(restarted empty or from an older snapshot) or failed a publish makes it resync, never wedge."""

from __future__ import annotations

import time

import fakeredis
import numpy as np
import pytest

from kvcluster.errors import RegistryDataError
from kvcluster.registry_publisher import RegistryPublisher
from routing.block_hashing import BlockHashArray, BlockHasher
from routing.config import RegistryConfig
from routing.memory_registry import InMemoryRegistry
from routing.redis_registry import RedisPrefixRegistry
from routing.registry import BlockEvent, EventBatch, NodeLoad, PrefixRegistry, PublishResult, Tier

HASHER = BlockHasher("xxh3_128", 4)


def chain(i: int) -> BlockHashArray:
    return HASHER.hash_chain(np.arange(4, dtype=np.int32) + 100 * i)


class Node:
    """What the node engine does: remember what it holds, queue its events, flush."""

    def __init__(self, registry: PrefixRegistry, config: RegistryConfig) -> None:
        self.held: list[BlockEvent] = []
        self.publisher = RegistryPublisher("n0", registry, config, load=NodeLoad,
                                           announce_all=lambda: list(self.held), clock=time.monotonic)
        assert self.publisher.register()

    def store(self, i: int) -> bool:
        event = BlockEvent.stored(chain(i), Tier.GPU)
        self.held.append(event)
        self.publisher.add(event)
        return self.publisher.flush()


@pytest.mark.parametrize("window", [4, 64])  # the lost gap leaves later batches out of window / buffered
def test_a_registry_restored_from_an_older_snapshot_is_resynced(window: int) -> None:
    raw = fakeredis.FakeRedis()
    config = RegistryConfig(index_stride_blocks=1, max_buffered_batches=window)
    registry = RedisPrefixRegistry(config, client=raw)
    node = Node(registry, config)
    nodes_key = f"{config.key_prefix}:{{nodes}}"
    snapshot = raw.dump(nodes_key)  # the node table as of the registration: nothing applied
    for i in range(6):
        assert node.store(i)
    raw.restore(nodes_key, 0, snapshot, replace=True)  # Redis restarted from that snapshot
    # batch 7 can never be applied (1..6 are gone from the registry's count): not published
    assert not node.store(6)
    node.publisher.tick()  # one heartbeat period: register again, re-announce
    assert all(registry.longest_prefix(chain(i)) for i in range(7))
    assert node.store(7)
    assert registry.longest_prefix(chain(7))


def test_a_registry_restarted_empty_is_not_reported_as_published() -> None:
    raw = fakeredis.FakeRedis()
    config = RegistryConfig(index_stride_blocks=1)
    registry = RedisPrefixRegistry(config, client=raw)
    node = Node(registry, config)
    assert node.store(0)
    raw.flushall()
    assert not node.store(1)  # the registry answered RESYNC: the event was not published
    node.publisher.tick()
    assert registry.longest_prefix(chain(0)) and registry.longest_prefix(chain(1))


class FailingOnce(InMemoryRegistry):
    """Fails the next publish (or every register_node) with a non-retryable registry error,
    as Redis does when it is out of memory (OOM) or cannot persist (MISCONF)."""

    fail_publish = False
    fail_register = False

    def publish(self, batch: EventBatch) -> PublishResult:
        if self.fail_publish:
            self.fail_publish = False
            raise RegistryDataError("redis registry error during publish: OOM")
        return super().publish(batch)

    def register_node(self, node_id: str, *, previous_epoch: int = 0) -> int:
        if self.fail_register:
            raise RegistryDataError("redis registry error during register: OOM")
        return super().register_node(node_id, previous_epoch=previous_epoch)


def test_a_failed_publish_stays_off_the_data_path_and_is_repaired() -> None:
    config = RegistryConfig(index_stride_blocks=1)
    registry = FailingOnce(config)
    node = Node(registry, config)
    assert node.store(0)
    registry.fail_publish = True
    assert not node.store(1)  # counted, not raised into the store
    assert node.publisher.errors == 1
    node.publisher.tick()
    for i in range(2, 4):
        assert node.store(i)
    assert all(registry.longest_prefix(chain(i)) for i in range(4))


def test_a_failing_registration_drops_queued_events() -> None:
    config = RegistryConfig(index_stride_blocks=1)
    registry = FailingOnce(config)
    node = Node(registry, config)
    registry.fail_publish = True
    assert not node.store(0)
    registry.fail_register = True
    for i in range(1, 100):
        node.store(i)
        if i % 10 == 0:
            node.publisher.tick()  # counted and retried next tick, not raised
    # nothing piles up while the registry keeps failing: the re-announce covers it
    assert len(node.publisher._pending) < 10
    registry.fail_register = False
    node.publisher.tick()
    assert all(registry.longest_prefix(chain(i)) for i in range(100))
