"""Bad input to the client's less travelled calls (chat sessions, pulls, ends of
conversations) gets a clear error naming what was wrong, and no node hears of it."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from kvcluster.client import KVClient
from kvcluster.config import KVClusterConfig
from kvcluster.errors import InvalidArgument, InvalidKV, InvalidTokens, NodeUnavailable
from kvcluster.node_handles import LocalNodeHandle
from kvcluster.synthetic_kv import SyntheticKV
from tests.cluster.in_process import in_process_client


@pytest.fixture
def kv_model() -> SyntheticKV:
    return SyntheticKV(KVClusterConfig.from_dict({}).model)


def activity(client: KVClient) -> list[tuple[int, int, int, int, int]]:
    return [(s.hits + s.misses, s.leases, s.sequences, s.ended_conversations, s.migrations_in)
            for s in client.node_stats().values()]


@pytest.mark.parametrize(("user", "message"), [
    ([1.5, 2.7], "integers"),
    ([[1, 2], [3, 4]], "1-D"),
    ([5, -1], "-1"),
])
def test_a_chat_turn_of_bad_tokens_is_refused_before_any_lookup(user: Any, message: str) -> None:
    with in_process_client(LocalNodeHandle) as (client, _, _):
        before = activity(client)
        chat = client.session("c")
        with pytest.raises(InvalidTokens, match=message):
            chat.prompt(user)
        assert activity(client) == before and chat.node_id is None


def test_a_chat_response_of_bad_tokens_stores_nothing(kv_model: SyntheticKV) -> None:
    with in_process_client(LocalNodeHandle) as (client, _, _):
        chat = client.session("c")
        result = chat.prompt(np.arange(100, 140))
        kv = kv_model.kv(np.arange(100, 142))
        with pytest.raises(InvalidTokens, match="integers"):
            chat.complete(result, [7.9, 8.2], kv)  # not silently stored as tokens 7 and 8
        assert [s.sequences for s in client.node_stats().values()] == [0, 0, 0]
        assert chat.history.size == 0


def test_a_pull_between_unknown_nodes_names_them() -> None:
    with in_process_client(LocalNodeHandle) as (client, _, _):
        before = activity(client)
        with pytest.raises(NodeUnavailable, match="'nope'"):
            client.migrate_prefix(np.arange(100, 164), "default", source="nope", target="n1")
        with pytest.raises(NodeUnavailable, match="'gone'"):
            client.migrate_prefix(np.arange(100, 164), "default", source="n0", target="gone")
        assert activity(client) == before


@pytest.mark.parametrize("namespace", [None, 7, b"tenant"])
def test_a_namespace_that_is_not_a_string_is_refused_by_every_call(namespace: Any) -> None:
    with in_process_client(LocalNodeHandle) as (client, _, _):
        before = activity(client)
        tokens = np.arange(100, 164)
        with pytest.raises(InvalidArgument, match="namespace must be a str"):
            client.end_conversation(tokens, namespace)
        with pytest.raises(InvalidArgument, match="namespace must be a str"):
            client.migrate_prefix(tokens, namespace, source="n0", target="n1")
        assert activity(client) == before


def test_a_turn_completed_with_bad_kv_keeps_its_lease_for_a_retry(kv_model: SyntheticKV) -> None:
    with in_process_client(LocalNodeHandle, nodes=1) as (client, _, (node,)):
        prefix = np.arange(100, 164)
        client.store(prefix, kv_model.kv(prefix), node="n0")
        chat = client.session("c")
        result = chat.prompt(np.concatenate([prefix, np.arange(300, 310)]))
        assert result.matched_tokens == prefix.size and result.lease_id is not None
        answer = np.arange(500, 508)
        kv = kv_model.kv(np.concatenate([result.tokens, answer]))[:, :, result.matched_tokens :]
        with pytest.raises(InvalidKV, match="shape"):
            chat.complete(result, answer, kv[:, :, 1:])  # one row short
        assert node.stats().leases == 1 and chat.history.size == 0
        stored = chat.complete(result, answer, kv)  # the corrected retry still holds its lease
        assert stored.new_tokens == 18 and node.stats().leases == 0
        assert chat.history.size == prefix.size + 18


def test_an_async_store_with_bad_kv_is_refused_before_it_is_routed(kv_model: SyntheticKV) -> None:
    with in_process_client(LocalNodeHandle) as (client, _, _):
        tokens = np.arange(100, 164)
        routed = client.router.stats().routed
        with pytest.raises(InvalidKV, match="shape"):
            asyncio.run(client.astore(tokens, kv_model.kv(tokens)[:, :, 1:]))
        assert client.router.stats().routed == routed
        assert [s.sequences for s in client.node_stats().values()] == [0, 0, 0]
