"""The node engine's prefix index as a simulated node's cache (:mod:`routing.simulator`).

``kvcluster simulate --node-cache index:POLICY`` replays a trace with each node caching in a
real :class:`~kvcluster.core.prefix_index.PrefixIndex` under an eviction policy of the engine
(``lru``, ``lfu``, ``reuse``), rather than the simulator's own block LRU. A trace block id is
one token of a 1-token block, so a node of ``capacity`` blocks holds ``capacity`` trace
blocks, and each request's generated length reaches the policy as a store would carry it.
The index evicts the tail of a leaf that holds more than it needs, so a node frees what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvcluster.core.block_pool import BlockPool
from kvcluster.core.eviction import make_policy, parse_policy_name
from kvcluster.core.prefix_index import PrefixIndex
from kvcluster.core.prefix_records import EvictedBlock
from kvcluster.errors import InvalidArgument

#: The ``--node-cache`` values that replay with the node engine's index.
INDEX_CACHE_PREFIX = "index:"


class IndexBlockCache:
    """A simulated node cache (:class:`routing.simulator.BlockCache`) backed by the engine's
    prefix index with eviction policy ``policy``."""

    def __init__(self, capacity: int, policy: str = "reuse") -> None:
        if capacity < 1:
            raise InvalidArgument(f"cache capacity must be >= 1 block, got {capacity}")
        if "ttl" in parse_policy_name(policy):
            raise InvalidArgument(f"policy {policy!r}: a trace replay has no use for a TTL; pick lru, lfu or reuse")
        self.capacity = capacity
        self._pool = BlockPool(capacity)
        self._evicted: list[EvictedBlock] = []
        self._index = PrefixIndex(self._pool, 1, policy=make_policy(policy), on_evict=self._evicted.append)

    @property
    def index(self) -> PrefixIndex:
        return self._index

    def __len__(self) -> int:
        return self._pool.num_blocks - self._pool.num_free

    def leading_hits(self, ids: Sequence[int]) -> int:
        return self._index.peek(np.asarray(ids, dtype=np.int64)) if ids else 0

    def end(self, ids: Sequence[int], keep: int) -> None:
        if ids:
            self._index.demote(np.asarray(ids, dtype=np.int64), keep_tokens=keep)

    def insert(self, ids: Sequence[int], generated_tokens: int | None = None,
               ) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Serve a chain as a node does: look it up (a use of what it finds), make room, store
        the rest with the request's generated length. Returns (depths newly stored, evicted
        (id, family, depth))."""
        if not ids:
            return [], []
        index, pool = self._index, self._pool
        tokens = np.asarray(ids, dtype=np.int64)
        match = index.lookup(tokens)
        matched = match.matched_tokens
        needed = tokens.size - matched
        if not needed:
            return [], []
        lease = index.acquire(match) if matched else None
        self._evicted.clear()
        try:
            if needed > pool.num_free:
                index.evict(needed - pool.num_free)
            take = min(needed, pool.num_free)  # a chain longer than the cache keeps its head
            if take:
                fresh = pool.allocate(take)
                assert fresh is not None
                table = np.concatenate([match.block_ids[:matched], fresh]) if matched else fresh
                index.insert_trusted(tokens[: matched + take].tobytes(), table, generated_tokens=generated_tokens)
                pool.decref_distinct(fresh)
        finally:
            if lease is not None:
                index.release(lease)
        evicted = [
            (int(block.tokens[0]), int.from_bytes(block.prefix_bytes[:8], "little", signed=True), block.block_index)
            for block in self._evicted
        ]
        return list(range(matched, matched + take)), evicted
