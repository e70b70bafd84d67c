"""The PrefixRegistry contract, run against the in-memory backend, fakeredis and real Redis."""

from __future__ import annotations

import numpy as np
import pytest

from kvcluster.errors import FencedEpoch, InvalidArgument
from routing.block_hashing import BlockHashArray, BlockHasher
from routing.registry import (
    BlockEvent,
    EventBatch,
    NodeLoad,
    PrefixHolding,
    PrefixRegistry,
    PublishStatus,
    Tier,
)
from tests.routing.conftest import RegistryEnv

HASHER = BlockHasher("xxh3_128", 4, b"contract", "test-model")


def chain(seed: int, blocks: int = 12, namespace: str = "default") -> BlockHashArray:
    tokens = np.arange(blocks * 4, dtype=np.int32) + seed * 1_000_000
    return HASHER.hash_chain(tokens, namespace)


def store(full: BlockHashArray, start: int, stop: int, tier: Tier = Tier.GPU,
          namespace: str = "default") -> BlockEvent:
    return BlockEvent.stored(full[start:stop], tier, first_position=start,
                             family=full[0].tobytes(), namespace=namespace)


def remove(full: BlockHashArray, start: int, stop: int) -> BlockEvent:
    return BlockEvent.removed(full[start:stop], first_position=start, family=full[0].tobytes())


def move(full: BlockHashArray, start: int, stop: int, tier: Tier) -> BlockEvent:
    return BlockEvent.moved(full[start:stop], tier, first_position=start, family=full[0].tobytes())


class Node:
    """A node's side of the protocol: registration and sequence numbers."""

    def __init__(self, registry: PrefixRegistry, node_id: str) -> None:
        self.registry = registry
        self.node_id = node_id
        self.epoch = registry.register_node(node_id)
        self.seq = 0

    def batch(self, *events: BlockEvent) -> EventBatch:
        self.seq += 1
        return EventBatch(self.node_id, self.epoch, self.seq, tuple(events))

    def publish(self, *events: BlockEvent) -> PublishStatus:
        return self.registry.publish(self.batch(*events)).status


