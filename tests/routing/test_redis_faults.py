"""Faults on a real redis-server: down at start, down mid-run, restarted empty."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from kvcluster.errors import RegistryUnavailable
from routing.block_hashing import BlockHashArray, BlockHasher
from routing.config import RegistryConfig, RouterConfig
from routing.redis_registry import RedisPrefixRegistry
from routing.registry import BlockEvent, EventBatch, NodeLoad, PublishStatus, Tier
from routing.router import HashRing, Router, ring_key
from tests.routing.conftest import RedisServer

pytestmark = pytest.mark.redis

HASHER = BlockHasher("xxh3_128", 4)
NODES = ("a", "b", "c")


def registry_for(server: RedisServer) -> RedisPrefixRegistry:
    return RedisPrefixRegistry(RegistryConfig(
        backend="redis", url=server.url, index_stride_blocks=1, heartbeat_interval_s=0.1,
        node_ttl_s=0.5, socket_timeout_s=0.3,
    ))


class NodeAgent:
    """What a node does with the registry: register, announce, heartbeat, resync."""

    def __init__(self, registry: RedisPrefixRegistry, node_id: str) -> None:
        self.registry = registry
        self.node_id = node_id
        self.held: list[BlockHashArray] = []
        self.epoch = 0
        self.seq = 0
        self.register()

    def register(self) -> None:
        self.epoch = self.registry.register_node(self.node_id, previous_epoch=self.epoch)
        self.seq = 0

    def store(self, chain: BlockHashArray) -> None:
        self.held.append(chain)
        self._publish([BlockEvent.stored(chain, Tier.GPU)])

    def _publish(self, events: list[BlockEvent]) -> PublishStatus:
        self.seq += 1
        return self.registry.publish(EventBatch(self.node_id, self.epoch, self.seq, tuple(events))).status

    def heartbeat(self) -> bool:
        """One heartbeat period: renew; if the registry forgot us, register and re-announce."""
        if self.registry.heartbeat(self.node_id, self.epoch, NodeLoad(0, 10, 10)):
            return True
        self.register()
        assert self._publish([BlockEvent.stored(c, Tier.GPU) for c in self.held]) is PublishStatus.APPLIED
        return False


def chain(seed: int) -> BlockHashArray:
    return HASHER.hash_chain(np.arange(40, dtype=np.int32) + seed * 1000)


def test_down_at_start(own_redis_server: RedisServer) -> None:
    own_redis_server.stop()
    registry = registry_for(own_redis_server)
    with pytest.raises(RegistryUnavailable):
        registry.register_node("a")
    router = Router(registry, RouterConfig(), HASHER)
    with pytest.raises(RegistryUnavailable, match="no node is known"):
        router.route_hashes(chain(1))
    decision = router.route_hashes(chain(1), candidates=list(NODES))
    assert decision.fallback == "registry_unavailable"
    assert decision.node_id == HashRing(NODES, 64).pick(ring_key(chain(1)[0].tobytes()), set(NODES))
    # the server comes up: the router recovers by itself once its backoff has passed
    own_redis_server.start()
    agents = [NodeAgent(registry, n) for n in NODES]
    agents[2].store(chain(1))
    router_fast = Router(registry, RouterConfig(registry_retry_s=0.05, registry_retry_max_s=0.1), HASHER)
    assert router_fast.route_hashes(chain(1)).node_id == "c"


def test_down_mid_run_then_restarted_empty(own_redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    registry = registry_for(own_redis_server)
    agents = {n: NodeAgent(registry, n) for n in NODES}
    hot = chain(2)
    agents["b"].store(hot)
    router = Router(registry, RouterConfig(registry_retry_s=0.2, registry_retry_max_s=0.4), HASHER)
    first = router.route_hashes(hot)
    assert (first.node_id, first.fallback, first.matched_blocks) == ("b", None, 10)

    own_redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="routing.router"):
        during = [router.route_hashes(hot) for _ in range(20)]
    ring_choice = HashRing(NODES, 64).pick(ring_key(hot[0].tobytes()), set(NODES))
    assert {d.node_id for d in during} == {ring_choice}
    assert {d.fallback for d in during} == {"registry_unavailable"}
    assert router.registry_down and router.stats().registry_failures == 1  # backing off
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    with pytest.raises(RegistryUnavailable):
        agents["a"].heartbeat()

    own_redis_server.start()  # empty: no nodes, no entries, no scripts
    time.sleep(0.45)  # past the router's backoff
    empty = router.route_hashes(hot)
    assert not router.registry_down
    assert (empty.fallback, empty.node_id) == ("no_live_nodes", ring_choice)
    # one heartbeat period: each node learns the registry forgot it and re-announces
    assert [agents[n].heartbeat() for n in NODES] == [False, False, False]
    assert all(not registry.needs_resync(n, agents[n].epoch) for n in NODES)
    recovered = router.route_hashes(hot)
    assert (recovered.node_id, recovered.fallback, recovered.matched_blocks) == ("b", None, 10)
    assert agents["b"].epoch == 2  # above the epoch it had before the restart
