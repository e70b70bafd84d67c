"""What every storage medium offers: slot allocation, page read/write, batch copies.

A *page* is the K/V of one block (all layers, contiguous) seen as bytes: a 1-D ``torch.uint8``
tensor of exactly ``page_bytes`` elements. Typed pages (bf16, fp8) cross this API as
``page.view(torch.uint8).reshape(-1)``. A *slot* is the index of a page-sized place in one
medium, ``[0, num_slots)``. Tiers know nothing of what a page means; the optional *tag* of a
write is the caller's opaque integer key, kept only by media that persist (NVMe) so that a
restarted tier can say which key each surviving page belongs to.

The interface is split into small capabilities (:class:`SlotAllocator`, :class:`PageReader`,
:class:`PageWriter`, :class:`PageViews`, :class:`Recoverable`) rather than one base class, and
:class:`PageStore` is just their union. :func:`copy_pages` moves a batch between two media and
picks the path with the fewest copies: straight into the destination's memory when it has
addressable pages (NVMe ``preadv`` into pinned host pages), straight out of the source's memory
when it has them (``pwritev`` from host pages), through a staging buffer otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch

from kvcluster.errors import InvalidArgument, InvalidKV, NotFound

Slots = npt.NDArray[np.int64]
PageBatch = torch.Tensor | Sequence[torch.Tensor]
"""Pages of a batch: a ``[n, page_bytes]`` uint8 tensor, or ``n`` 1-D uint8 tensors (views)."""

NO_TAG = -1
"""The tag of a page written without one. Untagged pages are not recovered after a restart."""


def as_slots(slots: Sequence[int] | Slots) -> Slots:
    return np.asarray(slots, dtype=np.int64).reshape(-1)


def check_page(page: object, page_bytes: int, what: str = "page") -> torch.Tensor:
    """``page`` itself if it is a 1-D ``torch.uint8`` tensor of ``page_bytes``; else InvalidKV."""
    if not isinstance(page, torch.Tensor):
        raise InvalidKV(f"{what} must be a torch.Tensor, got {type(page).__name__}")
    if page.dtype != torch.uint8:
        raise InvalidKV(
            f"{what} has dtype {page.dtype}; pages are torch.uint8 "
            "(view typed pages with .view(torch.uint8).reshape(-1))"
        )
    if page.dim() != 1 or page.numel() != page_bytes:
        raise InvalidKV(f"{what} has shape {tuple(page.shape)}; expected ({page_bytes},)")
    return page


def check_batch(slots: Slots, pages: PageBatch, page_bytes: int) -> Sequence[torch.Tensor]:
    """Validate a batch of pages against ``slots``; returns it as a sequence of 1-D pages."""
    if isinstance(pages, torch.Tensor):
        if pages.dtype != torch.uint8 or pages.dim() != 2 or pages.shape[1] != page_bytes:
            raise InvalidKV(
                f"a page batch has shape {tuple(pages.shape)} and dtype {pages.dtype}; "
                f"expected ({len(slots)}, {page_bytes}) torch.uint8"
            )
        if pages.shape[0] != len(slots):
            raise InvalidKV(f"{pages.shape[0]} pages given for {len(slots)} slots")
        return pages  # type: ignore[return-value]  # a 2-D tensor is a sequence of rows
    if len(pages) != len(slots):
        raise InvalidKV(f"{len(pages)} pages given for {len(slots)} slots")
    for i, page in enumerate(pages):
        check_page(page, page_bytes, f"page {i} of the batch")
    return pages


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[:] = src`` for same-sized uint8 tensors on any devices.

    Host to host it goes through numpy: one single-threaded memcpy that releases the GIL,
    where torch's ``copy_`` fans out to its intra-op thread pool, which stalls badly when the
    cores are busy (measured on a loaded 2-core host: 0.5 GB/s against numpy's 12 GB/s).
    """
    if dst.device.type == "cpu" and src.device.type == "cpu" and dst.is_contiguous() and src.is_contiguous():
        np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src, non_blocking=True)


@dataclass(slots=True)
class TierStats:
    """A snapshot of one tier. Counters are cumulative since the tier was opened.

    ``demotions`` counts pages moved out of this tier to a lower one, ``promotions`` pages moved
    into this tier from a lower one; ``bytes_moved`` and ``move_seconds`` cover every move
    that read from or wrote to this tier. ``stand_in`` is True for a GPU tier whose pages live in
    host memory because CUDA is absent.
    """

    name: str
    medium: str
    page_bytes: int
    pages_total: int
    pages_used: int = 0
    pages_free: int = 0
    bytes_used: int = 0
    bytes_capacity: int = 0
    demotions: int = 0
    promotions: int = 0
    discards: int = 0
    bytes_moved: int = 0
    move_seconds: float = 0.0
    checksum_failures: int = 0
    io_errors: int = 0
    stand_in: bool = False
    io_mode: str = "memory"


