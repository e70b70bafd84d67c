"""kvcluster on a 3-node local Ray cluster with the embedded registry (a Ray actor)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
import yaml

from kvcluster.cli import main as cli_main
from kvcluster.client import KVClient
from kvcluster.config import KVClusterConfig
from kvcluster.connection import connect
from kvcluster.deploy import Deployment, deploy, undeploy
from kvcluster.errors import ConfigDrift, InvalidKV, InvalidTokens, LeaseError, NodeUnavailable
from kvcluster.node_handles import RayNodeHandle
from kvcluster.node_status import collect_status
from kvcluster.node_types import LookupReply
from kvcluster.synthetic_kv import SyntheticKV
from kvcluster.token_wire import prompt_to_wire
from tests.cluster.conftest import wait_until

pytestmark = pytest.mark.ray_cluster

NAMESPACE = "kvc-test-memory"


def make_config(namespace: str = NAMESPACE, **cache: Any) -> KVClusterConfig:
    return KVClusterConfig.from_dict({
        "cache": {"num_blocks": 512, **cache},
        "tiers": {"cpu": {"capacity": "8MiB"}},
        "registry": {"index_stride_blocks": 1, "heartbeat_interval_s": 0.5, "node_ttl_s": 2.0},
        "cluster": {"ray_namespace": namespace, "lease_ttl_s": 60},
    })


@pytest.fixture(scope="module")
def deployment(ray_cluster: object) -> Iterator[Deployment]:
    deployed = deploy(make_config())
    try:
        yield deployed
    finally:
        undeploy(NAMESPACE)


@pytest.fixture(scope="module")
def client(deployment: Deployment) -> Iterator[KVClient]:
    kv_client = connect(make_config())
    yield kv_client
    kv_client.close()


@pytest.fixture(scope="module")
def kv_model() -> SyntheticKV:
    return SyntheticKV(make_config().model)


def test_one_actor_per_ray_node_and_up_is_idempotent(deployment: Deployment) -> None:
    assert len(deployment.nodes) == 3
    placements = ray.get([actor.ray_node_id.remote() for actor in deployment.nodes.values()])
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert set(placements) == alive
    again = deploy(make_config())
    assert again.identities == deployment.identities  # same actors, same epochs


def test_config_drift_is_refused_naming_both_values(deployment: Deployment) -> None:
    with pytest.raises(ConfigDrift) as info:
        deploy(make_config(block_size=32))
    text = str(info.value)
    assert "block_size" in text and "16" in text and "32" in text


def test_route_store_fetch_round_trip(client: KVClient, kv_model: SyntheticKV) -> None:
    prompt = np.arange(2000, 2000 + 300)
    first = client.route_and_lookup(prompt)
    assert first.matched_tokens == 0
    assert first.lease_id is None
    client.store(prompt, kv_model.kv(prompt), node=first.node_id)
    time.sleep(0.1)
    longer = np.concatenate([prompt, np.arange(50)])
    with client.lookup(longer) as result:
        assert result.node_id == first.node_id  # the router found the holder
        assert result.matched_tokens == 300
        assert result.blocks_per_tier["gpu"] == 19
        assert "node" in result.explanation
        kv = client.fetch(result)
        assert torch.equal(kv, kv_model.kv(longer)[:, :, :300])
        client.store(longer, kv_model.kv(longer)[:, :, 300:], result=result)
    before = client.stats().speculative_hits
    with client.lookup(longer) as result:
        assert result.matched_tokens == longer.size
    # The family's node was known, so that lookup was sent before the registry answered.
    assert client.stats().speculative_hits == before + 1


def test_async_forms_and_long_prompt_references_through_ray(client: KVClient, kv_model: SyntheticKV) -> None:
    """The asyncio forms await Ray's object refs; a long prompt's second lookup goes as a
    reference to the copy its node kept (decoded by the actor, answers identical)."""
    prompt = np.random.default_rng(7).integers(0, 32_000, 2_500)

    async def scenario() -> None:
        stored = await client.astore(prompt, kv_model.kv(prompt))
        deadline = time.monotonic() + 10
        while not client.router.route(prompt).matched_blocks:  # until the registry indexes it
            assert time.monotonic() < deadline, "the stored prefix never reached the registry"
            await asyncio.sleep(0.05)
        for _ in range(2):
            async with client.alookup(prompt) as result:
                assert (result.node_id, result.matched_tokens) == (stored.node_id, prompt.size)
                assert torch.equal(await client.afetch(result), kv_model.kv(prompt))
        with client.lookup(prompt) as result:
            assert result.matched_tokens == prompt.size

    asyncio.run(scenario())
    assert all(stats.leases == 0 for stats in client.node_stats().values())


def test_bad_input_gets_clear_errors(client: KVClient, kv_model: SyntheticKV) -> None:
    with pytest.raises(InvalidTokens):
        client.route_and_lookup([])
    with pytest.raises(InvalidTokens, match="outside the vocabulary"):
        client.route_and_lookup([1, 2, 10**8])
    prompt = np.arange(5000, 5040)
    with pytest.raises(InvalidKV, match="shape"):
        client.store(prompt, torch.zeros(1, 2, 3))
    with pytest.raises(InvalidKV, match="dtype"):
        client.store(prompt, kv_model.kv(prompt).to(torch.float16))
    client.store(prompt, kv_model.kv(prompt))
    result = client.route_and_lookup(prompt)
    assert client.release(result)
    with pytest.raises(LeaseError):
        client.fetch(result)


def test_namespaces_are_isolated_across_the_cluster(client: KVClient, kv_model: SyntheticKV) -> None:
    prompt = np.arange(7000, 7100)
    client.store(prompt, kv_model.kv(prompt), "tenant-a")
    with client.lookup(prompt, "tenant-b") as other:
        assert other.matched_tokens == 0
    with client.lookup(prompt, "tenant-a") as own:
        assert own.matched_tokens == 100


def test_migration_pulls_a_prefix_node_to_node(client: KVClient, kv_model: SyntheticKV) -> None:
    prompt = np.arange(9000, 9400)
    source, target = client.nodes[0], client.nodes[1]
    client.store(prompt, kv_model.kv(prompt), node=source)
    moved = client.migrate_prefix(prompt, "default", source=source, target=target)
    assert moved.node_id == target
    assert moved.new_tokens == 400
    stats = client.node_stats()
    assert stats[source].migrations_out >= 1
    assert stats[target].migrations_in >= 1
    # The client releases the export's lease without waiting for the answer: it ends soon.
    assert wait_until(lambda: client.node_stats()[source].leases == 0, timeout_s=10)
    # The target now serves the prefix itself, bit-exact.
    handle = client.node_handle(target)
    reply = LookupReply.from_wire(handle.call("lookup", *prompt_to_wire("default", prompt, np.dtype("<i8"))))
    assert reply.matched_tokens == 400 and reply.lease_id is not None
    try:
        assert torch.equal(handle.call("fetch", reply.lease_id, "default").to_tensor(), kv_model.kv(prompt))
    finally:
        handle.call("release", reply.lease_id)


@ray.remote
def export_that_fails(error: Exception) -> None:
    """Stands in for a source whose export raised."""
    raise error


def test_an_import_whose_export_failed_raises_and_stores_nothing(client: KVClient) -> None:
    handle = client.node_handle(client.nodes[2])
    prompt = np.arange(9500, 9600)
    wire = prompt_to_wire("default", prompt, np.dtype("<i8"))
    before = handle.call("stats")
    # A cluster error from the source reaches the caller as itself...
    with pytest.raises(InvalidKV, match="pages of float16"):
        handle.call("import_prefix", [export_that_fails.remote(InvalidKV("pages of float16"))], *wire)
    # ...anything else as the source being unavailable.
    with pytest.raises(NodeUnavailable, match="the export of a pull failed"):
        handle.call("import_prefix", [export_that_fails.remote(ValueError("disk on fire"))], *wire)
    with pytest.raises(InvalidKV, match="a list of one pages object, got tuple"):
        handle.call("import_prefix", (None,), *wire)
    after = handle.call("stats")
    assert (after.blocks_free, after.migrations_in) == (before.blocks_free, before.migrations_in)


def test_status_reads_the_node_metrics(
    client: KVClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = collect_status(NAMESPACE)
    assert len(rows) == 3
    assert all(row.error is None for row in rows)
    assert sum(row.lookups_hit + row.lookups_miss for row in rows) > 0
    assert all(row.pages_total.get("gpu") == 512 for row in rows)
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(make_config().model_dump(mode="json")))
    assert cli_main(["status", "--config", str(config_file), "--min-nodes", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("node-") == 3 and "hit rate" in out
    assert cli_main(["status", "--config", str(config_file), "--min-nodes", "4"]) == 1


def test_node_actors_freeze_their_start_up_objects_and_time_gc_pauses(client: KVClient) -> None:
    for node in client.nodes:
        text = client.node_handle(node).call("metrics_text")
        frozen = [line for line in text.splitlines() if line.startswith("kvcluster_gc_frozen_objects{")]
        assert len(frozen) == 1 and float(frozen[0].rsplit(" ", 1)[1]) > 50_000, frozen
        # Pauses are timed from start-up on (counted in tests/cluster/test_node_metrics.py).
        pauses = [line for line in text.splitlines() if line.startswith("kvcluster_gc_pause_seconds_count{")]
        assert len(pauses) == 3, pauses


def test_a_session_end_reaches_its_node_through_ray(client: KVClient, kv_model: SyntheticKV) -> None:
    with client.session("ray-chat", "session-ends") as chat:  # a namespace of its own: nothing shared
        result = chat.prompt(np.arange(7000, 7100))
        answer = np.arange(10, 18)
        chat.complete(result, answer, kv_model.kv(np.concatenate([result.tokens, answer])))
        assert chat.node_id is not None
        node = client.node_handle(chat.node_id)
        before = node.call("stats")
    after = node.call("stats")
    assert after.ended_conversations == before.ended_conversations + 1
    assert after.demoted_tokens == before.demoted_tokens + 108
    assert asyncio.run(client.aend_conversation(chat.history, "session-ends")) == 108


def test_pools_return_to_baseline(client: KVClient) -> None:
    for stats in client.node_stats().values():
        assert stats.leases == 0
        assert stats.sequences == 0
    for handle_node in client.nodes:
        assert client._nodes[handle_node].call("check_invariants")


@ray.remote
class PagesAfter:
    """Stands in for a node whose ``fetch`` answers, after ``seconds``, with pages too large
    for Ray to inline (so they arrive through the object store)."""

    def fetch(self, seconds: float, nbytes: int) -> np.ndarray:
        time.sleep(seconds)
        return np.arange(nbytes, dtype=np.uint8)


def test_a_fetch_reply_from_the_object_store_is_waited_for_then_read(ray_cluster: object) -> None:
    actor = PagesAfter.remote()  # type: ignore[attr-defined]
    handle = RayNodeHandle("pages", actor, timeout_s=10)
    pages = handle.call("fetch", 0.2, 4 << 20)
    assert pages.nbytes == 4 << 20 and np.array_equal(pages[:300], np.arange(300, dtype=np.uint8))
    slow = RayNodeHandle("pages", actor, timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(NodeUnavailable, match=r"node pages did not answer within 0.3 s"):
        slow.call("fetch", 3.0, 4 << 20)
    assert time.monotonic() - start < 2.5  # the wait gave up at its timeout
    ray.kill(actor)


def test_an_awaited_call_gives_up_at_the_handle_timeout(ray_cluster: object) -> None:
    actor = PagesAfter.remote()  # type: ignore[attr-defined]
    handle = RayNodeHandle("pages", actor, timeout_s=10)
    pages = asyncio.run(handle.acall("fetch", 0.1, 4 << 20))
    assert pages.nbytes == 4 << 20 and np.array_equal(pages[:300], np.arange(300, dtype=np.uint8))
    slow = RayNodeHandle("pages", actor, timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(NodeUnavailable, match=r"node pages did not answer within 0.3 s"):
        asyncio.run(slow.acall("fetch", 3.0, 4 << 20))
    assert time.monotonic() - start < 2.5  # the wait gave up at its timeout
    ray.kill(actor)
    with pytest.raises(NodeUnavailable):  # a dead actor: Ray's error, mapped
        asyncio.run(handle.acall("fetch", 0.0, 16))
