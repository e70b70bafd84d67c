"""Checks against an already running kvcluster deployment (the docker-compose client runs
these; so does tests/cluster/test_compose_equivalent.py against local processes).

Set KVCLUSTER_TEST_ADDRESS (Ray address) and KVCLUSTER_TEST_CONFIG (YAML); skipped otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import kvcluster
from kvcluster.client import KVClient
from kvcluster.synthetic_kv import SyntheticKV

ADDRESS = os.environ.get("KVCLUSTER_TEST_ADDRESS")
CONFIG = os.environ.get("KVCLUSTER_TEST_CONFIG")

pytestmark = pytest.mark.skipif(
    not ADDRESS, reason="KVCLUSTER_TEST_ADDRESS is not set (no running deployment to test)"
)


@pytest.fixture(scope="module")
def client() -> Iterator[KVClient]:
    kv_client = kvcluster.connect(CONFIG, address=ADDRESS)
    yield kv_client
    kv_client.close()


def test_every_node_answers(client: KVClient) -> None:
    stats = client.node_stats()
    assert len(stats) >= 3
    assert all(s.blocks_total > 0 for s in stats.values())


def test_store_then_route_to_the_holder(client: KVClient) -> None:
    config = kvcluster.load_config(CONFIG)
    kv_model = SyntheticKV(config.model, seed=11)
    prompt = np.random.default_rng(11).integers(0, config.model.vocab_size, 700)
    stored = client.store(prompt, kv_model.kv(prompt))
    with client.lookup(np.concatenate([prompt, [1, 2, 3]])) as result:
        assert result.node_id == stored.node_id
        assert result.matched_tokens == prompt.size
        assert torch.equal(client.fetch(result), kv_model.kv(prompt))
