"""Pages held in one preallocated ``[num_slots, page_bytes]`` uint8 tensor (device or host).

The shared body of :class:`~tiers.device_tier.DeviceTier` and :class:`~tiers.host_tier.HostTier`.
Batch copies take the path with one copy per page. On a GPU a 2-D batch is one
``index_select`` / ``index_copy_`` kernel; on the host, copies go through numpy (one
single-threaded memcpy per run, GIL released: torch's intra-op thread pool stalls on busy
cores). A list of page views is copied run by run (runs of consecutive slots whose
destinations are adjacent in memory are merged into one copy, which matters for small pages). Copies that touch a CUDA device run on the tier's own stream and are waited for
(an event) before the call returns, so a caller never observes a half-done copy and the
default stream of the model is never blocked.

Concurrency: allocation is thread-safe (a locked free stack). Reads and writes of *different*
slots may run concurrently; the caller (the tiered store) guarantees that nobody writes a slot
that is being read and that freed slots are not read.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt
import torch

from kvcluster.errors import NotFound
from tiers.page_store import (
    NO_TAG,
    PageBatch,
    SlotFreeStack,
    Slots,
    SlotsDelegate,
    TierStats,
    as_slots,
    check_batch,
    check_page,
    copy_bytes,
)

logger = logging.getLogger(__name__)


class TensorPages(SlotsDelegate):
    """Page slots in ``storage`` (a ``[num_slots, page_bytes]`` uint8 tensor, any device)."""

    medium = "memory"

    def __init__(
        self,
        name: str,
        storage: torch.Tensor,
        *,
        stand_in: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert storage.dtype == torch.uint8 and storage.dim() == 2, "storage must be [slots, bytes] uint8"
        self.name = name
        self.page_bytes = int(storage.shape[1])
        self._pages = storage
        self._slots = SlotFreeStack(int(storage.shape[0]))
        self._stand_in = stand_in
        self._clock = clock
        self._closed = False
        # A flat byte view of host storage: single-page reads copy through it (see read_into).
        self._flat = None if storage.is_cuda else storage.numpy().data.cast("B")
        self._stream: torch.cuda.Stream | None = None
        if torch.cuda.is_available():
            device = storage.device if storage.is_cuda else torch.device("cuda", torch.cuda.current_device())
            self._stream = torch.cuda.Stream(device=device)

    # --- allocation --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._pages.device


    # --- single pages ------------------------------------------------------------------------

    def write(self, slot: int, page: torch.Tensor, tag: int = NO_TAG) -> None:
        check_page(page, self.page_bytes)
        self._slots.check_allocated(as_slots([slot]))
        with self._copying(page):
            copy_bytes(self._pages[slot], page)

    def read(self, slot: int) -> torch.Tensor:
        """A new host tensor holding the page."""
        out = torch.empty(self.page_bytes, dtype=torch.uint8, pin_memory=self._pages.is_cuda)
        self.read_into(slot, out)
        return out

    def read_into(self, slot: int, out: torch.Tensor) -> None:
        """Copy one page into ``out`` (1-D uint8 of ``page_bytes``, any device).

        Host to host this is one memcpy done *holding* the GIL: for a single page that is
        shorter than the wait to take the GIL back from busy migration threads after
        releasing it, so a reader is not delayed by a spill storm. Batch copies release it.
        """
        check_page(out, self.page_bytes, "out")
        if not self._slots.is_allocated(slot):
            raise NotFound(f"slot {slot} of {self.name} is not allocated")
        if self._flat is not None and out.device.type == "cpu" and out.is_contiguous():
            start = slot * self.page_bytes
            out.numpy().data[:] = self._flat[start : start + self.page_bytes]
            return
        with self._copying(out):
            out.copy_(self._pages[slot], non_blocking=True)

    def peek_into(self, slot: int, out: torch.Tensor) -> bool:
        """See :class:`~tiers.page_store.PeekableTier`: an unchecked host-to-host copy."""
        if self._flat is None or out.device.type != "cpu" or not out.is_contiguous():
            return False
        if not 0 <= slot < self.num_slots:
            return False
        start = slot * self.page_bytes
        out.numpy().data[:] = self._flat[start : start + self.page_bytes]
        return True

    # --- batches -----------------------------------------------------------------------------

    def host_array(self, slots: Sequence[int] | Slots) -> npt.NDArray[np.uint8] | None:
        """The storage as a numpy array if it is host memory (``slots`` checked), else None."""
        if self._pages.is_cuda:
            return None
        self._slots.check_allocated(as_slots(slots))
        return self._pages.numpy()

    def page_views(self, slots: Sequence[int] | Slots) -> list[torch.Tensor]:
        ids = as_slots(slots)
        self._slots.check_allocated(ids)
        return [self._pages[int(s)] for s in ids]

    def read_batch(self, slots: Sequence[int] | Slots) -> torch.Tensor:
        """The pages as a new ``[n, page_bytes]`` tensor on this tier's device (one gather)."""
        ids = as_slots(slots)
        out = torch.empty((len(ids), self.page_bytes), dtype=torch.uint8, device=self._pages.device)
        self.read_batch_into(ids, out)
        return out

    def read_batch_into(self, slots: Sequence[int] | Slots, out: PageBatch) -> None:
        ids = as_slots(slots)
        targets = check_batch(ids, out, self.page_bytes)
        self._slots.check_allocated(ids)
        if isinstance(out, torch.Tensor) and out.is_cuda and out.device == self._pages.device:
            with self._copying(out):  # one gather kernel on the device
                torch.index_select(self._pages, 0, torch.from_numpy(ids).to(out.device), out=out)
            return
        with self._copying(*targets[:1]):
            for first, count, target in _runs(ids, targets, self.page_bytes):
                copy_bytes(target, self._pages[first : first + count].reshape(-1))

    def write_batch(
        self, slots: Sequence[int] | Slots, pages: PageBatch, tags: Sequence[int] | None = None
    ) -> None:
        ids = as_slots(slots)
        batch = check_batch(ids, pages, self.page_bytes)
        self._slots.check_allocated(ids)
        if isinstance(batch, torch.Tensor) and self._pages.is_cuda:
            with self._copying(batch):  # one transfer, then one scatter kernel on the device
                source = batch.to(self._pages.device, non_blocking=True)
                self._pages.index_copy_(0, torch.from_numpy(ids).to(self._pages.device), source)
            return
        if isinstance(batch, torch.Tensor) and batch.device.type == "cpu" and batch.is_contiguous():
            # Host scatter through numpy (single-threaded, GIL released; see _copy).
            self._pages.numpy()[ids] = batch.numpy()
            return
        with self._copying(*batch[:1]):
            for first, count, source in _runs(ids, batch, self.page_bytes):
                copy_bytes(self._pages[first : first + count].reshape(-1), source)

    # --- lifecycle ---------------------------------------------------------------------------

    def stats(self) -> TierStats:
        return self._slot_stats(
            self.name, self.medium, self.page_bytes,
            stand_in=self._stand_in, io_mode="cuda" if self._pages.is_cuda else "memory",
        )

    def close(self) -> None:
        """Release the storage. Idempotent; the tier must not be used afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.synchronize()
        if self._flat is not None:
            self._flat.release()
            self._flat = None
        self._pages = self._pages[:0]

    @contextlib.contextmanager
    def _copying(self, *others: torch.Tensor) -> Iterator[None]:
        """Run copies on this tier's CUDA stream and wait for them; a no-op without CUDA."""
        involves_cuda = self._pages.is_cuda or any(t.is_cuda for t in others)
        if self._stream is None or not involves_cuda:
            yield
            return
        # The copy stream must see everything the caller queued on its current stream.
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        with torch.cuda.stream(self._stream):
            yield
            done = torch.cuda.Event()
            done.record(self._stream)
        done.synchronize()


def _runs(
    slots: Slots, views: Sequence[torch.Tensor], page_bytes: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Group consecutive slots whose views are adjacent in one storage into single copies.

    Yields ``(first_slot, count, flat_view_of_count_pages)``::

        slots   7    8    9    3          views  [a][a+P][a+2P] [b]
        runs    (7, 3, view a..a+3P)      (3, 1, view b)
    """
    i, n = 0, len(slots)
    while i < n:
        j = i + 1
        base = views[i]
        while (
            j < n
            and base.is_contiguous()
            and slots[j] == slots[j - 1] + 1
            and views[j].device == base.device
            and views[j].is_contiguous()
            and views[j].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            and views[j].data_ptr() == views[j - 1].data_ptr() + page_bytes
        ):
            j += 1
        if j - i == 1:
            yield int(slots[i]), 1, base
        else:
            yield int(slots[i]), j - i, base.as_strided(((j - i) * page_bytes,), (1,))
        i = j