class SlotFreeStack:
    """``num_slots`` slots with an O(1) free stack and an allocated bitmap. Thread-safe.

    The free slots are ``_stack[:_top]``; allocating ``n`` pops them off the top and freeing
    pushes them back (vectorised, no Python objects per slot). The first allocations hand out
    ``0, 1, 2, ...`` so early pages sit in consecutive slots and batch I/O coalesces.
    All operations are all-or-nothing: a bad argument raises and changes nothing.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise InvalidArgument(f"num_slots must be positive, got {num_slots}")
        self._num_slots = num_slots
        self._stack: Slots = np.arange(num_slots - 1, -1, -1, dtype=np.int64)
        self._top = num_slots
        self._allocated = np.zeros(num_slots, dtype=np.bool_)
        self._lock = threading.Lock()

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self._num_slots - self._top

    def allocate(self, n: int) -> Slots | None:
        """``n`` free slots, or ``None`` (nothing changed) when fewer than ``n`` are free."""
        if n < 0:
            raise InvalidArgument(f"cannot allocate a negative number of slots ({n})")
        with self._lock:
            if n > self._top:
                return None
            slots = self._stack[self._top - n : self._top][::-1].copy()
            self._top -= n
            self._allocated[slots] = True
            return slots

    def free(self, slots: Sequence[int] | Slots) -> None:
        """Return ``slots``; raises NotFound (changing nothing) if one is free or repeated."""
        ids = as_slots(slots)
        with self._lock:
            self.check_allocated(ids)
            if len(ids) > 1 and len(np.unique(ids)) != len(ids):
                raise InvalidArgument(f"slots {ids.tolist()} repeat a slot; nothing was freed")
            self._allocated[ids] = False
            self._stack[self._top : self._top + len(ids)] = ids[::-1]
            self._top += len(ids)

    def mark_allocated(self, slots: Sequence[int] | Slots) -> None:
        """Take specific free slots (recovery after a restart). Raises if one is taken."""
        ids = as_slots(slots)
        with self._lock:
            self._check_range(ids)
            if self._allocated[ids].any() or len(np.unique(ids)) != len(ids):
                raise InvalidArgument(f"slots {ids.tolist()} are not all free and distinct")
            self._allocated[ids] = True
            free = self._stack[: self._top]
            keep = free[~np.isin(free, ids)]
            self._stack[: len(keep)] = keep
            self._top = len(keep)

    def is_allocated(self, slot: int) -> bool:
        return 0 <= slot < self._num_slots and bool(self._allocated[slot])

    def check_allocated(self, ids: Slots) -> None:
        """Raise NotFound unless every slot in ``ids`` is allocated."""
        if len(ids) == 1:  # the per-page path of spills and discards: no numpy reductions
            slot = int(ids[0])
            if 0 <= slot < self._num_slots and self._allocated[slot]:
                return
        self._check_range(ids)
        if len(ids) and not self._allocated[ids].all():
            bad = ids[~self._allocated[ids]]
            raise NotFound(f"slots {bad.tolist()} are not allocated (never allocated or freed)")

    def _check_range(self, ids: Slots) -> None:
        if len(ids) and (ids.min() < 0 or ids.max() >= self._num_slots):
            bad = ids[(ids < 0) | (ids >= self._num_slots)]
            raise NotFound(f"slots {bad.tolist()} are outside [0, {self._num_slots})")


# --- capabilities ---------------------------------------------------------------------------


class SlotsDelegate:
    """The allocation half of a page store, served by its ``_slots`` free stack.

    Every medium allocates the same way (an O(1) :class:`SlotFreeStack`); only how pages are
    read and written differs, so the media share these methods instead of repeating them.
    A medium that must do more when slots are freed overrides :meth:`free`.
    """

    _slots: SlotFreeStack

    @property
    def num_slots(self) -> int:
        return self._slots.num_slots

    @property
    def num_free(self) -> int:
        return self._slots.num_free

    @property
    def num_used(self) -> int:
        return self._slots.num_used

    def allocate(self, n: int) -> Slots | None:
        return self._slots.allocate(n)

    def free(self, slots: Sequence[int] | Slots) -> None:
        self._slots.free(slots)

    def is_allocated(self, slot: int) -> bool:
        return self._slots.is_allocated(slot)

    def _slot_stats(self, name: str, medium: str, page_bytes: int, **extra: object) -> TierStats:
        """A :class:`TierStats` with the occupancy fields filled in from the slots."""
        used = self.num_used
        return TierStats(
            name=name,
            medium=medium,
            page_bytes=page_bytes,
            pages_total=self.num_slots,
            pages_used=used,
            pages_free=self.num_slots - used,
            bytes_used=used * page_bytes,
            bytes_capacity=self.num_slots * page_bytes,
            **extra,  # type: ignore[arg-type]
        )


@runtime_checkable
class SlotAllocator(Protocol):
    """O(1) allocation of page slots. Thread-safe in every implementation."""

    @property
    def num_slots(self) -> int: ...
    @property
    def num_free(self) -> int: ...
    @property
    def num_used(self) -> int: ...
    def allocate(self, n: int) -> Slots | None: ...
    def free(self, slots: Sequence[int] | Slots) -> None: ...
    def is_allocated(self, slot: int) -> bool: ...


@runtime_checkable
class PageReader(Protocol):
    """Reads of allocated slots. A read of a free slot raises NotFound.

    ``read`` returns a new host tensor; ``read_into`` copies one page into ``out`` and
    ``read_batch_into`` page ``i`` into ``out[i]`` (1-D uint8 tensors of ``page_bytes``, on any
    device). Media with checksums raise PageCorrupt (PagesCorrupt for a batch) for pages that
    fail it and never return them.
    """

    page_bytes: int

    def read(self, slot: int) -> torch.Tensor: ...
    def read_into(self, slot: int, out: torch.Tensor) -> None: ...
    def read_batch_into(self, slots: Sequence[int] | Slots, out: PageBatch) -> None: ...


@runtime_checkable
class PageWriter(Protocol):
    """Writes to allocated slots; a page of the wrong size or dtype raises InvalidKV.

    ``tags`` are the caller's keys, persisted by media that survive a restart.
    """

    def write(self, slot: int, page: torch.Tensor, tag: int = NO_TAG) -> None: ...
    def write_batch(
        self, slots: Sequence[int] | Slots, pages: PageBatch, tags: Sequence[int] | None = None
    ) -> None: ...


@runtime_checkable
class PageViews(Protocol):
    """Media whose pages are addressable memory (device and host tiers).

    The views alias the slots: they are valid only while the caller keeps the slots from being
    freed or rewritten (the tiered store pins them for the duration of a move).
    """

    def page_views(self, slots: Sequence[int] | Slots) -> list[torch.Tensor]: ...
    def host_array(self, slots: Sequence[int] | Slots) -> npt.NDArray[np.uint8] | None:
        """The whole ``[num_slots, page_bytes]`` storage as a numpy array when it is host
        memory (after checking that ``slots`` are allocated), else None."""
        ...


@runtime_checkable
class PeekableTier(Protocol):
    """Media whose slots can be copied without any check or lock (host memory).

    ``peek_into`` copies whatever ``slot`` holds *now* into ``out`` and returns True, or
    returns False when it cannot (``out`` not a contiguous host tensor). The bytes may be
    those of a page being rewritten: only a caller that validates the copy afterwards (the
    tiered store's slot generations) may use it.
    """

    def peek_into(self, slot: int, out: torch.Tensor) -> bool: ...


@runtime_checkable
class Recoverable(Protocol):
    """Media that survive a restart: the pages found again at open, as ``{tag: slot}``."""

    def recovered_pages(self) -> dict[int, int]: ...


@runtime_checkable
class PageStore(SlotAllocator, PageReader, PageWriter, Protocol):
    """One medium of the tiered store: a name, slots, reads, writes and stats."""

    name: str

    def stats(self) -> TierStats: ...
    def close(self) -> None: ...


def copy_pages(
    src: PageStore,
    src_slots: Sequence[int] | Slots,
    dst: PageStore,
    dst_slots: Sequence[int] | Slots,
    tags: Sequence[int] | None = None,
) -> None:
    """Copy pages ``src[src_slots[i]]`` into ``dst[dst_slots[i]]`` with the fewest copies.

    Both slot lists must be allocated; the caller keeps them so until this returns. Errors of
    either medium (TierIOError, PagesCorrupt) propagate; the destination slots then hold
    unspecified bytes and the source is unchanged.
    """
    s_ids, d_ids = as_slots(src_slots), as_slots(dst_slots)
    if len(s_ids) != len(d_ids):
        raise InvalidArgument(f"{len(s_ids)} source slots but {len(d_ids)} destination slots")
    if len(s_ids) == 0:
        return
    if isinstance(src, PageViews) and isinstance(dst, PageViews):
        src_array, dst_array = src.host_array(s_ids), dst.host_array(d_ids)
        if src_array is not None and dst_array is not None:
            # Host to host: one numpy memcpy per run of consecutive slots on both sides.
            for s_first, d_first, count in _slot_runs(s_ids, d_ids):
                np.copyto(dst_array[d_first : d_first + count], src_array[s_first : s_first + count])
            return
    if isinstance(dst, PageViews):
        # Read straight into the destination's memory: one copy (or one DMA / preadv). Media
        # with addressable pages keep no tags, so ``tags`` has nothing to go to.
        src.read_batch_into(s_ids, dst.page_views(d_ids))
        return
    if isinstance(src, PageViews):
        dst.write_batch(d_ids, src.page_views(s_ids), tags)
        return
    staging = torch.empty((len(s_ids), src.page_bytes), dtype=torch.uint8)
    src.read_batch_into(s_ids, list(staging))
    dst.write_batch(d_ids, staging, tags)


def _slot_runs(src: Slots, dst: Slots) -> list[tuple[int, int, int]]:
    """``(src_first, dst_first, count)`` for maximal runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src.tolist(), dst.tolist()):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            first_s, first_d, count = runs[-1]
            runs[-1] = (first_s, first_d, count + 1)
        else:
            runs.append((s, d, 1))
    return runs
