"""Fixtures for the tier tests: one factory per medium, so one contract suite runs on all."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from kvcluster.spill_store import SpillStore
from tiers.device_tier import DeviceTier
from tiers.host_tier import HostTier
from tiers.nvme_tier import NvmeTier, probe_o_direct
from tiers.page_store import NO_TAG, PageBatch, PageStore, Slots, TierStats
from tiers.tiered_store import TieredStore

TierFactory = Callable[[int, int], PageStore]

MEDIA = [
    "device-standin",
    pytest.param("device-cuda", marks=pytest.mark.gpu),
    "host",
    "nvme-direct",
    "nvme-buffered",
]


def make_tier(medium: str, directory: Path, num_slots: int, page_bytes: int) -> PageStore:
    if medium == "device-standin":
        return DeviceTier(num_slots, page_bytes, device="cpu")
    if medium == "device-cuda":
        return DeviceTier(num_slots, page_bytes, device="cuda")
    if medium == "host":
        return HostTier(num_slots, page_bytes)
    if medium == "nvme-direct":
        reason = probe_o_direct(directory)
        if reason is not None:
            pytest.skip(f"O_DIRECT unusable here: {reason}")
        return NvmeTier([directory], num_slots, page_bytes, o_direct="always", io_threads=2)
    if medium == "nvme-buffered":
        return NvmeTier([directory], num_slots, page_bytes, o_direct="never", io_threads=2)
    raise AssertionError(medium)


@pytest.fixture(params=MEDIA)
def medium(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tier_factory(medium: str, tmp_path: Path) -> Iterator[TierFactory]:
    """Builds tiers of ``medium`` (each NVMe tier in its own directory); closes them after."""
    made: list[PageStore] = []

    def build(num_slots: int, page_bytes: int) -> PageStore:
        directory = tmp_path / f"tier{len(made)}"
        directory.mkdir()
        tier = make_tier(medium, directory, num_slots, page_bytes)
        made.append(tier)
        return tier

    yield build
    for tier in made:
        tier.close()


def random_pages(n: int, page_bytes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, page_bytes), dtype=torch.uint8, generator=generator)


class ManualClock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class GatedTier:
    """Wraps a tier; while ``gate`` is closed, batch writes into it block (a slow move).

    It has no ``page_views``, so moves into it go through ``write_batch``. ``entered`` is set
    when a batch write is waiting at the gate. ``explode`` makes batch writes raise a bug.
    """

    def __init__(self, inner: PageStore) -> None:
        self._inner = inner
        self.name = inner.name
        self.page_bytes = inner.page_bytes
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.explode = False

    @property
    def num_slots(self) -> int:
        return self._inner.num_slots

    @property
    def num_free(self) -> int:
        return self._inner.num_free

    @property
    def num_used(self) -> int:
        return self._inner.num_used

    def allocate(self, n: int) -> Slots | None:
        return self._inner.allocate(n)

    def free(self, slots: Sequence[int] | Slots) -> None:
        self._inner.free(slots)

    def is_allocated(self, slot: int) -> bool:
        return self._inner.is_allocated(slot)

    def read(self, slot: int) -> torch.Tensor:
        return self._inner.read(slot)

    def read_into(self, slot: int, out: torch.Tensor) -> None:
        self._inner.read_into(slot, out)

    def read_batch_into(self, slots: Sequence[int] | Slots, out: PageBatch) -> None:
        self._inner.read_batch_into(slots, out)

    def write(self, slot: int, page: torch.Tensor, tag: int = NO_TAG) -> None:
        self._inner.write(slot, page, tag)

    def write_batch(
        self, slots: Sequence[int] | Slots, pages: PageBatch, tags: Sequence[int] | None = None
    ) -> None:
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise AssertionError("the test never opened the gate")
        if self.explode:
            raise RuntimeError("injected bug")
        self._inner.write_batch(slots, pages, tags)

    def stats(self) -> TierStats:
        return self._inner.stats()

    def close(self) -> None:
        self._inner.close()


@pytest.fixture
def made() -> Iterator[list[SpillStore]]:
    """Spill stores a test makes (it appends them), closed when it ends."""
    spills: list[SpillStore] = []
    yield spills
    for spill in spills:
        spill.close()


@pytest.fixture
def stores() -> Iterator[list[TieredStore]]:
    """Tiered stores a test makes (it appends them), closed when it ends."""
    made: list[TieredStore] = []
    yield made
    for store in made:
        store.close()
