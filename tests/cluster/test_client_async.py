"""The asyncio forms of the client: the same answers, leases and failover as the sync ones.

In-process nodes (their ``acall`` runs the node method in a worker thread, as a Ray actor
would run it elsewhere); ``asyncio.run`` drives each scenario.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from kvcluster.client import KVClient
from kvcluster.config import KVClusterConfig
from kvcluster.errors import InvalidKV, NodeUnavailable
from kvcluster.node_actor import NodeActor
from kvcluster.prompt_memory import PromptMemory
from kvcluster.synthetic_kv import SyntheticKV
from tests.cluster.in_process import SwitchableHandle, in_process_client


class FlakyHandle(SwitchableHandle):
    """An in-process node that can be switched off and counts its asynchronous lookups."""

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.async_lookups = 0

    async def acall(self, method: str, *args: Any) -> Any:
        self.async_lookups += not self.down and method == "lookup"
        return await super().acall(method, *args)


@contextmanager
def running_client() -> Iterator[tuple[KVClient, dict[str, FlakyHandle], list[NodeActor]]]:
    with in_process_client(FlakyHandle, cache={"num_blocks": 1024, "max_context": 8192}) as running:
        yield running


@pytest.fixture
def kv_model() -> SyntheticKV:
    return SyntheticKV(KVClusterConfig.from_dict({}).model)


def live_leases(client: KVClient) -> int:
    return sum(stats.leases for stats in client.node_stats().values())


def test_async_store_lookup_fetch_and_release_match_the_sync_forms(kv_model: SyntheticKV) -> None:
    prompt = np.arange(100, 300)
    turn = np.concatenate([prompt, np.arange(900, 950)])

    async def scenario(client: KVClient) -> None:
        stored = await client.astore(prompt, kv_model.kv(prompt))
        assert stored.new_tokens == prompt.size
        result = await client.aroute_and_lookup(turn)
        assert (result.node_id, result.matched_tokens) == (stored.node_id, prompt.size)
        assert result.lease_id is not None and live_leases(client) == 1
        kv = await client.afetch(result)
        assert torch_equal(kv, kv_model.kv(prompt))
        extended = await client.astore(turn, kv_model.kv(turn)[:, :, prompt.size :], result=result)
        assert (extended.node_id, extended.new_tokens) == (stored.node_id, 50)
        assert await client.arelease(result) is True
        assert await client.arelease(result) is False
        async with client.alookup(turn) as again:
            assert again.matched_tokens == turn.size
            assert torch_equal(await client.afetch(again), kv_model.kv(turn))
        with pytest.raises(InvalidKV, match="kv has shape"):
            await client.astore(turn, kv_model.kv(prompt))
        assert live_leases(client) == 0
        sync = client.route_and_lookup(turn)
        assert (sync.node_id, sync.matched_tokens) == (again.node_id, again.matched_tokens)
        client.release(sync)

    with running_client() as (client, _, _):
        asyncio.run(scenario(client))


def test_async_lookup_releases_its_lease_when_the_block_raises(kv_model: SyntheticKV) -> None:
    prompt = np.arange(100, 200)

    async def scenario(client: KVClient) -> None:
        await client.astore(prompt, kv_model.kv(prompt))
        with pytest.raises(RuntimeError, match="engine failed"):
            async with client.alookup(prompt):
                assert live_leases(client) == 1
                raise RuntimeError("engine failed")
        assert live_leases(client) == 0

    with running_client() as (client, _, _):
        asyncio.run(scenario(client))


def test_async_lookup_routes_around_an_unavailable_node(kv_model: SyntheticKV) -> None:
    prompt = np.arange(100, 200)

    async def scenario(client: KVClient, handles: dict[str, FlakyHandle]) -> None:
        stored = await client.astore(prompt, kv_model.kv(prompt))
        handles[stored.node_id].down = True
        result = await client.aroute_and_lookup(prompt)
        assert result.node_id != stored.node_id and result.matched_tokens == 0  # a miss, not an error
        await client.arelease(result)
        for handle in handles.values():
            handle.down = True
        with pytest.raises(NodeUnavailable):
            await client.aroute_and_lookup(prompt)

    with running_client() as (client, handles, _):
        asyncio.run(scenario(client, handles))


def test_async_calls_send_long_prompts_by_reference_and_recover_when_forgotten(kv_model: SyntheticKV) -> None:
    prompt = np.random.default_rng(0).integers(0, 32_000, 3_000)

    async def scenario(client: KVClient, handles: dict[str, FlakyHandle], nodes: list[NodeActor]) -> None:
        stored = await client.astore(prompt, kv_model.kv(prompt))
        holder = next(node for node in nodes if node.node_id == stored.node_id)
        assert len(holder._prompts) == 1
        async with client.alookup(prompt) as result:
            assert result.matched_tokens == prompt.size
        assert handles[stored.node_id].async_lookups == 1
        holder._prompts = PromptMemory(1 << 20)  # as after a restart
        async with client.alookup(prompt) as result:
            assert result.matched_tokens == prompt.size
        assert handles[stored.node_id].async_lookups == 3  # the reference, then the full prompt
        assert len(holder._prompts) == 1
        assert live_leases(client) == 0

    with running_client() as (client, handles, nodes):
        asyncio.run(scenario(client, handles, nodes))


def torch_equal(a: Any, b: Any) -> bool:
    return bool((a == b).all()) and tuple(a.shape) == tuple(b.shape)


class SlowReplyHandle(SwitchableHandle):
    """An in-process node whose lookup replies take a while to come back (the lease is
    already granted on the node)."""

    async def acall(self, method: str, *args: Any) -> Any:
        reply = await super().acall(method, *args)
        if method == "lookup":
            await asyncio.sleep(0.3)
        return reply


def test_a_lookup_cancelled_in_flight_releases_its_lease(kv_model: SyntheticKV) -> None:
    # An asyncio server cancels the request of a client that went away: the lookup already
    # ran on the node, and its lease must not stay pinned (and count as load) until expiry.
    with in_process_client(SlowReplyHandle) as (client, _, actors):
        prompt = np.arange(100, 164)
        client.store(prompt, kv_model.kv(prompt))

        async def scenario() -> None:
            task = asyncio.create_task(client.aroute_and_lookup(prompt))
            await asyncio.sleep(0.1)  # the node has answered; the reply is on its way
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.5)  # the reply arrives, unwanted

        asyncio.run(scenario())
        assert [actor._engine.stats().leases for actor in actors] == [0, 0, 0]
