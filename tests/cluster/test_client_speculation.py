"""Speculative lookups: the client asks a prefix family's last node while the registry answers.

In-process nodes behind handles that say their calls run concurrently (as Ray actors do), so
every decision of the client is visible: which node got a lookup, which lease was released.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from kvcluster.client import ClientStats, KVClient
from kvcluster.config import KVClusterConfig
from kvcluster.node_handles import LocalNodeHandle
from kvcluster.node_types import LookupReply
from kvcluster.synthetic_kv import SyntheticKV
from tests.cluster.in_process import in_process_client


class RecordingHandle(LocalNodeHandle):
    """An in-process node that claims concurrent calls and records every method called."""

    concurrent = True

    def __init__(self, node: Any, calls: list[tuple[str, str]]) -> None:
        super().__init__(node)
        self._calls = calls

    def call(self, method: str, *args: Any) -> Any:
        self._calls.append((self.node_id, method))
        return super().call(method, *args)


@contextmanager
def running_client(**cluster: Any) -> Iterator[tuple[KVClient, list[tuple[str, str]]]]:
    """A client of three in-process nodes (closed afterwards) and the log of their calls."""
    calls: list[tuple[str, str]] = []
    with in_process_client(lambda node: RecordingHandle(node, calls), cluster=cluster) as (client, _, _):
        yield client, calls


@pytest.fixture
def kv_model() -> SyntheticKV:
    return SyntheticKV(KVClusterConfig.from_dict({}).model)


def leases(client: KVClient) -> dict[str, int]:
    return {node: stats.leases for node, stats in client.node_stats().items()}


def lookups(calls: list[tuple[str, str]]) -> list[str]:
    return [node for node, method in calls if method == "lookup"]


def test_the_second_lookup_of_a_family_is_sent_before_routing_and_used(kv_model: SyntheticKV) -> None:
    with running_client() as (client, calls):
        prompt = np.arange(100, 164)
        stored = client.store(prompt, kv_model.kv(prompt))
        with client.lookup(prompt) as first:  # unknown family: routed, then asked
            assert first.node_id == stored.node_id
        assert client.stats() == ClientStats(0, 0)
        calls.clear()
        with client.lookup(np.concatenate([prompt, [5, 6, 7]])) as second:  # same family
            assert second.node_id == stored.node_id and second.matched_tokens == 64
        assert lookups(calls) == [stored.node_id]  # one lookup: the speculative one, used
        assert client.stats() == ClientStats(1, 0)
        assert set(leases(client).values()) == {0}


def test_a_lost_speculation_is_released_on_its_node(kv_model: SyntheticKV) -> None:
    with running_client() as (client, calls):
        prompt = np.arange(100, 164)
        stored = client.store(prompt, kv_model.kv(prompt))
        with client.lookup(prompt):
            pass
        # The family moves: another node now holds a longer prefix of the next prompt, so
        # the router leaves the node the client guessed.
        longer = np.concatenate([prompt, np.arange(500, 564)])
        other = next(node for node in client.nodes if node != stored.node_id)
        client.store(longer, kv_model.kv(longer), node=other)
        calls.clear()
        with client.lookup(longer) as result:
            assert result.node_id == other and result.matched_tokens == 128
            assert leases(client) == {node: int(node == other) for node in client.nodes}
        assert lookups(calls) == [stored.node_id, other]
        assert (stored.node_id, "release_reply") in calls
        assert client.stats() == ClientStats(0, 1)
        assert set(leases(client).values()) == {0}


def test_no_speculation_when_disabled_or_when_calls_run_inline(kv_model: SyntheticKV) -> None:
    with running_client(speculative_lookup=False) as (client, _):
        prompt = np.arange(100, 164)
        client.store(prompt, kv_model.kv(prompt))
        for _ in range(2):
            with client.lookup(prompt):
                pass
        assert client.stats() == ClientStats(0, 0)
    with running_client() as (client, _):
        for handle in client._nodes.values():  # in-process handles run a submitted call at once
            handle.concurrent = False  # type: ignore[misc]
        client.store(prompt, kv_model.kv(prompt))
        for _ in range(2):
            with client.lookup(prompt):
                pass
        assert client.stats() == ClientStats(0, 0)


def test_the_affinity_memory_is_bounded(kv_model: SyntheticKV) -> None:
    with running_client(affinity_entries=2) as (client, _):
        for start in (1000, 2000, 3000):
            prompt = np.arange(start, start + 16)
            client.store(prompt, kv_model.kv(prompt))
            with client.lookup(prompt):
                pass
        with client.lookup(np.arange(1000, 1016)):  # its family was forgotten: no guess
            pass
        assert client.stats() == ClientStats(0, 0)
        with client.lookup(np.arange(3000, 3016)):  # still remembered
            pass
        assert client.stats() == ClientStats(1, 0)


def test_release_reply_ignores_a_miss() -> None:
    with running_client() as (client, _):
        node = client.node_handle(client.nodes[0])
        miss = node.call("lookup", *client._wire("default", np.arange(7000, 7020)))
        assert LookupReply.from_wire(miss).lease_id is None
        assert node.call("release_reply", miss) is False


def test_a_speculative_hit_fetches_the_same_kv(kv_model: SyntheticKV) -> None:
    with running_client() as (client, _):
        prompt = np.arange(100, 164)
        client.store(prompt, kv_model.kv(prompt))
        for _ in range(2):
            with client.lookup(prompt) as result:
                assert torch.equal(client.fetch(result), kv_model.kv(prompt))
        assert client.stats().speculative_hits == 1


class FailingRouter:
    def route(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: routing failed")


def test_a_lookup_that_fails_after_speculating_releases_the_guess(kv_model: SyntheticKV) -> None:
    with running_client() as (client, calls):
        prompt = np.arange(100, 164)
        client.store(prompt, kv_model.kv(prompt))
        with client.lookup(prompt):  # the family's node is remembered
            pass
        client._router = FailingRouter()  # type: ignore[assignment]
        calls.clear()
        with pytest.raises(RuntimeError, match="injected"):
            client.route_and_lookup(prompt)
        assert [method for _, method in calls] == ["lookup", "release_reply"]
        assert set(leases(client).values()) == {0}