def test_empty_registry_answers_nothing(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    assert registry.longest_prefix(chain(1)) == {}
    assert registry.live_nodes() == {}
    Node(registry, "a")
    assert registry.longest_prefix(chain(1)) == {}
    assert registry.longest_prefix(chain(1)[:0]) == {}
    stats = registry.stats()
    assert (stats.registered_nodes, stats.live_nodes, stats.families, stats.blocks, stats.entries) == (1, 1, 0, 0, 0)


def test_leading_blocks_per_node_and_tier(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a, b, c = Node(registry, "a"), Node(registry, "b"), Node(registry, "c")
    full = chain(1)
    assert a.publish(store(full, 0, 5, Tier.GPU), store(full, 5, 8, Tier.CPU)) is PublishStatus.APPLIED
    assert b.publish(store(full, 0, 2, Tier.NVME)) is PublishStatus.APPLIED
    # c holds blocks 1..9 but not block 0: no LEADING blocks at all
    assert c.publish(store(full, 1, 10)) is PublishStatus.APPLIED
    assert registry.longest_prefix(full) == {
        "a": PrefixHolding(8, 5, 3, 0),
        "b": PrefixHolding(2, 0, 0, 2),
    }
    # a shorter query is capped by its own length
    assert registry.longest_prefix(full[:3]) == {"a": PrefixHolding(3, 3, 0, 0), "b": PrefixHolding(2, 0, 0, 2)}
    # a hole stops the count: a loses block 3
    assert a.publish(remove(full, 3, 4)) is PublishStatus.APPLIED
    assert registry.longest_prefix(full)["a"] == PrefixHolding(3, 3, 0, 0)
    stats = registry.stats()
    assert (stats.families, stats.blocks, stats.entries) == (1, 10, 7 + 2 + 9)


def test_divergent_chains_share_a_family_but_not_blocks(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a = Node(registry, "a")
    shared = np.arange(16, dtype=np.int32)
    left = HASHER.hash_chain(np.concatenate([shared, np.full(16, 7, np.int32)]))
    right = HASHER.hash_chain(np.concatenate([shared, np.full(16, 9, np.int32)]))
    assert a.publish(store(left, 0, 8)) is PublishStatus.APPLIED
    assert registry.longest_prefix(right) == {"a": PrefixHolding(4, 4, 0, 0)}
    assert registry.longest_prefix(left) == {"a": PrefixHolding(8, 8, 0, 0)}


def test_namespaces_are_isolated(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a = Node(registry, "a")
    full = chain(1)
    a.publish(store(full, 0, 4, namespace="tenant-x"))
    assert registry.longest_prefix(full, "tenant-x") == {"a": PrefixHolding(4, 4, 0, 0)}
    assert registry.longest_prefix(full, "tenant-y") == {}
    assert registry.longest_prefix(full) == {}


def test_moved_and_removed(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a, b = Node(registry, "a"), Node(registry, "b")
    full = chain(2)
    a.publish(store(full, 0, 6))
    b.publish(store(full, 0, 6))
    a.publish(move(full, 2, 5, Tier.NVME))
    assert registry.longest_prefix(full)["a"] == PrefixHolding(6, 3, 0, 3)
    # moving blocks a node does not hold registers nothing
    a.publish(move(full, 6, 9, Tier.CPU))
    assert registry.longest_prefix(full)["a"].num_blocks == 6
    # removing a's copy leaves b's
    a.publish(remove(full, 0, 6))
    assert registry.longest_prefix(full) == {"b": PrefixHolding(6, 6, 0, 0)}
    b.publish(remove(full, 0, 6))
    assert registry.longest_prefix(full) == {}
    stats = registry.stats()
    assert (stats.families, stats.blocks, stats.entries) == (0, 0, 0)


def test_storing_twice_changes_only_the_tier(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a = Node(registry, "a")
    full = chain(3)
    a.publish(store(full, 0, 4, Tier.GPU))
    a.publish(store(full, 0, 4, Tier.CPU))
    assert registry.longest_prefix(full) == {"a": PrefixHolding(4, 0, 4, 0)}
    assert registry.stats().entries == 4


def test_duplicates_are_ignored(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a = Node(registry, "a")
    full = chain(4)
    first = a.batch(store(full, 0, 4))
    second = a.batch(remove(full, 2, 4))
    assert registry.publish(first).status is PublishStatus.APPLIED
    assert registry.publish(second).status is PublishStatus.APPLIED
    replay = registry.publish(first)
    assert (replay.status, replay.applied_through) == (PublishStatus.DUPLICATE, 2)
    assert registry.longest_prefix(full) == {"a": PrefixHolding(2, 2, 0, 0)}


def test_out_of_order_batches_wait_for_the_gap(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a = Node(registry, "a")
    full = chain(5)
    b1, b2, b3 = a.batch(store(full, 0, 4)), a.batch(remove(full, 2, 4)), a.batch(store(full, 2, 6, Tier.CPU))
    assert registry.publish(b3).status is PublishStatus.BUFFERED
    assert registry.publish(b3).status is PublishStatus.DUPLICATE  # already buffered
    assert registry.publish(b2).status is PublishStatus.BUFFERED
    assert registry.longest_prefix(full) == {}
    result = registry.publish(b1)
    assert (result.status, result.applied_through, result.batches_applied) == (PublishStatus.APPLIED, 3, 3)
    # the state of applying 1, 2, 3 in order
    assert registry.longest_prefix(full) == {"a": PrefixHolding(6, 2, 4, 0)}
    assert registry.publish(b2).status is PublishStatus.DUPLICATE


def test_batches_too_far_ahead_are_dropped(registry_env: RegistryEnv) -> None:
    registry = registry_env.make(max_buffered_batches=4)
    a = Node(registry, "a")
    full = chain(6)
    far = EventBatch("a", a.epoch, 6, (store(full, 0, 4),))
    result = registry.publish(far)
    assert (result.status, result.applied_through) == (PublishStatus.OUT_OF_WINDOW, 0)
    assert registry.publish(EventBatch("a", a.epoch, 5, (store(full, 0, 4),))).status is PublishStatus.BUFFERED


def test_publish_many_equals_publishing_in_order(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a = Node(registry, "a")
    full = chain(7)
    batches = [a.batch(store(full, 0, 6)), a.batch(move(full, 0, 2, Tier.CPU)), a.batch(remove(full, 5, 6))]
    results = registry.publish_many([batches[0], batches[2], batches[1], batches[0]])
    assert [r.status for r in results] == [
        PublishStatus.APPLIED, PublishStatus.BUFFERED, PublishStatus.APPLIED, PublishStatus.DUPLICATE
    ]
    assert registry.longest_prefix(full) == {"a": PrefixHolding(5, 3, 2, 0)}
    assert registry.publish_many([]) == []


def test_fencing_a_restarted_node(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    old = Node(registry, "a")
    full = chain(8)
    old.publish(store(full, 0, 6))
    assert registry.needs_resync("a", old.epoch) is False
    new = Node(registry, "a")
    assert new.epoch == old.epoch + 1
    assert registry.needs_resync("a", old.epoch) is True
    # the old epoch's entries no longer count
    assert registry.longest_prefix(full) == {}
    # and the old process can neither publish nor renew; nothing changes
    with pytest.raises(FencedEpoch):
        old.publish(store(full, 0, 6))
    with pytest.raises(FencedEpoch):
        registry.heartbeat("a", old.epoch, NodeLoad())
    assert registry.longest_prefix(full) == {}
    # the new epoch counts from 1 again; re-announcing drops the old epoch's records
    assert new.publish(store(full, 0, 3)) is PublishStatus.APPLIED
    assert registry.longest_prefix(full) == {"a": PrefixHolding(3, 3, 0, 0)}
    assert registry.live_nodes()["a"].epoch == new.epoch
    assert registry.stats().entries == 3 + 3  # blocks 3..5 of the old epoch await a sweep
    assert registry.sweep() == 3  # type: ignore[attr-defined]
    assert registry.stats().entries == 3


def test_publish_many_raises_fenced_after_sending_all(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    old = Node(registry, "a")
    new = Node(registry, "a")
    b = Node(registry, "b")
    full = chain(17)
    with pytest.raises(FencedEpoch):
        registry.publish_many([old.batch(store(full, 0, 2)), b.batch(store(full, 0, 4)),
                               new.batch(store(full, 0, 1))])
    assert registry.longest_prefix(full) == {"a": PrefixHolding(1, 1, 0, 0), "b": PrefixHolding(4, 4, 0, 0)}


def test_epochs_stay_above_what_the_node_knew(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    assert registry.register_node("a", previous_epoch=41) == 42
    assert registry.register_node("a") == 43
    assert registry.register_node("a", previous_epoch=10) == 44


def test_unknown_node(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    assert registry.heartbeat("ghost", 1, NodeLoad()) is False
    assert registry.needs_resync("ghost", 1) is True
    result = registry.publish(EventBatch("ghost", 1, 1, (store(chain(1), 0, 2),)))
    assert result.status is PublishStatus.RESYNC
    assert registry.longest_prefix(chain(1)) == {}


def test_heartbeat_carries_load(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a = Node(registry, "a")
    assert registry.heartbeat("a", a.epoch, NodeLoad(3, 100, 400)) is True
    info = registry.live_nodes()["a"]
    assert (info.epoch, info.load) == (a.epoch, NodeLoad(3, 100, 400))
    assert 0 <= info.heartbeat_age_s < 5


def test_silent_node_drops_out_within_ttl(registry_env: RegistryEnv) -> None:
    registry = registry_env.make(heartbeat_interval_s=0.1, node_ttl_s=0.4)
    a, b = Node(registry, "a"), Node(registry, "b")
    full = chain(9)
    a.publish(store(full, 0, 4))
    b.publish(store(full, 0, 4))
    registry_env.advance(0.25)
    assert registry.heartbeat("b", b.epoch, NodeLoad(1, 0, 0))
    registry_env.advance(0.25)  # a silent for 0.5 s > 0.4 s; b renewed 0.25 s ago
    assert set(registry.live_nodes()) == {"b"}
    assert set(registry.longest_prefix(full)) == {"b"}
    # a renewing node comes back with its entries (it was never fenced)
    assert registry.heartbeat("a", a.epoch, NodeLoad())
    assert set(registry.longest_prefix(full)) == {"a", "b"}


def test_entries_expire_unless_refreshed(registry_env: RegistryEnv) -> None:
    registry = registry_env.make(entry_ttl_s=0.6, heartbeat_interval_s=1.0, node_ttl_s=60)
    a = Node(registry, "a")
    kept, dropped = chain(10), chain(11)
    a.publish(store(kept, 0, 3), store(dropped, 0, 3))
    registry_env.advance(0.35)
    a.publish(store(kept, 0, 3))  # re-announcing refreshes the family
    registry_env.advance(0.35)
    assert registry.longest_prefix(kept) == {"a": PrefixHolding(3, 3, 0, 0)}
    assert registry.longest_prefix(dropped) == {}
    assert registry.stats().families == 1


def test_purge_node(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a, b = Node(registry, "a"), Node(registry, "b")
    full = chain(12)
    a.publish(store(full, 0, 4))
    b.publish(store(full, 0, 2))
    assert registry.purge_node("a") is True
    assert registry.purge_node("a") is False
    assert registry.longest_prefix(full) == {"b": PrefixHolding(2, 2, 0, 0)}
    assert set(registry.live_nodes()) == {"b"}
    assert registry.stats().entries == 2  # a's entries are reclaimed
    assert registry.heartbeat("a", a.epoch, NodeLoad()) is False


def test_clear_namespace(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a = Node(registry, "a")
    x1, x2, y = chain(13, namespace="x"), chain(14, namespace="x"), chain(13, namespace="y")
    a.publish(store(x1, 0, 3, namespace="x"), store(x2, 0, 3, namespace="x"),
              store(y, 0, 3, namespace="y"))
    assert registry.clear_namespace("x") == 2
    assert registry.clear_namespace("x") == 0
    assert registry.longest_prefix(x1, "x") == {}
    assert registry.longest_prefix(y, "y") == {"a": PrefixHolding(3, 3, 0, 0)}


def test_index_stride(registry_env: RegistryEnv) -> None:
    registry = registry_env.make(index_stride_blocks=4)
    assert registry.index_stride == 4
    a, b = Node(registry, "a"), Node(registry, "b")
    full = chain(15, blocks=13)
    a.publish(store(full, 0, 10, Tier.CPU))  # checkpoints at depths 3 and 7
    b.publish(store(full, 0, 3))  # no checkpoint: nothing indexed
    assert registry.longest_prefix(full) == {"a": PrefixHolding(8, 0, 8, 0)}
    assert registry.longest_prefix(full[:7]) == {"a": PrefixHolding(4, 0, 4, 0)}
    assert registry.longest_prefix(full[:3]) == {}
    assert registry.stats().entries == 2
    # an event run starting mid-chain lands on the same checkpoints
    b.publish(store(full, 2, 13))
    assert registry.longest_prefix(full)["b"] == PrefixHolding(12, 12, 0, 0)


def test_bad_input_is_rejected_and_changes_nothing(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a = Node(registry, "a")
    full = chain(16)
    for bad_id in ("", "has space", "brace{", "star*", 7):
        with pytest.raises(InvalidArgument, match="node_id"):
            registry.register_node(bad_id)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="namespace"):
        registry.longest_prefix(full, "bad ns")
    with pytest.raises(InvalidArgument, match="seq"):
        registry.publish(EventBatch("a", a.epoch, 0, (store(full, 0, 2),)))
    with pytest.raises(InvalidArgument, match="epoch"):
        registry.publish(EventBatch("a", -1, 1, (store(full, 0, 2),)))
    with pytest.raises(InvalidArgument):
        registry.publish("not a batch")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="family"):
        BlockEvent.stored(full[2:4], Tier.GPU, first_position=2)
    with pytest.raises(InvalidArgument):
        registry.heartbeat("a", a.epoch, "busy")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        NodeLoad(-1, 0, 0)
    with pytest.raises(InvalidArgument):
        registry.longest_prefix(np.zeros(4, dtype=np.int64))
    with pytest.raises(InvalidArgument):
        registry.publish_many([EventBatch("a", a.epoch, 1, (store(full, 0, 2),)), EventBatch("a", a.epoch, 0, ())])
    assert registry.longest_prefix(full) == {}
    assert a.publish(store(full, 0, 1)) is PublishStatus.APPLIED
    assert registry.longest_prefix(full) == {"a": PrefixHolding(1, 1, 0, 0)}
