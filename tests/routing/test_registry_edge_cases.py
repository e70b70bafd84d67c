"""Edge cases of the registry contract where the backends diverged, run against all three."""

from __future__ import annotations

import numpy as np
import pytest

from kvcluster.errors import InvalidArgument
from routing.block_hashing import BLOCK_HASH_DTYPE
from routing.redis_registry import encode_ops
from routing.registry import (
    BlockEvent,
    EventBatch,
    EventKind,
    NodeLoad,
    PrefixHolding,
    PublishStatus,
    Tier,
)
from tests.routing.conftest import RegistryEnv
from tests.routing.test_registry_contract import Node, chain, store


def test_a_bad_tier_is_an_invalid_argument_and_changes_nothing(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a = Node(registry, "a")
    full = chain(1)
    for bad in (5, -1, "gpu"):
        with pytest.raises(InvalidArgument, match="tier"):
            BlockEvent.stored(full, bad)  # type: ignore[arg-type]
    # built directly, past the factory methods: publish validates it
    bad_tier = BlockEvent(EventKind.STORED, full[0].tobytes(), 0, full, 7)  # type: ignore[arg-type]
    bad_kind = BlockEvent("stored", full[0].tobytes(), 0, full, Tier.GPU)  # type: ignore[arg-type]
    for event in (bad_tier, bad_kind):
        with pytest.raises(InvalidArgument):
            registry.publish(EventBatch("a", a.epoch, 1, (store(full, 0, 2), event)))
    assert registry.longest_prefix(full) == {}
    assert a.publish(store(full, 0, 3)) is PublishStatus.APPLIED  # seq 1 was never consumed
    assert registry.longest_prefix(full) == {"a": PrefixHolding(3, 3, 0, 0)}


def test_events_must_be_a_sequence_of_events(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    a = Node(registry, "a")
    full = chain(2)
    with pytest.raises(InvalidArgument, match="events"):
        registry.publish(EventBatch("a", a.epoch, 1, store(full, 0, 2)))  # type: ignore[arg-type]
    assert a.publish(store(full, 0, 2)) is PublishStatus.APPLIED


def test_numpy_integers_are_accepted_alike(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    epoch = np.int64(registry.register_node("a"))
    full = chain(3)
    result = registry.publish(EventBatch("a", epoch, np.int64(1), (store(full, 0, 2),)))  # type: ignore[arg-type]
    assert (result.status, result.applied_through) == (PublishStatus.APPLIED, 1)
    assert registry.heartbeat("a", epoch, NodeLoad()) is True  # type: ignore[arg-type]
    assert registry.longest_prefix(full) == {"a": PrefixHolding(2, 2, 0, 0)}


def test_previous_epoch_beyond_exact_integers_is_rejected(registry_env: RegistryEnv) -> None:
    registry = registry_env.make()
    for bad in (2**53, 2**63, 10**20):
        with pytest.raises(InvalidArgument, match="previous_epoch"):
            registry.register_node("a", previous_epoch=bad)
    assert registry.live_nodes() == {}
    assert registry.register_node("a", previous_epoch=2**53 - 2) == 2**53 - 1


def test_clear_namespace_counts_only_families_still_there(registry_env: RegistryEnv) -> None:
    registry = registry_env.make(entry_ttl_s=0.2, heartbeat_interval_s=1.0, node_ttl_s=60)
    a = Node(registry, "a")
    a.publish(store(chain(4, namespace="x"), 0, 2, namespace="x"),
              store(chain(5, namespace="y"), 0, 2, namespace="y"))
    registry_env.advance(0.3)
    assert registry.clear_namespace("x") == 0  # its one family had expired
    assert registry.stats().families == 0


def test_a_batch_naming_more_families_than_the_blob_can_is_refused() -> None:
    keys = np.arange(2 * 65536, dtype=np.uint64).view(BLOCK_HASH_DTYPE)  # 65,536 one-block chains
    events = [BlockEvent.stored(keys[i : i + 1], Tier.GPU) for i in range(65536)]
    with pytest.raises(InvalidArgument, match="at most 65535 families"):
        encode_ops(events, 1, lambda namespace, family: family.hex())
    names, _ = encode_ops(events[:65535], 1, lambda namespace, family: family.hex())
    assert len(names) == 65535
