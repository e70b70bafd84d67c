"""BlockPool: O(1) free stack, ref counts, all-or-nothing allocation, double-free detection."""

from __future__ import annotations

import numpy as np
import pytest

from kvcluster.core.block_pool import BlockPool
from kvcluster.errors import InvalidArgument


def test_fresh_pool_hands_out_ids_in_order() -> None:
    pool = BlockPool(8)
    assert (pool.num_blocks, pool.num_free, pool.num_used) == (8, 8, 0)
    first = pool.allocate(3)
    assert first is not None and first.dtype == np.int64
    assert first.tolist() == [0, 1, 2]
    second = pool.allocate(2)
    assert second is not None and second.tolist() == [3, 4]
    assert pool.ref_counts([0, 1, 2, 3, 4, 5]).tolist() == [1, 1, 1, 1, 1, 0]
    assert (pool.num_free, pool.num_used) == (3, 5)
    pool.check_invariants()


def test_allocate_is_all_or_nothing() -> None:
    pool = BlockPool(4)
    assert pool.allocate(3) is not None
    assert pool.can_allocate(1) and not pool.can_allocate(2)
    assert pool.allocate(2) is None
    assert pool.num_free == 1
    assert pool.allocate(0) is not None and pool.num_free == 1
    with pytest.raises(InvalidArgument, match="negative"):
        pool.allocate(-1)
    pool.check_invariants()


def test_freed_blocks_are_reused_most_recent_first() -> None:
    pool = BlockPool(6)
    ids = pool.allocate(4)
    assert ids is not None
    freed = pool.decref([1, 3])
    assert sorted(freed.tolist()) == [1, 3]
    again = pool.allocate(2)
    assert again is not None and sorted(again.tolist()) == [1, 3]
    following = pool.allocate(2)
    assert following is not None and following.tolist() == [4, 5]
    pool.check_invariants()


def test_ref_counts_keep_shared_blocks_alive() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(2)
    assert ids is not None
    pool.incref([0, 0, 1])
    assert pool.ref_counts([0, 1]).tolist() == [3, 2]
    assert pool.decref([0, 1]).size == 0
    assert pool.decref([0, 0, 1]).tolist() == [0, 1]
    assert pool.num_free == 4
    pool.check_invariants()


def test_double_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(2)
    before = pool.ref_counts_view().copy()
    with pytest.raises(InvalidArgument, match=r"double free: block\(s\) \[1\]"):
        pool.decref([0, 1, 1])
    np.testing.assert_array_equal(pool.ref_counts_view(), before)
    assert pool.num_free == 2
    with pytest.raises(InvalidArgument, match="double free"):
        pool.decref([2])
    pool.check_invariants()


def test_incref_of_free_or_out_of_range_block_raises() -> None:
    pool = BlockPool(4)
    pool.allocate(1)
    with pytest.raises(InvalidArgument, match=r"free block\(s\) \[2\]"):
        pool.incref([0, 2])
    assert pool.ref_count(0) == 1
    with pytest.raises(InvalidArgument, match="outside the pool"):
        pool.incref([4])
    with pytest.raises(InvalidArgument, match="outside the pool"):
        pool.decref([-1])
    with pytest.raises(InvalidArgument, match="outside the pool"):
        pool.ref_count(9)
    pool.check_invariants()


def test_ref_counts_view_is_read_only() -> None:
    pool = BlockPool(2)
    view = pool.ref_counts_view()
    with pytest.raises(ValueError):
        view[0] = 5
    pool.allocate(1)
    assert view[0] == 1  # a live view


def test_empty_pool_is_rejected() -> None:
    with pytest.raises(InvalidArgument):
        BlockPool(0)


def test_large_allocation_round_trip() -> None:
    pool = BlockPool(8192)
    ids = pool.allocate(8192)
    assert ids is not None
    assert np.array_equal(np.sort(ids), np.arange(8192))
    assert pool.decref(ids).size == 8192
    assert pool.num_free == 8192
    pool.check_invariants()


def test_the_trusted_paths_match_the_checked_ones() -> None:
    checked, trusted = BlockPool(8), BlockPool(8)
    for pool in (checked, trusted):
        ids = pool.allocate(5)
        assert ids is not None
    ids = np.arange(5)
    checked.incref(ids[:3])
    trusted.incref_distinct(ids[:3])
    np.testing.assert_array_equal(checked.ref_counts(ids), trusted.ref_counts(ids))
    for drop, freed in ((ids[1:4], [3]), (ids[1:3], [1, 2])):
        freed_checked = checked.decref(drop)
        freed_trusted = trusted.decref_distinct(drop)
        assert sorted(freed_checked.tolist()) == sorted(freed_trusted.tolist()) == freed
        np.testing.assert_array_equal(checked.ref_counts(ids), trusted.ref_counts(ids))
    assert checked.num_free == trusted.num_free == 6
    trusted.check_invariants()
    assert sorted(trusted.allocate(6).tolist()) == sorted(checked.allocate(6).tolist())  # type: ignore[union-attr]
