"""Spill store under faults and misuse: pins of a dropped page, a half-failed batched spill,
refused discards and bad pages. Real host and NVMe tiers, no timing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kvcluster.errors import InvalidArgument, InvalidKV, PageCorrupt
from kvcluster.spill_store import SpillRequest, SpillStore, tier_key
from tests.tiers.conftest import random_pages
from tiers.fault_injection import FaultInjectingFileIO
from tiers.host_tier import HostTier
from tiers.nvme_file_io import FileIO, PosixFileIO
from tiers.nvme_tier import NvmeTier
from tiers.tiered_store import TieredStore

P = 4096
BS = 4  # tokens per block


def _hash(i: int) -> bytes:
    return bytes([i + 1]) * 16


def _tokens(i: int) -> np.ndarray:
    return np.arange(i * BS, (i + 1) * BS, dtype=np.int64)


def _spill_store(
    made: list[SpillStore], tmp_path: Path, host_slots: int, file_io: FileIO | None = None
) -> tuple[SpillStore, NvmeTier]:
    nvme = NvmeTier([tmp_path], 8, P, o_direct="never", io_threads=1, fsync=False, file_io=file_io)
    store = TieredStore(
        [HostTier(host_slots, P, pinned="never"), nvme],
        high_watermark=1.0, low_watermark=1.0, promote_on_hit=False, io_retry_seconds=0.0,
    )
    spill = SpillStore(store, None)
    made.append(spill)
    return spill, nvme


def _request(i: int) -> SpillRequest:
    return SpillRequest(_hash(i), "ns", _tokens(i).astype("<i8").tobytes(), _hash(0), i)


def test_a_pinned_page_dropped_as_corrupt_does_not_keep_the_others_pinned(
    made: list[SpillStore], tmp_path: Path
) -> None:
    spill, nvme = _spill_store(made, tmp_path, host_slots=4)
    pages = random_pages(2, P, 1)
    keys = [tier_key(_hash(i)) for i in range(2)]
    for i in range(2):
        spill.spill(_hash(i), "ns", _tokens(i), pages[i], family=_hash(0), position=i)
    assert spill.store.demote(keys[:1]).result(timeout=10).moved == (keys[0],)
    path, offset = nvme.slot_location(0)  # the first page written to the NVMe tier
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 16, offset)
    finally:
        os.close(fd)
    # A lookup's lease pins both; the fetch finds the first corrupt, and it is dropped.
    spill.pin(keys)
    with pytest.raises(PageCorrupt):
        spill.read(keys[0])
    assert spill.location(keys[0]) is None
    # Releasing the lease must unpin what is still there.
    spill.unpin(keys)
    assert spill.store.pins(keys[1]) == 0


def test_a_batched_spill_that_fails_on_one_tier_keeps_the_metadata_of_what_it_stored(
    made: list[SpillStore], tmp_path: Path
) -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    spill, _ = _spill_store(made, tmp_path, host_slots=2, file_io=faulty)
    faulty.fail("pwritev", errno.ENOSPC, times=-1)  # the disk is full: only the host takes pages
    tiers = spill.spill_many([_request(i) for i in range(4)], random_pages(4, P, 2))
    assert tiers == ["cpu", "cpu", None, None]
    # Every page the store holds can be found again: none is kept without its metadata.
    assert len(spill) == len(spill.store) == 2
    hashes = [_hash(i) for i in range(4)]
    tokens = np.concatenate([_tokens(i) for i in range(4)])
    assert spill.continue_chain(hashes, tokens, 0, BS, "ns") == [tier_key(h) for h in hashes[:2]]


def test_a_refused_discard_changes_nothing(made: list[SpillStore], tmp_path: Path) -> None:
    spill, _ = _spill_store(made, tmp_path, host_slots=4)
    key = tier_key(_hash(0))
    spill.spill(_hash(0), "ns", _tokens(0), random_pages(1, P, 3)[0], family=_hash(0), position=0)
    spill.pin([key])
    with pytest.raises(InvalidArgument, match="pinned"):
        spill.discard(key)
    assert len(spill) == 1
    assert spill.continue_chain([_hash(0)], _tokens(0), 0, BS, "ns") == [key]


def test_a_page_of_the_wrong_size_is_refused_not_silently_dropped(
    made: list[SpillStore], tmp_path: Path
) -> None:
    spill, _ = _spill_store(made, tmp_path, host_slots=4)
    with pytest.raises(InvalidKV):
        spill.spill(_hash(0), "ns", _tokens(0), torch.zeros(P - 1, dtype=torch.uint8),
                    family=_hash(0), position=0)
    with pytest.raises(InvalidKV):
        spill.spill_many([_request(0), _request(1)], torch.zeros((2, P), dtype=torch.float32))
    with pytest.raises(InvalidKV):
        spill.spill_many([_request(0), _request(1)], random_pages(3, P, 4))
    assert len(spill) == 0 and len(spill.store) == 0

