"""An ``on_evict`` listener that raises (a spill that failed) stops the eviction there: the
node it was told about stays cached, and the nodes already evicted in the same call still
return their blocks to the pool (no block is lost)."""

from __future__ import annotations

import pytest

from kvcluster.core.block_pool import BlockPool
from kvcluster.core.eviction import make_policy
from kvcluster.core.prefix_index import PrefixIndex
from kvcluster.core.prefix_records import EvictedBlock
from tests.kvcluster.prefix_cache_helpers import FakeClock


class SpillFailed(RuntimeError):
    pass


def failing_index(fail_on_call: int) -> tuple[BlockPool, PrefixIndex, FakeClock, list[int]]:
    pool = BlockPool(16)
    clock = FakeClock()
    seen: list[int] = []

    def listener(block: EvictedBlock) -> None:
        seen.append(block.block_id)
        if len(seen) == fail_on_call:
            raise SpillFailed(f"spill of block {block.block_id} failed")

    index = PrefixIndex(pool, 4, policy=make_policy("lru+ttl", ttl_s=5.0, clock=clock), clock=clock,
                        on_evict=listener)
    for tokens in ([1, 2, 3, 4], [5, 6, 7, 0]):
        table = pool.allocate(1)
        assert table is not None
        index.insert(tokens, table)
        pool.decref(table)
        clock.advance(1)
    return pool, index, clock, seen


@pytest.mark.parametrize("expire", [False, True])
def test_a_failing_listener_loses_no_block(expire: bool) -> None:
    pool, index, clock, seen = failing_index(fail_on_call=2)
    with pytest.raises(SpillFailed):
        if expire:
            clock.advance(10)
            index.evict_expired()
        else:
            index.evict(2)
    # The first leaf went (its block is free again); the second stayed cached.
    assert pool.num_free == 15
    assert index.peek([1, 2, 3, 4]) == 0
    assert index.peek([5, 6, 7, 0]) == 4
    index.check_invariants()
    assert pool.ref_counts_view().tolist() == index.held_refs().tolist()
    assert index.evict(1) == 1
    assert pool.num_free == 16
    assert len(seen) == 3
