"""PrefixIndex: radix-tree cases, token-granular matches, namespaces, leases, pins, eviction
orders and bad input (each leaving the state exactly as it was)."""

from __future__ import annotations

import numpy as np
import pytest

from kvcluster.core import prefix_index as prefix_index_module
from kvcluster.core import radix_walk
from kvcluster.core.block_pool import BlockPool
from kvcluster.core.eviction import make_policy
from kvcluster.core.prefix_index import PrefixIndex
from kvcluster.core.prefix_records import PrefixMatch
from kvcluster.errors import (
    InvalidArgument,
    InvalidTokens,
    LeaseError,
    PinBudgetExceeded,
)
from tests.kvcluster.prefix_cache_helpers import Cache, make_cache, snapshot


@pytest.fixture(autouse=True, params=["native", "python"])
def walk_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the native radix walks (when built) and with the Python ones."""
    if request.param == "native":
        if radix_walk.native_walk is None:
            pytest.skip("the native radix walk extension is not built")
    else:
        monkeypatch.setattr(prefix_index_module, "native_walk", None)
    return str(request.param)


@pytest.fixture
def cache() -> Cache:
    return make_cache()


def ids(match: PrefixMatch) -> list[int]:
    return match.block_ids.tolist()


# --- the three insert cases ---------------------------------------------------------------------


def test_new_leaf_then_exact_and_token_granular_lookups(cache: Cache) -> None:
    table = cache.store(range(10))  # bs 4: blocks hold tokens 0-3, 4-7, 8-9
    full = cache.index.lookup(np.arange(10))
    assert (full.matched_tokens, full.total_tokens, ids(full)) == (10, 10, table.tolist())
    assert full.remaining.tolist() == [] and full.savings_ratio == 1.0

    inside = cache.index.lookup(np.arange(6))  # ends inside the second block
    assert (inside.matched_tokens, ids(inside), inside.partial_tokens) == (6, table[:2].tolist(), 2)
    assert inside.full_blocks == 1

    longer = cache.index.lookup([*list(range(10)), 50, 51, 52])
    assert (longer.matched_tokens, longer.remaining.tolist()) == (10, [50, 51, 52])
    assert longer.savings_ratio == pytest.approx(10 / 13)

    differs = cache.index.lookup([0, 1, 2, 3, 4, 99, 6])
    assert (differs.matched_tokens, ids(differs), differs.remaining.tolist()) == (5, table[:2].tolist(), [99, 6])
    cache.index.check_invariants()


def test_descend_past_a_node_adopts_only_the_new_blocks(cache: Cache) -> None:
    first = cache.store(range(8), keep=True)  # two full blocks
    extended = np.concatenate([first, cache.pool.allocate(1)])
    result = cache.index.insert(np.arange(12), extended)
    assert (result.cached_tokens, result.new_tokens, result.adopted_blocks, result.split) == (8, 4, 1, False)
    # The sequence still holds its three blocks; the tree holds one reference on each.
    assert cache.pool.ref_counts(extended).tolist() == [2, 2, 2]
    assert ids(cache.index.lookup(np.arange(12))) == extended.tolist()
    cache.index.check_invariants()


def test_descend_past_a_partial_block_uses_the_copied_block(cache: Cache) -> None:
    first = cache.store(range(6))  # block 1 holds tokens 4, 5 (partial)
    # An engine appending to a shared partial block copies it first: block 1 is a fresh block.
    copied = cache.pool.allocate(2)
    extended = np.array([first[0], copied[0], copied[1]])
    result = cache.index.insert(np.arange(12), extended)
    assert (result.cached_tokens, result.new_tokens, result.adopted_blocks) == (6, 6, 2)
    assert ids(cache.index.lookup(np.arange(12))) == extended.tolist()
    # A match that ends at the old end still uses the old partial block.
    assert ids(cache.index.lookup(np.arange(6))) == first.tolist()
    assert ids(cache.index.lookup(np.arange(7))) == [first[0], copied[0]]
    cache.index.check_invariants()


def test_split_inside_a_block_references_the_straddling_block_from_both_sides(cache: Cache) -> None:
    a = cache.store(range(10))  # [0..9]
    b_tokens = [0, 1, 2, 3, 4, 5, 77, 78, 79]
    b = cache.store(b_tokens)
    # The split at 6 leaves block a[1] (tokens 4..7) covered by the upper node and by A's lower
    # part: two tree references. B's blocks from index 1 are its own.
    assert cache.pool.ref_counts(a).tolist() == [1, 2, 1]
    assert cache.pool.ref_counts(b).tolist() == [0, 1, 1]  # b[0] duplicated a[0]: not adopted
    assert ids(cache.index.lookup(b_tokens)) == [a[0], b[1], b[2]]
    assert ids(cache.index.lookup(np.arange(10))) == a.tolist()
    assert ids(cache.index.lookup(np.arange(6))) == a[:2].tolist()
    assert cache.index.stats().nodes == 3
    cache.index.check_invariants()
    # Evicting one block of A's branch drops only its last block, a[2]: the branch keeps
    # tokens 6..7 in a[1], which the upper node also references.
    cache.index.lookup(b_tokens)
    assert cache.index.evict(1) == 1
    assert cache.evicted_tokens() == [[8, 9]]
    assert cache.pool.ref_counts(a).tolist() == [1, 2, 0]
    assert ids(cache.index.lookup(np.arange(10))) == a[:2].tolist()
    assert cache.index.lookup(np.arange(10)).matched_tokens == 8
    cache.index.check_invariants()


def test_split_on_a_block_boundary_adds_no_reference(cache: Cache) -> None:
    a = cache.store(range(12))
    b = cache.store([0, 1, 2, 3, 4, 5, 6, 7, 90, 91])
    assert cache.pool.ref_counts(a).tolist() == [1, 1, 1]
    assert ids(cache.index.lookup([0, 1, 2, 3, 4, 5, 6, 7, 90, 91])) == [a[0], a[1], b[2]]
    cache.index.check_invariants()


def test_divergence_at_first_and_second_token(cache: Cache) -> None:
    cache.store([5, 6, 7])
    cache.store([8, 6, 7])  # a sibling under the root: no split
    assert cache.index.stats().nodes == 2
    result = cache.index.insert([5, 9], cache.pool.allocate(1))
    assert (result.cached_tokens, result.split) == (1, True)
    assert cache.index.lookup([5, 6, 7]).matched_tokens == 3
    assert cache.index.lookup([5, 9, 9]).matched_tokens == 2
    assert cache.index.lookup([6]).matched_tokens == 0
    cache.index.check_invariants()


def test_tokens_already_cached_keep_their_blocks(cache: Cache) -> None:
    first = cache.store(range(8))
    before = cache.pool.ref_counts_view().copy()
    again = cache.pool.allocate(2)
    result = cache.index.insert(np.arange(8), again)
    assert (result.cached_tokens, result.new_tokens, result.adopted_blocks) == (8, 0, 0)
    assert cache.pool.ref_counts(again).tolist() == [1, 1]  # only the caller's own reference
    assert ids(cache.index.lookup(np.arange(8))) == first.tolist()
    prefix = cache.index.insert(np.arange(5), again)  # a prefix ending inside an edge
    assert (prefix.cached_tokens, prefix.new_tokens, prefix.split) == (5, 0, True)
    cache.pool.decref(again)
    # The split at 5 references the straddling block once more; nothing else changed.
    assert int(cache.pool.ref_counts_view()[first[1]]) == before[first[1]] + 1
    cache.index.check_invariants()


def test_every_hit_compares_every_stored_token() -> None:
    cache = make_cache(num_blocks=4096, block_size=16)
    rng = np.random.default_rng(3)
    long_prompt = rng.integers(0, 32000, 32768)
    cache.store(long_prompt)
    assert cache.index.lookup(long_prompt).matched_tokens == 32768
    for position in (0, 1, 15, 16, 12345, 32767):
        probe = long_prompt.copy()
        probe[position] += 1
        assert cache.index.lookup(probe).matched_tokens == position
    # Same tokens in another order, same sum and same multiset: no match beyond the common part.
    swapped = long_prompt.copy()
    swapped[[100, 101]] = swapped[[101, 100]]
    assert swapped[100] != long_prompt[100] and swapped.sum() == long_prompt.sum()
    assert cache.index.lookup(swapped).matched_tokens == 100
    cache.index.check_invariants()


# --- namespaces -----------------------------------------------------------------------------------


def test_namespaces_are_isolated(cache: Cache) -> None:
    in_a = cache.store(range(8), "tenant-a")
    in_b = cache.store(range(8), "tenant-b")
    assert ids(cache.index.lookup(np.arange(8), "tenant-a")) == in_a.tolist()
    assert ids(cache.index.lookup(np.arange(8), "tenant-b")) == in_b.tolist()
    miss = cache.index.lookup(np.arange(8), "tenant-c")
    assert (miss.matched_tokens, miss.namespace) == (0, "tenant-c")
    assert sorted(cache.index.namespaces()) == ["tenant-a", "tenant-b"]  # a miss creates nothing
    assert cache.index.lookup(np.arange(8)).matched_tokens == 0  # "default" is a namespace too
    assert cache.index.clear_namespace("tenant-a") == 2
    assert cache.index.lookup(np.arange(8), "tenant-b").matched_tokens == 8
    assert cache.index.namespaces() == ["tenant-b"]
    cache.index.check_invariants()


# --- leases ----------------------------------------------------------------------------------------


def test_lease_keeps_blocks_from_eviction_until_released(cache: Cache) -> None:
    table = cache.store(range(8))
    lease = cache.index.acquire(cache.index.lookup(np.arange(6)))
    assert lease.block_ids.tolist() == table.tolist() and lease.matched_tokens == 6
    assert cache.index.reclaimable_blocks() == 0
    assert cache.index.evict(2) == 0
    assert cache.index.lookup(np.arange(8)).matched_tokens == 8
    cache.index.release(lease)
    with pytest.raises(LeaseError):
        cache.index.release(lease)
    assert cache.index.evict(2) == 2
    cache.index.check_invariants()


def test_acquire_refuses_a_match_from_another_index_and_rechecks_after_any_drop(cache: Cache) -> None:
    other = make_cache()
    other.store(range(8))
    foreign = other.index.lookup(np.arange(8))
    with pytest.raises(LeaseError, match="stale"):
        cache.index.acquire(foreign)  # nothing of it is cached here
    cache.store(range(8))
    cache.store(range(100, 108))
    match = cache.index.lookup(np.arange(8))
    cache.index.evict(2)  # drops the other prompt (the LRU one): the match is still cached
    lease = cache.index.acquire(match)
    assert cache.pool.ref_counts(lease.block_ids).tolist() == [2, 2]
    cache.index.release(lease)
    cache.index.check_invariants()


def test_acquire_refuses_a_match_whose_prefix_was_evicted(cache: Cache) -> None:
    cache.store(range(8))
    match = cache.index.lookup(np.arange(8))
    cache.index.evict(2)
    cache.store([40, 41, 42, 43, 44, 45, 46, 47])  # reuses the freed blocks for other tokens
    before = snapshot(cache)
    with pytest.raises(LeaseError, match="stale"):
        cache.index.acquire(match)
    assert snapshot(cache) == before
    empty = cache.index.acquire(cache.index.lookup([1, 2, 3]))
    assert empty.block_ids.size == 0
    cache.index.release(empty)


def test_acquire_refuses_a_match_from_another_index(cache: Cache) -> None:
    other = make_cache()
    other.pool.allocate(1)  # so the same tokens land in other blocks
    cache.store(range(8))
    other.store(range(8))
    foreign = other.index.lookup(np.arange(8))
    before = snapshot(cache)
    with pytest.raises(LeaseError):
        cache.index.acquire(foreign)
    assert snapshot(cache) == before
    cache.index.release(cache.index.acquire(cache.index.lookup(np.arange(8))))


def test_match_is_an_immutable_snapshot(cache: Cache) -> None:
    cache.store(range(8))
    match = cache.index.lookup(np.arange(10))
    with pytest.raises(AttributeError):
        match.matched_tokens = 3  # type: ignore[misc]
    with pytest.raises(ValueError):
        match.block_ids[0] = 7
    with pytest.raises(ValueError):
        match.remaining[0] = 7
    cache.store([0, 1, 2, 99])  # splits the node the match ended in
    assert match.matched_tokens == 8 and match.block_ids.size == 2
    cache.index.release(cache.index.acquire(match))  # the split kept the anchor alive


# --- eviction orders -------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used_leaf_first(cache: Cache) -> None:
    for first in (10, 20, 30):
        cache.clock.advance(1)
        cache.store([first, 1, 2, 3])
    cache.clock.advance(1)
    cache.index.lookup([10, 1])  # 10 becomes the most recent
    for _ in range(3):
        cache.index.evict(1)
    assert cache.evicted_tokens() == [[20, 1, 2, 3], [30, 1, 2, 3], [10, 1, 2, 3]]
    assert cache.index.stats().evictions["capacity"] == 3
    cache.index.check_invariants()


def test_a_partial_eviction_takes_a_long_leafs_last_blocks_and_keeps_the_rest_usable(cache: Cache) -> None:
    table = cache.store(range(30))  # one leaf, 8 blocks, the last holding tokens 28-29
    before = cache.index.stats()
    assert cache.index.evict(3) == 3
    # The last three blocks go, each reported with its own tokens and the whole prefix.
    assert cache.evicted_tokens() == [[20, 21, 22, 23], [24, 25, 26, 27], [28, 29]]
    assert [e.block_id for e in cache.evicted] == table[5:].tolist()
    assert cache.evicted[-1].prefix_bytes == np.arange(30, dtype=np.int64).tobytes()
    assert cache.pool.ref_counts(table).tolist() == [1] * 5 + [0] * 3
    after = cache.index.stats()
    assert after.nodes == before.nodes and after.evicted_nodes == before.evicted_nodes
    assert after.evictions["capacity"] == 3 and after.blocks_used == 5
    match = cache.index.lookup(np.arange(30))
    assert (match.matched_tokens, ids(match)) == (20, table[:5].tolist())
    # Nothing ends where the leaf now ends: removing that prefix frees nothing.
    assert cache.index.remove(np.arange(20)) == 0
    # Storing the whole prompt again extends the leaf with new blocks.
    again = cache.pool.allocate(3)
    assert again is not None
    cache.index.insert(np.arange(30), np.concatenate([table[:5], again]))
    cache.pool.decref(again)
    assert ids(cache.index.lookup(np.arange(30))) == [*table[:5].tolist(), *again.tolist()]
    cache.index.check_invariants()
    cache.pool.check_invariants()


def test_leaves_go_before_their_parents(cache: Cache) -> None:
    cache.store(range(8))
    cache.store([*list(range(8)), 100, 101, 102, 103])
    cache.store([*list(range(8)), 200, 201, 202, 203])
    cache.clock.advance(1)
    cache.index.lookup(np.arange(8))  # touches the parent alone: it stays behind its children
    cache.index.evict(3)
    # The two leaves, then for the third block the parent's last block only: a partial
    # eviction takes a leaf's tail, so its head stays cached.
    assert cache.evicted_tokens() == [[100, 101, 102, 103], [200, 201, 202, 203], [4, 5, 6, 7]]
    assert cache.index.stats().nodes == 1
    assert cache.index.lookup(np.arange(8)).matched_tokens == 4
    cache.index.evict(1)
    assert cache.evicted_tokens()[-1] == [0, 1, 2, 3] and cache.index.stats().nodes == 0
    cache.index.check_invariants()


def test_blocks_in_use_are_skipped_and_count_as_used(cache: Cache) -> None:
    cache.store([1, 1, 1, 1])
    held = cache.store([2, 2, 2, 2], keep=True)  # a live sequence still holds it
    cache.store([3, 3, 3, 3])
    assert cache.index.reclaimable_blocks() == 2
    assert cache.index.evict(2) == 2
    assert cache.evicted_tokens() == [[1, 1, 1, 1], [3, 3, 3, 3]]
    assert cache.index.evict(1) == 0
    cache.pool.decref(held)
    assert cache.index.evict(1) == 1
    cache.index.check_invariants()


def test_lfu_evicts_least_frequently_used_then_least_recent() -> None:
    cache = make_cache(policy="lfu")
    for first in (10, 20, 30, 40):
        cache.store([first, 0, 0, 0])
    for first, uses in ((10, 3), (20, 1), (30, 2), (40, 1)):
        for _ in range(uses):
            cache.index.lookup([first, 0])
    cache.index.evict(4)
    assert [t[0] for t in cache.evicted_tokens()] == [20, 40, 30, 10]
    cache.index.check_invariants()


def test_ttl_evictor_drops_expired_leaves_without_a_lookup() -> None:
    cache = make_cache(policy="lru+ttl", ttl_s=10.0)
    cache.store([1, 1, 1, 1])
    cache.clock.advance(5)
    cache.store([2, 2, 2, 2])
    held = cache.store([3, 3, 3, 3], keep=True)
    cache.clock.now = 12.0
    assert cache.index.evict_expired() == 1
    assert cache.evicted_tokens() == [[1, 1, 1, 1]]
    cache.clock.now = 16.0
    assert cache.index.evict_expired() == 1  # [2...] expired; [3...] is in use: its TTL restarts
    cache.pool.decref(held)
    cache.clock.now = 25.0
    assert cache.index.evict_expired() == 0
    cache.clock.now = 26.0
    assert cache.index.evict_expired() == 1
    stats = cache.index.stats()
    assert stats.evictions["ttl"] == 3 and stats.evictions["capacity"] == 0
    cache.index.check_invariants()


def test_lfu_ttl_evicts_expired_before_infrequent() -> None:
    cache = make_cache(policy="lfu+ttl", ttl_s=10.0)
    cache.store([1, 0, 0, 0])
    for _ in range(5):
        cache.index.lookup([1, 0])
    cache.clock.advance(20)
    cache.store([2, 0, 0, 0])
    cache.index.evict(1)
    assert cache.evicted_tokens() == [[1, 0, 0, 0]]


def test_memory_budget_evicts_after_insert() -> None:
    cache = make_cache(bytes_per_block=100, memory_budget_bytes=250)
    cache.store([1, 1, 1, 1])
    cache.clock.advance(1)
    cache.store([2, 2, 2, 2, 2, 2, 2, 2])  # 3 blocks > 2.5
    assert cache.evicted_tokens() == [[1, 1, 1, 1]]
    stats = cache.index.stats()
    assert (stats.blocks_used, stats.bytes_used, stats.evictions["memory_budget"]) == (2, 200, 1)


def test_evict_listener_sees_block_before_its_reference_is_dropped() -> None:
    seen: list[tuple[int, int, list[int], list[int], str]] = []
    pool = BlockPool(16)

    def listener(block):
        seen.append((block.block_id, pool.ref_count(block.block_id), block.tokens.tolist(),
                     block.prefix_tokens.tolist(), block.reason))

    index = PrefixIndex(pool, 4, policy="lru", on_evict=listener)
    a = pool.allocate(2)
    index.insert([1, 2, 3, 4, 5, 6], a)
    pool.decref(a)
    b = pool.allocate(2)
    index.insert([1, 2, 3, 4, 5, 9], b)  # splits at 5, inside block 1; the sequence stays live
    # A's lower part goes first, but its block a[1] stays with the upper node: nothing freed,
    # nothing reported. B's leaf is in use, so nothing else can go.
    assert index.evict(1) == 0
    assert seen == []
    assert index.lookup([1, 2, 3, 4, 5, 6]).matched_tokens == 5
    pool.decref(b)  # the sequence ends
    assert index.evict(5, reason="explicit") == 3
    assert seen == [
        (int(b[1]), 1, [5, 9], [1, 2, 3, 4, 5, 9], "explicit"),
        (int(a[0]), 1, [1, 2, 3, 4], [1, 2, 3, 4], "explicit"),
        (int(a[1]), 1, [5], [1, 2, 3, 4, 5], "explicit"),
    ]
    assert pool.num_free == 16


def test_remove_prunes_only_nodes_left_empty(cache: Cache) -> None:
    cache.store(range(8))
    cache.store([*list(range(8)), 50, 51, 52, 53])
    assert cache.index.remove([0, 1, 2, 3]) == 0  # never inserted as such
    assert cache.index.remove([*list(range(8)), 50, 51, 52, 53]) == 1
    assert cache.index.lookup(np.arange(12)).matched_tokens == 8  # [0..7] was inserted itself
    cache.store([*list(range(8)), 60, 61, 62, 63])
    assert cache.index.remove(np.arange(8)) == 0  # still the prefix of a cached sequence
    assert cache.index.remove([*list(range(8)), 60, 61, 62, 63]) == 3  # nothing left above it
    assert cache.index.stats().nodes == 0
    assert cache.index.stats().evictions["explicit"] == 4
    cache.index.check_invariants()


# --- pins ------------------------------------------------------------------------------------------


def test_pin_survives_eviction_and_unpin_releases_it() -> None:
    cache = make_cache(num_blocks=16, pin_budget_fraction=0.25)  # 4 blocks may be pinned
    system = list(range(6))
    cache.store([*system, 40, 41])
    cache.store([*system, 50, 51])
    assert cache.index.pin(system, priority=1) == 6  # ends inside an edge: splits there
    assert cache.index.stats().pinned_blocks == 2
    cache.index.evict(16)
    assert cache.index.lookup([*system, 40]).matched_tokens == 6
    assert cache.index.unpin(system)
    assert not cache.index.unpin(system)
    cache.index.evict(16)
    assert cache.index.lookup(system).matched_tokens == 0
    cache.index.check_invariants()


def test_pin_beyond_budget_raises_and_changes_nothing() -> None:
    cache = make_cache(num_blocks=16, pin_budget_fraction=0.25)
    cache.store(range(12))  # 3 blocks
    cache.store([90] * 10)  # 3 blocks
    assert cache.index.pin(np.arange(12)) == 12
    before = snapshot(cache)
    with pytest.raises(PinBudgetExceeded, match="pin budget of 4 blocks"):
        cache.index.pin([90] * 7)  # would split [90]*10 at 7 and pin 2 more blocks
    assert snapshot(cache) == before
    cache.index.check_invariants()


def test_higher_priority_pin_displaces_lower_ones() -> None:
    cache = make_cache(num_blocks=16, pin_budget_fraction=0.25)
    cache.store(range(12))
    cache.store([90] * 8)
    assert cache.index.pin(np.arange(12), priority=0) == 12
    with pytest.raises(PinBudgetExceeded):
        cache.index.pin([90] * 8, priority=0)
    assert cache.index.pin([90] * 8, priority=5) == 8
    assert cache.index.pins() == [("default", 8, 5)]
    assert cache.index.pin([90] * 8, priority=7) == 8  # same tokens: priority updated
    assert cache.index.pins() == [("default", 8, 7)]
    assert cache.index.pin([1, 2, 3]) == 0  # not cached: nothing pinned
    cache.index.check_invariants()


# --- batches, stats, min prefix ----------------------------------------------------------------


def test_batched_lookups_and_inserts_equal_single_calls() -> None:
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 50, int(rng.integers(1, 30))) for _ in range(60)]
    prompts += [p[: max(1, p.size // 2)] for p in prompts[:10]]
    single, batched, packed = (make_cache(num_blocks=2048) for _ in range(3))
    for cache in (single, batched, packed):
        cache.tables = [cache.pool.allocate(-(-p.size // 4)) for p in prompts]
    for p, t in zip(prompts, single.tables):
        single.index.insert(p, t)
    batched.index.insert_many(list(zip(prompts, batched.tables)))
    offsets = np.cumsum([0] + [p.size for p in prompts])
    packed.index.insert_packed(np.concatenate(prompts), offsets, np.concatenate(packed.tables))
    assert snapshot(single)[0] == snapshot(batched)[0] == snapshot(packed)[0]
    queries = [rng.integers(0, 50, int(rng.integers(1, 30))) for _ in range(40)] + prompts[:20]
    expected = [single.index.lookup(q) for q in queries]
    many = batched.index.lookup_many(queries)
    packed_many = packed.index.lookup_packed(np.concatenate(queries), np.cumsum([0] + [q.size for q in queries]))
    for results in (many, packed_many):
        assert [m.matched_tokens for m in results] == [m.matched_tokens for m in expected]
        assert [ids(m) for m in results] == [ids(m) for m in expected]
        assert [m.remaining.tolist() for m in results] == [m.remaining.tolist() for m in expected]
        assert results.matched_tokens.tolist() == [m.matched_tokens for m in expected]
    assert single.index.stats().hits == batched.index.stats().hits == packed.index.stats().hits
    for cache in (single, batched, packed):
        cache.index.check_invariants()


def test_batch_with_a_conflicting_block_changes_nothing(cache: Cache) -> None:
    cache.store(range(8))
    shared = cache.pool.allocate(1)
    before = snapshot(cache)
    with pytest.raises(InvalidArgument, match="same block"):
        cache.index.insert_many([([30, 31, 32], shared), ([40, 41, 42], shared)])
    assert snapshot(cache) == before
    cached = cache.index.lookup(np.arange(8)).block_ids
    before = snapshot(cache)
    with pytest.raises(InvalidArgument, match="already hold cached tokens"):
        cache.index.insert([*list(range(8)), 9], np.array([cached[0], cached[1], cached[0]]))
    assert snapshot(cache) == before
    cache.index.check_invariants()


def test_stats_count_hits_misses_and_tokens(cache: Cache) -> None:
    cache.store(range(8))
    cache.index.lookup(np.arange(4))
    cache.index.lookup([9, 9])
    cache.index.lookup(np.arange(10))
    stats = cache.index.stats()
    assert (stats.hits, stats.misses, stats.hit_tokens, stats.lookup_tokens) == (2, 1, 12, 16)
    assert stats.hit_rate == pytest.approx(2 / 3) and stats.token_hit_rate == pytest.approx(12 / 16)
    assert (stats.inserts, stats.inserted_tokens, stats.blocks_used, stats.nodes, stats.namespaces) == (1, 8, 2, 1, 1)


def test_min_prefix_tokens_skips_short_sequences_and_short_matches() -> None:
    cache = make_cache(min_prefix_tokens=4)
    table = cache.pool.allocate(1)
    assert cache.index.insert([1, 2, 3], table).skipped
    assert cache.index.stats().nodes == 0
    cache.store([1, 2, 3, 4, 5])
    assert cache.index.lookup([1, 2, 3, 9]).matched_tokens == 0
    assert cache.index.lookup([1, 2, 3, 4, 9]).matched_tokens == 4


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens",
    [[], np.array([], dtype=np.int64), [1.5, 2.0], [True, False], np.array([[1, 2]]), "abc",
     [1, -2], [1, 2**70], np.array([2**63 + 5], dtype=np.uint64), None],
)
def test_bad_tokens_raise_and_change_nothing(cache: Cache, tokens: object) -> None:
    cache.store(range(8))
    before = snapshot(cache)
    with pytest.raises(InvalidTokens):
        cache.index.lookup(tokens)  # type: ignore[arg-type]
    with pytest.raises(InvalidTokens):
        cache.index.insert(tokens, [0])  # type: ignore[arg-type]
    with pytest.raises(InvalidTokens):
        cache.index.lookup_many([np.arange(3), tokens])  # type: ignore[list-item]
    assert snapshot(cache) == before


def test_tokens_outside_the_vocabulary_raise() -> None:
    cache = make_cache(vocab_size=100)
    cache.store([1, 2, 3])
    before = snapshot(cache)
    with pytest.raises(InvalidTokens, match="vocabulary"):
        cache.index.lookup([1, 2, 3, 100])
    with pytest.raises(InvalidTokens, match="vocabulary"):
        cache.index.insert([1, 2, 3, 100], cache.pool.allocate(1))
    assert snapshot(cache)[:4] == before[:4]


@pytest.mark.parametrize(
    ("block_ids", "message"),
    [([0], "exactly 2"), ([0, 1, 2], "exactly 2"), ([0, 64], "outside the pool"), ([-1, 0], "outside the pool"),
     ([0.5, 1], "integer"), ([60, 61], "free")],
)
def test_bad_block_tables_raise_and_change_nothing(cache: Cache, block_ids: list, message: str) -> None:
    cache.pool.allocate(2)
    before = snapshot(cache)
    with pytest.raises(InvalidArgument, match=message):
        cache.index.insert(np.arange(5), block_ids)
    assert snapshot(cache) == before


def test_bad_arguments_name_the_culprit(cache: Cache) -> None:
    cache.store(range(4))
    before = snapshot(cache)
    with pytest.raises(InvalidArgument, match="namespace"):
        cache.index.lookup([1], namespace=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="num_blocks"):
        cache.index.evict(-1)
    with pytest.raises(InvalidArgument, match="reason"):
        cache.index.evict(1, reason="boredom")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="priority"):
        cache.index.pin([0, 1], priority="high")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="offsets"):
        cache.index.lookup_packed([1, 2, 3], [0, 2])
    assert snapshot(cache) == before


@pytest.mark.parametrize("name", ["lru2", "fifo", "lru+lfu", "lru+lru", "", "LRU + ttl2"])
def test_unknown_policy_names_list_the_valid_ones(name: str) -> None:
    with pytest.raises(InvalidArgument, match="lru") as info:
        make_policy(name)
    if "unknown" in str(info.value):
        assert "lru, lfu, reuse, ttl" in str(info.value)
    with pytest.raises(InvalidArgument):
        PrefixIndex(BlockPool(4), 4, policy=name)


@pytest.mark.parametrize("ttl", [0, -1.0, float("nan"), float("inf"), True])
def test_ttl_must_be_positive(ttl: float) -> None:
    with pytest.raises(InvalidArgument, match="ttl_s"):
        make_policy("lru+ttl", ttl_s=ttl)


def test_ttl_needs_the_ttl_policy_and_vice_versa() -> None:
    with pytest.raises(InvalidArgument, match="needs ttl_s"):
        make_policy("ttl")
    with pytest.raises(InvalidArgument, match="lru\\+ttl"):
        make_policy("lru", ttl_s=5)
    assert make_policy(" TTL+lru ", ttl_s=5).name == "lru+ttl"


def test_a_trusted_insert_builds_the_same_tree_and_keeps_the_tree_checks() -> None:
    prompts = [np.arange(40), np.concatenate([np.arange(20), np.arange(100, 130)]), np.arange(50, 60)]
    checked_pool, trusted_pool = BlockPool(64), BlockPool(64)
    checked, trusted = PrefixIndex(checked_pool, 16), PrefixIndex(trusted_pool, 16)
    for prompt in prompts:
        blocks = -(-prompt.size // 16)
        checked.insert(prompt, checked_pool.allocate(blocks))  # type: ignore[arg-type]
        table = trusted_pool.allocate(blocks)
        assert table is not None
        trusted.insert_trusted(prompt.tobytes(), table)
    for query in [*prompts, np.arange(30), np.arange(100, 120)]:
        assert trusted.peek(query) == checked.peek(query)
        np.testing.assert_array_equal(trusted.lookup(query).block_ids, checked.lookup(query).block_ids)
    trusted.check_invariants()
    reused = trusted.lookup(np.arange(40)).block_ids  # blocks that already hold other tokens
    used, counts = trusted.stats().blocks_used, trusted_pool.ref_counts(np.arange(64))
    with pytest.raises(InvalidArgument, match="already hold cached tokens"):
        trusted.insert_trusted(np.arange(200, 232).tobytes(), reused[:2].copy())
    assert trusted.stats().blocks_used == used
    np.testing.assert_array_equal(trusted_pool.ref_counts(np.arange(64)), counts)
    trusted.check_invariants()
    assert trusted.peek(np.arange(200, 232)) == 0

