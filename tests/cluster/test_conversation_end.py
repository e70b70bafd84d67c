"""Ending a conversation through the client: ``ChatSession.end()`` (or leaving its ``with``
block) and ``KVClient.end_conversation`` reach the node(s), which demote what only that
conversation cached; a node that does not answer degrades the hint, never the call."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from kvcluster.config import KVClusterConfig
from kvcluster.errors import InvalidArgument, InvalidTokens, NodeUnavailable
from kvcluster.node_actor import NodeActor
from kvcluster.node_handles import LocalNodeHandle
from kvcluster.synthetic_kv import SyntheticKV
from tests.cluster.in_process import SwitchableHandle, in_process_client

SYSTEM = np.arange(1000, 1064)  # 4 blocks of 16


@pytest.fixture
def kv_model() -> SyntheticKV:
    return SyntheticKV(KVClusterConfig.from_dict({}).model)


def first_in_line(node: NodeActor, count: int) -> list[tuple[int, int]]:
    """The token ranges of the next ``count`` radix nodes to be evicted on ``node``."""
    return [(n.start, n.end) for n in node._engine._index.policy.order()[:count]]


def chat_turns(chat: Any, kv_model: SyntheticKV, turns: list[np.ndarray]) -> None:
    for user in turns:
        result = chat.prompt(user)
        answer = np.arange(5000 + result.tokens.size, 5000 + result.tokens.size + 8)
        full = np.concatenate([result.tokens, answer])
        chat.complete(result, answer, kv_model.kv(full)[:, :, result.matched_tokens :])


def test_leaving_a_session_demotes_its_history_past_the_prefix_it_found(kv_model: SyntheticKV) -> None:
    with in_process_client(LocalNodeHandle, nodes=1) as (client, _, (node,)):
        client.store(SYSTEM, kv_model.kv(SYSTEM), node="n0")
        other = client.session("other")
        chat_turns(other, kv_model, [np.concatenate([SYSTEM, np.arange(300, 320)])])
        with client.session("ours") as chat:
            chat_turns(chat, kv_model, [np.concatenate([SYSTEM, np.arange(100, 140)]), np.arange(200, 230)])
            assert chat.shared_tokens == SYSTEM.size
            history = chat.history
            turn_one = SYSTEM.size + 40 + 8
            assert first_in_line(node, 1) == [(SYSTEM.size, SYSTEM.size + 28)]  # the other one's
        assert first_in_line(node, 2) == [(turn_one, history.size), (SYSTEM.size, turn_one)]
        stats = node.stats()
        assert (stats.ended_conversations, stats.demoted_tokens) == (1, history.size - SYSTEM.size)
        assert chat.end() == 0  # already ended: not sent again
        assert node.stats().ended_conversations == 1
        node.check_invariants()


def test_a_session_that_stored_nothing_sends_nothing() -> None:
    with in_process_client(LocalNodeHandle, nodes=1) as (client, _, (node,)):
        with client.session("empty"):
            pass
        assert node.stats().ended_conversations == 0


def test_end_conversation_reaches_every_copy(kv_model: SyntheticKV) -> None:
    prompt = np.arange(100, 180)
    with in_process_client(LocalNodeHandle, nodes=3) as (client, _, nodes):
        for node_id in ("n0", "n2"):
            client.store(prompt, kv_model.kv(prompt), node=node_id)
        assert client.end_conversation(prompt) == 2 * prompt.size
        assert [n.stats().demoted_tokens for n in nodes] == [prompt.size, 0, prompt.size]
        assert client.end_conversation(prompt, node="n0", keep_tokens=16) == 0  # [0, 80) holds kept tokens
        assert asyncio.run(client.aend_conversation(prompt)) == 2 * prompt.size


def test_bad_input_is_refused_before_any_node_is_told(kv_model: SyntheticKV) -> None:
    prompt = np.arange(100, 180)
    with in_process_client(LocalNodeHandle, nodes=2) as (client, _, nodes):
        client.store(prompt, kv_model.kv(prompt), node="n0")
        with pytest.raises(InvalidArgument, match="keep_tokens must be an integer >= 0"):
            client.end_conversation(prompt, keep_tokens=-1)
        with pytest.raises(InvalidTokens):
            client.end_conversation([])
        with pytest.raises(InvalidTokens, match="outside the vocabulary"):
            client.end_conversation([1, 10**9])
        with pytest.raises(NodeUnavailable, match="no node 'n9'"):
            client.end_conversation(prompt, node="n9")
        with pytest.raises(InvalidArgument, match="keep_tokens"):
            asyncio.run(client.aend_conversation(prompt, keep_tokens=True))  # type: ignore[arg-type]
        assert [n.stats().ended_conversations for n in nodes] == [0, 0]


def test_a_node_that_does_not_answer_is_skipped_unless_named(kv_model: SyntheticKV) -> None:
    prompt = np.arange(100, 180)
    with in_process_client(SwitchableHandle, nodes=2) as (client, handles, nodes):
        for node_id in ("n0", "n1"):
            client.store(prompt, kv_model.kv(prompt), node=node_id)
        handles["n1"].down = True
        assert client.end_conversation(prompt) == prompt.size
        assert asyncio.run(client.aend_conversation(prompt)) == prompt.size
        with pytest.raises(NodeUnavailable, match="n1 is down"):
            client.end_conversation(prompt, node="n1")
        with pytest.raises(NodeUnavailable, match="n1 is down"):
            asyncio.run(client.aend_conversation(prompt, node="n1"))
        assert [n.stats().ended_conversations for n in nodes] == [2, 0]


def test_a_session_whose_node_is_down_still_ends(kv_model: SyntheticKV) -> None:
    with in_process_client(SwitchableHandle, nodes=1) as (client, handles, (node,)):
        chat = client.session("c")
        chat_turns(chat, kv_model, [np.arange(100, 150)])
        handles["n0"].down = True
        assert chat.end() == 0  # a hint: its blocks age out as usual
        handles["n0"].down = False
        assert node.stats().ended_conversations == 0
