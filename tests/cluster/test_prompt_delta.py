"""Long prompts cross the wire once: later lookups and stores send a reference plus new ids.

In-process nodes behind a handle that records the prompt frame of every call, so the bytes
the client sends are visible; the nodes decode frames exactly as their Ray actors do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from kvcluster.client import KVClient
from kvcluster.config import KVClusterConfig
from kvcluster.node_actor import NodeActor
from kvcluster.node_handles import LocalNodeHandle
from kvcluster.prompt_memory import PromptMemory
from kvcluster.synthetic_kv import SyntheticKV
from kvcluster.token_wire import BASE, REMEMBER
from tests.cluster.in_process import in_process_client

LONG = 3_000  # above the default prompt_delta_min_tokens (2048)


class FrameRecordingHandle(LocalNodeHandle):
    """Records ``(node, method, frame bytes, flags)`` of every call carrying a prompt."""

    def __init__(self, node: Any, frames: list[tuple[str, str, int, int]]) -> None:
        super().__init__(node)
        self._frames = frames

    def call(self, method: str, *args: Any) -> Any:
        if method in ("lookup", "store"):
            wire = args if method == "lookup" else args[3:]  # after (payload, lease, generated)
            self._frames.append((self.node_id, method, sum(map(len, wire)), wire[0][1]))
        return super().call(method, *args)


@contextmanager
def running_client(**cluster: Any) -> Iterator[tuple[KVClient, list[tuple[str, str, int, int]], list[NodeActor]]]:
    frames: list[tuple[str, str, int, int]] = []
    with in_process_client(
        lambda node: FrameRecordingHandle(node, frames), nodes=2,
        cache={"num_blocks": 2048, "max_context": 8192}, cluster=cluster,
    ) as (client, _, nodes):
        yield client, frames, nodes


@pytest.fixture
def kv_model() -> SyntheticKV:
    return SyntheticKV(KVClusterConfig.from_dict({}).model)


def full_frame_bytes(tokens: int) -> int:
    return 4 + len("default") + 16 + 2 * tokens  # header, namespace, prompt id, uint16 ids


def test_a_repeated_long_prompt_is_sent_once(kv_model: SyntheticKV) -> None:
    with running_client() as (client, frames, _):
        prompt = np.random.default_rng(0).integers(0, 32_000, LONG)
        client.store(prompt, kv_model.kv(prompt))
        frames.clear()
        for _ in range(3):
            with client.lookup(prompt) as result:
                assert result.matched_tokens == LONG
        sizes = [(size, flags) for _, method, size, flags in frames if method == "lookup"]
        # The store was sent in full; every lookup is just a reference to the prompt the node
        # kept (nothing new to keep).
        assert sizes == [(4 + len("default") + 20, BASE)] * 3
        assert set(client.node_stats()[n].leases for n in client.nodes) == {0}


def test_a_next_turn_sends_only_its_new_tokens(kv_model: SyntheticKV) -> None:
    with running_client() as (client, frames, _):
        rng = np.random.default_rng(1)
        turn = rng.integers(0, 32_000, LONG)
        client.store(turn, kv_model.kv(turn))
        for _ in range(3):  # each turn extends the last by 200 tokens
            turn = np.concatenate([turn, rng.integers(0, 32_000, 200)])
            frames.clear()
            with client.lookup(turn) as result:
                assert result.matched_tokens == turn.size - 200
                kv = kv_model.kv(turn)[:, :, result.matched_tokens :]
                client.store(turn, kv, result=result)
            with client.lookup(turn) as again:
                assert again.matched_tokens == turn.size
                np.testing.assert_array_equal(client.fetch(again), kv_model.kv(turn))
            lookup, store, repeat = frames
            assert lookup[1:] == ("lookup", full_frame_bytes(200) + 20, REMEMBER | BASE)
            # The store and the repeat refer to the prompt the lookup left on the node.
            assert store[1:] == ("store", full_frame_bytes(0) + 20 - 16, BASE)
            assert repeat[1:] == ("lookup", full_frame_bytes(0) + 20 - 16, BASE)


def test_a_node_that_forgot_the_base_gets_the_prompt_in_full(kv_model: SyntheticKV) -> None:
    with running_client() as (client, frames, nodes) :
        prompt = np.random.default_rng(2).integers(0, 32_000, LONG)
        stored = client.store(prompt, kv_model.kv(prompt))
        holder = next(node for node in nodes if node.node_id == stored.node_id)
        holder._prompts = PromptMemory(1 << 20)  # as after a restart: nothing kept
        frames.clear()
        with client.lookup(prompt) as result:
            assert result.matched_tokens == LONG
        assert [(method, flags) for _, method, _, flags in frames] == [("lookup", BASE), ("lookup", REMEMBER)]
        assert frames[1][2] == full_frame_bytes(LONG)
        frames.clear()
        with client.lookup(prompt) as result:  # the node kept the full resend
            assert result.matched_tokens == LONG
        assert [flags for *_, flags in frames] == [BASE]
        assert len(holder._prompts) == 1  # references to a kept prompt keep nothing new
        assert set(client.node_stats()[n].leases for n in client.nodes) == {0}


def test_short_prompts_and_a_disabled_memory_always_travel_in_full(kv_model: SyntheticKV) -> None:
    with running_client() as (client, frames, _):
        short = np.arange(100, 400)
        client.store(short, kv_model.kv(short))
        with client.lookup(short):
            pass
        assert [flags for *_, flags in frames] == [0, 0]
    with running_client(prompt_memory_tokens=0) as (client, frames, nodes):
        prompt = np.random.default_rng(3).integers(0, 32_000, LONG)
        client.store(prompt, kv_model.kv(prompt))
        with client.lookup(prompt) as result:
            assert result.matched_tokens == LONG
        assert [flags for *_, flags in frames] == [0, 0]
        assert all(len(node._prompts) == 0 for node in nodes)


def test_a_node_that_keeps_no_prompts_costs_extra_round_trips_only_a_few_times(kv_model: SyntheticKV) -> None:
    with running_client() as (client, frames, nodes):
        prompt = np.random.default_rng(4).integers(0, 32_000, LONG)
        stored = client.store(prompt, kv_model.kv(prompt))
        holder = next(node for node in nodes if node.node_id == stored.node_id)
        holder._prompts = PromptMemory(0)  # a node deployed with prompt_memory_tokens: 0
        frames.clear()
        for _ in range(6):
            with client.lookup(prompt) as result:
                assert result.matched_tokens == LONG
        # Three references refused, each followed by the full prompt; then the client stops
        # asking that node to keep prompts: plain full frames, one call per lookup.
        assert [flag for *_, flag in frames] == [BASE, REMEMBER, BASE, REMEMBER, BASE, 0, 0, 0, 0]
        assert set(client.node_stats()[n].leases for n in client.nodes) == {0}
