"""The GPU tier: pages in one device tensor ``[num_slots, page_bytes]``.

Where CUDA is absent a CPU tensor stands in, so the whole stack runs (and is tested) on a
machine without a GPU; the tier then says so in :attr:`TierStats.stand_in` and logs it once
when it is built. On a GPU, copies in and out run on the tier's own CUDA stream (see
:mod:`tiers.tensor_pages`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kvcluster.errors import InvalidArgument
from tiers.tensor_pages import TensorPages

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda:<current>`` when CUDA is present, else ``cpu``; others as given.

    Raises InvalidArgument for a CUDA device that this machine does not have.
    """
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise InvalidArgument(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = resolved.index if resolved.index is not None else 0
        if index >= count:
            raise InvalidArgument(f"device {device!r} requested but this machine has {count} CUDA devices")
        return torch.device("cuda", index)
    if resolved.type != "cpu":
        raise InvalidArgument(f"device {device!r} is neither cpu nor cuda")
    return resolved


class DeviceTier(TensorPages):
    """``num_slots`` pages of ``page_bytes`` on ``device`` (a CPU stand-in without CUDA)."""

    medium = "device"

    def __init__(
        self,
        num_slots: int,
        page_bytes: int,
        *,
        name: str = "gpu",
        device: str | torch.device = "auto",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_slots <= 0 or page_bytes <= 0:
            raise InvalidArgument(f"a device tier needs positive slots and page bytes, got {num_slots} x {page_bytes}")
        resolved = resolve_device(device)
        stand_in = resolved.type != "cuda"
        storage = torch.zeros((num_slots, page_bytes), dtype=torch.uint8, device=resolved)
        super().__init__(name, storage, stand_in=stand_in, clock=clock)
        if stand_in:
            logger.warning(
                "tier %s: no CUDA device, %d pages (%d bytes) held in host memory as a stand-in",
                name, num_slots, num_slots * page_bytes,
            )
        else:
            logger.info("tier %s: %d pages of %d bytes on %s", name, num_slots, page_bytes, resolved)
