"""Property tests: longest_prefix equals a brute-force model, whatever the delivery order.

Each example builds a small tree of chains (a trunk and branches that share its first
blocks), lets three nodes store, remove and move random runs of blocks, then delivers every
node's batches shuffled and partly duplicated. The registry's answer for every chain must
equal the brute force over the model of applying each batch once, in order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import fakeredis
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.block_hashing import BlockHashArray, BlockHasher
from routing.config import RegistryConfig
from routing.memory_registry import InMemoryRegistry
from routing.redis_registry import RedisPrefixRegistry
from routing.registry import (
    BlockEvent,
    EventBatch,
    PrefixHolding,
    PrefixRegistry,
    PublishStatus,
    Tier,
)
from tests.routing.conftest import RedisServer

HASHER = BlockHasher("sha256", 2, b"model", "m")
NODES = ("a", "b", "c")
DEPTH = 10
_TRUNK = np.arange(DEPTH * 2, dtype=np.int32)
CHAINS: list[BlockHashArray] = [HASHER.hash_chain(_TRUNK)]
for fork in (1, 4, 7):
    tokens = _TRUNK.copy()
    tokens[fork * 2 :] += 1000 * fork
    CHAINS.append(HASHER.hash_chain(tokens))

Model = dict[str, dict[bytes, int]]  # node -> block key -> tier


def brute_force(model: Model, chain: BlockHashArray, stride: int) -> dict[str, PrefixHolding]:
    out = {}
    keys = chain.tolist()
    for node, held in model.items():
        tiers = [0, 0, 0]
        count = 0
        for depth in range(stride - 1, len(keys), stride):
            if keys[depth] not in held:
                break
            tiers[held[keys[depth]]] += stride
            count += stride
        if count:
            out[node] = PrefixHolding(count, *tiers)
    return out


op_strategy = st.tuples(
    st.sampled_from(NODES),
    st.sampled_from(["stored", "removed", "moved"]),
    st.integers(0, len(CHAINS) - 1),
    st.integers(0, DEPTH - 1),
    st.integers(1, DEPTH),
    st.sampled_from(list(Tier)),
)


def check_against_model(make: Callable[[int], PrefixRegistry], data: st.DataObject) -> None:
    stride = data.draw(st.sampled_from([1, 1, 2, 3]), label="stride")
    registry = make(stride)
    ops = data.draw(st.lists(op_strategy, max_size=24), label="ops")
    model: Model = {node: {} for node in NODES}
    epochs = {node: registry.register_node(node) for node in NODES}
    batches: dict[str, list[EventBatch]] = {node: [] for node in NODES}
    for node, kind, c, start, length, tier in ops:
        full = CHAINS[c]
        stop = min(DEPTH, start + length)
        run = full[start:stop]
        family = full[0].tobytes()
        if kind == "stored":
            event = BlockEvent.stored(run, tier, first_position=start, family=family)
        elif kind == "removed":
            event = BlockEvent.removed(run, first_position=start, family=family)
        else:
            event = BlockEvent.moved(run, tier, first_position=start, family=family)
        held = model[node]
        for depth in range(start, stop):
            if (depth + 1) % stride:
                continue  # only checkpoints are indexed
            key = full[depth].tobytes()
            if kind == "stored":
                held[key] = int(tier)
            elif kind == "removed":
                held.pop(key, None)
            elif key in held:
                held[key] = int(tier)
        seq = len(batches[node]) + 1
        batches[node].append(EventBatch(node, epochs[node], seq, (event,)))
    # deliver: each node's batches shuffled, some twice, nodes interleaved
    deliveries = [b for node in NODES for b in batches[node]]
    deliveries += data.draw(st.lists(st.sampled_from(deliveries), max_size=6), label="dups") if deliveries else []
    order = data.draw(st.permutations(deliveries), label="order")
    for batch in order:
        status = registry.publish(batch).status
        assert status in (PublishStatus.APPLIED, PublishStatus.BUFFERED, PublishStatus.DUPLICATE)
    for full in CHAINS:
        assert registry.longest_prefix(full) == brute_force(model, full, stride)
    stats = registry.stats()
    assert stats.entries == sum(len(held) for held in model.values())




def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@_settings(150)
@given(data=st.data())
def test_memory_matches_model(data: st.DataObject) -> None:
    check_against_model(
        lambda stride: InMemoryRegistry(RegistryConfig(index_stride_blocks=stride)), data
    )


@_settings(50)
@given(data=st.data())
def test_fakeredis_matches_model(data: st.DataObject) -> None:
    check_against_model(
        lambda stride: RedisPrefixRegistry(
            RegistryConfig(index_stride_blocks=stride), client=fakeredis.FakeRedis()
        ),
        data,
    )


_prefixes = itertools.count()


@pytest.mark.redis
@_settings(40)
@given(data=st.data())
def test_real_redis_matches_model(redis_server: RedisServer, data: st.DataObject) -> None:
    client = redis_server.client()

    def make(stride: int) -> PrefixRegistry:
        config = RegistryConfig(index_stride_blocks=stride, key_prefix=f"m{next(_prefixes)}")
        return RedisPrefixRegistry(config, client=client)

    check_against_model(make, data)
