"""The pinned-CPU tier: pages in one host buffer ``[num_slots, page_bytes]``.

The buffer is page-locked (``pin_memory``) when CUDA is present and pinning is not ``never``,
so host<->device copies are true asynchronous DMA. Without CUDA (or with ``pinned="never"``)
it is an anonymous ``mmap``: page-aligned, so every page whose size is a multiple of 4096 can
be the buffer of an ``O_DIRECT`` read or write with no staging copy, and populated up front so
the first spill does not pay page faults.
"""

from __future__ import annotations

import logging
import mmap
import time
from collections.abc import Callable
from typing import Literal

import torch

from kvcluster.errors import InvalidArgument
from tiers.tensor_pages import TensorPages

logger = logging.getLogger(__name__)

PinMode = Literal["auto", "always", "never"]


def aligned_host_buffer(num_bytes: int, populate: bool = True) -> torch.Tensor:
    """A 1-D uint8 tensor over fresh anonymous memory aligned to the OS page size."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    region = mmap.mmap(-1, max(num_bytes, 1), flags=flags)
    # The tensor keeps the mmap alive through the buffer protocol export.
    return torch.frombuffer(region, dtype=torch.uint8, count=num_bytes)


class HostTier(TensorPages):
    """``num_slots`` pages of ``page_bytes`` in host memory, pinned when CUDA is present."""

    medium = "host"

    def __init__(
        self,
        num_slots: int,
        page_bytes: int,
        *,
        name: str = "cpu",
        pinned: PinMode = "auto",
        populate: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_slots <= 0 or page_bytes <= 0:
            raise InvalidArgument(f"a host tier needs positive slots and page bytes, got {num_slots} x {page_bytes}")
        if pinned not in ("auto", "always", "never"):
            raise InvalidArgument(f"pinned must be auto, always or never, got {pinned!r}")
        cuda = torch.cuda.is_available()
        if pinned == "always" and not cuda:
            raise InvalidArgument("pinned='always' needs CUDA to page-lock host memory; none is present")
        self.pinned = cuda and pinned != "never"
        if self.pinned:
            storage = torch.empty((num_slots, page_bytes), dtype=torch.uint8, pin_memory=True)
        else:
            storage = aligned_host_buffer(num_slots * page_bytes, populate).view(num_slots, page_bytes)
        super().__init__(name, storage, clock=clock)
        logger.info(
            "tier %s: %d pages of %d bytes in %s host memory",
            name, num_slots, page_bytes, "pinned" if self.pinned else "pageable",
        )
