"""A stateful test: random puts, reads, demotions, prefetches, pins and discards against a model.

The store has three small tiers (GPU stand-in 4, host 6, NVMe 10 pages) so that watermark
demotions, promotions on hit and discards at the bottom all happen within a few steps. The model
is a dict key -> page seed kept in step by the ``on_discard`` listener. After every step (once
the workers are idle) the store holds exactly the model's keys, every slot in use belongs to
one of them (no leaked page), and no pinned key was ever discarded; every read returns the
exact bytes that were put.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvcluster.errors import CapacityError, InvalidArgument, NotFound
from tiers.device_tier import DeviceTier
from tiers.host_tier import HostTier
from tiers.nvme_tier import NvmeTier
from tiers.tiered_store import TieredStore

P = 4096
KEYS = st.integers(min_value=0, max_value=40)


def _page(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (P,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


class TieredStoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="kvcluster-stateful-"))
        self.model: dict[int, int] = {}
        self.pins: dict[int, int] = {}
        self.discarded_pinned: list[int] = []
        self.lock = threading.Lock()
        self.seed = 0
        tiers = [
            DeviceTier(4, P, device="cpu"),
            HostTier(6, P),
            NvmeTier([self.directory], 10, P, o_direct="auto", io_threads=2, fsync=False),
        ]
        self.store = TieredStore(
            tiers, high_watermark=0.75, low_watermark=0.5, migration_threads=2, batch_pages=3,
            on_discard=self._on_discard,
        )

    def _on_discard(self, key: int) -> None:
        with self.lock:
            if self.pins.get(key):
                self.discarded_pinned.append(key)
            self.model.pop(key, None)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _settle(self) -> None:
        assert self.store.wait_idle(30)

    @initialize(keys=st.lists(KEYS, min_size=8, max_size=20, unique=True))
    def fill(self, keys: list[int]) -> None:
        self.put_many(keys)

    @rule(keys=st.lists(KEYS, min_size=1, max_size=8, unique=True))
    def put_many(self, keys: list[int]) -> None:
        for key in keys:
            self.put(key)

    @rule(key=KEYS)
    def put(self, key: int) -> None:
        self._settle()
        self.seed += 1
        if key in self.model:
            try:
                self.store.put(key, _page(self.seed))
            except InvalidArgument:
                return
            raise AssertionError(f"a second put of {key} was accepted")
        try:
            self.store.put(key, _page(self.seed))
        except CapacityError:
            # Only when every stored page is pinned.
            assert all(self.pins.get(k, 0) > 0 for k in self.model), "capacity refused with evictable pages"
            return
        with self.lock:
            self.model[key] = self.seed

    @rule(key=KEYS)
    def get(self, key: int) -> None:
        with self.lock:
            seed = self.model.get(key)
        try:
            page = self.store.get(key)
        except NotFound:
            self._settle()
            assert key not in self.model, f"key {key} lost"
            return
        assert seed is not None, f"key {key} returned without being stored"
        assert torch.equal(page, _page(seed)), f"key {key} returned wrong bytes"

    @rule(keys=st.lists(KEYS, max_size=5))
    def demote(self, keys: list[int]) -> None:
        result = self.store.demote(keys).result(timeout=30)
        for key in result.moved:
            assert self.pins.get(key, 0) == 0, f"pinned key {key} was demoted"

    @rule(keys=st.lists(KEYS, max_size=5))
    def prefetch(self, keys: list[int]) -> None:
        result = self.store.prefetch(keys).result(timeout=30)
        assert set(result.moved) | set(result.already) | set(result.missing) | set(result.skipped) | set(
            result.failed
        ) == set(keys)
        assert result.failed == ()

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        self._settle()
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.store.pin([key])
        self.pins[key] = self.pins.get(key, 0) + 1

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, n in self.pins.items() if n)))
        self.store.unpin([key])
        self.pins[key] -= 1

    @rule(key=KEYS)
    def discard(self, key: int) -> None:
        self._settle()
        if self.pins.get(key, 0) and key in self.model:
            try:
                self.store.discard(key)
            except InvalidArgument:
                return
            raise AssertionError(f"pinned key {key} was discarded")
        assert self.store.discard(key) is (key in self.model)
        with self.lock:
            self.model.pop(key, None)

    @invariant()
    def store_matches_the_model(self) -> None:
        self._settle()
        assert self.discarded_pinned == []
        assert set(self.store.keys()) == set(self.model)
        stats = self.store.stats()
        assert sum(s.pages_used for s in stats.values()) == len(self.model), "a slot leaked"
        for key in self.model:
            assert self.store.location(key) in ("gpu", "cpu", "nvme")
        for key, n in self.pins.items():
            if n and key in self.model:
                assert self.store.pins(key) == n


TestTieredStoreStateful = TieredStoreMachine.TestCase
TestTieredStoreStateful.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
