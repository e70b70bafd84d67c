"""generate() when the node's fetch is shorter than its match (a corrupt spilled page is dropped)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import kvcluster
from kvcluster.config import KVClusterConfig
from kvcluster.errors import PageCorrupt
from kvcluster.integrations.hf import generate, model_spec_from_hf
from tests.kvcluster.integrations.conftest import BLOCK_SIZE
from tests.kvcluster.integrations.test_hf import (
    ATOL,
    assert_same_generation,
    random_prompt,
    reference_kv,
)


@pytest.fixture
def spilling_client(gqa_model: Any) -> Iterator[Any]:
    """One node with a tiny device pool and a host tier: old prefixes spill to host."""
    spec = model_spec_from_hf(gqa_model.config, name="tiny-llama-gqa-spill")
    config = KVClusterConfig.from_dict({
        "model": spec.model_dump(),
        "cache": {"block_size": BLOCK_SIZE, "num_blocks": 12},
        "tiers": {"cpu": {"capacity": "4MiB"}},
        "registry": {"index_stride_blocks": 1},
        "cluster": {"local_nodes": 1},
    })
    client = kvcluster.connect_local(config)
    yield client
    client.close()


def test_a_fetch_short_of_the_match_is_computed_and_stored(
    gqa_model: Any, spilling_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = spilling_client
    prompt = random_prompt(77, 70)
    prefix = prompt[:48]  # 3 blocks
    client.store(prefix, reference_kv(gqa_model, prefix))
    for i in range(4):  # push the prefix out of the 12-block device pool into the host tier
        other = random_prompt(500 + i, 48)
        client.store(other, reference_kv(gqa_model, other))
    (node_id,) = client.nodes
    engine = client.node_handle(node_id).node._engine
    engine.drain_spills()
    with client.lookup(prompt) as probe:
        assert probe.matched_tokens == 48 and probe.blocks_per_tier.get("gpu", 0) < 3
    spill = engine._spill
    real_read = spill.read
    corrupt: set[int] = set()

    def read(key: int) -> torch.Tensor:
        if key in corrupt or not corrupt:
            corrupt.add(key)  # the first spilled page read is corrupt, then always
            raise PageCorrupt(f"injected: page {key} failed its checksum")
        return real_read(key)

    monkeypatch.setattr(spill, "read", read)

    result = generate(gqa_model, prompt, client, max_new_tokens=4)

    assert_same_generation(result, gqa_model, prompt)
    assert result.matched_tokens == 48 and result.reused_tokens < 48
    assert result.computed_tokens == 70 - result.reused_tokens
    seen = np.concatenate([prompt, np.asarray(result.tokens[:-1], dtype=np.int64)])
    assert result.stored_tokens > 0
    with client.lookup(seen) as again:
        assert again.matched_tokens == len(seen)
        torch.testing.assert_close(client.fetch(again), reference_kv(gqa_model, seen), atol=ATOL, rtol=0)
