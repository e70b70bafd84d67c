"""How a tier ranks its pages from coldest to hottest: LRU or LFU, both O(1) per access.

The tiered store keeps one order per tier and asks it for the coldest keys when it must demote
or discard; it skips keys it cannot move (pinned, being moved) itself. Not thread-safe: the
store calls these under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from kvcluster.errors import InvalidArgument

POLICIES = ("lru", "lfu")


class EvictionOrder(Protocol):
    def add(self, key: int, hits: int) -> None: ...
    def touch(self, key: int) -> None: ...
    def remove(self, key: int) -> None: ...
    def coldest(self) -> Iterator[int]: ...
    def __len__(self) -> int: ...


class LruOrder:
    """Least recently used first. An OrderedDict gives O(1) move-to-end and removal."""

    def __init__(self) -> None:
        self._keys: OrderedDict[int, None] = OrderedDict()

    def add(self, key: int, hits: int) -> None:
        self._keys[key] = None

    def touch(self, key: int) -> None:
        self._keys.move_to_end(key)

    def remove(self, key: int) -> None:
        del self._keys[key]

    def coldest(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class LfuOrder:
    """Least frequently used first, ties broken by least recent.

    Keys sit in one bucket per hit count (an OrderedDict each, oldest first), so a touch moves
    a key from bucket ``n`` to ``n + 1`` in O(1). ``coldest`` walks buckets in ascending count;
    there are few distinct counts, so sorting them per call is cheap.
    """

    def __init__(self) -> None:
        self._hits: dict[int, int] = {}
        self._buckets: dict[int, OrderedDict[int, None]] = {}

    def add(self, key: int, hits: int) -> None:
        self._hits[key] = hits
        self._buckets.setdefault(hits, OrderedDict())[key] = None

    def touch(self, key: int) -> None:
        hits = self._hits[key]
        self._unlink(key, hits)
        self.add(key, hits + 1)

    def remove(self, key: int) -> None:
        self._unlink(key, self._hits.pop(key))

    def coldest(self) -> Iterator[int]:
        for hits in sorted(self._buckets):
            yield from self._buckets[hits]

    def __len__(self) -> int:
        return len(self._hits)

    def _unlink(self, key: int, hits: int) -> None:
        bucket = self._buckets[hits]
        del bucket[key]
        if not bucket:
            del self._buckets[hits]


def make_order(policy: str) -> EvictionOrder:
    if policy == "lru":
        return LruOrder()
    if policy == "lfu":
        return LfuOrder()
    raise InvalidArgument(f"unknown eviction policy {policy!r}; allowed: {', '.join(POLICIES)}")
