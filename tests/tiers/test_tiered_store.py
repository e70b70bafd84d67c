"""Tiered store: placement, watermark demotion, promotion, prefetch, pins, capacity, discards,
two-phase moves, faults and warm restart. Exact keys and exact orders, no timing."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from kvcluster.errors import (
    CapacityError,
    InvalidArgument,
    InvalidKV,
    NotFound,
    PageCorrupt,
    TierIOError,
)
from tests.tiers.conftest import GatedTier, ManualClock, random_pages
from tiers.device_tier import DeviceTier
from tiers.fault_injection import FaultInjectingFileIO
from tiers.host_tier import HostTier
from tiers.nvme_file_io import PosixFileIO
from tiers.nvme_tier import NvmeTier
from tiers.page_store import PageStore
from tiers.tiered_store import MoveResult, TieredStore

P = 4096


class Recorder:
    def __init__(self) -> None:
        self.moves: list[tuple[int, str, str]] = []
        self.discards: list[int] = []
        self._lock = threading.Lock()

    def on_move(self, key: int, src: str, dst: str) -> None:
        with self._lock:
            self.moves.append((key, src, dst))

    def on_discard(self, key: int) -> None:
        with self._lock:
            self.discards.append(key)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def _store(
    stores: list[TieredStore],
    recorder: Recorder,
    tiers: list[PageStore] | None = None,
    sizes: tuple[int, ...] = (10, 20),
    **kw: object,
) -> TieredStore:
    if tiers is None:
        tiers = [DeviceTier(sizes[0], P, device="cpu")] + [
            HostTier(n, P, name=f"cpu{i}" if i else "cpu") for i, n in enumerate(sizes[1:])
        ]
    kw.setdefault("high_watermark", 0.8)
    kw.setdefault("low_watermark", 0.5)
    store = TieredStore(tiers, on_move=recorder.on_move, on_discard=recorder.on_discard, **kw)  # type: ignore[arg-type]
    stores.append(store)
    return store


def _fill(store: TieredStore, keys: range, seed: int = 0) -> dict[int, torch.Tensor]:
    pages = random_pages(len(keys), P, seed)
    for key, page in zip(keys, pages):
        store.put(key, page)
    return dict(zip(keys, pages))


def _where(store: TieredStore, keys: object) -> dict[int, str | None]:
    return {k: store.location(k) for k in keys}  # type: ignore[attr-defined]


def _in(store: TieredStore, tier: str, keys: range) -> set[int]:
    return {k for k in keys if store.location(k) == tier}


# --- placement and watermarks ---------------------------------------------------------------


def test_put_fills_the_top_tier_then_the_next_with_room(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder, sizes=(2, 3), high_watermark=1.0, low_watermark=1.0, promote_on_hit=False)
    pages = _fill(store, range(5))
    assert [store.location(k) for k in range(5)] == ["gpu", "gpu", "cpu", "cpu", "cpu"]
    assert all(torch.equal(store.get(k), pages[k]) for k in range(5))
    assert len(store) == 5 and 3 in store and store.contains(4) and not store.contains(5)
    assert sorted(store.keys()) == [0, 1, 2, 3, 4]


def test_above_the_high_watermark_the_coldest_pages_are_demoted(
    stores: list[TieredStore], recorder: Recorder
) -> None:
    store = _store(stores, recorder)  # gpu 10 slots: demote above 8, down to 5
    pages = _fill(store, range(8))
    assert store.wait_idle(10)
    assert recorder.moves == []  # 8 is not above 8
    store.put(8, random_pages(1, P, 99)[0])
    assert store.wait_idle(10)
    assert _in(store, "cpu", range(9)) == {0, 1, 2, 3}
    assert _in(store, "gpu", range(9)) == {4, 5, 6, 7, 8}
    assert recorder.moves == [(k, "gpu", "cpu") for k in range(4)]
    stats = store.stats()
    assert (stats["gpu"].demotions, stats["gpu"].pages_used, stats["cpu"].pages_used) == (4, 5, 4)
    assert stats["gpu"].bytes_moved == stats["cpu"].bytes_moved == 4 * P
    assert stats["cpu"].promotions == 0 and stats["gpu"].stand_in
    assert all(torch.equal(store.get(k), pages[k]) for k in range(8))


def test_a_recent_read_keeps_a_page_up_under_lru(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder)
    _fill(store, range(8))
    store.get(0)
    store.get(1)
    store.put(8, random_pages(1, P, 9)[0])
    assert store.wait_idle(10)
    assert _in(store, "cpu", range(9)) == {2, 3, 4, 5}


@pytest.mark.parametrize(("policy", "demoted"), [("lru", {0, 1, 2, 3}), ("lfu", {8, 1, 2, 3})])
def test_the_policy_picks_the_coldest(
    stores: list[TieredStore], recorder: Recorder, policy: str, demoted: set[int]
) -> None:
    store = _store(stores, recorder, policy=policy)
    _fill(store, range(8))
    for key in (0, 0, 0, 1, 2, 3, 4, 5, 6, 7):
        store.get(key)
    store.put(8, random_pages(1, P, 9)[0])
    assert store.wait_idle(10)
    assert _in(store, "cpu", range(9)) == demoted


def test_demotion_cascades_and_the_bottom_discards_its_coldest(
    stores: list[TieredStore], recorder: Recorder
) -> None:
    store = _store(stores, recorder, sizes=(4, 4, 4), high_watermark=0.75, low_watermark=0.5)
    for key in range(16):
        store.put(key, random_pages(1, P, key)[0])
        assert store.wait_idle(10)
    # Every tier holds its share and the oldest pages fell out of the bottom.
    held = [k for k in range(16) if k in store]
    assert recorder.discards == [k for k in range(16) if k not in held]
    assert recorder.discards[:2] == [0, 1]
    assert all(store.location(k) is None for k in recorder.discards)
    stats = store.stats()
    assert stats["cpu1"].discards == len(recorder.discards)
    assert stats["gpu"].pages_used <= 3 and stats["cpu"].pages_used <= 3
    for key in held:
        assert torch.equal(store.get(key), random_pages(1, P, key)[0])


# --- promotion and prefetch -----------------------------------------------------------------


@pytest.mark.parametrize("promote", [True, False])
def test_a_hit_below_the_top_promotes(stores: list[TieredStore], recorder: Recorder, promote: bool) -> None:
    store = _store(stores, recorder, promote_on_hit=promote)
    pages = _fill(store, range(9))
    assert store.wait_idle(10)
    assert store.location(2) == "cpu"
    recorder.moves.clear()
    assert torch.equal(store.get(2), pages[2])
    assert store.wait_idle(10)
    if promote:
        assert store.location(2) == "gpu"
        assert (2, "cpu", "gpu") in recorder.moves
        assert store.stats()["gpu"].promotions == 1
    else:
        assert store.location(2) == "cpu" and recorder.moves == []
    assert torch.equal(store.get(2), pages[2])


def test_prefetch_promotes_a_batch_and_reports_each_key(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder)
    pages = _fill(store, range(9))
    assert store.wait_idle(10)
    result = store.prefetch([0, 1, 8, 12345, 0]).result(timeout=10)
    assert result == MoveResult(moved=(0, 1), already=(8,), missing=(12345,))
    assert store.location(0) == store.location(1) == "gpu"
    assert torch.equal(store.get(1), pages[1])
    assert store.wait_idle(10)


def test_prefetch_makes_room_by_demoting_colder_pages(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder, sizes=(4, 8), high_watermark=1.0, low_watermark=1.0)
    _fill(store, range(8))  # 0-3 on gpu, 4-7 on cpu
    result = store.prefetch([6, 7]).result(timeout=10)
    assert result.moved == (6, 7)
    assert _in(store, "gpu", range(8)) == {2, 3, 6, 7}
    assert recorder.moves[:2] == [(0, "gpu", "cpu"), (1, "gpu", "cpu")]


def test_explicit_demote(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder)
    pages = _fill(store, range(3))
    result = store.demote([0, 1, 777]).result(timeout=10)
    assert result == MoveResult(moved=(0, 1), missing=(777,))
    assert store.location(0) == "cpu"
    assert store.demote([0]).result(timeout=10).skipped == (0,)  # already at the bottom
    assert torch.equal(store.get(0), pages[0])


# --- pins -----------------------------------------------------------------------------------


def test_pinned_pages_are_not_demoted_discarded_or_auto_promoted(
    stores: list[TieredStore], recorder: Recorder
) -> None:
    store = _store(stores, recorder)
    _fill(store, range(8))
    store.pin([0, 1])
    store.pin([1])
    assert (store.pins(0), store.pins(1), store.pins(99)) == (1, 2, 0)
    store.put(8, random_pages(1, P, 8)[0])
    assert store.wait_idle(10)
    assert _in(store, "cpu", range(9)) == {2, 3, 4, 5}
    assert store.demote([0]).result(timeout=10).skipped == (0,)
    with pytest.raises(InvalidArgument, match="pinned"):
        store.discard(0)
    # A pinned page below the top is not promoted by a hit, but an explicit prefetch moves it.
    store.pin([2])
    store.get(2)
    assert store.wait_idle(10)
    assert store.location(2) == "cpu"
    assert store.prefetch([2]).result(timeout=10).moved == (2,)
    assert store.location(2) == "gpu"
    store.unpin([0, 1, 1, 2])
    assert store.demote([0]).result(timeout=10).moved == (0,)


def test_pin_and_unpin_are_all_or_nothing(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder)
    _fill(store, range(2))
    with pytest.raises(NotFound):
        store.pin([0, 99])
    assert store.pins(0) == 0
    store.pin([0])
    with pytest.raises(InvalidArgument):
        store.unpin([0, 1])
    with pytest.raises(InvalidArgument):
        store.unpin([0, 0])
    assert store.pins(0) == 1


def test_full_and_nothing_evictable_raises_capacity_and_changes_nothing(
    stores: list[TieredStore], recorder: Recorder
) -> None:
    store = _store(stores, recorder, sizes=(2, 2), high_watermark=1.0, low_watermark=1.0)
    _fill(store, range(4))
    store.pin(range(4))
    with pytest.raises(CapacityError):
        store.put(4, random_pages(1, P, 4)[0])
    assert 4 not in store and len(store) == 4 and recorder.discards == []
    # One unpinned page anywhere is enough: it is discarded (and reported) to make room.
    store.unpin([1])
    assert store.put(4, random_pages(1, P, 4)[0]) == "gpu"
    assert recorder.discards == [1] and store.location(1) is None


def test_the_bottom_discards_its_coldest_unpinned_page_when_full(
    stores: list[TieredStore], recorder: Recorder
) -> None:
    store = _store(stores, recorder, sizes=(1, 3), high_watermark=1.0, low_watermark=1.0)
    _fill(store, range(4))  # 0 on gpu, 1-3 on cpu
    store.pin([1])
    store.put(4, random_pages(1, P, 4)[0])
    assert recorder.discards == [2]
    assert store.location(4) == "cpu" and store.location(2) is None
    with pytest.raises(NotFound):
        store.get(2)


def test_put_many_places_like_put_in_one_batch(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder, sizes=(2, 3), high_watermark=1.0, low_watermark=1.0, promote_on_hit=False)
    pages = random_pages(4, P, 1)
    assert store.put_many([10, 11, 12, 13], pages) == ["gpu", "gpu", "cpu", "cpu"]
    assert all(torch.equal(store.get(10 + i), pages[i]) for i in range(4))
    store.pin([10])
    # One slot left, then the coldest unpinned pages of the bottom tier make room.
    more = random_pages(3, P, 2)
    assert store.put_many([20, 21, 22], more) == ["cpu", "cpu", "cpu"]
    assert recorder.discards == [12, 13]
    assert all(torch.equal(store.get(20 + i), more[i]) for i in range(3))
    assert store.put_many([], torch.empty((0, P), dtype=torch.uint8)) == []


def test_put_many_without_room_for_all_stores_what_fits(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder, sizes=(1, 1), high_watermark=1.0, low_watermark=1.0)
    _fill(store, range(1))
    store.pin([0])
    pages = random_pages(3, P, 3)
    assert store.put_many([5, 6, 7], pages) == ["cpu", None, None]
    assert store.location(5) == "cpu" and 6 not in store and 7 not in store
    assert torch.equal(store.get(5), pages[0])


def test_put_many_refuses_bad_batches_and_changes_nothing(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder, sizes=(2, 2), high_watermark=1.0, low_watermark=1.0)
    _fill(store, range(1))
    pages = random_pages(2, P, 4)
    with pytest.raises(InvalidArgument, match="repeat"):
        store.put_many([3, 3], pages)
    with pytest.raises(InvalidArgument, match=r"keys \[0\] are already stored"):
        store.put_many([3, 0], pages)
    with pytest.raises(InvalidKV, match="page batch"):
        store.put_many([3, 4], pages[:, :10])
    with pytest.raises(InvalidKV, match="2 pages given for 3 slots"):
        store.put_many([3, 4, 5], pages)
    assert sorted(store.keys()) == [0] and store.stats()["gpu"].pages_used == 1


def test_put_many_write_error_keeps_the_other_tiers_pages(
    stores: list[TieredStore], recorder: Recorder, tmp_path: Path
) -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    store = _nvme_store(stores, recorder, tmp_path, faulty)
    faulty.fail("pwritev", errno.EIO)
    pages = random_pages(6, P, 5)
    with pytest.raises(TierIOError):
        store.put_many(range(6), pages)
    assert _where(store, range(6)) == {0: "gpu", 1: "gpu", 2: "gpu", 3: "gpu", 4: None, 5: None}
    assert store.stats()["nvme"].pages_used == 0
    assert store.put_many([4, 5], pages[4:]) == ["nvme", "nvme"]
    assert torch.equal(store.get(5), pages[5])


def test_discard_frees_the_page(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder)
    _fill(store, range(3))
    assert store.discard(1) is True
    assert store.discard(1) is False
    assert store.location(1) is None and 1 not in store
    assert store.stats()["gpu"].pages_used == 2
    assert recorder.discards == []  # the caller asked; no callback
    store.put(1, random_pages(1, P, 5)[0])  # the key can be reused


# --- two-phase moves ------------------------------------------------------------------------


def _gated_store(stores: list[TieredStore], recorder: Recorder, **kw: object) -> tuple[TieredStore, GatedTier]:
    gated = GatedTier(HostTier(20, P))
    store = _store(stores, recorder, tiers=[DeviceTier(10, P, device="cpu"), gated], **kw)
    return store, gated


def test_a_page_being_moved_stays_readable_and_lookups_do_not_wait(
    stores: list[TieredStore], recorder: Recorder
) -> None:
    store, gated = _gated_store(stores, recorder)
    pages = _fill(store, range(8))
    gated.gate.clear()
    store.put(8, random_pages(1, P, 8)[0])
    assert gated.entered.wait(10)  # a demotion of 0-3 is now in flight and blocked
    seen: list[object] = []

    def look() -> None:
        seen.append(store.location(0))
        seen.append(torch.equal(store.get(0), pages[0]))
        seen.append(torch.equal(store.get(7), pages[7]))

    reader = threading.Thread(target=look)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "a lookup waited for the move"
    assert seen == ["gpu", True, True]
    gated.gate.set()
    assert store.wait_idle(10)
    assert store.location(1) == "cpu"
    assert torch.equal(store.get(1), pages[1])


def test_a_page_pinned_during_its_demotion_stays(stores: list[TieredStore], recorder: Recorder) -> None:
    store, gated = _gated_store(stores, recorder)
    pages = _fill(store, range(8))
    gated.gate.clear()
    store.put(8, random_pages(1, P, 8)[0])
    assert gated.entered.wait(10)
    store.pin([0])
    gated.gate.set()
    assert store.wait_idle(10)
    assert store.location(0) == "gpu"
    assert (0, "gpu", "cpu") not in recorder.moves
    # The rolled-back page is made up for by the next coldest, down to the low watermark.
    assert {k for k, _, _ in recorder.moves} == {1, 2, 3, 4}
    assert store.stats()["cpu"].pages_used == 4  # the rolled-back copy's slot was given back
    assert torch.equal(store.get(0), pages[0])


def test_a_page_discarded_during_its_move_frees_both_slots(stores: list[TieredStore], recorder: Recorder) -> None:
    store, gated = _gated_store(stores, recorder)
    _fill(store, range(9))
    assert store.wait_idle(10)
    gated.gate.clear()
    future = store.prefetch([0])
    assert store.prefetch([]).result(10) == MoveResult()
    store.demote([5])
    assert gated.entered.wait(10)
    assert store.discard(5) is True
    gated.gate.set()
    assert future.result(10).moved == (0,)
    assert store.wait_idle(10)
    assert store.location(5) is None
    stats = store.stats()
    assert stats["gpu"].pages_used + stats["cpu"].pages_used == 8


def test_a_worker_bug_is_not_swallowed(stores: list[TieredStore], recorder: Recorder) -> None:
    store, gated = _gated_store(stores, recorder)
    gated.explode = True
    _fill(store, range(9))
    with pytest.raises(RuntimeError, match="worker failed"):
        store.wait_idle(10)
    assert all(store.location(k) == "gpu" for k in range(9))  # nothing moved, nothing lost
    assert store.stats()["cpu"].pages_used == 0  # the rolled-back copies gave their slots back
    gated.explode = False
    assert isinstance(store._workers.forget_error(), RuntimeError)  # acknowledged; close() works


def test_a_failing_listener_does_not_stop_the_store(
    stores: list[TieredStore], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(key: int, src: str, dst: str) -> None:
        raise ValueError("listener bug")

    store = TieredStore([DeviceTier(10, P, device="cpu"), HostTier(10, P)], high_watermark=0.8, low_watermark=0.5)
    stores.append(store)
    seen: list[int] = []
    store.add_move_listener(broken)
    store.add_move_listener(lambda key, src, dst: seen.append(key))
    with caplog.at_level(logging.ERROR):
        _fill(store, range(9))
        assert store.wait_idle(10)
    assert seen == [0, 1, 2, 3] and "listener" in caplog.text


# --- NVMe bottom: faults, corruption, warm restart ------------------------------------------


def _nvme_store(
    stores: list[TieredStore], recorder: Recorder, path: Path, faulty: FaultInjectingFileIO | None = None,
    clock: ManualClock | None = None, watermark: float = 1.0,
) -> TieredStore:
    nvme = NvmeTier([path], 16, P, o_direct="auto", io_threads=2, file_io=faulty)
    return _store(
        stores, recorder, tiers=[DeviceTier(4, P, device="cpu"), nvme],
        high_watermark=watermark, low_watermark=watermark, clock=clock or ManualClock(),
    )


def test_enospc_on_demotion_keeps_the_page_and_retries_later(
    stores: list[TieredStore], recorder: Recorder, tmp_path: Path
) -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    clock = ManualClock()
    store = _nvme_store(stores, recorder, tmp_path, faulty, clock, watermark=0.5)
    faulty.fail("pwritev", errno.ENOSPC)
    pages = _fill(store, range(3))
    assert store.wait_idle(10)
    assert faulty.injected == 1
    assert _where(store, range(3)) == {0: "gpu", 1: "gpu", 2: "gpu"}
    assert store.stats()["nvme"].io_errors == 1 and store.stats()["nvme"].pages_used == 0
    assert torch.equal(store.get(0), pages[0])
    store.rebalance()  # still backing off: nothing happens
    assert store.wait_idle(10) and store.location(1) == "gpu"
    clock.advance(5)
    store.rebalance()
    assert store.wait_idle(10)
    assert store.location(1) == "nvme" and recorder.moves == [(1, "gpu", "nvme")]
    assert torch.equal(store.get(1), pages[1])


def test_eio_on_read_raises_and_the_page_stays(
    stores: list[TieredStore], recorder: Recorder, tmp_path: Path
) -> None:
    faulty = FaultInjectingFileIO(PosixFileIO())
    store = _nvme_store(stores, recorder, tmp_path, faulty)
    pages = _fill(store, range(3))
    assert store.demote([0]).result(10).moved == (0,)
    faulty.fail("preadv", errno.EIO)
    with pytest.raises(TierIOError):
        store.get(0)
    assert store.location(0) == "nvme" and recorder.discards == []
    assert torch.equal(store.get(0), pages[0])


def test_a_corrupt_page_is_dropped_reported_and_never_returned(
    stores: list[TieredStore], recorder: Recorder, tmp_path: Path
) -> None:
    store = _nvme_store(stores, recorder, tmp_path)
    _fill(store, range(2))
    assert store.demote([0, 1]).result(10).moved == (0, 1)
    nvme = store._tiers[1]
    assert isinstance(nvme, NvmeTier)
    for key in (0, 1):
        path, offset = nvme.slot_location(store._entries[key].slot)
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"\xde\xad", offset + 10)
        os.close(fd)
    with pytest.raises(PageCorrupt):
        store.get(0)
    result = store.prefetch([1]).result(10)
    assert result.failed == (1,) and result.moved == ()
    assert recorder.discards == [0, 1]
    assert store.location(0) is None and store.location(1) is None
    stats = store.stats()["nvme"]
    assert (stats.checksum_failures, stats.discards, stats.pages_used) == (2, 2, 0)


def test_a_restarted_store_finds_its_nvme_pages(
    stores: list[TieredStore], recorder: Recorder, tmp_path: Path
) -> None:
    store = _nvme_store(stores, recorder, tmp_path)
    pages = _fill(store, range(4))
    assert store.demote(range(4)).result(10).moved == (0, 1, 2, 3)
    store.discard(2)
    store.close()
    again = _nvme_store(stores, recorder, tmp_path)
    assert sorted(again.keys()) == [0, 1, 3]
    assert {again.location(k) for k in (0, 1, 3)} == {"nvme"}
    for key in (0, 1, 3):
        assert torch.equal(again.get(key), pages[key])
    assert again.wait_idle(10)
    assert again.location(0) == "gpu"  # and they promote like any other page


# --- misuse and lifecycle -------------------------------------------------------------------


def test_bad_keys_and_pages_are_rejected(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder)
    page = random_pages(1, P, 0)[0]
    store.put(1, page)
    for key in (-1, 2**63, True, "1", 1.0):
        with pytest.raises(InvalidArgument):
            store.put(key, page)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="already stored"):
        store.put(1, page)
    with pytest.raises(InvalidKV):
        store.put(2, page[:-1])
    with pytest.raises(InvalidKV):
        store.put(2, page.view(torch.int8))
    with pytest.raises(NotFound):
        store.get(2)
    with pytest.raises(InvalidKV):
        store.get(1, out=torch.empty(P, dtype=torch.float32))
    out = torch.empty(P, dtype=torch.uint8)
    assert store.get(1, out=out) is out and torch.equal(out, page)
    assert len(store) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tiers": []},
        {"tiers": "mixed-sizes"},
        {"tiers": "same-names"},
        {"high_watermark": 0.5, "low_watermark": 0.6},
        {"high_watermark": 1.5},
        {"policy": ["lru"]},
        {"policy": "mru"},
        {"migration_threads": 0},
    ],
)
def test_bad_construction_is_rejected(kwargs: dict[str, object]) -> None:
    tiers: object = [DeviceTier(2, P, device="cpu"), HostTier(2, P)]
    if kwargs.get("tiers") == "mixed-sizes":
        tiers = [DeviceTier(2, P, device="cpu"), HostTier(2, 2 * P)]
    elif kwargs.get("tiers") == "same-names":
        tiers = [HostTier(2, P), HostTier(2, P)]
    elif "tiers" in kwargs:
        tiers = kwargs["tiers"]
    rest = {k: v for k, v in kwargs.items() if k != "tiers"}
    with pytest.raises(InvalidArgument):
        TieredStore(tiers, **rest)  # type: ignore[arg-type]


def test_close_joins_the_workers_and_is_idempotent(recorder: Recorder) -> None:
    store = TieredStore([DeviceTier(4, P, device="cpu"), HostTier(4, P)])
    _fill(store, range(6))
    workers = store._workers.threads
    store.close()
    store.close()
    assert not any(w.is_alive() for w in workers)
    with pytest.raises(InvalidArgument, match="closed"):
        store.put(9, random_pages(1, P, 0)[0])
    with pytest.raises(InvalidArgument, match="closed"):
        store.prefetch([0])


# --- lock-free reads --------------------------------------------------------------------------


class HookedHost(HostTier):
    """A host tier that runs ``hook`` in the middle of a lock-free read (a racing writer)."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.hook: object = None
        self.peeks = 0

    def peek_into(self, slot: int, out: torch.Tensor) -> bool:
        self.peeks += 1
        hook, self.hook = self.hook, None
        if callable(hook):
            hook()
        return super().peek_into(slot, out)


