"""Tiny Llama models with seeded random weights (no download) and local clusters for them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import transformers

import kvcluster
from kvcluster.config import KVClusterConfig
from kvcluster.integrations.hf import model_spec_from_hf

BLOCK_SIZE = 16
VOCAB = 512


def tiny_llama(*, kv_heads: int, layers: int, seed: int) -> Any:
    """A float32 ``LlamaForCausalLM`` with 8 query heads of dim 8, seeded random weights.

    bos/eos/pad are unset so nothing stops or masks generation: the reference and the
    cached path must agree on every step.
    """
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        # Larger than the default 0.02, so logits spread out and greedy ties are implausible.
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gqa_model() -> Any:
    """Grouped-query attention: 8 query heads share 2 K/V heads; 3 layers."""
    return tiny_llama(kv_heads=2, layers=3, seed=1)


@pytest.fixture(scope="module")
def mha_model() -> Any:
    """Multi-head attention: 8 query heads, 8 K/V heads; 2 layers."""
    return tiny_llama(kv_heads=8, layers=2, seed=2)


def local_client(model: Any, name: str, nodes: int) -> Any:
    """An in-process cluster of ``nodes`` nodes for ``model``.

    The registry indexes every block (stride 1), so a prefix of one full block or more is
    routed to its holder; sub-block prefixes are not in the registry at all.
    """
    spec = model_spec_from_hf(model.config, name=name)
    config = KVClusterConfig.from_dict(
        {
            "model": spec.model_dump(),
            "cache": {"block_size": BLOCK_SIZE, "num_blocks": 4096},
            "registry": {"index_stride_blocks": 1},
            "cluster": {"local_nodes": nodes},
        }
    )
    return kvcluster.connect_local(config)


@pytest.fixture(scope="module")
def gqa_client(gqa_model: Any) -> Iterator[Any]:
    """One node: every lookup reaches the node holding the prefix, whatever its length."""
    client = local_client(gqa_model, "tiny-llama-gqa-test", nodes=1)
    yield client
    client.close()


@pytest.fixture(scope="module")
def gqa_cluster(gqa_model: Any) -> Iterator[Any]:
    """Three nodes: lookups are routed through the registry."""
    client = local_client(gqa_model, "tiny-llama-gqa-test", nodes=3)
    yield client
    client.close()


@pytest.fixture(scope="module")
def mha_client(mha_model: Any) -> Iterator[Any]:
    client = local_client(mha_model, "tiny-llama-mha-test", nodes=1)
    yield client
    client.close()
