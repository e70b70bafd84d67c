"""ChainCache: exactly the hasher's chain, reusing the common prefix of a family's last prompt."""

from __future__ import annotations

import numpy as np
import pytest

from kvcluster.errors import InvalidArgument
from routing.block_hashing import BlockHasher
from routing.chain_cache import ChainCache

BS = 4


@pytest.fixture
def hasher() -> BlockHasher:
    return BlockHasher("xxh3_128", BS, b"salt", "model-fp")


def test_repeats_and_extensions_reuse_the_chain_and_equal_a_fresh_hash(hasher: BlockHasher) -> None:
    cache = ChainCache(hasher, max_tokens=1000)
    turn1 = np.arange(1, 23)  # 5 full blocks + 2 tokens
    assert np.array_equal(cache.hash_chain(turn1), hasher.hash_chain(turn1))
    assert (cache.reused_blocks, cache.hashed_blocks) == (0, 5)
    assert np.array_equal(cache.hash_chain(turn1), hasher.hash_chain(turn1))
    assert (cache.reused_blocks, cache.hashed_blocks) == (5, 5)
    turn2 = np.concatenate([turn1, np.arange(100, 110)])  # the next turn: 8 full blocks
    assert np.array_equal(cache.hash_chain(turn2), hasher.hash_chain(turn2))
    assert (cache.reused_blocks, cache.hashed_blocks) == (10, 8)


def test_a_divergence_inside_a_block_rehashes_from_that_block(hasher: BlockHasher) -> None:
    cache = ChainCache(hasher, max_tokens=1000)
    base = np.arange(1, 17)
    cache.hash_chain(base)
    forked = base.copy()
    forked[9] = 999  # inside block 2
    assert np.array_equal(cache.hash_chain(forked), hasher.hash_chain(forked))
    assert cache.reused_blocks == 2
    shorter = base[:9]  # a prefix of the cached prompt: nothing to hash
    assert np.array_equal(cache.hash_chain(shorter), hasher.hash_chain(shorter))
    assert cache.hashed_blocks == 4 + 2


def test_namespaces_and_families_never_share(hasher: BlockHasher) -> None:
    cache = ChainCache(hasher, max_tokens=1000)
    tokens = np.arange(1, 13)
    a = cache.hash_chain(tokens, "a")
    b = cache.hash_chain(tokens, "b")
    assert np.array_equal(b, hasher.hash_chain(tokens, "b")) and not np.array_equal(a, b)
    assert cache.reused_blocks == 0 and len(cache) == 2
    assert cache.hash_chain(np.arange(1, 3)).size == 0  # shorter than a block


def test_memory_is_bounded_by_tokens_least_recently_used_first(hasher: BlockHasher) -> None:
    cache = ChainCache(hasher, max_tokens=16)
    for start in (100, 200, 300):  # 8 tokens each
        cache.hash_chain(np.arange(start, start + 8))
    assert len(cache) == 2
    cache.hash_chain(np.arange(100, 108))  # forgotten: hashed again
    assert cache.reused_blocks == 0
    cache.hash_chain(np.arange(100, 140))  # longer than the whole budget: not kept
    assert len(cache) <= 2
    with pytest.raises(InvalidArgument, match="max_tokens"):
        ChainCache(hasher, max_tokens=0)