def _hooked_store(stores: list[TieredStore], recorder: Recorder) -> tuple[TieredStore, HookedHost]:
    top = HookedHost(4, P, name="gpu")
    store = _store(
        stores, recorder, tiers=[top, HostTier(8, P)], high_watermark=1.0, low_watermark=1.0,
        promote_on_hit=False,
    )
    return store, top


def test_a_top_tier_read_takes_no_lock(stores: list[TieredStore], recorder: Recorder) -> None:
    store, top = _hooked_store(stores, recorder)
    pages = _fill(store, range(2))
    with store._lock:  # a writer holds the store lock: the read still completes
        done: list[bool] = []
        reader = threading.Thread(target=lambda: done.append(torch.equal(store.get(1), pages[1])))
        reader.start()
        reader.join(timeout=10)
        assert done == [True]
    assert top.peeks == 1


def test_a_slot_reused_during_a_lock_free_read_is_not_returned(
    stores: list[TieredStore], recorder: Recorder
) -> None:
    store, top = _hooked_store(stores, recorder)
    pages = _fill(store, range(2))

    def reuse_the_slot() -> None:  # key 1 goes away and key 9 takes its slot
        store.discard(1)
        store.put(9, random_pages(1, P, 9)[0])

    top.hook = reuse_the_slot
    with pytest.raises(NotFound):
        store.get(1)
    assert torch.equal(store.get(9), random_pages(1, P, 9)[0])
    assert torch.equal(store.get(0), pages[0])


def test_a_page_moved_during_a_lock_free_read_is_read_again(stores: list[TieredStore], recorder: Recorder) -> None:
    store, top = _hooked_store(stores, recorder)
    pages = _fill(store, range(2))

    def move_and_overwrite() -> None:  # key 1 leaves; its old slot gets another page
        assert store.demote([1]).result(10).moved == (1,)
        store.put(5, random_pages(1, P, 5)[0])

    top.hook = move_and_overwrite
    assert torch.equal(store.get(1), pages[1])
    assert store.location(1) == "cpu"


def test_lock_free_reads_still_count_for_the_eviction_order(stores: list[TieredStore], recorder: Recorder) -> None:
    store = _store(stores, recorder, sizes=(4, 8), high_watermark=0.75, low_watermark=0.5)
    _fill(store, range(3))
    store.get(0)
    store.get(1)  # LRU order now 2, 0, 1
    store.put(3, random_pages(1, P, 3)[0])  # 4 > 3: demote the two coldest
    assert store.wait_idle(10)
    assert _in(store, "cpu", range(4)) == {2, 0}
