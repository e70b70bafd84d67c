"""Faults on a 3-node Ray cluster: Redis killed and restarted empty, a node actor killed,
a restarted node re-announcing its NVMe pages (warm restart)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from kvcluster.client import KVClient
from kvcluster.config import KVClusterConfig
from kvcluster.connection import connect
from kvcluster.deploy import Deployment, deploy, find_nodes, undeploy
from kvcluster.synthetic_kv import SyntheticKV
from tests.cluster.conftest import RedisServer, wait_until

pytestmark = [pytest.mark.ray_cluster, pytest.mark.redis, pytest.mark.slow]

NAMESPACE = "kvc-test-faults"


@pytest.fixture(scope="module")
def config(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> KVClusterConfig:
    nvme_dir: Path = tmp_path_factory.mktemp("nvme")
    return KVClusterConfig.from_dict({
        "cache": {"num_blocks": 64},
        "tiers": {
            "cpu": {"capacity": "256KiB"},
            "nvme": {"enabled": True, "paths": [str(nvme_dir)], "capacity": "16MiB", "io_threads": 1},
            "high_watermark": 0.5, "low_watermark": 0.25,
        },
        "registry": {"backend": "redis", "url": redis_server.url, "index_stride_blocks": 1,
                     "heartbeat_interval_s": 0.3, "node_ttl_s": 1.5},
        "cluster": {"ray_namespace": NAMESPACE, "lease_ttl_s": 60},
    })


@pytest.fixture(scope="module")
def deployment(ray_cluster: object, config: KVClusterConfig) -> Iterator[Deployment]:
    deployed = deploy(config)
    try:
        yield deployed
    finally:
        undeploy(NAMESPACE)


@pytest.fixture(scope="module")
def client(deployment: Deployment, config: KVClusterConfig) -> Iterator[KVClient]:
    kv_client = connect(config)
    yield kv_client
    kv_client.close()


@pytest.fixture(scope="module")
def kv_model(config: KVClusterConfig) -> SyntheticKV:
    return SyntheticKV(config.model)


def test_redis_killed_then_restarted_empty(
    client: KVClient, kv_model: SyntheticKV, redis_server: RedisServer
) -> None:
    prompt = np.arange(100, 420)
    stored = client.store(prompt, kv_model.kv(prompt))

    def routed_to_holder() -> bool:
        with client.lookup(prompt) as result:
            return result.node_id == stored.node_id

    assert wait_until(routed_to_holder)
    redis_server.stop()
    # Routing falls back to affinity; the data path keeps working; nothing raises.
    for _ in range(5):
        with client.lookup(prompt) as result:
            assert "registry" in result.explanation
            kv = client.fetch(result)
            assert torch.equal(kv, kv_model.kv(prompt)[:, :, : kv.shape[2]])
    assert client.router.stats().registry_failures >= 1
    redis_server.start()  # restarted empty: the nodes must re-announce what they hold

    def routed_by_prefix() -> bool:
        with client.lookup(prompt) as result:
            return result.node_id == stored.node_id and result.matched_tokens == prompt.size and (
                "registry" not in result.explanation
            )

    assert wait_until(routed_by_prefix)


def test_killed_node_routes_elsewhere_and_restarts_warm(
    client: KVClient, kv_model: SyntheticKV, config: KVClusterConfig
) -> None:
    victim_node = client.nodes[0]
    prompt = np.arange(3000, 3160)  # 10 blocks
    client.store(prompt, kv_model.kv(prompt), node=victim_node)
    # Push the prompt's pages down: device pool (64 blocks) -> host (32 pages) -> NVMe.
    for i in range(10):
        filler = np.arange(160) + 4000 + 200 * i
        client.store(filler, kv_model.kv(filler), node=victim_node)
    assert ray.get(find_nodes(NAMESPACE)[victim_node].drain_spills.remote())
    assert wait_until(lambda: client.node_stats()[victim_node].tiers["nvme"]["pages_used"] >= 10)

    actor = find_nodes(NAMESPACE)[f"{victim_node}"]
    ray.kill(actor, no_restart=True)

    def dead() -> bool:  # ray.kill returns before the process is gone
        try:
            ray.get(actor.ping.remote(), timeout=1)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            return False
        return False

    # Before any lookup: one served (or a speculative one received) by the dying node would
    # promote the prompt's pages from NVMe to its host tier, and the restart would lose them.
    assert wait_until(dead)
    # The client still has the dead node's handle: the call fails, it routes elsewhere.
    with client.lookup(prompt) as result:
        assert result.node_id != victim_node
    # Its registry entries stop counting within the node TTL.
    assert wait_until(lambda: victim_node not in client.router._registry.live_nodes(), timeout_s=10)

    # Warm restart: `up` again creates the node's actor, which finds its NVMe pages.
    deploy(config)
    restarted = connect(config)
    try:
        # The new process started with an empty host tier, so any spilled block it serves was
        # recovered from its NVMe files (a lookup may already have promoted some to the host).
        seen: list[object] = []

        def served_from_nvme() -> bool:
            with restarted.lookup(prompt) as again:
                seen[:] = [again, restarted.node_stats()[victim_node]]
                recovered = again.blocks_per_tier.get("nvme", 0) + again.blocks_per_tier.get("cpu", 0)
                return again.node_id == victim_node and recovered > 0

        assert wait_until(served_from_nvme), (seen, restarted.node_stats()[victim_node].tiers)
        with restarted.lookup(prompt) as again:
            kv = restarted.fetch(again)
            assert torch.equal(kv, kv_model.kv(prompt)[:, :, : kv.shape[2]])
            assert kv.shape[2] >= 16
    finally:
        restarted.close()


