"""The records the tiered store keeps and returns: entries, moves, counters, move results.

Hot records are slotted dataclasses. :class:`StoreEntry` and :class:`MovePlan` are mutated
only under the store's lock (``StoreEntry.where`` is also read without it, which is why it is
one tuple); :class:`MoveResult` is what ``prefetch``/``demote`` futures resolve to.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StoreEntry:
    """Where one key's page is. Mutated only under the store lock.

    ``where`` is ``(tier, slot)`` as one tuple so that lock-free readers see a consistent pair.
    """

    key: int
    where: tuple[int, int]
    hits: int = 0
    pins: int = 0
    readers: int = 0
    moving: bool = False
    removed: bool = False
    # Old (tier, slot) places that a reader may still be copying from; freed at readers == 0.
    retired: list[tuple[int, int]] = field(default_factory=list)

    @property
    def tier(self) -> int:
        return self.where[0]

    @property
    def slot(self) -> int:
        return self.where[1]


@dataclass(slots=True)
class MoveCounters:
    demotions: int = 0
    promotions: int = 0
    discards: int = 0
    bytes_moved: int = 0
    move_seconds: float = 0.0


@dataclass(slots=True, frozen=True)
class MoveResult:
    """What a ``prefetch`` or ``demote`` request did, key by key.

    ``moved``: now in the target tier because of this request; ``already``: nothing to do;
    ``missing``: unknown or discarded keys; ``skipped``: pinned (demote), bottom tier (demote)
    or no room; ``failed``: an I/O error (the page stayed) or a checksum failure (the page was
    dropped and reported to ``on_discard``).
    """

    moved: tuple[int, ...] = ()
    already: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()
    skipped: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()


@dataclass(slots=True)
class MovePlan:
    """A batch move prepared under the lock: ``keys`` from ``src`` slots to ``dst`` slots."""

    src: int
    dst: int
    entries: list[StoreEntry]
    src_slots: list[int]
    dst_slots: list[int]
    # Roll back (rather than commit) pages that got pinned during the copy: every move except
    # an explicit prefetch.
    yield_to_pins: bool = True
