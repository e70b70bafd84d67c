"""The native radix walks (``kvcluster/core/_radixwalk.c``) against the Python ones: the same
matches, the same nodes, the same trees after the same inserts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvcluster.core import radix_walk
from kvcluster.core.block_pool import BlockPool
from kvcluster.core.prefix_index import PrefixIndex
from kvcluster.errors import InvalidArgument
from tests.kvcluster.prefix_cache_helpers import make_cache, snapshot

native = radix_walk.native_walk
pytestmark = pytest.mark.skipif(native is None, reason="the native radix walk extension is not built")


def test_native_walks_equal_python_walks_on_random_trees() -> None:
    assert native is not None
    rng = np.random.default_rng(11)
    for trial in range(20):
        alphabet = int(rng.integers(2, 6))  # few distinct ids: many shared prefixes and splits
        stored = [rng.integers(0, alphabet, int(rng.integers(1, 40))) for _ in range(60)]
        pool = BlockPool(60 * 10)
        index = PrefixIndex(pool, 4, native=False)
        index.insert_many([(p, pool.allocate(-(-p.size // 4))) for p in stored])
        root = index._roots["default"]
        queries = [rng.integers(0, alphabet, int(rng.integers(1, 50))) for _ in range(200)]
        buffer = b"".join(q.astype(np.int64).tobytes() for q in queries)
        bounds = np.concatenate([[0], np.cumsum([q.size * 8 for q in queries])]).tolist()
        for shortest in (8, 24):
            got = native.walk_batch(root, buffer, bounds, shortest)
            want = radix_walk.walk_batch(root, buffer, bounds, shortest)
            assert got[0] == want[0], trial
            assert [id(n) for n in got[1]] == [id(n) for n in want[1]], trial
            assert [id(n) for n in got[2]] == [id(n) for n in want[2]], trial
            assert got[3] == want[3], trial
        for start, end in itertools.pairwise(bounds):
            got_node, got_pos = native.descend(root, buffer, start, end)
            want_node, want_pos = radix_walk.descend(root, buffer, start, end)
            assert (got_node is want_node, got_pos) == (True, want_pos)


def test_native_walk_rejects_bounds_outside_the_buffer() -> None:
    assert native is not None
    cache = make_cache()
    cache.store(range(8))
    root = cache.index._roots["default"]
    buffer = np.arange(8, dtype=np.int64).tobytes()
    with pytest.raises(ValueError, match="prompt 0 spans bytes"):
        native.walk_batch(root, buffer, [0, 72], 8)
    with pytest.raises(ValueError, match="prompt 1 spans bytes"):
        native.walk_batch(root, buffer, [0, 32, 36], 8)
    with pytest.raises(ValueError, match="not whole ids"):
        native.descend(root, buffer, 0, 12)


def random_batch(rng: np.random.Generator, alphabet: int, count: int) -> list[np.ndarray]:
    return [rng.integers(0, alphabet, int(rng.integers(1, 30))) for _ in range(count)]


def test_native_inserts_build_the_same_trees_as_python_inserts() -> None:
    """Batches that create leaves, split edges inside and on block boundaries, end inside
    cached sequences, straddle pinned nodes and fail as a whole leave both indexes equal."""
    rng = np.random.default_rng(5)
    caches = {form: make_cache(num_blocks=4000, block_size=4, native=form == "native") for form in ("native", "python")}
    assert caches["native"].index._insert_walk is native.insert_walk
    assert caches["python"].index._insert_walk is radix_walk.insert_walk
    for round_ in range(12):
        alphabet = int(rng.integers(2, 5))
        batch = random_batch(rng, alphabet, 40)
        namespace = f"ns{round_ % 3}"
        for cache in caches.values():
            tables = [cache.pool.allocate(-(-p.size // 4)) for p in batch]
            cache.index.insert_many(list(zip(batch, tables)), namespace)
            cache.pool.decref(np.concatenate(tables))  # the tree's references remain
            if round_ % 4 == 1:
                cache.index.pin(batch[0], namespace, priority=1)
            if round_ == 6:  # two items claiming one block for different tokens: nothing changes
                table = cache.pool.allocate(1)
                before = snapshot(cache)
                with pytest.raises(InvalidArgument):
                    cache.index.insert_many([(np.array([90, 91]), table), (np.array([92, 93]), table)], namespace)
                assert snapshot(cache) == before
                cache.pool.decref(table)
            cache.clock.advance(1.0)
        assert snapshot(caches["native"]) == snapshot(caches["python"]), round_
        for cache in caches.values():
            cache.index.check_invariants()
    queries = random_batch(rng, 4, 100)
    for namespace in ("ns0", "ns1", "ns2"):
        got = caches["native"].index.lookup_many(queries, namespace)
        want = caches["python"].index.lookup_many(queries, namespace)
        assert got.matched_tokens.tolist() == want.matched_tokens.tolist()
