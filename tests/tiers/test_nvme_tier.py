"""NVMe tier: checksums, corruption, truncation, journal and warm restart, injected faults."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvcluster.errors import (
    InvalidArgument,
    NotFound,
    PageCorrupt,
    PagesCorrupt,
    TierError,
    TierIOError,
)
from tests.tiers.conftest import random_pages
from tiers.fault_injection import FaultInjectingFileIO
from tiers.nvme_file_io import PosixFileIO
from tiers.nvme_journal import RECORD_BYTES, slot_bytes_for
from tiers.nvme_tier import NvmeTier, probe_o_direct

PAGE = 8192


@pytest.fixture(params=["direct", "buffered"])
def mode(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "direct" and probe_o_direct(tmp_path) is not None:
        pytest.skip("O_DIRECT unusable here")
    return "always" if request.param == "direct" else "never"


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[list[NvmeTier]]:
    """Tiers a test opened; closed afterwards even if the test failed."""
    tiers: list[NvmeTier] = []
    yield tiers
    for tier in tiers:
        tier.close()


def _open(opened: list[NvmeTier], path: Path, mode: str, slots: int = 8, **kw: object) -> NvmeTier:
    tier = NvmeTier([path], slots, PAGE, o_direct=mode, io_threads=2, **kw)  # type: ignore[arg-type]
    opened.append(tier)
    return tier


def _write_tagged(tier: NvmeTier, n: int, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    pages = random_pages(n, PAGE, seed)
    slots = tier.allocate(n)
    assert slots is not None
    tier.write_batch(slots, pages, tags=[1000 + i for i in range(n)])
    return slots.tolist(), pages


def _damage(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_slots_are_4096_aligned_with_room_for_the_header() -> None:
    assert slot_bytes_for(8192) == 12288
    assert slot_bytes_for(5000) == 8192
    assert slot_bytes_for(4032) == 4096
    assert slot_bytes_for(4033) == 8192


@pytest.mark.parametrize("where", ["data", "header"])
def test_a_flipped_byte_is_reported_counted_and_never_returned(
    tmp_path: Path, opened: list[NvmeTier], mode: str, where: str
) -> None:
    tier = _open(opened, tmp_path, mode)
    slots, pages = _write_tagged(tier, 3)
    path, offset = tier.slot_location(slots[1])
    at = offset + (100 if where == "data" else tier.slot_bytes - 40)
    original = path.read_bytes()[at]
    _damage(path, at, bytes([original ^ 0xFF]))

    with pytest.raises(PageCorrupt):
        tier.read(slots[1])
    assert tier.stats().checksum_failures == 1
    with pytest.raises(PageCorrupt):  # still corrupt, counted once
        tier.read(slots[1])
    assert tier.stats().checksum_failures == 1
    out = [torch.zeros(PAGE, dtype=torch.uint8) for _ in range(3)]
    with pytest.raises(PagesCorrupt) as raised:
        tier.read_batch_into(slots, out)
    assert raised.value.slots == [slots[1]]
    assert torch.equal(out[0], pages[0]) and torch.equal(out[2], pages[2])
    # Rewriting the slot heals it; freeing it works like any other slot.
    tier.write(slots[1], pages[1], tag=1001)
    assert torch.equal(tier.read(slots[1]), pages[1])
    tier.free([slots[1]])


def test_a_truncated_file_reads_as_corrupt(tmp_path: Path, opened: list[NvmeTier], mode: str) -> None:
    tier = _open(opened, tmp_path, mode)
    slots, pages = _write_tagged(tier, 4)
    path, offset = tier.slot_location(slots[2])
    os.truncate(path, offset + 1000)  # slot 2 torn, slot 3 gone
    out = [torch.zeros(PAGE, dtype=torch.uint8) for _ in range(4)]
    with pytest.raises(PagesCorrupt) as raised:
        tier.read_batch_into(slots, out)
    assert raised.value.slots == [slots[2], slots[3]]
    assert tier.stats().checksum_failures == 2
    assert torch.equal(out[0], pages[0]) and torch.equal(out[1], pages[1])


def test_a_restart_finds_the_written_pages_and_only_those(tmp_path: Path, opened: list[NvmeTier], mode: str) -> None:
    tier = _open(opened, tmp_path, mode)
    slots, pages = _write_tagged(tier, 5)
    untagged = tier.allocate(1)
    assert untagged is not None
    tier.write(int(untagged[0]), pages[0])  # no tag: not recoverable
    tier.free([slots[3]])
    tier.close()

    again = _open(opened, tmp_path, mode)
    recovered = again.recovered_pages()
    assert recovered == {1000: slots[0], 1001: slots[1], 1002: slots[2], 1004: slots[4]}
    for tag, slot in recovered.items():
        assert torch.equal(again.read(slot), pages[tag - 1000])
    assert again.num_used == 4
    # The journal was compacted to the live pages.
    journal = tmp_path / "kvcluster-pages.journal"
    assert journal.stat().st_size == 64 + 4 * RECORD_BYTES
    # New writes after a restart get fresh slots and survive the next restart too.
    more = again.allocate(1)
    assert more is not None and int(more[0]) not in recovered.values()
    again.write(int(more[0]), pages[3], tag=77)
    again.close()
    third = _open(opened, tmp_path, mode)
    assert third.recovered_pages()[77] == int(more[0])
    assert torch.equal(third.read(int(more[0])), pages[3])


def test_a_page_damaged_while_down_is_not_recovered(tmp_path: Path, opened: list[NvmeTier], mode: str) -> None:
    tier = _open(opened, tmp_path, mode)
    slots, pages = _write_tagged(tier, 3)
    path, offset = tier.slot_location(slots[0])
    tier.close()
    _damage(path, offset + 5, b"\x00\x01\x02")
    again = _open(opened, tmp_path, mode)
    assert again.recovered_pages() == {1001: slots[1], 1002: slots[2]}
    assert again.stats().checksum_failures == 1
    assert not again.is_allocated(slots[0])
    assert torch.equal(again.read(slots[1]), pages[1]) and torch.equal(again.read(slots[2]), pages[2])


def test_the_journal_is_compacted_while_running(tmp_path: Path, opened: list[NvmeTier]) -> None:
    tier = _open(opened, tmp_path, "never", slots=4, compact_after=8)
    pages = random_pages(2, PAGE, seed=4)
    live: list[int] = []
    for key in range(60):  # churn: write a page, free the one before
        slot = tier.allocate(1)
        assert slot is not None
        tier.write(int(slot[0]), pages[key % 2], tag=key)
        if live:
            tier.free(live[-1:])
        live = [int(slot[0])]
    journal = tmp_path / "kvcluster-pages.journal"
    assert journal.stat().st_size <= 64 + (4 * 1 + 8 + 2 + 2) * RECORD_BYTES
    tier.close()
    again = _open(opened, tmp_path, "never", slots=4)
    assert again.recovered_pages() == {59: live[0]}
    assert torch.equal(again.read(live[0]), pages[1])


def test_a_torn_journal_tail_is_ignored(tmp_path: Path, opened: list[NvmeTier], mode: str) -> None:
    tier = _open(opened, tmp_path, mode)
    slots, _ = _write_tagged(tier, 2)
    tier.close()
    with open(tmp_path / "kvcluster-pages.journal", "ab") as journal:
        journal.write(b"\x52\x4a\x56\x4b" + b"\x01" * 20)  # half a record
    again = _open(opened, tmp_path, mode)
    assert again.recovered_pages() == {1000: slots[0], 1001: slots[1]}


def test_a_journal_for_another_page_size_recovers_nothing(tmp_path: Path, opened: list[NvmeTier]) -> None:
    tier = _open(opened, tmp_path, "never")
    _write_tagged(tier, 2)
    tier.close()
    other = NvmeTier([tmp_path], 8, 4096, o_direct="never")
    opened.append(other)
    assert other.recovered_pages() == {} and other.num_used == 0


def test_recover_false_starts_empty(tmp_path: Path, opened: list[NvmeTier]) -> None:
    tier = _open(opened, tmp_path, "never")
    _write_tagged(tier, 2)
    tier.close()
    fresh = _open(opened, tmp_path, "never", recover=False)
    assert fresh.recovered_pages() == {} and fresh.num_used == 0
    fresh.close()
    assert _open(opened, tmp_path, "never").recovered_pages() == {}


def test_pages_stripe_over_several_directories(tmp_path: Path, opened: list[NvmeTier]) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    tier = NvmeTier(dirs, 9, PAGE, o_direct="never")
    opened.append(tier)
    pages = random_pages(9, PAGE, seed=3)
    slots = tier.allocate(9)
    assert slots is not None
    tier.write_batch(slots, pages, tags=list(range(9)))
    assert [tier.slot_location(s)[0].parent for s in (0, 1, 2)] == [dirs[0], dirs[1], dirs[0]]
    assert {p.parent for p in tier.files()} == set(dirs)
    tier.close()
    again = NvmeTier(dirs, 9, PAGE, o_direct="never")
    opened.append(again)
    assert again.recovered_pages() == {i: int(s) for i, s in enumerate(slots)}
    for i, s in enumerate(slots):
        assert torch.equal(again.read(int(s)), pages[i])


def test_a_second_process_cannot_open_the_same_files(tmp_path: Path, opened: list[NvmeTier]) -> None:
    _open(opened, tmp_path, "never")
    with pytest.raises(TierError, match="in use"):
        NvmeTier([tmp_path], 8, PAGE, o_direct="never")


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        NvmeTier([], 8, PAGE)
    with pytest.raises(InvalidArgument):
        NvmeTier([tmp_path / "missing"], 8, PAGE)
    with pytest.raises(InvalidArgument):
        NvmeTier([tmp_path], 8, PAGE, o_direct="sometimes")  # type: ignore[arg-type]


def test_never_written_slots_are_not_readable(tmp_path: Path, opened: list[NvmeTier]) -> None:
    tier = _open(opened, tmp_path, "never")
    slots = tier.allocate(1)
    assert slots is not None
    with pytest.raises(NotFound):
        tier.read(int(slots[0]))


def test_tags_must_fit_the_journal(tmp_path: Path, opened: list[NvmeTier]) -> None:
    tier = _open(opened, tmp_path, "never")
    slots = tier.allocate(1)
    assert slots is not None
    with pytest.raises(InvalidArgument):
        tier.write(int(slots[0]), random_pages(1, PAGE, 0)[0], tag=2**63)
    with pytest.raises(InvalidArgument):
        tier.write_batch(slots, random_pages(1, PAGE, 0), tags=[1, 2])


def test_o_direct_falls_back_to_buffered_io_where_unsupported(
    tmp_path: Path, opened: list[NvmeTier], caplog: pytest.LogCaptureFixture
) -> None:
    # A filesystem without O_DIRECT refuses the probe's open with EINVAL.
    faulty = FaultInjectingFileIO(PosixFileIO())
    faulty.fail("open", errno.EINVAL)
    with pytest.raises(InvalidArgument, match="O_DIRECT is required"):
        NvmeTier([tmp_path], 4, PAGE, o_direct="always", file_io=faulty)
    faulty.fail("open", errno.EINVAL)
    with caplog.at_level(logging.WARNING, logger="tiers.nvme_tier"):
        tier = _open(opened, tmp_path, "auto", slots=4, file_io=faulty)
    assert tier.io_mode == "buffered" and tier.stats().io_mode == "buffered"
    assert "buffered I/O" in caplog.text and "Invalid argument" in caplog.text
    slots, pages = _write_tagged(tier, 2)
    assert torch.equal(tier.read(slots[1]), pages[1])
    assert list(tmp_path.glob(".kvcluster-odirect-probe*")) == []


def test_auto_uses_o_direct_where_it_works(tmp_path: Path, opened: list[NvmeTier]) -> None:
    expected = "o_direct" if probe_o_direct(tmp_path) is None else "buffered"
    assert _open(opened, tmp_path, "auto").io_mode == expected


# --- injected faults ------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("operation", ["pwritev", "fdatasync", "append"])
def test_a_failed_write_raises_and_leaves_nothing_readable(
    tmp_path: Path, opened: list[NvmeTier], code: int, operation: str
) -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    # Strict durability: each batch is fdatasync'ed before its records are appended.
    tier = _open(opened, tmp_path, "never", file_io=faulty, fsync_interval_s=0)
    kept, kept_pages = _write_tagged(tier, 1, seed=1)
    slots = tier.allocate(2)
    assert slots is not None
    faulty.fail(operation, code)
    with pytest.raises(TierIOError, match=errno.errorcode[code] if operation == "pwritev" else None):
        tier.write_batch(slots, random_pages(2, PAGE, 2), tags=[5, 6])
    assert faulty.injected == 1 and tier.stats().io_errors == 1
    with pytest.raises(NotFound):
        tier.read(int(slots[0]))
    assert torch.equal(tier.read(kept[0]), kept_pages[0])
    # The disk recovers: the same slots take the pages.
    pages = random_pages(2, PAGE, 3)
    tier.write_batch(slots, pages, tags=[5, 6])
    assert torch.equal(tier.read(int(slots[1])), pages[1])
    tier.close()
    recovered = _open(opened, tmp_path, "never").recovered_pages()
    assert recovered == {1000: kept[0], 5: int(slots[0]), 6: int(slots[1])}


def test_group_commit_flushes_in_the_background_and_retries_a_failed_flush(
    tmp_path: Path, opened: list[NvmeTier]
) -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    tier = _open(opened, tmp_path, "never", file_io=faulty, fsync_interval_s=0.01)
    faulty.fail("fdatasync", errno.EIO, times=2)
    slots, pages = _write_tagged(tier, 2)  # the write itself does not wait for the device
    deadline = time.monotonic() + 10
    while faulty.injected < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert faulty.injected == 2
    tier.flush()  # succeeds now; the failed flushes were counted, not raised
    assert tier.stats().io_errors == 2
    assert torch.equal(tier.read(slots[1]), pages[1])
    tier.close()
    assert _open(opened, tmp_path, "never").recovered_pages() == {1000: slots[0], 1001: slots[1]}


def test_a_failed_journal_append_is_not_recovered(tmp_path: Path, opened: list[NvmeTier]) -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    tier = _open(opened, tmp_path, "never", file_io=faulty)
    kept, _ = _write_tagged(tier, 1)
    slots = tier.allocate(1)
    assert slots is not None
    faulty.fail("append", errno.ENOSPC)
    with pytest.raises(TierIOError):
        tier.write(int(slots[0]), random_pages(1, PAGE, 9)[0], tag=9)
    tier.close()
    assert _open(opened, tmp_path, "never").recovered_pages() == {1000: kept[0]}


def test_a_read_error_raises_and_the_page_stays(tmp_path: Path, opened: list[NvmeTier]) -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    tier = _open(opened, tmp_path, "never", file_io=faulty)
    slots, pages = _write_tagged(tier, 2)
    faulty.fail("preadv", errno.EIO)
    with pytest.raises(TierIOError, match="EIO"):
        tier.read(slots[0])
    assert tier.stats().io_errors == 1 and tier.stats().checksum_failures == 0
    assert torch.equal(tier.read(slots[0]), pages[0])


def test_fault_injection_arguments_are_checked() -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    with pytest.raises(InvalidArgument):
        faulty.fail("unlink")
    with pytest.raises(InvalidArgument):
        faulty.fail("pwritev", times=0)
    faulty.fail("pwritev", times=-1, after=1)
    faulty.clear()
