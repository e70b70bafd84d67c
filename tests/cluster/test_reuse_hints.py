"""The generated length a client reports with a store reaches the node's ``reuse`` policy."""

from __future__ import annotations

import numpy as np
import pytest

from kvcluster.config import KVClusterConfig
from kvcluster.errors import InvalidArgument
from kvcluster.node_actor import NodeActor
from kvcluster.node_handles import LocalNodeHandle
from kvcluster.synthetic_kv import SyntheticKV
from tests.cluster.in_process import in_process_client

REUSE_CACHE = {"num_blocks": 256, "eviction": {"policy": "reuse"}}


def learned(node: NodeActor) -> dict[tuple[int, bool], tuple[int, int]]:
    return node._engine._index.policy.reuse_model.chances()


def test_a_session_reports_each_turn_s_generated_length() -> None:
    kv_model = SyntheticKV(KVClusterConfig.from_dict({}).model)
    with in_process_client(LocalNodeHandle, nodes=1, cache=REUSE_CACHE) as (client, _, (node,)):
        chat = client.session("c1")
        for turn, answer in enumerate((np.arange(500, 505), np.arange(600, 640))):
            result = chat.prompt(np.arange(100 * turn, 100 * turn + 40))
            full = np.concatenate([result.tokens, answer])
            chat.complete(result, answer, kv_model.kv(full)[:, :, result.matched_tokens :])
        # Turn 1 generated 5 tokens (bucket log2(6) = 2) and was continued by turn 2, which
        # generated 40 (bucket 5) and extended turn 1's prefix.
        assert learned(node) == {(2, False): (1, 1), (5, True): (1, 0)}


def test_a_store_without_a_length_and_a_bad_length() -> None:
    kv_model = SyntheticKV(KVClusterConfig.from_dict({}).model)
    with in_process_client(LocalNodeHandle, nodes=1, cache=REUSE_CACHE) as (client, _, (node,)):
        prompt = np.arange(1000, 1100)
        client.store(prompt, kv_model.kv(prompt), node="n0")
        assert learned(node) == {(-1, False): (1, 0)}
        for bad in (-1, 2.5, "12"):
            with pytest.raises(InvalidArgument, match="generated_tokens must be an integer >= 0 or None"):
                client.store(prompt, kv_model.kv(prompt), node="n0", generated_tokens=bad)  # type: ignore[arg-type]
        assert learned(node) == {(-1, False): (1, 0)}
