"""The tiered store: places pages in the fastest tier with room and migrates them in the background.

Tiers are ordered top (fastest: GPU) to bottom (largest: NVMe). Keys are the caller's opaque
integers in ``[0, 2**63)``; a key names one page whose *location* (tier and slot) changes while
its identity and bytes never do.

Placement and migration
    ``put`` writes a page into the highest tier with a free slot. When a tier's occupancy passes
    ``high_watermark`` the worker threads demote its coldest unpinned pages (LRU or LFU per tier)
    one tier down until it falls to ``low_watermark``. A hit on a lower tier (``get``) queues the
    page for promotion to the top; ``prefetch`` promotes a batch early and returns a Future;
    ``demote`` pushes pages down explicitly. When the bottom tier is full, its coldest unpinned
    pages are *discarded* to make room and every discard is reported to the ``on_discard``
    listeners (the caller unregisters the key). When nothing can be placed and nothing is
    evictable, ``put`` raises CapacityError and changes nothing. Every completed move is
    reported to the ``on_move`` listeners as ``(key, from_tier, to_tier)``.

Pins
    A pinned page (``pin``) is never demoted, discarded or moved by an automatic promotion; only
    an explicit ``prefetch`` promotes it (the pin holder asked for it). ``discard`` of a pinned
    key is misuse. A move is two-phase: the page is marked *moving* and copied while it stays
    readable at its source; the commit then switches its location. A demotion whose page got
    pinned meanwhile is rolled back instead of committed.

Locking contract
    * ``_lock`` guards all metadata (entries, per-tier orders, counters, the work queue flags,
      slot generations).
      It is held only for O(batch) bookkeeping, never during a page copy, disk I/O or a
      listener call. Tier ``allocate``/``free`` are in-memory and may be called under it (lock
      order: store, then tier).
    * ``location``, ``contains`` and ``len`` take no lock at all (one dict lookup and one
      attribute read, atomic under the GIL), so a lookup never waits on a demotion.
    * ``get`` of a page in host memory (the top tier, or any host tier when no promotion is
      due) takes no lock either: it copies the slot and then checks that the slot's
      generation, bumped by every free, did not change (a seqlock), so it never returns bytes
      of a reused slot; the access reaches the eviction order through a lock-free log drained
      at the next locked decision. Otherwise ``get`` takes ``_lock`` twice, briefly, to
      register and release itself as a reader of the slot; the copy runs unlocked, and a slot
      that a move or discard retires while it has readers is freed only when the last leaves.
      Either way ``get`` never waits for another page's copy or I/O.
    * Listeners run on the thread that caused the event (a worker or the caller of ``put``)
      with no store lock held; they may call back into the store. A listener that raises is
      logged and does not stop the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import replace

import numpy as np
import torch

from kvcluster.errors import (
    CapacityError,
    InvalidArgument,
    NotFound,
    PageCorrupt,
    PagesCorrupt,
    TierIOError,
)
from tiers.eviction_order import EvictionOrder, make_order
from tiers.migration_workers import MigrationWorkers
from tiers.page_store import (
    PageStore,
    PeekableTier,
    Recoverable,
    TierStats,
    check_batch,
    check_page,
    copy_pages,
)
from tiers.store_records import MoveCounters, MovePlan, MoveResult, StoreEntry

logger = logging.getLogger(__name__)

MoveListener = Callable[[int, str, str], None]
DiscardListener = Callable[[int], None]

_KEY_LIMIT = 2**63
_PRIORITY_PREFETCH, _PRIORITY_HIT, _PRIORITY_DEMOTE = 0, 1, 2
_ACCESS_LOG_LIMIT = 4096


class TieredStore:
    """Pages under caller-chosen keys in ``tiers`` (top to bottom), migrated by worker threads.

    The store owns the tiers: :meth:`close` closes them. Pages found again by a recoverable
    tier (NVMe warm restart) are adopted at construction; :meth:`keys` lists them.
    """

    def __init__(
        self,
        tiers: Sequence[PageStore],
        *,
        high_watermark: float = 0.90,
        low_watermark: float = 0.80,
        migration_threads: int = 2,
        policy: str | Sequence[str] = "lru",
        promote_on_hit: bool = True,
        batch_pages: int = 32,
        io_retry_seconds: float = 1.0,
        on_move: MoveListener | None = None,
        on_discard: DiscardListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not tiers:
            raise InvalidArgument("a tiered store needs at least one tier")
        sizes = {t.page_bytes for t in tiers}
        if len(sizes) != 1:
            raise InvalidArgument(f"all tiers must hold pages of one size, got {sorted(sizes)}")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"tier names must be distinct, got {names}")
        if not (0 < low_watermark <= high_watermark <= 1):
            raise InvalidArgument(
                f"watermarks must satisfy 0 < low ({low_watermark}) <= high ({high_watermark}) <= 1"
            )
        if migration_threads <= 0 or batch_pages <= 0:
            raise InvalidArgument(
                f"migration_threads and batch_pages must be positive, got {migration_threads}, {batch_pages}"
            )
        policies = [policy] * len(tiers) if isinstance(policy, str) else list(policy)
        if len(policies) != len(tiers):
            raise InvalidArgument(f"{len(policies)} eviction policies given for {len(tiers)} tiers")
        self._orders: list[EvictionOrder] = [make_order(p) for p in policies]
        self._tiers = list(tiers)
        self._names = names
        self.page_bytes = sizes.pop()
        self._high = high_watermark
        self._low = low_watermark
        self._promote_on_hit = promote_on_hit
        self._batch = batch_pages
        self._io_retry = io_retry_seconds
        self._clock = clock

        self._lock = threading.Lock()
        self._moves_done = threading.Condition(self._lock)
        self._entries: dict[int, StoreEntry] = {}
        # Per tier and slot, bumped whenever the store frees the slot (see _get_optimistic).
        self._generations = [np.zeros(t.num_slots, dtype=np.int64) for t in tiers]
        self._peekable = [isinstance(t, PeekableTier) for t in tiers]
        self._accesses: deque[int] = deque()  # keys read without the lock, not yet applied
        self._reserved: set[int] = set()
        self._counters = [MoveCounters() for _ in tiers]
        self._draining = [False] * len(tiers)
        # Pages being copied out of each tier: their source slots still count as used until
        # the commit, but a watermark pass must not pick replacements for them again.
        self._leaving = [0] * len(tiers)
        self._io_backoff_until = [0.0] * len(tiers)
        self._hit_promotions: dict[int, None] = {}
        self._hit_task_queued = False
        self._rebalance_queued = False
        self._move_listeners: list[MoveListener] = [on_move] if on_move else []
        self._discard_listeners: list[DiscardListener] = [on_discard] if on_discard else []
        self._closed = False
        self._halted = False  # set by a bug in a move: automatic moves stop

        self._adopt_recovered()
        self._workers = MigrationWorkers(migration_threads)
        if any(self._over_high(i) for i in range(len(self._tiers) - 1)):
            self.rebalance()

    def _adopt_recovered(self) -> None:
        for index, tier in enumerate(self._tiers):
            if not isinstance(tier, Recoverable):
                continue
            for key, slot in sorted(tier.recovered_pages().items(), key=lambda kv: kv[1]):
                if key in self._entries:
                    tier.free([slot])
                    continue
                self._entries[key] = StoreEntry(key, (index, slot))
                self._orders[index].add(key, 0)
            if self._entries:
                logger.info("tiered store: adopted %d recovered pages from %s", len(self._entries), tier.name)

    # --- listeners ---------------------------------------------------------------------------

    def add_move_listener(self, listener: MoveListener) -> None:
        with self._lock:
            self._move_listeners.append(listener)

    def add_discard_listener(self, listener: DiscardListener) -> None:
        with self._lock:
            self._discard_listeners.append(listener)

    def _notify(self, moves: Iterable[tuple[int, int, int]], discards: Iterable[int]) -> None:
        """Tell listeners; called with no lock held."""
        for key, src, dst in moves:
            for on_move in list(self._move_listeners):
                self._call_listener(on_move, key, self._names[src], self._names[dst])
        for key in discards:
            for on_discard in list(self._discard_listeners):
                self._call_listener(on_discard, key)

    @staticmethod
    def _call_listener(listener: Callable[..., None], *args: object) -> None:
        try:
            listener(*args)
        except Exception:  # a broken listener must not stop migrations; it is the caller's bug
            logger.exception("tiered store listener %r failed on %s", listener, args)

    # --- lookups (lock-free) -----------------------------------------------------------------

    @property
    def tier_names(self) -> list[str]:
        return list(self._names)

    def location(self, key: int) -> str | None:
        """The name of the tier holding ``key``, or ``None`` if it is not stored. Lock-free."""
        entry = self._entries.get(key)
        return None if entry is None else self._names[entry.tier]

    def contains(self, key: int) -> bool:
        return key in self._entries

    __contains__ = contains

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[int]:
        with self._lock:
            return list(self._entries)

    # --- put / get / discard -----------------------------------------------------------------

    def put(self, key: int, page: torch.Tensor) -> str:
        """Store ``page`` (1-D uint8, ``page_bytes``) under a new ``key``; the tier it went to.

        Raises InvalidArgument for a key already stored, InvalidKV for a bad page,
        CapacityError when every tier is full and nothing is evictable, TierIOError when the
        only room is on a disk that failed (the page is then not stored). On any error the
        store is unchanged, except that pages discarded to make room stay discarded.
        """
        _check_key(key)
        check_page(page, self.page_bytes)
        with self._lock:
            self._check_open()
            if key in self._entries or key in self._reserved:
                raise InvalidArgument(f"key {key} is already stored; discard it first")
            places, dropped = self._reserve_many_locked(1)
            if not places:
                raise CapacityError(
                    f"cannot store key {key}: all {len(self._tiers)} tiers are full and every "
                    "page is pinned or being moved"
                )
            (tier, slot), = places
            self._reserved.add(key)
        self._notify((), dropped)
        try:
            self._tiers[tier].write(slot, page, key)
        except BaseException:
            with self._lock:
                self._reserved.discard(key)
                self._free_locked(tier, slot)
            raise
        with self._lock:
            self._drain_accesses_locked()  # reads before this put rank before it
            self._reserved.discard(key)
            self._entries[key] = StoreEntry(key, (tier, slot))
            self._orders[tier].add(key, 0)
            needs_rebalance = any(self._over_high(i) for i in range(len(self._tiers) - 1))
        if needs_rebalance:
            self.rebalance()
        return self._names[tier]

    def put_many(self, keys: Sequence[int], pages: torch.Tensor) -> list[str | None]:
        """The bulk form of :meth:`put`: ``pages[i]`` (rows of a ``[n, page_bytes]`` uint8
        tensor) under new ``keys[i]``, with one reservation and one batched write per tier.

        Placement is :meth:`put`'s (top tier first; with every tier full, the coldest
        unpinned pages of the lowest tier that has any are discarded). Returns, per key, the
        tier it went to, or None when no room was left for it. Repeated or already stored
        keys and a bad batch raise (InvalidArgument / InvalidKV) with nothing changed. On a
        write error the pages of the other tiers are stored and the error is raised.
        """
        key_list = [int(key) for key in keys]
        for key in key_list:
            _check_key(key)
        if len(set(key_list)) != len(key_list):
            raise InvalidArgument("put_many keys repeat a key")
        check_batch(np.arange(len(key_list)), pages, self.page_bytes)
        if not key_list:
            return []
        with self._lock:
            self._check_open()
            taken = [key for key in key_list if key in self._entries or key in self._reserved]
            if taken:
                raise InvalidArgument(f"keys {taken[:8]} are already stored; discard them first")
            placements, dropped = self._reserve_many_locked(len(key_list))
            self._reserved.update(key_list[: len(placements)])
        self._notify((), dropped)
        by_tier: dict[int, list[int]] = {}
        for position, (tier, _) in enumerate(placements):
            by_tier.setdefault(tier, []).append(position)
        failure: BaseException | None = None
        written: list[int] = []
        for tier, positions in by_tier.items():
            slots = np.array([placements[i][1] for i in positions], dtype=np.int64)
            batch = pages if len(positions) == len(key_list) else pages[positions]
            try:
                self._tiers[tier].write_batch(slots, batch, [key_list[i] for i in positions])
            except BaseException as exc:
                with self._lock:
                    for i in positions:
                        self._reserved.discard(key_list[i])
                        self._free_locked(tier, placements[i][1])
                failure = failure or exc
                continue
            written.extend(positions)
        with self._lock:
            self._drain_accesses_locked()  # reads before this put rank before it
            for i in sorted(written):
                key, place = key_list[i], placements[i]
                self._reserved.discard(key)
                self._entries[key] = StoreEntry(key, place)
                self._orders[place[0]].add(key, 0)
            needs_rebalance = any(self._over_high(i) for i in range(len(self._tiers) - 1))
        if needs_rebalance:
            self.rebalance()
        if failure is not None:
            raise failure
        return [self._names[placements[i][0]] if i < len(placements) else None
                for i in range(len(key_list))]

    def _reserve_many_locked(self, n: int) -> tuple[list[tuple[int, int]], list[int]]:
        """Up to ``n`` (tier, slot) places for new pages, and the keys discarded to make room."""
        places: list[tuple[int, int]] = []
        for index, tier in enumerate(self._tiers):
            take = min(n - len(places), tier.num_free)
            if take > 0:
                slots = tier.allocate(take)
                assert slots is not None, f"tier {self._names[index]} refused {take} free slots"
                places.extend((index, int(slot)) for slot in slots)
        dropped: list[int] = []
        for index in range(len(self._tiers) - 1, -1, -1):
            if len(places) == n:
                break
            victims = self._discard_coldest_locked(index, n - len(places))
            if victims:
                slots = self._tiers[index].allocate(len(victims))
                assert slots is not None, f"tier {self._names[index]} has no slot after a discard"
                places.extend((index, int(slot)) for slot in slots)
                dropped.extend(victims)
        return places, dropped

    def get(self, key: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of ``key``'s page: into ``out`` if given (1-D uint8, any device), else a new
        host tensor. Raises NotFound for an unknown key, PageCorrupt when the page failed its
        checksum (it is then dropped and reported to ``on_discard``), TierIOError on a disk
        error (the page stays). A hit below the top tier queues a promotion."""
        self._check_open()
        if out is not None:
            check_page(out, self.page_bytes, "out")
        copied = self._get_optimistic(key, out)
        if copied is not None:
            return copied
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise NotFound(f"key {key} is not stored")
            self._drain_accesses_locked()
            entry.readers += 1
            entry.hits += 1
            tier, slot = entry.tier, entry.slot
            self._orders[tier].touch(key)
            promote = self._promote_on_hit and tier > 0 and entry.pins == 0 and not entry.moving
        try:
            if out is None:
                out = self._tiers[tier].read(slot)
            else:
                self._tiers[tier].read_into(slot, out)
        except PageCorrupt:
            self._drop_corrupt([entry])
            raise
        finally:
            with self._lock:
                entry.readers -= 1
                self._collect_locked(entry)
        if promote:
            self._queue_hit_promotion(key)
        return out

    def _get_optimistic(self, key: int, out: torch.Tensor | None) -> torch.Tensor | None:
        """The lock-free read of a page in host memory (a seqlock on the slot's generation).

        ``None`` when it does not apply (no such key, a tier that cannot be peeked, a hit that
        should queue a promotion) or when the slot changed hands during the copy: the caller
        then takes the locked path. A valid copy is one during which the entry stayed at the
        slot and the slot was never freed: frees bump the generation first, and nobody else
        can write a slot before allocating it again.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        tier, slot = entry.where
        if slot < 0 or not self._peekable[tier]:
            return None
        if tier > 0 and self._promote_on_hit and entry.pins == 0:
            return None
        generation = int(self._generations[tier][slot])
        if entry.removed or entry.where != (tier, slot):
            return None
        target = out if out is not None else torch.empty(self.page_bytes, dtype=torch.uint8)
        peek: Callable[[int, torch.Tensor], bool] = self._tiers[tier].peek_into  # type: ignore[attr-defined]
        if not peek(slot, target):
            return None
        if entry.removed or entry.where != (tier, slot) or self._generations[tier][slot] != generation:
            return None
        self._accesses.append(key)  # the eviction order learns of it at the next decision
        if len(self._accesses) > _ACCESS_LOG_LIMIT and self._lock.acquire(blocking=False):
            try:
                self._drain_accesses_locked()
            finally:
                self._lock.release()
        return target

    def _drain_accesses_locked(self) -> None:
        """Apply the reads recorded without the lock to hit counts and eviction orders."""
        while self._accesses:
            key = self._accesses.popleft()
            entry = self._entries.get(key)
            if entry is not None:
                entry.hits += 1
                self._orders[entry.tier].touch(key)

    def discard(self, key: int) -> bool:
        """Forget ``key`` and free its page; False if it was not stored. Raises InvalidArgument
        for a pinned key. Caller-initiated: not reported to ``on_discard``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry.pins:
                raise InvalidArgument(f"key {key} is pinned ({entry.pins} pins); unpin it first")
            self._remove_locked(entry)
            self._counters[entry.tier].discards += 1
            return True

    def _remove_locked(self, entry: StoreEntry) -> None:
        self._drain_accesses_locked()
        del self._entries[entry.key]
        self._orders[entry.tier].remove(entry.key)
        entry.removed = True
        self._collect_locked(entry)

    def _collect_locked(self, entry: StoreEntry) -> None:
        """Free what no reader and no move needs any more."""
        if entry.readers:
            return
        for tier, slot in entry.retired:
            self._free_locked(tier, slot)
        entry.retired.clear()
        if entry.removed and not entry.moving and entry.slot >= 0:
            self._free_locked(entry.tier, entry.slot)
            entry.where = (entry.tier, -1)

    def _free_locked(self, tier: int, slot: int) -> None:
        """Free a slot, first bumping its generation so optimistic readers notice."""
        self._generations[tier][slot] += 1
        self._tiers[tier].free([slot])

    def _drop_corrupt(self, entries: Sequence[StoreEntry]) -> None:
        dropped = []
        with self._lock:
            for entry in entries:
                if self._entries.get(entry.key) is entry:
                    self._remove_locked(entry)
                    self._counters[entry.tier].discards += 1
                    dropped.append(entry.key)
        logger.error("tiered store: dropped corrupt pages %s", dropped)
        self._notify((), dropped)

    # --- pins --------------------------------------------------------------------------------

    def pin(self, keys: Iterable[int]) -> None:
        """Pin each key once (pins nest). All or nothing: NotFound if one is not stored."""
        wanted = list(keys)
        with self._lock:
            missing = [k for k in wanted if k not in self._entries]
            if missing:
                raise NotFound(f"cannot pin keys that are not stored: {missing}")
            for key in wanted:
                self._entries[key].pins += 1

    def unpin(self, keys: Iterable[int]) -> None:
        """Undo one pin per key. All or nothing: InvalidArgument if a key has fewer pins."""
        wanted = Counter(keys)
        with self._lock:
            short = [k for k, n in wanted.items() if k not in self._entries or self._entries[k].pins < n]
            if short:
                raise InvalidArgument(f"keys {short} are not pinned (as often as unpinned) or not stored")
            for key, n in wanted.items():
                self._entries[key].pins -= n
        self.rebalance()

    def pins(self, key: int) -> int:
        entry = self._entries.get(key)
        return 0 if entry is None else entry.pins

    # --- explicit moves ----------------------------------------------------------------------

    def prefetch(self, keys: Iterable[int]) -> Future[MoveResult]:
        """Start promoting ``keys`` to the top tier (pinned ones too); resolves when done."""
        wanted = list(dict.fromkeys(keys))
        with self._lock:
            self._drain_accesses_locked()
            for key in wanted:
                entry = self._entries.get(key)
                if entry is not None:
                    self._orders[entry.tier].touch(key)
        self._check_open()
        return self._workers.submit(_PRIORITY_PREFETCH, lambda: self._promote(wanted, explicit=True))

    def demote(self, keys: Iterable[int]) -> Future[MoveResult]:
        """Move unpinned ``keys`` one tier down (discarding at the bottom if it is full)."""
        wanted = list(dict.fromkeys(keys))
        self._check_open()
        return self._workers.submit(_PRIORITY_DEMOTE, lambda: self._demote_keys(wanted))

    def rebalance(self) -> None:
        """Ask the workers for a watermark pass (idempotent while one is queued)."""
        with self._lock:
            if self._rebalance_queued or self._closed or self._halted:
                return
            self._rebalance_queued = True
            self._workers.enqueue(_PRIORITY_DEMOTE, self._rebalance_step)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no move is queued or running; False on timeout. Re-raises a worker's
        unexpected error (a bug), so tests cannot miss it."""
        return self._workers.wait_idle(timeout)

    def _queue_hit_promotion(self, key: int) -> None:
        with self._lock:
            if self._closed or self._halted:
                return
            self._hit_promotions[key] = None
            if not self._hit_task_queued:
                self._hit_task_queued = True
                self._workers.enqueue(_PRIORITY_HIT, self._promote_hits)

    def _promote_hits(self) -> None:
        with self._lock:
            self._hit_task_queued = False
            keys = list(self._hit_promotions)
            self._hit_promotions.clear()
        for start in range(0, len(keys), self._batch):
            self._promote(keys[start : start + self._batch], explicit=False)

    # --- planning (under the lock) -----------------------------------------------------------

    def _staying(self, index: int) -> int:
        """Pages in tier ``index`` that are not on their way out."""
        return self._tiers[index].num_used - self._leaving[index]

    def _over_high(self, index: int) -> bool:
        return self._staying(index) > self._high * self._tiers[index].num_slots

    def _coldest_locked(
        self, index: int, n: int, exclude: frozenset[int] = frozenset(), unread: bool = False
    ) -> list[StoreEntry]:
        """Up to ``n`` coldest pages of tier ``index`` that may leave it (unpinned, not moving;
        with ``unread`` also without readers, so their slot is free at once)."""
        found: list[StoreEntry] = []
        if n <= 0:
            return found
        self._drain_accesses_locked()
        for key in self._orders[index].coldest():
            entry = self._entries[key]
            if (
                entry.pins == 0
                and not entry.moving
                and not (unread and entry.readers)
                and key not in exclude
            ):
                found.append(entry)
                if len(found) == n:
                    break
        return found

    def _discard_coldest_locked(self, index: int, n: int) -> list[int]:
        """Discard up to ``n`` coldest evictable pages of tier ``index``; their keys."""
        victims = self._coldest_locked(index, n, unread=True)
        for entry in victims:
            self._remove_locked(entry)
            self._counters[index].discards += 1
        if victims:
            logger.debug("tier %s full: discarded %d pages", self._names[index], len(victims))
        return [e.key for e in victims]

    def _plan_locked(self, entries: list[StoreEntry], dst: int, discarded: list[int]) -> MovePlan | None:
        """Reserve slots in ``dst`` for as many of ``entries`` (one source tier) as fit.

        When ``dst`` is the bottom tier and full, its coldest pages are discarded to make
        room (their keys are appended to ``discarded``).
        """
        if not entries or self._clock() < self._io_backoff_until[dst]:
            return None
        short = len(entries) - self._tiers[dst].num_free
        if short > 0 and dst == len(self._tiers) - 1 and dst > entries[0].tier:
            discarded += self._discard_coldest_locked(dst, short)
        room = min(len(entries), self._tiers[dst].num_free)
        if room == 0:
            if dst < len(self._tiers) - 1:
                self._draining[dst] = True
            return None
        entries = entries[:room]
        slots = self._tiers[dst].allocate(room)
        assert slots is not None, f"tier {self._names[dst]} refused {room} free slots"
        for entry in entries:
            entry.moving = True
        self._leaving[entries[0].tier] += len(entries)
        return MovePlan(entries[0].tier, dst, entries, [e.slot for e in entries], [int(s) for s in slots])

    # --- moves -------------------------------------------------------------------------------

    def _execute(self, plan: MovePlan) -> tuple[list[int], list[int], list[int]]:
        """Copy, then commit or roll back. Returns (moved keys, failed keys, rolled back keys)."""
        started = self._clock()
        corrupt: set[int] = set()
        failed = False
        unexpected: BaseException | None = None
        try:
            copy_pages(
                self._tiers[plan.src], plan.src_slots, self._tiers[plan.dst], plan.dst_slots,
                tags=[e.key for e in plan.entries],
            )
        except PagesCorrupt as exc:
            corrupt = set(exc.slots)
        except TierIOError as exc:
            failed = True
            logger.warning(
                "move %s -> %s of %d pages failed, pages stay: %s",
                self._names[plan.src], self._names[plan.dst], len(plan.entries), exc,
            )
        except BaseException as exc:  # a bug: roll the move back, then let it surface
            failed = True
            unexpected = exc
            # No automatic move is started again (it would hit the bug in a loop); explicit
            # requests still run. wait_idle re-raises the bug.
            self._halted = True
            logger.error("tiered store: automatic migrations stopped after an unexpected error")
        elapsed = self._clock() - started
        moved: list[tuple[int, int, int]] = []
        dropped: list[int] = []
        rolled_back: list[int] = []
        with self._lock:
            self._drain_accesses_locked()
            demotion = plan.dst > plan.src
            self._leaving[plan.src] -= len(plan.entries)
            for entry, src_slot, dst_slot in zip(plan.entries, plan.src_slots, plan.dst_slots):
                entry.moving = False
                keep_source = (
                    failed or src_slot in corrupt or entry.removed or (plan.yield_to_pins and entry.pins > 0)
                )
                if keep_source:
                    self._free_locked(plan.dst, dst_slot)
                    if src_slot in corrupt and not entry.removed:
                        self._remove_locked(entry)
                        self._counters[plan.src].discards += 1
                        dropped.append(entry.key)
                    elif not failed and not entry.removed:
                        rolled_back.append(entry.key)
                    self._collect_locked(entry)
                    continue
                self._orders[plan.src].remove(entry.key)
                self._orders[plan.dst].add(entry.key, entry.hits)
                entry.retired.append((plan.src, src_slot))
                entry.where = (plan.dst, dst_slot)
                self._collect_locked(entry)
                moved.append((entry.key, plan.src, plan.dst))
            if failed and unexpected is None:
                self._io_backoff_until[plan.dst] = self._clock() + self._io_retry
            nbytes = len(moved) * self.page_bytes
            for index in (plan.src, plan.dst):
                self._counters[index].bytes_moved += nbytes
                self._counters[index].move_seconds += elapsed
            if demotion:
                self._counters[plan.src].demotions += len(moved)
            else:
                self._counters[plan.dst].promotions += len(moved)
            self._moves_done.notify_all()
            again = any(self._draining) or any(self._over_high(i) for i in range(len(self._tiers) - 1))
        if unexpected is not None:
            raise unexpected
        if dropped:
            logger.error("tiered store: dropped corrupt pages %s", dropped)
        self._notify(moved, dropped)
        if again:
            self.rebalance()
        failed_keys = [e.key for e in plan.entries] if failed else dropped
        return [k for k, _, _ in moved], failed_keys, rolled_back

    def _make_room(self, index: int, need: int, exclude: frozenset[int]) -> None:
        """Demote from tier ``index`` (recursively below) until ``need`` slots are free there."""
        if index >= len(self._tiers) - 1:
            return
        while True:
            discarded: list[int] = []
            with self._lock:
                short = need - self._tiers[index].num_free
                if short <= 0:
                    return
                victims = self._coldest_locked(index, min(short, self._batch), exclude)
                plan = self._plan_locked(victims, index + 1, discarded)
                below_full = plan is None and victims and self._tiers[index + 1].num_free == 0
            self._notify((), discarded)
            if plan is None:
                if below_full:
                    self._make_room(index + 1, min(short, self._batch), exclude)
                    with self._lock:
                        if self._tiers[index + 1].num_free == 0:
                            return
                    continue
                return
            moved, _, _ = self._execute(plan)
            if not moved:
                return

    def _wait_not_moving(self, keys: Sequence[int]) -> None:
        """Wait (under the lock) until none of ``keys`` is in the middle of a move."""

        def settled() -> bool:
            return not any((e := self._entries.get(k)) is not None and e.moving for k in keys)

        self._moves_done.wait_for(settled)

    def _promote(self, keys: list[int], explicit: bool) -> MoveResult:
        moved: list[int] = []
        failed: list[int] = []
        skipped: list[int] = []
        with self._lock:
            self._wait_not_moving(keys)
            missing = [k for k in keys if k not in self._entries]
            already = [k for k in keys if k in self._entries and self._entries[k].tier == 0]
            todo = [
                k for k in keys
                if k in self._entries and self._entries[k].tier > 0 and (explicit or self._entries[k].pins == 0)
            ]
            skipped += [k for k in keys if k in self._entries and k not in todo and k not in already]
        if todo:
            self._make_room(0, len(todo), frozenset(todo))
        pending = todo
        while pending:
            discarded: list[int] = []
            with self._lock:
                self._wait_not_moving(pending)
                live = [self._entries[k] for k in pending if k in self._entries and self._entries[k].tier > 0]
                missing += [k for k in pending if k not in self._entries]
                pending = [k for k in pending if k in self._entries]  # report each missing key once
                if not live:
                    break
                src = live[0].tier
                group = [e for e in live if e.tier == src][: self._batch]
                target = next((t for t in range(src) if self._tiers[t].num_free > 0), None)
                plan = None if target is None else self._plan_locked(group, target, discarded)
                if plan is not None:
                    plan.yield_to_pins = not explicit
                done_now = {e.key for e in group}
            self._notify((), discarded)
            if plan is None:
                skipped += [e.key for e in group]
            else:
                ok, bad, back = self._execute(plan)
                moved += ok
                failed += bad
                skipped += back + [e.key for e in group[len(plan.entries) :]]
            pending = [k for k in pending if k not in done_now]
        return MoveResult(tuple(moved), tuple(already), tuple(missing), tuple(skipped), tuple(failed))

    def _demote_keys(self, keys: list[int]) -> MoveResult:
        moved: list[int] = []
        failed: list[int] = []
        skipped: list[int] = []
        missing: list[int] = []
        pending = list(keys)
        while pending:
            discarded: list[int] = []
            with self._lock:
                self._wait_not_moving(pending)
                missing += [k for k in pending if k not in self._entries]
                live = [self._entries[k] for k in pending if k in self._entries]
                bottom = len(self._tiers) - 1
                skipped += [e.key for e in live if e.pins or e.tier == bottom]
                live = [e for e in live if not e.pins and e.tier < bottom]
                if not live:
                    break
                src = live[0].tier
                group = [e for e in live if e.tier == src][: self._batch]
                done_now = {e.key for e in group}
                pending = [e.key for e in live if e.key not in done_now]
                plan = self._plan_locked(group, src + 1, discarded)
            self._notify((), discarded)
            if plan is None:
                skipped += [e.key for e in group]
                continue
            ok, bad, back = self._execute(plan)
            moved += ok
            failed += bad
            skipped += back + [e.key for e in group[len(plan.entries) :]]
        return MoveResult(tuple(moved), (), tuple(missing), tuple(skipped), tuple(failed))

    def _rebalance_step(self) -> None:
        """Plan and run one demotion batch for the lowest tier that is draining; requeue if
        more remains so several workers drain in parallel."""
        discarded: list[int] = []
        plan: MovePlan | None = None
        with self._lock:
            self._rebalance_queued = False
            # A tier whose lower neighbour is full marks that neighbour draining; one more
            # sweep (bottom-up) then frees room there first.
            for _ in range(len(self._tiers)):
                before = list(self._draining)
                plan = self._plan_rebalance_locked(discarded)
                if plan is not None or self._draining == before:
                    break
            more = plan is not None and any(self._draining)
            if more and not self._rebalance_queued and not self._closed and not self._halted:
                self._rebalance_queued = True
                self._workers.enqueue(_PRIORITY_DEMOTE, self._rebalance_step)
        self._notify((), discarded)
        if plan is not None:
            self._execute(plan)

    def _plan_rebalance_locked(self, discarded: list[int]) -> MovePlan | None:
        for index in range(len(self._tiers) - 2, -1, -1):
            tier = self._tiers[index]
            if self._over_high(index):
                self._draining[index] = True
            target = int(self._low * tier.num_slots)
            # Draining ends when the pages have actually left (not merely started to), so a
            # move that is rolled back is made up for by the pass its commit triggers.
            if self._draining[index] and tier.num_used <= target:
                self._draining[index] = False
            if not self._draining[index]:
                continue
            victims = self._coldest_locked(index, min(self._batch, self._staying(index) - target))
            plan = self._plan_locked(victims, index + 1, discarded)
            if plan is not None:
                return plan
        return None

    # --- stats and lifecycle -----------------------------------------------------------------

    def stats(self) -> dict[str, TierStats]:
        """Per tier: occupancy from the tier, moves and discards counted by the store."""
        with self._lock:
            counters = [replace(c) for c in self._counters]
        result = {}
        for tier, c in zip(self._tiers, counters):
            result[tier.name] = replace(
                tier.stats(), demotions=c.demotions, promotions=c.promotions, discards=c.discards,
                bytes_moved=c.bytes_moved, move_seconds=c.move_seconds,
            )
        return result

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument("the tiered store is closed")

    def close(self) -> None:
        """Finish queued moves, stop the workers, close the tiers. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._workers.close()
        for tier in self._tiers:
            tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_key(key: object) -> None:
    if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < _KEY_LIMIT:
        raise InvalidArgument(f"keys are integers in [0, 2**63), got {key!r}")
