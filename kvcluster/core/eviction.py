"""Eviction policies of the prefix index: ``lru``, ``lfu``, ``reuse``, ``ttl`` and combinations.

A policy orders the *unpinned* nodes of a :class:`~kvcluster.core.prefix_index.PrefixIndex`
(every namespace: they share one block pool) so the index can ask for the next victim in O(1)
(``lru``, ``ttl``) or O(log F) (``lfu``, F = distinct use counts), never by scanning.

Why the front of the order is always a leaf
    A use of a node is a use of its whole prefix, so the index touches a node and then each of
    its ancestors (:meth:`EvictionPolicy.touch_path`, deepest first). An ancestor is therefore
    always at least as recent, and at least as frequently used, as any of its descendants, and
    it sits *behind* them in the order. The front of the order is a node without descendants:
    a leaf. Evicting it may expose its parent, which is already in its exact place. This is how
    the index evicts leaves first without a heap over the leaves. (Pinned nodes are not in the
    order; a pin covers its whole prefix, so an ancestor of a pinned node is pinned too.)

Policies
    ``lru``  least recently used first. ``OrderedDict`` keyed by node: touch = ``move_to_end``,
             victim = first key, both O(1).
    ``lfu``  least frequently used first, least recently used among equals. One insertion-ordered
             bucket per use count plus a min-heap of the counts present (lazily pruned): touch
             moves a node to the next bucket in O(1) amortised, victim is O(log F).
    ``ttl``  a node expires ``ttl_s`` seconds after its last use (injected monotonic clock). The
             index's evictor drops expired nodes (``PrefixIndex.evict_expired``) without waiting
             for a lookup to notice. Alone, ``ttl`` evicts for capacity in expiry order, which
             with one TTL for all is the ``lru`` order.
    ``reuse`` learned: lowest rank first. A store ranks the nodes it touches
             ``log(chance) + blocks_touched / (REUSE_HORIZON_TURNOVERS * capacity)``, where
             ``chance`` is what :class:`~kvcluster.core.reuse_model.ReuseModel` has learned
             of requests like it (their generated length, whether they extended a cached
             prefix) being continued; a lookup, before its request has run, uses the chance
             of all requests. A use never lowers a rank, so an ancestor ranks at least as
             high as any descendant and the front is a leaf, as above (equal ranks: the
             deeper node first). A min-heap with lazily skipped stale entries: touch and
             victim O(log n). Without generated lengths it still learns from continuation.
    ``lru+ttl`` / ``lfu+ttl`` / ``reuse+ttl``: expired nodes go first, oldest first; then the
             ``lru``/``lfu``/``reuse`` order.

Concurrency: not thread-safe; the index's owner serialises every call.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Literal

from kvcluster.core.radix_node import UNRANKED, RadixNode
from kvcluster.core.reuse_model import ReuseModel, ReuseRecord
from kvcluster.errors import InvalidArgument

#: Policy names that can be combined with '+' (``lru``, ``lfu`` and ``reuse`` exclude each other).
POLICY_NAMES = ("lru", "lfu", "reuse", "ttl")

#: ``reuse``: recency still counts; a rank gains 1 (a factor e in chance) per this many
#: turnovers of the cache's capacity in blocks touched (each touch counts its whole path).
#: Chosen on the Mooncake trace, replayed through this index at 5-40 % of its unique blocks:
#: 2 is at or above LRU at every size (24-94 % of an unbounded cache against LRU's 24-85 %);
#: a longer memory keeps stale likely blocks too long in a small cache (10: 24 % at 10 %,
#: where LRU gets 41 %).
REUSE_HORIZON_TURNOVERS = 2.0

EvictionReason = Literal["capacity", "ttl", "memory_budget", "explicit"]
#: Every reason an eviction is counted under.
EVICTION_REASONS: tuple[EvictionReason, ...] = ("capacity", "ttl", "memory_budget", "explicit")

Clock = Callable[[], float]


def parse_policy_name(name: str) -> tuple[str, ...]:
    """The parts of a policy name such as ``"lfu+ttl"``, validated and in canonical order.

    Raises :class:`InvalidArgument` naming the bad value and listing the valid policies.
    """
    if not isinstance(name, str):
        raise InvalidArgument(
            f"eviction policy must be a string naming one of {', '.join(POLICY_NAMES)}, got {name!r}"
        )
    parts = [p.strip().lower() for p in name.split("+")]
    valid = ", ".join(POLICY_NAMES)
    unknown = [p for p in parts if p not in POLICY_NAMES]
    if unknown:
        raise InvalidArgument(
            f"unknown eviction policy {name!r} ({', '.join(repr(u) for u in unknown)}); "
            f"valid policies: {valid}, or a combination such as 'lru+ttl'"
        )
    if len(set(parts)) != len(parts):
        raise InvalidArgument(f"eviction policy {name!r} names a policy twice; valid: {valid}")
    orders = [p for p in parts if p != "ttl"]
    if len(orders) > 1:
        raise InvalidArgument(
            f"eviction policy {name!r}: {' and '.join(orders)} cannot be combined; pick one of "
            "lru, lfu and reuse, optionally with ttl ('lru+ttl', 'lfu+ttl', 'reuse+ttl')"
        )
    return tuple(p for p in POLICY_NAMES if p in parts)


def make_policy(name: str, ttl_s: float | None = None, clock: Clock = time.monotonic) -> EvictionPolicy:
    """The policy called ``name`` (``lru``, ``lfu``, ``reuse``, ``ttl``, or ``lru``/``lfu``/``reuse``
    with ``+ttl``).

    ``ttl_s`` is required by, and only allowed with, a policy that includes ``ttl``; it must be
    a finite number of seconds > 0. Bad values raise :class:`InvalidArgument`.
    """
    return EvictionPolicy(name, ttl_s=ttl_s, clock=clock)


class EvictionPolicy:
    """The eviction order over the unpinned nodes of one prefix index.

    Contract with the index (which keeps it): every alive, unpinned, non-root node is tracked
    exactly once; every use goes through :meth:`touch_path`; pinned nodes are untracked (their
    ``freq``/``last_access`` are still updated by touches, so they re-enter in their place).
    """

    def __init__(self, name: str, *, ttl_s: float | None = None, clock: Clock = time.monotonic) -> None:
        parts = parse_policy_name(name)
        if ttl_s is not None:
            if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not math.isfinite(ttl_s) or ttl_s <= 0:
                raise InvalidArgument(f"ttl_s must be a finite number of seconds > 0, got {ttl_s!r}")
            if "ttl" not in parts:
                raise InvalidArgument(
                    f"ttl_s={ttl_s} is set but eviction policy {name!r} does not include 'ttl'; "
                    f"use '{'+'.join((*parts, 'ttl'))}'"
                )
        elif "ttl" in parts:
            raise InvalidArgument(f"eviction policy {name!r} needs ttl_s (seconds, > 0)")
        self.name = "+".join(parts)
        self.ttl_s: float | None = float(ttl_s) if ttl_s is not None else None
        self.clock = clock
        self.uses_frequency = "lfu" in parts
        self.uses_reuse = "reuse" in parts
        self.uses_recency = not (self.uses_frequency or self.uses_reuse) or self.ttl_s is not None
        # Recency order (lru, ttl): front = least recently used. O(1) move-to-end.
        self._recency: OrderedDict[RadixNode, None] = OrderedDict()
        # Frequency order (lfu): count -> nodes in order of reaching that count.
        self._buckets: dict[int, OrderedDict[RadixNode, None]] = {}
        self._counts: list[int] = []  # min-heap of bucket counts, pruned lazily
        self._counts_in_heap: set[int] = set()
        self._size = 0
        # Rank order (reuse): a heap of (rank, -end, node_id, node); a node's live entry is
        # the one equal to _ranked[node], the others are skipped when they surface.
        self.reuse_model = ReuseModel()
        self._ranked: dict[RadixNode, tuple[float, int, int]] = {}
        self._heap: list[tuple[float, int, int, RadixNode]] = []
        self._blocks_touched = 0
        self._per_block = 1.0 / REUSE_HORIZON_TURNOVERS  # until attach() gives the capacity
        self._block_size = 1
        self._store: ReuseRecord | None = None  # the store whose touches are under way
        self._store_rank = 0.0
        self.touch_path: Callable[[RadixNode, float], None]
        # touch_match(node, now): a lookup matched up to ``node``: ``touch_path``, and for
        # ``reuse`` the request that last stored ``node`` counts as continued.
        self.touch_match: Callable[[RadixNode, float], None]
        if self.uses_reuse:
            self.touch_path = self._touch_reuse
        elif self.uses_frequency and self.uses_recency:
            self.touch_path = self._touch_both
        elif self.uses_frequency:
            self.touch_path = self._touch_frequency
        else:
            self.touch_path = self._touch_recency
        self.touch_match = self._touch_match_reuse if self.uses_reuse else self.touch_path

    def __repr__(self) -> str:
        return f"EvictionPolicy({self.name!r}, ttl_s={self.ttl_s}, tracked={self._size})"

    def __len__(self) -> int:
        return self._size

    def __contains__(self, node: object) -> bool:
        if self.uses_reuse:
            return node in self._ranked
        if self.uses_recency:
            return node in self._recency
        return isinstance(node, RadixNode) and node in self._buckets.get(node.freq, ())

    # --- membership ----------------------------------------------------------------------------

    def track(self, node: RadixNode) -> None:
        """Add ``node`` as the most recently used of its use count (new, split or unpinned)."""
        if self.uses_recency:
            self._recency[node] = None
        if self.uses_frequency:
            self._bucket(node.freq)[node] = None
        if self.uses_reuse:
            self._rank(node)
        self._size += 1

    def track_many(self, nodes: list[RadixNode]) -> None:
        """``track`` each of ``nodes`` in order."""
        if self.uses_recency:
            recency = self._recency
            for node in nodes:
                recency[node] = None
        if self.uses_frequency:
            for node in nodes:
                self._bucket(node.freq)[node] = None
        if self.uses_reuse:
            for node in nodes:
                self._rank(node)
        self._size += len(nodes)

    def untrack(self, node: RadixNode) -> None:
        """Remove ``node`` (evicted, removed or pinned). It must be tracked."""
        if self.uses_recency:
            del self._recency[node]
        if self.uses_frequency:
            bucket = self._buckets[node.freq]
            del bucket[node]
            if not bucket:
                del self._buckets[node.freq]
        if self.uses_reuse:
            del self._ranked[node]
        self._size -= 1

    def shortened(self, node: RadixNode) -> None:
        """Tracked ``node`` lost the end of its edge (a partial eviction): it keeps its place,
        except that ``reuse``, which breaks rank ties by depth, re-enters it at its new end."""
        if self.uses_reuse:
            self._rank(node)

    def demote(self, chain: list[RadixNode]) -> None:
        """Put ``chain`` at the front of the order, deepest first: a leaf and its ancestors
        up to a node no other branch goes through, all tracked (the sequence they hold will
        not be used again). The front stays a leaf, each node stays ahead of its parent and
        a later use promotes them as usual.

        ``lru``/``ttl``: to the front, stamped as used no later than the node that was first
        (so the recency order stays sorted by last use and expiry still meets the oldest
        first). ``lfu``: use count 0, first of that count. ``reuse``: ranked below any use.
        """
        if not chain:
            return
        if self.uses_recency:
            recency = self._recency
            oldest = min(next(iter(recency)).last_access, chain[0].last_access)
            for node in reversed(chain):  # shallowest first: the deepest ends up in front
                node.last_access = min(node.last_access, oldest)
                recency.move_to_end(node, last=False)
        if self.uses_frequency:
            for node in reversed(chain):
                bucket = self._buckets[node.freq]
                del bucket[node]
                if not bucket:
                    del self._buckets[node.freq]
                node.freq = 0
                lowest = self._bucket(0)
                lowest[node] = None
                lowest.move_to_end(node, last=False)
        if self.uses_reuse:
            for node in chain:
                node.reuse_value = UNRANKED
                self._rank(node)

    # --- uses ----------------------------------------------------------------------------------
    # ``touch_path(node, now)`` is bound in __init__ to the variant for this policy, so the hot
    # path of a lookup pays no dispatch. Each stamps ``node`` and every ancestor below the root,
    # deepest first (the order the leaf-first argument in the module docstring relies on).

    def touch_many(self, nodes: list[RadixNode], now: float) -> None:
        """``touch_path`` for each node in order (one call for a batch)."""
        if self.uses_frequency or self.uses_reuse:
            touch = self.touch_path
            for node in nodes:
                touch(node, now)
            return
        move = self._recency.move_to_end
        for node in nodes:
            while node.parent is not None:
                node.last_access = now
                node.freq += 1
                if not node.pin_count:
                    move(node)
                node = node.parent

    def track_and_touch(self, nodes: list[RadixNode], now: float) -> None:
        """``track_many(nodes)`` then ``touch_many(nodes, now)``, for new unpinned leaves
        (none an ancestor of an earlier one, as the leaves a batch insert creates, in order).

        With a recency order each leaf is appended when its turn comes instead of being
        appended and then moved: every leaf is touched, and a leaf's place is decided by its
        touch, so the end state is the same.
        """
        if self.uses_frequency or self.uses_reuse:
            self.track_many(nodes)
            self.touch_many(nodes, now)
            return
        recency = self._recency
        expected = len(recency) + len(nodes)
        move = recency.move_to_end
        for leaf in nodes:
            leaf.last_access = now
            leaf.freq += 1
            recency[leaf] = None
            node = leaf.parent
            while node is not None and node.parent is not None:  # up to the root, excluded
                node.last_access = now
                node.freq += 1
                if not node.pin_count:
                    move(node)
                node = node.parent
        assert len(recency) == expected, "track_and_touch was given a node already tracked"
        self._size += len(nodes)

    def _touch_recency(self, node: RadixNode, now: float) -> None:
        move = self._recency.move_to_end
        while node.parent is not None:
            node.last_access = now
            node.freq += 1
            if not node.pin_count:
                move(node)
            node = node.parent

    def _touch_frequency(self, node: RadixNode, now: float) -> None:
        buckets = self._buckets
        while node.parent is not None:
            node.last_access = now
            count = node.freq
            node.freq = count + 1
            if not node.pin_count:
                bucket = buckets[count]
                del bucket[node]
                if not bucket:
                    del buckets[count]
                self._bucket(count + 1)[node] = None
            node = node.parent

    def _touch_both(self, node: RadixNode, now: float) -> None:
        move = self._recency.move_to_end
        buckets = self._buckets
        while node.parent is not None:
            node.last_access = now
            count = node.freq
            node.freq = count + 1
            if not node.pin_count:
                move(node)
                bucket = buckets[count]
                del bucket[node]
                if not bucket:
                    del buckets[count]
                self._bucket(count + 1)[node] = None
            node = node.parent

    def _touch_reuse(self, node: RadixNode, now: float) -> None:
        """Rank ``node`` and its ancestors: the store's chance under way, else the chance of
        all requests, plus the recency term; a rank only ever rises. A store also makes its
        record the owner of every node it touches (the request a later match credits)."""
        self._blocks_touched += -(-node.end // self._block_size)
        store = self._store
        rank = (self._store_rank if store is not None else self.reuse_model.neutral_log_chance()) \
            + self._blocks_touched * self._per_block
        move = self._recency.move_to_end if self.uses_recency else None
        while node.parent is not None:
            node.last_access = now
            node.freq += 1
            if store is not None:
                node.reuse_owner = store
            if rank > node.reuse_value:
                node.reuse_value = rank
                if not node.pin_count:
                    self._rank(node)
            if move is not None and not node.pin_count:
                move(node)
            node = node.parent

    def _touch_match_reuse(self, node: RadixNode, now: float) -> None:
        self.reuse_model.credit(node.reuse_owner)
        self._touch_reuse(node, now)

    def touch_matches(self, nodes: list[RadixNode], now: float) -> None:
        """``touch_match`` for each of a batch's matched nodes, in order."""
        if self.uses_reuse:
            credit = self.reuse_model.credit
            for node in nodes:
                credit(node.reuse_owner)
        self.touch_many(nodes, now)

    def attach(self, capacity_blocks: int, block_size: int) -> None:
        """The index's capacity and block size (``reuse`` measures recency in turnovers)."""
        if capacity_blocks < 1 or block_size < 1:
            raise InvalidArgument(f"capacity_blocks and block_size must be >= 1, got {capacity_blocks}, {block_size}")
        self._per_block = 1.0 / (REUSE_HORIZON_TURNOVERS * capacity_blocks)
        self._block_size = block_size

    def begin_store(self, generated_tokens: int | None, extends_prefix: bool) -> ReuseRecord | None:
        """The touches until :meth:`end_store` belong to one stored request (``reuse``: ranked
        by the chance of its bucket, and owned by its record, returned; else None)."""
        if not self.uses_reuse:
            return None
        model = self.reuse_model
        bucket = model.bucket(generated_tokens, extends_prefix)
        self._store = ReuseRecord(bucket)
        self._store_rank = model.log_chance(bucket)
        return self._store

    def end_store(self, stored: bool, extended: ReuseRecord | None = None) -> None:
        """The store is over: if it ``stored``, count it, and credit ``extended`` (the record
        of the request that last stored where this one's cached prefix ended, read before
        the store's touches made this one the owner); a failed store changes nothing."""
        record, self._store = self._store, None
        if record is not None and stored:
            self.reuse_model.count(record)
            self.reuse_model.credit(extended)

    def _rank(self, node: RadixNode) -> None:
        """(Re)enter ``node`` in the rank heap under its current ``reuse_value``."""
        key = (node.reuse_value, -node.end, node.node_id)
        self._ranked[node] = key
        heap = self._heap
        heapq.heappush(heap, (*key, node))
        if len(heap) > 4 * len(self._ranked) + 1024:  # mostly stale entries: rebuild
            self._heap = [(*k, n) for n, k in self._ranked.items()]
            heapq.heapify(self._heap)

    # --- victims -------------------------------------------------------------------------------

    def victim(self, now: float) -> RadixNode | None:
        """The next node to evict for capacity (``None``: nothing tracked). Does not remove it."""
        if self.ttl_s is not None and (self.uses_frequency or self.uses_reuse):
            oldest = self.oldest()
            if oldest is not None and self.is_expired(oldest, now):
                return oldest
        if self.uses_frequency:
            return self._least_frequent()
        if self.uses_reuse:
            return self._lowest_ranked()
        return next(iter(self._recency), None)

    def oldest(self) -> RadixNode | None:
        """The least recently used tracked node (``None``: none, or no recency order kept)."""
        return next(iter(self._recency), None)

    def is_expired(self, node: RadixNode, now: float) -> bool:
        return self.ttl_s is not None and now - node.last_access >= self.ttl_s

    def order(self) -> list[RadixNode]:
        """Every tracked node in capacity-eviction order, ignoring expiry (O(n); for tests)."""
        if self.uses_frequency:
            return [n for count in sorted(self._buckets) for n in self._buckets[count]]
        if self.uses_reuse:
            return sorted(self._ranked, key=self._ranked.__getitem__)
        return list(self._recency)

    def iter_recency(self) -> Iterator[RadixNode]:
        """Tracked nodes, least recently used first (empty for plain ``lfu``)."""
        return iter(self._recency)

    # --- internals -----------------------------------------------------------------------------

    def _bucket(self, count: int) -> OrderedDict[RadixNode, None]:
        bucket = self._buckets.get(count)
        if bucket is None:
            bucket = self._buckets[count] = OrderedDict()
            if count not in self._counts_in_heap:
                heapq.heappush(self._counts, count)
                self._counts_in_heap.add(count)
        return bucket

    def _lowest_ranked(self) -> RadixNode | None:
        heap, ranked = self._heap, self._ranked
        while heap:
            rank, depth, node_id, node = heap[0]
            if ranked.get(node) == (rank, depth, node_id):
                return node
            heapq.heappop(heap)
        return None

    def _least_frequent(self) -> RadixNode | None:
        counts = self._counts
        while counts:
            bucket = self._buckets.get(counts[0])
            if bucket:
                return next(iter(bucket))
            self._counts_in_heap.discard(heapq.heappop(counts))
        return None
