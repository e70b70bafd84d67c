"""Malformed block ids, counts and batches raise :class:`InvalidArgument` and change nothing:
a float or bool block id is never truncated into another block, and a batch that is not an
iterable of ``(tokens, block_ids)`` pairs (or of prompts) is named as such."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvcluster.core.block_pool import BlockPool
from kvcluster.errors import InvalidArgument
from tests.kvcluster.prefix_cache_helpers import make_cache, snapshot


@pytest.mark.parametrize("ids", [[0.7], [1.0], np.array([0.0, 1.0]), [None], [[0], [1, 2]], [True]])
@pytest.mark.parametrize("method", ["incref", "decref", "ref_counts"])
def test_block_ids_must_be_integers(ids: Any, method: str) -> None:
    pool = BlockPool(4)
    pool.allocate(2)
    before = pool.ref_counts_view().tolist()
    with pytest.raises(InvalidArgument, match="block ids must be"):
        getattr(pool, method)(ids)
    assert pool.ref_counts_view().tolist() == before
    pool.check_invariants()


@pytest.mark.parametrize("count", [1.5, 2.0, True, "2", None])
def test_allocate_takes_an_integer_count(count: Any) -> None:
    pool = BlockPool(4)
    with pytest.raises(InvalidArgument, match="must be an integer"):
        pool.allocate(count)
    assert pool.num_free == 4


def test_integer_block_ids_of_any_width_are_accepted() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    pool.incref(np.array([0, 2], dtype=np.uint8))
    assert pool.ref_counts(np.array([0, 1, 2], dtype=np.int32)).tolist() == [2, 1, 2]
    assert pool.ref_count(np.int16(2)) == 2
    assert pool.allocate(np.int64(1)) is not None
    assert pool.decref([]).size == 0


@pytest.mark.parametrize("items", [None, 5, [([1, 2],)], [([1, 2], [0], 1)], [[1, 2, 3]]])
def test_insert_many_names_a_malformed_batch(items: Any) -> None:
    cache = make_cache()
    cache.store([1, 2, 3, 4, 5])
    before = snapshot(cache)
    with pytest.raises(InvalidArgument, match="pair"):
        cache.index.insert_many(items)
    assert snapshot(cache) == before


@pytest.mark.parametrize("prompts", [None, 5])
def test_lookup_many_names_a_batch_that_is_not_iterable(prompts: Any) -> None:
    cache = make_cache()
    cache.store([1, 2, 3, 4, 5])
    before = snapshot(cache)
    with pytest.raises(InvalidArgument, match="iterable"):
        cache.index.lookup_many(prompts)
    assert snapshot(cache) == before


@pytest.mark.parametrize("namespace", [1, None, ["default"], b"default"])
def test_clear_namespace_rejects_a_namespace_that_is_not_a_string(namespace: Any) -> None:
    cache = make_cache()
    cache.store([1, 2, 3, 4, 5])
    before = snapshot(cache)
    with pytest.raises(InvalidArgument, match="namespace must be a string"):
        cache.index.clear_namespace(namespace)
    assert snapshot(cache) == before
