"""The spill store's metadata log: a failed write keeps neither page nor record, the log is
compacted while the node runs, and a torn record does not hide the ones after it. Real host
and NVMe tiers, faults injected through the log's FileIO, no timing."""

from __future__ import annotations

import errno
import hashlib
import logging
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest

from kvcluster.errors import TierIOError
from kvcluster.spill_store import SpillRequest, SpillStore, tier_key
from tests.tiers.conftest import random_pages
from tiers.fault_injection import FaultInjectingFileIO
from tiers.host_tier import HostTier
from tiers.nvme_file_io import FileIO, PosixFileIO
from tiers.nvme_tier import NvmeTier
from tiers.tiered_store import TieredStore

P = 4096
BS = 4  # tokens per block
HEADER = struct.Struct("<II")  # the log's record header: payload length, crc32
LOGGER = "kvcluster.spill_store"


def _hash(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(4, "little"), digest_size=16).digest()


def _tokens(i: int) -> np.ndarray:
    return np.arange(i * BS, (i + 1) * BS, dtype=np.int64)


def _request(i: int) -> SpillRequest:
    return SpillRequest(_hash(i), "ns", _tokens(i).astype("<i8").tobytes(), _hash(0), i)


class _HookedFileIO(PosixFileIO):
    """Real calls; ``tear_next`` writes half of the next append and then fails it with EIO,
    ``on_next_fsync`` runs (once) before the next fsync."""

    def __init__(self) -> None:
        self.tear_next = False
        self.on_next_fsync: Callable[[], object] | None = None

    def append(self, fd: int, data: bytes) -> int:
        if self.tear_next:
            self.tear_next = False
            super().append(fd, data[: len(data) // 2])
            raise OSError(errno.EIO, "torn append (injected)")
        return super().append(fd, data)

    def fsync(self, fd: int) -> None:
        hook, self.on_next_fsync = self.on_next_fsync, None
        if hook is not None:
            hook()
        super().fsync(fd)


class _Crash(BaseException):
    """The process dying at this point."""


def _open(made: list[SpillStore], tmp_path: Path, *, file_io: FileIO | None = None, nvme: bool = True,
          compact_min_records: int = 1024) -> SpillStore:
    """A spill store whose log is ``tmp_path/node.blocks``: on an NVMe tier over ``tmp_path``
    (its pages survive a reopen) or, with ``nvme=False``, on a host tier."""
    tier = (NvmeTier([tmp_path], 16, P, o_direct="never", io_threads=1, fsync=False) if nvme
            else HostTier(16, P, pinned="never"))
    store = TieredStore([tier], high_watermark=1.0, low_watermark=1.0, promote_on_hit=False,
                        io_retry_seconds=0.0)
    try:
        spill = SpillStore(store, tmp_path / "node.blocks", file_io=file_io,
                           compact_min_records=compact_min_records)
    except BaseException:
        store.close()
        raise
    made.append(spill)
    return spill


def _spill(spill: SpillStore, i: int) -> str | None:
    page = random_pages(1, P, i)[0]
    return spill.spill(_hash(i), "ns", _tokens(i), page, family=_hash(0), position=i)


def _found(spill: SpillStore, i: int) -> bool:
    return spill.continue_chain([_hash(i)], _tokens(i), 0, BS, "ns") == [tier_key(_hash(i))]


def _log_records(path: Path) -> list[bytes]:
    """The records of an intact log, each with its header."""
    data = path.read_bytes()
    records, offset = [], 0
    while offset < len(data):
        length, crc = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        assert end <= len(data) and zlib.crc32(data[offset + HEADER.size : end]) == crc
        records.append(data[offset:end])
        offset = end
    return records


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records
               if r.name == LOGGER and r.levelno == logging.WARNING and text in r.getMessage())


# --- a failed metadata write -------------------------------------------------------------


def test_a_failed_metadata_write_keeps_neither_page_nor_record_and_is_logged_once(
    made: list[SpillStore], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    spill = _open(made, tmp_path, file_io=faulty, nvme=False)
    assert spill.spill_many([_request(0)], random_pages(1, P, 0)) == ["cpu"]
    faulty.fail("append", errno.ENOSPC, times=-1)  # the disk under the log is full
    caplog.set_level(logging.INFO, logger=LOGGER)
    # No OSError escapes: the batch is reported as not kept, and nothing of it is stored.
    assert spill.spill_many([_request(i) for i in (1, 2, 3)], random_pages(3, P, 1)) == [None] * 3
    assert _spill(spill, 4) is None
    assert len(spill) == len(spill.store) == 1
    assert spill.meta_write_failures == 2
    assert _warnings(caplog, "cannot write the metadata log") == 1  # once per outage
    # The disk recovers: spills are kept again, and a new outage is logged again.
    faulty.clear()
    assert spill.spill_many([_request(i) for i in (1, 2)], random_pages(2, P, 2)) == ["cpu", "cpu"]
    assert all(_found(spill, i) for i in (0, 1, 2))
    assert not _found(spill, 3)
    faulty.fail("append", errno.EIO, times=1)
    assert _spill(spill, 3) is None
    assert _warnings(caplog, "cannot write the metadata log") == 2
    assert len(spill) == len(spill.store) == 3


def test_a_failed_metadata_write_after_a_half_failed_batched_spill_drops_only_its_page(
    made: list[SpillStore], tmp_path: Path
) -> None:
    pages_io, log_io = FaultInjectingFileIO(PosixFileIO()), FaultInjectingFileIO(PosixFileIO())
    nvme = NvmeTier([tmp_path], 8, P, o_direct="never", io_threads=1, fsync=False, file_io=pages_io)
    store = TieredStore([HostTier(2, P, pinned="never"), nvme], high_watermark=1.0, low_watermark=1.0,
                        promote_on_hit=False, io_retry_seconds=0.0)
    spill = SpillStore(store, tmp_path / "node.blocks", file_io=log_io)
    made.append(spill)
    pages_io.fail("pwritev", errno.ENOSPC, times=-1)  # the batch lands on the host tier only...
    log_io.fail("append", errno.ENOSPC, times=1, after=1)  # ...and the second page's record fails
    tiers = spill.spill_many([_request(i) for i in range(4)], random_pages(4, P, 3))
    # Page 1 was dropped with its record, so page 2, spilled one by one, took its host slot.
    assert tiers == ["cpu", None, "cpu", None]
    assert len(spill) == len(spill.store) == 2
    assert [_found(spill, i) for i in range(4)] == [True, False, True, False]


def test_a_torn_metadata_write_is_cut_off_so_the_records_after_it_survive_a_restart(
    made: list[SpillStore], tmp_path: Path
) -> None:
    io = _HookedFileIO()
    spill = _open(made, tmp_path, file_io=io)
    assert _spill(spill, 0) == "nvme"
    io.tear_next = True
    assert _spill(spill, 1) is None  # half its record reached the disk: page and record dropped
    assert _spill(spill, 2) == "nvme"
    assert len(_log_records(tmp_path / "node.blocks")) == 2  # no torn bytes between them
    spill.close()
    again = _open(made, tmp_path)
    assert len(again) == 2
    assert _found(again, 0) and _found(again, 2) and not _found(again, 1)


# --- recovery of a damaged log -----------------------------------------------------------


def _torn(record: bytes) -> bytes:
    return record[: len(record) // 2]


def _garbage(record: bytes) -> bytes:
    return b"\x07\x00\x00\x00\xff\xfe" + bytes(range(200, 255))


def _not_a_record(record: bytes) -> bytes:
    payload = msgpack.packb(12345)  # framed and checksummed, but not a spilled block
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@pytest.mark.parametrize("damage", [_torn, _garbage, _not_a_record])
def test_replay_skips_a_damaged_record_and_keeps_the_ones_after_it(
    made: list[SpillStore], tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    spill = _open(made, tmp_path)
    for i in range(4):
        assert _spill(spill, i) == "nvme"
    spill.close()
    log = tmp_path / "node.blocks"
    r0, r1, r2, r3 = _log_records(log)
    # Block 1's record was torn (or overwritten by junk); later spills were appended after it.
    log.write_bytes(r0 + damage(r1) + r2 + r3)
    again = _open(made, tmp_path)
    assert [_found(again, i) for i in range(4)] == [True, False, True, True]
    assert len(again.store) == 3  # block 1's page has no record: it was dropped
    assert len(_log_records(log)) == 3  # and the rewritten log is intact


def test_an_unreadable_log_fails_startup_with_a_tier_error(made: list[SpillStore], tmp_path: Path) -> None:
    (tmp_path / "node.blocks").mkdir()  # reading it raises IsADirectoryError
    with pytest.raises(TierIOError, match=r"node\.blocks"):
        _open(made, tmp_path)


# --- compaction while running ------------------------------------------------------------


def _churn(spill: SpillStore, first: int, count: int) -> None:
    """Spill and discard ``count`` blocks: each leaves one dead record."""
    for i in range(first, first + count):
        assert _spill(spill, i) is not None
        spill.discard(tier_key(_hash(i)))


def test_dead_records_are_compacted_away_while_running(made: list[SpillStore], tmp_path: Path) -> None:
    spill = _open(made, tmp_path, compact_min_records=8)
    for i in range(3):
        _spill(spill, i)
    _churn(spill, 100, 200)
    log = tmp_path / "node.blocks"
    # Compacted whenever records > 2 * live + 8 after a spill (live: 3, plus the churned one).
    assert len(_log_records(log)) <= 2 * 4 + 8
    for i in range(3, 6):  # the log keeps taking appends after the swap
        _spill(spill, i)
    assert not (tmp_path / "node.tmp").exists()
    spill.close()
    again = _open(made, tmp_path)
    assert len(again) == 6 and all(_found(again, i) for i in range(6))


def test_records_appended_during_a_compaction_are_kept(made: list[SpillStore], tmp_path: Path) -> None:
    io = _HookedFileIO()
    spill = _open(made, tmp_path, file_io=io, compact_min_records=4)
    _spill(spill, 0)
    _churn(spill, 100, 7)  # 8 records, 1 live: the next spill (9 > 2 * 2 + 4) compacts
    # The next spill sets off the compaction; while its copy is fsynced (unlocked), block 2
    # is spilled and must reach the new log too.
    io.on_next_fsync = lambda: _spill(spill, 2)
    _spill(spill, 1)
    assert io.on_next_fsync is None
    assert len(_log_records(tmp_path / "node.blocks")) == 3
    spill.close()
    again = _open(made, tmp_path)
    assert len(again) == 3 and all(_found(again, i) for i in range(3))


def test_a_failed_compaction_keeps_the_old_log_and_the_node_running(
    made: list[SpillStore], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    spill = _open(made, tmp_path, file_io=faulty, compact_min_records=4)
    _spill(spill, 0)
    _churn(spill, 100, 7)  # 8 records, 1 live: the next spill (9 > 2 * 2 + 4) compacts
    faulty.fail("fsync", errno.EIO, times=1)  # the compaction's fsync of its new log
    assert _spill(spill, 1) == "nvme"
    assert faulty.injected == 1
    assert _warnings(caplog, "compacting") == 1
    assert not (tmp_path / "node.tmp").exists()
    assert len(_log_records(tmp_path / "node.blocks")) == 9  # nothing lost, nothing compacted
    _spill(spill, 2)  # retried only after another compact_min_records appends
    assert len(_log_records(tmp_path / "node.blocks")) == 10
    spill.close()
    again = _open(made, tmp_path)
    assert len(again) == 3 and all(_found(again, i) for i in range(3))


def test_a_crash_mid_compaction_leaves_a_usable_log(made: list[SpillStore], tmp_path: Path) -> None:
    io = _HookedFileIO()
    spill = _open(made, tmp_path, file_io=io, compact_min_records=4)
    _spill(spill, 0)
    _churn(spill, 100, 7)  # 8 records, 1 live: the next spill (9 > 2 * 2 + 4) compacts

    def crash() -> None:
        raise _Crash

    io.on_next_fsync = crash  # the process dies with the new log written but not yet renamed
    with pytest.raises(_Crash):
        _spill(spill, 1)
    assert (tmp_path / "node.tmp").exists()
    spill.close()
    again = _open(made, tmp_path)
    assert len(again) == 2 and _found(again, 0) and _found(again, 1)
