"""NVMe tier: faults while it opens."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from kvcluster.errors import TierIOError
from tiers.fault_injection import FaultInjectingFileIO
from tiers.nvme_file_io import PosixFileIO
from tiers.nvme_tier import NvmeTier

P = 4096


@pytest.mark.parametrize("operation", ["append", "fsync"])
def test_a_full_disk_at_open_is_a_tier_error_and_leaves_nothing_open(tmp_path: Path, operation: str) -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    faulty.fail(operation, errno.ENOSPC)  # the journal cannot be rewritten at open
    with pytest.raises(TierIOError, match="No space left"):
        NvmeTier([tmp_path], 8, P, o_direct="never", io_threads=1, file_io=faulty)
    # The page file's lock was released: the tier opens once the disk has room again.
    NvmeTier([tmp_path], 8, P, o_direct="never", io_threads=1).close()
