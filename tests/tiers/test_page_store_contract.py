"""One contract, every medium: allocation, read/write, batch copies and misuse.

Runs against the device tier (CPU stand-in, and CUDA under ``gpu``), the host tier and the NVMe
tier with O_DIRECT and with buffered I/O. Page sizes: a multiple of 4096 (NVMe transfers pages
in place) and an odd size (NVMe goes through its aligned staging buffer).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from kvcluster.errors import InvalidArgument, InvalidKV, NotFound
from tests.tiers.conftest import TierFactory, random_pages
from tiers.host_tier import HostTier
from tiers.page_store import (
    PageReader,
    PageStore,
    PageWriter,
    SlotAllocator,
    TierStats,
    copy_pages,
)

PAGE_SIZES = [8192, 5000]


@pytest.fixture(params=PAGE_SIZES, ids=lambda p: f"page{p}")
def page_bytes(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def _read_all(tier: PageStore, slots: list[int]) -> list[torch.Tensor]:
    return [tier.read(s) for s in slots]


def test_implements_the_capabilities(tier_factory: TierFactory) -> None:
    tier = tier_factory(4, 4096)
    assert isinstance(tier, SlotAllocator)
    assert isinstance(tier, PageReader)
    assert isinstance(tier, PageWriter)
    assert isinstance(tier, PageStore)


def test_allocation_is_all_or_nothing(tier_factory: TierFactory) -> None:
    tier = tier_factory(8, 4096)
    assert (tier.num_slots, tier.num_free, tier.num_used) == (8, 8, 0)
    first = tier.allocate(3)
    assert first is not None and first.tolist() == [0, 1, 2]
    second = tier.allocate(5)
    assert second is not None and sorted(first.tolist() + second.tolist()) == list(range(8))
    assert tier.allocate(1) is None
    assert (tier.num_free, tier.num_used) == (0, 8)
    tier.free(first)
    assert tier.allocate(4) is None  # more than free: nothing taken
    assert tier.num_free == 3
    again = tier.allocate(3)
    assert again is not None and sorted(again.tolist()) == [0, 1, 2]
    empty = tier.allocate(0)
    assert empty is not None and len(empty) == 0
    with pytest.raises(InvalidArgument):
        tier.allocate(-1)
    assert all(tier.is_allocated(s) for s in range(8))
    assert not tier.is_allocated(8) and not tier.is_allocated(-1)


def test_write_then_read_returns_a_copy_of_the_bytes(tier_factory: TierFactory, page_bytes: int) -> None:
    tier = tier_factory(4, page_bytes)
    pages = random_pages(3, page_bytes, seed=1)
    slots = tier.allocate(3)
    assert slots is not None
    for slot, page in zip(slots.tolist(), pages):
        tier.write(slot, page, tag=100 + slot)
    got = _read_all(tier, slots.tolist())
    for page, read in zip(pages, got):
        assert read.dtype == torch.uint8 and read.shape == (page_bytes,)
        assert torch.equal(read.cpu(), page)
    got[0].zero_()  # the caller's copy is its own
    assert torch.equal(tier.read(int(slots[0])).cpu(), pages[0])
    # Overwriting a slot replaces its page.
    tier.write(int(slots[1]), pages[2])
    assert torch.equal(tier.read(int(slots[1])).cpu(), pages[2])


def test_typed_pages_travel_as_bytes(tier_factory: TierFactory) -> None:
    tier = tier_factory(2, 4096)
    typed = torch.randn(2048, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    slots = tier.allocate(1)
    assert slots is not None
    tier.write(int(slots[0]), typed.view(torch.uint8).reshape(-1))
    back = tier.read(int(slots[0])).cpu().view(torch.bfloat16)
    assert torch.equal(back, typed)


@pytest.mark.parametrize("as_tensor", [True, False], ids=["2d-batch", "page-list"])
def test_batch_write_and_read(tier_factory: TierFactory, page_bytes: int, as_tensor: bool) -> None:
    tier = tier_factory(16, page_bytes)
    pages = random_pages(6, page_bytes, seed=2)
    slots = tier.allocate(10)
    assert slots is not None
    chosen = slots[[7, 1, 2, 3, 9, 0]]  # unordered, with a run of consecutive slots
    tier.write_batch(chosen, pages if as_tensor else list(pages), tags=list(range(6)))
    out = torch.zeros_like(pages)
    tier.read_batch_into(chosen, out if as_tensor else list(out))
    assert torch.equal(out, pages)
    for slot, page in zip(chosen.tolist(), pages):
        assert torch.equal(tier.read(slot).cpu(), page)


def test_batch_copies_to_and_from_another_medium(tier_factory: TierFactory, page_bytes: int) -> None:
    tier = tier_factory(16, page_bytes)
    other = tier_factory(8, page_bytes)
    host = HostTier(16, page_bytes)
    pages = random_pages(5, page_bytes, seed=4)

    def holds(store: PageStore, slots: object) -> bool:
        return all(torch.equal(store.read(s).cpu(), p) for s, p in zip(slots.tolist(), pages))  # type: ignore[attr-defined]

    src = host.allocate(5)
    assert src is not None
    host.write_batch(src, pages)
    into = tier.allocate(5)
    assert into is not None
    copy_pages(host, src, tier, into, tags=[1, 2, 3, 4, 5])  # host -> this medium
    assert holds(tier, into)
    mid = other.allocate(5)
    assert mid is not None
    copy_pages(tier, into, other, mid, tags=[1, 2, 3, 4, 5])  # this medium -> same medium
    assert holds(other, mid)
    back = host.allocate(5)
    assert back is not None
    copy_pages(tier, into, host, back)  # this medium -> host
    assert holds(host, back)
    again = tier.allocate(5)
    assert again is not None
    copy_pages(other, mid, tier, again, tags=[1, 2, 3, 4, 5])
    assert holds(tier, again)
    copy_pages(tier, [], host, [])  # an empty batch is a no-op
    with pytest.raises(InvalidArgument):
        copy_pages(tier, [0], host, [0, 1])
    host.close()


def test_reads_and_writes_of_free_slots_are_rejected(tier_factory: TierFactory) -> None:
    tier = tier_factory(4, 4096)
    page = random_pages(1, 4096, seed=5)[0]
    slots = tier.allocate(2)
    assert slots is not None
    tier.write(int(slots[0]), page, tag=1)
    tier.free(slots[:1])
    with pytest.raises(NotFound):
        tier.read(int(slots[0]))
    with pytest.raises(NotFound):
        tier.read(3)  # never allocated
    with pytest.raises(NotFound):
        tier.read(99)  # out of range
    with pytest.raises(NotFound):
        tier.write(int(slots[0]), page)
    with pytest.raises(NotFound):
        tier.read_batch_into([int(slots[1]), int(slots[0])], [page.clone(), page.clone()])
    with pytest.raises(NotFound):
        tier.write_batch([3], page.reshape(1, -1))
    host = HostTier(2, 4096)
    into = host.allocate(1)
    assert into is not None
    with pytest.raises(NotFound):
        copy_pages(tier, [int(slots[0])], host, into)  # a batch copy out of a freed slot
    with pytest.raises(NotFound):
        copy_pages(host, into, tier, [int(slots[0])])  # and into one
    host.close()
    assert tier.num_used == 1


def test_double_free_and_repeated_slots_change_nothing(tier_factory: TierFactory) -> None:
    tier = tier_factory(4, 4096)
    slots = tier.allocate(3)
    assert slots is not None
    tier.free([int(slots[0])])
    with pytest.raises(NotFound):
        tier.free([int(slots[1]), int(slots[0])])  # one already free: nothing freed
    assert tier.num_used == 2 and tier.is_allocated(int(slots[1]))
    with pytest.raises(InvalidArgument):
        tier.free([int(slots[1]), int(slots[1])])
    assert tier.num_used == 2
    tier.free(slots[1:])
    assert tier.num_used == 0


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(torch.zeros(4095, dtype=torch.uint8), id="short"),
        pytest.param(torch.zeros(4097, dtype=torch.uint8), id="long"),
        pytest.param(torch.zeros(2048, dtype=torch.float16), id="float16"),
        pytest.param(torch.zeros(4096, dtype=torch.int8), id="int8"),
        pytest.param(torch.zeros(2, 2048, dtype=torch.uint8), id="2d"),
        pytest.param(np.zeros(4096, dtype=np.uint8), id="numpy"),
    ],
)
def test_pages_of_wrong_size_or_dtype_are_rejected(tier_factory: TierFactory, bad: object) -> None:
    tier = tier_factory(4, 4096)
    good = random_pages(1, 4096, seed=6)[0]
    slots = tier.allocate(2)
    assert slots is not None
    tier.write(int(slots[0]), good, tag=7)
    with pytest.raises(InvalidKV):
        tier.write(int(slots[0]), bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidKV):
        tier.write_batch(slots, [good, bad])  # type: ignore[list-item]
    with pytest.raises(InvalidKV):
        tier.read_batch_into(slots[:1], [bad])  # type: ignore[list-item]
    assert torch.equal(tier.read(int(slots[0])).cpu(), good)
    assert tier.num_used == 2


def test_batch_shape_mismatches_are_rejected(tier_factory: TierFactory) -> None:
    tier = tier_factory(4, 4096)
    slots = tier.allocate(2)
    assert slots is not None
    with pytest.raises(InvalidKV):
        tier.write_batch(slots, random_pages(3, 4096, seed=0))
    with pytest.raises(InvalidKV):
        tier.write_batch(slots, torch.zeros((2, 4096), dtype=torch.int16))
    with pytest.raises(InvalidKV):
        tier.read_batch_into(slots, [torch.zeros(4096, dtype=torch.uint8)])


def test_stats_report_occupancy(tier_factory: TierFactory, medium: str) -> None:
    tier = tier_factory(8, 4096)
    slots = tier.allocate(3)
    assert slots is not None
    stats = tier.stats()
    assert isinstance(stats, TierStats)
    assert (stats.pages_total, stats.pages_used, stats.pages_free) == (8, 3, 5)
    assert (stats.bytes_used, stats.bytes_capacity, stats.page_bytes) == (3 * 4096, 8 * 4096, 4096)
    assert stats.stand_in is (medium == "device-standin")
    assert stats.checksum_failures == 0 and stats.io_errors == 0
    expected_mode = {"nvme-direct": "o_direct", "nvme-buffered": "buffered", "device-cuda": "cuda"}
    assert stats.io_mode == expected_mode.get(medium, "memory")


def test_concurrent_writers_and_readers_of_distinct_slots(tier_factory: TierFactory) -> None:
    tier = tier_factory(32, 8192)
    pages = random_pages(32, 8192, seed=8)
    slots = tier.allocate(32)
    assert slots is not None
    errors: list[BaseException] = []

    def worker(part: int) -> None:
        try:
            mine = slots[part::4]
            for _ in range(3):
                tier.write_batch(mine, pages[part::4].clone())
                out = torch.empty_like(pages[part::4])
                tier.read_batch_into(mine, list(out))
                assert torch.equal(out, pages[part::4])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_close_is_idempotent(tier_factory: TierFactory, tmp_path: Path) -> None:
    tier = tier_factory(2, 4096)
    tier.close()
    tier.close()
