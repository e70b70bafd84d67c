"""NodeEngine in-process (no Ray): the data path, leases, spilling and registry publishing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvcluster.config import KVClusterConfig
from kvcluster.errors import (
    InvalidKV,
    InvalidTokens,
    LeaseError,
    PageCorrupt,
    RegistryUnavailable,
    TierIOError,
)
from kvcluster.kv_payload import KVPages, KVPayload
from kvcluster.node_engine import NodeEngine
from kvcluster.synthetic_kv import SyntheticKV
from routing.block_hashing import BlockHasher
from routing.memory_registry import InMemoryRegistry


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyRegistry:
    """Fault injection as a wrapper: every call fails while ``down`` is set."""

    def __init__(self, inner: InMemoryRegistry) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise RegistryUnavailable("injected outage")
            return attr(*args, **kwargs)

        return call


def make_config(**cache: Any) -> KVClusterConfig:
    return KVClusterConfig.from_dict({
        "cache": {"num_blocks": 64, **cache},
        "tiers": {"cpu": {"capacity": "4MiB"}},
        "registry": {"index_stride_blocks": 1},
        "cluster": {"lease_ttl_s": 10},
    })


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> FlakyRegistry:
    return FlakyRegistry(InMemoryRegistry(make_config().registry, clock=clock))


def checked_engine(node_id: str, registry: FlakyRegistry, clock: FakeClock) -> Iterator[NodeEngine]:
    """A node without background threads, its invariants checked when the test ends."""
    engine = NodeEngine(node_id, make_config(), registry, clock=clock, start_background=False)  # type: ignore[arg-type]
    yield engine
    engine.check_invariants()
    engine.shutdown()


@pytest.fixture
def node(registry: FlakyRegistry, clock: FakeClock) -> Iterator[NodeEngine]:
    yield from checked_engine("n0", registry, clock)


@pytest.fixture
def kv_model() -> SyntheticKV:
    return SyntheticKV(make_config().model)


def store_all(node: NodeEngine, kv_model: SyntheticKV, tokens: np.ndarray, namespace: str = "default") -> None:
    node.store(tokens, KVPayload.from_tensor(kv_model.kv(tokens)), namespace)


def test_miss_then_exact_hit_and_fetch(node: NodeEngine, kv_model: SyntheticKV) -> None:
    tokens = np.arange(100, 200)
    assert node.lookup(tokens).matched_tokens == 0
    store_all(node, kv_model, tokens)
    reply = node.lookup(tokens)
    assert reply.matched_tokens == 100
    assert reply.blocks_per_tier == {"gpu": 7}
    assert reply.lease_id is not None
    kv = node.fetch(reply.lease_id).to_tensor()
    assert torch.equal(kv, kv_model.kv(tokens))
    assert node.release(reply.lease_id)
    assert not node.release(reply.lease_id)


def test_token_granular_match_and_store_continuation(node: NodeEngine, kv_model: SyntheticKV) -> None:
    base = np.arange(1000, 1100)
    store_all(node, kv_model, base)
    prompt = np.concatenate([base[:37], np.arange(5000, 5050)])  # diverges inside block 2
    reply = node.lookup(prompt)
    assert reply.matched_tokens == 37
    assert reply.lease_id is not None
    expected = kv_model.kv(prompt)
    assert torch.equal(node.fetch(reply.lease_id).to_tensor(), expected[:, :, :37])
    node.store(prompt, KVPayload.from_tensor(expected[:, :, 37:]), "default", reply.lease_id)
    node.release(reply.lease_id)
    again = node.lookup(prompt)
    assert again.matched_tokens == prompt.size
    assert again.lease_id is not None
    assert torch.equal(node.fetch(again.lease_id).to_tensor(), expected)
    node.release(again.lease_id)
    # The original prompt is untouched by the copy-on-write of its partial block.
    original = node.lookup(base)
    assert original.lease_id is not None
    assert torch.equal(node.fetch(original.lease_id).to_tensor(), kv_model.kv(base))
    node.release(original.lease_id)


def test_namespaces_never_share(node: NodeEngine, kv_model: SyntheticKV) -> None:
    tokens = np.arange(300, 364)
    store_all(node, kv_model, tokens, "tenant-a")
    assert node.lookup(tokens, "tenant-b").matched_tokens == 0
    reply = node.lookup(tokens, "tenant-a")
    assert reply.matched_tokens == 64
    assert reply.lease_id is not None
    with pytest.raises(LeaseError, match="tenant-a"):
        node.fetch(reply.lease_id, "tenant-b")
    node.release(reply.lease_id)


def test_lease_expires_and_unpins(node: NodeEngine, kv_model: SyntheticKV, clock: FakeClock) -> None:
    tokens = np.arange(10, 74)
    store_all(node, kv_model, tokens)
    reply = node.lookup(tokens)
    assert reply.lease_id is not None
    assert node.stats().leases == 1
    clock.now += 11
    with pytest.raises(LeaseError, match="expired"):
        node.fetch(reply.lease_id)
    assert node.stats().leases == 0


def test_leased_blocks_survive_pressure_and_evicted_blocks_spill(
    node: NodeEngine, kv_model: SyntheticKV
) -> None:
    leased = np.arange(20000, 20160)  # 10 blocks
    store_all(node, kv_model, leased)
    reply = node.lookup(leased)
    assert reply.lease_id is not None
    victim = np.arange(21000, 21160)
    store_all(node, kv_model, victim)
    for i in range(12):  # far more than the 64-block pool
        store_all(node, kv_model, np.arange(160) + 22000 + 200 * i)
    # The leased prefix stayed on the device; the victim was demoted to the host tier.
    assert torch.equal(node.fetch(reply.lease_id).to_tensor(), kv_model.kv(leased))
    node.release(reply.lease_id)
    node.drain_spills()  # evicted pages are written to the host tier by the spill writer
    spilled = node.lookup(victim)
    assert spilled.blocks_per_tier.get("cpu", 0) > 0
    assert spilled.matched_tokens == victim.size
    assert spilled.lease_id is not None
    assert torch.equal(node.fetch(spilled.lease_id).to_tensor(), kv_model.kv(victim))
    node.release(spilled.lease_id)
    stats = node.stats()
    assert stats.evictions["capacity"] > 0
    assert stats.tiers["cpu"]["pages_used"] > 0


def test_store_promotes_a_spilled_prefix(node: NodeEngine, kv_model: SyntheticKV) -> None:
    first = np.arange(25000, 25096)
    store_all(node, kv_model, first)
    for i in range(12):
        store_all(node, kv_model, np.arange(160) + 26000 + 200 * i)
    node.drain_spills()
    reply = node.lookup(np.concatenate([first, [7, 8, 9]]))
    assert reply.blocks_per_tier.get("cpu", 0) == 6
    full = np.concatenate([first, np.arange(30)])
    expected = kv_model.kv(full)
    node.store(full, KVPayload.from_tensor(expected[:, :, 96:]), "default", reply.lease_id)
    node.release(reply.lease_id)  # type: ignore[arg-type]
    again = node.lookup(full)
    assert again.blocks_per_tier.get("gpu", 0) >= 7
    assert again.lease_id is not None
    assert torch.equal(node.fetch(again.lease_id).to_tensor(), expected)
    node.release(again.lease_id)


@pytest.fixture
def peer(registry: FlakyRegistry, clock: FakeClock) -> Iterator[NodeEngine]:
    yield from checked_engine("n1", registry, clock)


def fetch_all(node: NodeEngine, tokens: np.ndarray) -> tuple[int, torch.Tensor]:
    reply = node.lookup(tokens)
    assert reply.lease_id is not None
    try:
        return reply.matched_tokens, node.fetch(reply.lease_id).to_tensor()
    finally:
        node.release(reply.lease_id)


@pytest.mark.parametrize("length", [16, 37, 100])
def test_exported_pages_import_bit_exact_on_a_peer(
    node: NodeEngine, peer: NodeEngine, kv_model: SyntheticKV, length: int
) -> None:
    tokens = np.arange(30000, 30000 + length)
    store_all(node, kv_model, tokens)
    pages = node.export_prefix(np.concatenate([tokens, [1, 2, 3]]))  # a longer prompt: its prefix
    assert pages is not None and pages.num_tokens == length
    assert len(pages.segments) == 1
    assert pages.rows().shape == (-(-length // 16), 16 * make_config().model.bytes_per_token)
    pages.segments[0].flags.writeable = False  # as it arrives from the object store
    reply = peer.import_prefix(tokens, pages)
    assert (reply.cached_tokens, reply.new_tokens) == (length, length)
    matched, kv = fetch_all(peer, tokens)
    assert matched == length and torch.equal(kv, kv_model.kv(tokens))
    assert node.stats().leases == 0  # the export's lease is released
    assert node.export_prefix(np.arange(7, 30)) is None


def test_a_pinned_export_is_a_view_of_the_pool_until_its_lease_is_released(
    node: NodeEngine, kv_model: SyntheticKV
) -> None:
    tokens = np.arange(23000, 23100)  # 7 blocks, the last partial
    store_all(node, kv_model, tokens)
    pool = node._engine.pages.pages.numpy()
    pages, lease_id = node.export_pinned(tokens)
    assert pages is not None and lease_id is not None and pages.num_tokens == 100
    assert all(np.shares_memory(segment, pool) for segment in pages.segments)  # no copy
    assert sum(segment.shape[0] for segment in pages.segments) == 7
    assert node.stats().leases == 1  # pinned until the caller has shipped them
    kept = pages.copied()
    assert node.release(lease_id) and node.stats().leases == 0
    assert len(kept.segments) == 1 and not np.shares_memory(kept.segments[0], pool)
    assert node.export_pinned(np.arange(5, 40)) == (None, None)


def test_pages_in_several_segments_import_bit_exact(
    node: NodeEngine, peer: NodeEngine, kv_model: SyntheticKV
) -> None:
    tokens = np.arange(21000, 21090)  # 6 blocks
    store_all(node, kv_model, tokens)
    rows = node.export_prefix(tokens)
    assert rows is not None
    whole = rows.rows()
    split = KVPages((whole[:1], whole[1:4], whole[4:]), rows.dtype, rows.page_shape, rows.num_tokens)
    peer.import_prefix(tokens, split)
    matched, kv = fetch_all(peer, tokens)
    assert matched == 90 and torch.equal(kv, kv_model.kv(tokens))


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ((), "non-empty tuple of 2-D uint8 arrays"),
        ((np.zeros((4, 8), dtype=np.float32),), "non-empty tuple of 2-D uint8 arrays"),
        ([np.zeros((4, 8), dtype=np.uint8)], "non-empty tuple of 2-D uint8 arrays"),
        ((np.zeros((2, 8), dtype=np.uint8), np.zeros((2, 9), dtype=np.uint8)), "different widths"),
    ],
)
def test_malformed_page_segments_are_refused_and_change_nothing(
    node: NodeEngine, peer: NodeEngine, kv_model: SyntheticKV, segments: Any, message: str
) -> None:
    tokens = np.arange(22000, 22064)
    store_all(node, kv_model, tokens)
    pages = node.export_prefix(tokens)
    assert pages is not None
    before = peer.stats()
    with pytest.raises(InvalidKV, match=message):
        peer.import_prefix(tokens, KVPages(segments, pages.dtype, pages.page_shape, 64))
    assert peer.stats() == before


def test_export_includes_spilled_pages(node: NodeEngine, peer: NodeEngine, kv_model: SyntheticKV) -> None:
    first = np.arange(25000, 25096)
    store_all(node, kv_model, first)
    for i in range(12):  # push ``first`` out to the host tier
        store_all(node, kv_model, np.arange(160) + 26000 + 200 * i)
    node.drain_spills()
    spilled = node.lookup(first)
    assert spilled.blocks_per_tier.get("cpu", 0) == 6 and spilled.lease_id is not None
    node.release(spilled.lease_id)
    pages = node.export_prefix(first)
    assert pages is not None and pages.num_tokens == 96
    peer.import_prefix(first, pages)
    matched, kv = fetch_all(peer, first)
    assert matched == 96 and torch.equal(kv, kv_model.kv(first))


def test_import_refuses_pages_that_do_not_fit(node: NodeEngine, peer: NodeEngine, kv_model: SyntheticKV) -> None:
    tokens = np.arange(500, 564)
    store_all(node, kv_model, tokens)
    pages = node.export_prefix(tokens)
    assert pages is not None
    before = peer.stats()
    with pytest.raises(InvalidKV, match=r"pages of float32 \(2, 2, 8, 2, 16\) do not fit a cache of float32 \(2, 2, 16, 2, 16\)"):
        peer.import_prefix(tokens, KVPages(pages.segments, pages.dtype, (2, 2, 8, 2, 16), 64))
    with pytest.raises(InvalidKV, match="pages hold 64 tokens of a 10-token prompt"):
        peer.import_prefix(tokens[:10], pages)
    with pytest.raises(InvalidKV, match="import_prefix takes KVPages, got KVPayload"):
        peer.import_prefix(tokens, KVPayload.from_tensor(kv_model.kv(tokens)))  # type: ignore[arg-type]
    assert peer.stats() == before


def test_bad_tokens_change_nothing(node: NodeEngine, kv_model: SyntheticKV) -> None:
    before = node.stats()
    for bad in ([], [1.5, 2.0], [-1, 3], [10**9]):
        with pytest.raises(InvalidTokens):
            node.lookup(bad)
    assert node.stats() == before


def test_published_blocks_are_found_by_the_registry(
    node: NodeEngine, kv_model: SyntheticKV, registry: FlakyRegistry
) -> None:
    tokens = np.arange(30000, 30080)  # 5 full blocks
    store_all(node, kv_model, tokens)
    config = make_config()
    hasher = BlockHasher(config.hashing.algorithm, 16, b"", config.model.fingerprint())
    holding = registry.inner.longest_prefix(hasher.hash_chain(tokens))
    assert holding["n0"].num_blocks == 5
    assert holding["n0"].gpu_blocks == 5


def test_evicted_blocks_are_published_on_their_spill_tier_or_removed(
    registry: FlakyRegistry, clock: FakeClock, kv_model: SyntheticKV
) -> None:
    # A host tier of 8 pages: of a 10-block prefix pushed out of a 64-block pool, the spill
    # keeps what fits and the registry hears of every block, kept or not.
    config = KVClusterConfig.from_dict({
        "cache": {"num_blocks": 64}, "tiers": {"cpu": {"capacity": f"{8 * 16 * 512}B"}},
        "registry": {"index_stride_blocks": 1},
    })
    node = NodeEngine("n0", config, registry, clock=clock, start_background=False)  # type: ignore[arg-type]
    try:
        hasher = BlockHasher(config.hashing.algorithm, 16, b"", config.model.fingerprint())
        victim = np.arange(20000, 20160)  # 10 blocks
        store_all(node, kv_model, victim)
        for i in range(6):
            store_all(node, kv_model, np.arange(160) + 22000 + 200 * i)
        node.drain_spills()
        holding = registry.inner.longest_prefix(hasher.hash_chain(victim)).get("n0")
        kept = node.lookup(victim)
        assert kept.lease_id is not None
        node.release(kept.lease_id)
        assert holding is not None and holding.num_blocks == kept.matched_tokens // 16
        assert holding.gpu_blocks == kept.blocks_per_tier.get("gpu", 0)
        assert holding.cpu_blocks == kept.blocks_per_tier.get("cpu", 0) > 0
        node.check_invariants()
    finally:
        node.shutdown()


def test_a_failed_spill_is_published_as_removed_and_later_spills_go_on(
    registry: FlakyRegistry, clock: FakeClock, kv_model: SyntheticKV, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = KVClusterConfig.from_dict({
        "cache": {"num_blocks": 64}, "tiers": {"cpu": {"capacity": "4MiB"}}, "registry": {"index_stride_blocks": 1},
    })
    node = NodeEngine("n0", config, registry, clock=clock, start_background=False)  # type: ignore[arg-type]
    try:
        assert node._spill is not None
        real_spill_many = node._spill.spill_many
        calls = []

        def failing_once(*args: Any) -> Any:
            calls.append(len(args[0]))
            if len(calls) == 1:
                raise TierIOError("injected: the host tier failed")
            return real_spill_many(*args)

        monkeypatch.setattr(node._spill, "spill_many", failing_once)
        hasher = BlockHasher(config.hashing.algorithm, 16, b"", config.model.fingerprint())
        first = np.arange(10000, 10160)  # 10 blocks, the oldest in a 64-block pool
        store_all(node, kv_model, first)
        for i in range(6):  # 60 more blocks: the 7th store evicts first's last 6 (the failing spill)
            store_all(node, kv_model, np.arange(160) + 12000 + 200 * i)
        store_all(node, kv_model, np.arange(160) + 14000)  # and the next one its first 4
        node.drain_spills()
        assert calls == [6, 10]
        holding = registry.inner.longest_prefix(hasher.hash_chain(first)).get("n0")
        assert holding is not None and (holding.num_blocks, holding.cpu_blocks) == (4, 4)  # the 6 were removed
        kept = node.lookup(first)
        assert (kept.matched_tokens, kept.blocks_per_tier) == (64, {"gpu": 0, "cpu": 4})
        assert kept.lease_id is not None
        node.release(kept.lease_id)
        node.check_invariants()
    finally:
        node.shutdown()


def test_drain_spills_waits_for_the_demotions_the_spills_set_off(
    registry: FlakyRegistry, clock: FakeClock, kv_model: SyntheticKV, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A host tier of 16 pages that demotes to NVMe above half full: once drain_spills returns,
    # the pages it moved are on NVMe, with no move left running (a restart would find them).
    config = KVClusterConfig.from_dict({
        "cache": {"num_blocks": 64},
        "tiers": {"cpu": {"capacity": f"{16 * 16 * 512}B"},
                  "nvme": {"enabled": True, "paths": [str(tmp_path)], "capacity": "4MiB", "io_threads": 1},
                  "high_watermark": 0.5, "low_watermark": 0.25},
        "registry": {"index_stride_blocks": 1},
    })
    node = NodeEngine("n0", config, registry, clock=clock, start_background=False)  # type: ignore[arg-type]
    assert node._spill is not None
    store = node._spill.store
    execute = store._execute

    def slow_move(plan: Any) -> Any:  # moves that take a while, as on a busy disk
        time.sleep(0.1)
        return execute(plan)

    monkeypatch.setattr(store, "_execute", slow_move)
    try:
        for i in range(8):
            store_all(node, kv_model, np.arange(160) + 10000 + 200 * i)
        assert node.drain_spills(timeout_s=30)
        assert store.wait_idle(timeout=0)  # nothing still moving
        assert node.stats().tiers["nvme"]["pages_used"] > 0
    finally:
        node.shutdown()


def test_registry_outage_is_counted_and_repaired_by_resync(
    node: NodeEngine, kv_model: SyntheticKV, registry: FlakyRegistry
) -> None:
    config = make_config()
    hasher = BlockHasher(config.hashing.algorithm, 16, b"", config.model.fingerprint())
    registry.down = True
    tokens = np.arange(31000, 31064)
    store_all(node, kv_model, tokens)  # serving continues while the registry is down
    assert node.stats().registry_errors >= 1
    assert node.lookup(tokens).matched_tokens == 64
    registry.down = False
    node._publisher.tick()  # the maintenance thread's step: re-register and re-announce
    holding = registry.inner.longest_prefix(hasher.hash_chain(tokens))
    assert holding["n0"].num_blocks == 4
    assert node.identity().epoch == 2  # a new epoch fenced off whatever the outage lost


def test_a_store_the_index_skips_publishes_nothing(registry: FlakyRegistry, clock: FakeClock,
                                                   kv_model: SyntheticKV) -> None:
    # Below min_prefix_tokens the index caches nothing: the registry must not hear of it,
    # or the router would send the prefix here for a match the node never gives.
    config = KVClusterConfig.from_dict({
        "cache": {"num_blocks": 64, "eviction": {"min_prefix_tokens": 64}},
        "tiers": {"cpu": {"capacity": "4MiB"}}, "registry": {"index_stride_blocks": 1},
    })
    node = NodeEngine("n0", config, registry, clock=clock, start_background=False)  # type: ignore[arg-type]
    try:
        hasher = BlockHasher(config.hashing.algorithm, 16, b"", config.model.fingerprint())
        short = np.arange(4000, 4032)  # 2 full blocks, under the 64-token minimum
        reply = node.store(short, KVPayload.from_tensor(kv_model.kv(short)))
        assert (reply.new_tokens, reply.published_blocks) == (0, 0)
        assert node.lookup(short).matched_tokens == 0
        assert registry.inner.longest_prefix(hasher.hash_chain(short)) == {}
        longer = np.arange(4100, 4164)  # at the minimum: cached and published
        assert node.store(longer, KVPayload.from_tensor(kv_model.kv(longer))).published_blocks == 4
        assert registry.inner.longest_prefix(hasher.hash_chain(longer))["n0"].num_blocks == 4
        node.check_invariants()
    finally:
        node.shutdown()


@pytest.mark.parametrize("on_device", [0, 32])
def test_an_export_whose_first_spilled_page_is_corrupt_stops_before_it(
    node: NodeEngine, peer: NodeEngine, kv_model: SyntheticKV, monkeypatch: pytest.MonkeyPatch,
    on_device: int,
) -> None:
    first = np.arange(25000, 25096)  # 6 blocks
    store_all(node, kv_model, first)
    for i in range(12):  # push ``first`` out to the host tier
        store_all(node, kv_model, np.arange(160) + 26000 + 200 * i)
    node.drain_spills()
    if on_device:  # its head back on the device: the export is device pages, then spilled ones
        store_all(node, kv_model, first[:on_device])
    assert node._spill is not None

    def corrupt(key: int) -> torch.Tensor:
        raise PageCorrupt(f"injected: page {key} failed its checksum")

    monkeypatch.setattr(node._spill, "read", corrupt)
    pages = node.export_prefix(first)  # a fault: a shorter export (or none), never an error
    assert node.stats().leases == 0
    if not on_device:
        assert pages is None
        return
    assert pages is not None and pages.num_tokens == on_device
    peer.import_prefix(first, pages)
    matched, kv = fetch_all(peer, first)
    assert matched == on_device and torch.equal(kv, kv_model.kv(first)[:, :, :on_device])


def test_blocks_evicted_by_a_store_over_the_memory_budget_spill_intact(
    registry: FlakyRegistry, clock: FakeClock, kv_model: SyntheticKV
) -> None:
    # The index enforces its memory budget inside the insert itself: the pages it evicts
    # must be copied out before their blocks are reused, or a wrong page is spilled.
    config = KVClusterConfig.from_dict({
        "cache": {"num_blocks": 64, "eviction": {"memory_budget_bytes": 10 * 16 * 512}},
        "tiers": {"cpu": {"capacity": "4MiB"}}, "registry": {"index_stride_blocks": 1},
    })
    node = NodeEngine("n0", config, registry, clock=clock, start_background=False)  # type: ignore[arg-type]
    try:
        first = np.arange(1000, 1160)  # 10 blocks: the whole budget
        store_all(node, kv_model, first)
        for i in range(3):  # each store pushes older blocks out of the budget
            store_all(node, kv_model, np.arange(160) + 2000 + 200 * i)
        node.drain_spills()
        reply = node.lookup(first)
        assert reply.matched_tokens == 160 and reply.blocks_per_tier.get("cpu", 0) > 0
        assert reply.lease_id is not None
        assert torch.equal(node.fetch(reply.lease_id).to_tensor(), kv_model.kv(first))
        node.release(reply.lease_id)
        node.check_invariants()
    finally:
        node.shutdown()


def _small_host_tier_node(registry: FlakyRegistry, clock: FakeClock, pages: int) -> NodeEngine:
    config = KVClusterConfig.from_dict({
        "cache": {"num_blocks": 64}, "tiers": {"cpu": {"capacity": f"{pages * 16 * 512}B"}},
        "registry": {"index_stride_blocks": 1},
    })
    return NodeEngine("n0", config, registry, clock=clock, start_background=False)  # type: ignore[arg-type]


def _registered(registry: FlakyRegistry, node: NodeEngine, tokens: np.ndarray) -> tuple[int, int, int]:
    """(blocks, on gpu, on cpu) of ``tokens``' chain that the registry credits to ``node``."""
    config = make_config()
    hasher = BlockHasher(config.hashing.algorithm, 16, b"", config.model.fingerprint())
    holding = registry.inner.longest_prefix(hasher.hash_chain(tokens)).get(node.node_id)
    return (0, 0, 0) if holding is None else (holding.num_blocks, holding.gpu_blocks, holding.cpu_blocks)


def _assert_registry_matches_lookups(registry: FlakyRegistry, node: NodeEngine, prompts: list[np.ndarray]) -> None:
    for tokens in prompts:
        held = node.lookup(tokens)
        if held.lease_id is not None:
            node.release(held.lease_id)
        tiers = held.blocks_per_tier
        assert _registered(registry, node, tokens) == (
            held.matched_tokens // 16, tiers.get("gpu", 0), tiers.get("cpu", 0)
        ), tokens[0]


def test_spilled_blocks_the_host_tier_discards_for_room_are_unregistered(
    registry: FlakyRegistry, clock: FakeClock, kv_model: SyntheticKV
) -> None:
    # A full host tier makes room for each new spill by discarding its coldest pages: the
    # registry must stop crediting the node with them (it used to until the entry TTL, 1 h).
    node = _small_host_tier_node(registry, clock, pages=8)
    try:
        prompts = [np.arange(160) + 20000 + 200 * i for i in range(12)]  # 10 blocks each
        for tokens in prompts:
            store_all(node, kv_model, tokens)
        node.drain_spills()
        node._maintain()
        assert node.stats().dropped_spills > 0
        _assert_registry_matches_lookups(registry, node, prompts)
        node.check_invariants()
    finally:
        node.shutdown()


def test_a_block_stored_again_before_its_spill_is_written_stays_registered_on_the_device(
    registry: FlakyRegistry, clock: FakeClock, kv_model: SyntheticKV, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The spill writer runs after the call that evicted: if the prefix is stored again
    # before the writer gets to it, its late moved (or, failing, removed) event must not
    # overwrite the stored event the second store published.
    node = _small_host_tier_node(registry, clock, pages=64)
    try:
        assert node._spill is not None
        real_spill_many = node._spill.spill_many
        go, failing = threading.Event(), [False]

        def held_back(*args: Any) -> Any:
            assert go.wait(10)
            if failing[0]:
                raise TierIOError("injected: the host tier failed")
            return real_spill_many(*args)

        monkeypatch.setattr(node._spill, "spill_many", held_back)
        for attempt, fail in enumerate([False, True]):
            go.clear()
            failing[0] = fail
            first = np.arange(160) + 10000 + 3000 * attempt  # 10 blocks, the oldest in the pool
            store_all(node, kv_model, first)
            for i in range(6):  # the 7th store evicts first's last 6 (the spill is held back)
                store_all(node, kv_model, np.arange(160) + 11000 + 3000 * attempt + 200 * i)
            store_all(node, kv_model, first)  # first back on the device, in full
            go.set()
            node.drain_spills()
            assert _registered(registry, node, first) == (10, 10, 0), f"spill failing: {fail}"
        node.check_invariants()
    finally:
        node.shutdown()


def test_a_spilled_page_found_corrupt_is_unregistered(
    registry: FlakyRegistry, clock: FakeClock, kv_model: SyntheticKV, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _small_host_tier_node(registry, clock, pages=64)
    try:
        prompts = [np.arange(160) + 25000 + 200 * i for i in range(8)]
        for tokens in prompts:
            store_all(node, kv_model, tokens)
        node.drain_spills()
        first = prompts[0]
        assert _registered(registry, node, first)[2] > 0  # on the host tier
        spill = node._spill
        assert spill is not None
        real_get = spill.store.get

        def corrupt_once(key: int, out: torch.Tensor | None = None) -> torch.Tensor:
            # What the tiers do with a page that fails its checksum: drop it, then raise.
            monkeypatch.setattr(spill.store, "get", real_get)
            while spill.store.pins(key):  # dropped with its pins, as _drop_corrupt does
                spill.store.unpin([key])
            spill.store.discard(key)
            raise PageCorrupt(f"injected: page {key} failed its checksum")

        monkeypatch.setattr(spill.store, "get", corrupt_once)
        _, kv = fetch_all(node, first)  # the K/V stops short at the corrupt page
        assert kv.shape[2] < 160
        node._maintain()
        assert node.stats().dropped_spills >= 1
        _assert_registry_matches_lookups(registry, node, prompts)
    finally:
        node.shutdown()


def _chain(tokens: np.ndarray) -> list[bytes]:
    config = make_config()
    return BlockHasher(config.hashing.algorithm, 16, b"", config.model.fingerprint()).hash_chain(tokens).tolist()


def _on_device_and_spilled(node: NodeEngine, kv_model: SyntheticKV, first: np.ndarray,
                           monkeypatch: pytest.MonkeyPatch, base: int) -> None:
    """Leave ``first``'s last 6 blocks both on the device and in the host tier: evicted with
    the spill writer held back, stored again, then written (the spill of a block held again)."""
    assert node._spill is not None
    real_spill_many = node._spill.spill_many
    go = threading.Event()

    def held_back(*args: Any) -> Any:
        assert go.wait(10)
        return real_spill_many(*args)

    monkeypatch.setattr(node._spill, "spill_many", held_back)
    store_all(node, kv_model, first)
    for i in range(6):  # the 7th store evicts first's last 6
        store_all(node, kv_model, np.arange(160) + base + 200 * i)
    store_all(node, kv_model, first)
    go.set()
    node.drain_spills()
    monkeypatch.setattr(node._spill, "spill_many", real_spill_many)


def test_a_dropped_spill_of_a_block_on_its_way_to_the_tiers_again_stays_registered(
    registry: FlakyRegistry, clock: FakeClock, kv_model: SyntheticKV, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A block's old spilled copy is discarded for room while the block is on the device; the
    # call that evicts the block again unregisters the drop. The new spill's moved event comes
    # after that removal, and a moved event does not bring a removed entry back: the block, in
    # the host tier again, must stay registered.
    node = _small_host_tier_node(registry, clock, pages=56)
    try:
        assert node._spill is not None
        first = np.arange(160) + 2000
        _on_device_and_spilled(node, kv_model, first, monkeypatch, base=3000)
        for i in range(5):  # 50 blocks more to spill: the last ones discard the coldest, first's
            store_all(node, kv_model, np.arange(160) + 5000 + 200 * i)
            node.drain_spills()
        tail = _chain(first)[4:]
        assert _registered(registry, node, first) == (10, 10, 0)
        assert all(node._block_keys.holds(key) for key in tail)
        assert {record.block_hash for record in node._dropped_spills} >= set(tail)
        store_all(node, kv_model, np.arange(160) + 7500)  # evicts first's last 6, spilled anew
        node.drain_spills()
        node._maintain()
        held = node.lookup(first)
        assert held.lease_id is not None and node.release(held.lease_id)
        assert held.blocks_per_tier == {"gpu": 4, "cpu": 6}
        _assert_registry_matches_lookups(registry, node, [first])
    finally:
        node.shutdown()


def test_a_failed_spill_of_a_block_evicted_again_since_does_not_unregister_it(
    registry: FlakyRegistry, clock: FakeClock, kv_model: SyntheticKV, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Evicted, stored again and evicted again before the writer gets to the first eviction:
    # the first spill's outcome is stale. A failed first spill must not unregister the block
    # that the second spill keeps (its moved event cannot bring the entry back).
    node = _small_host_tier_node(registry, clock, pages=64)
    try:
        assert node._spill is not None
        real_spill_many = node._spill.spill_many
        go, calls = threading.Event(), [0]

        def first_fails(*args: Any) -> Any:
            assert go.wait(10)
            calls[0] += 1
            if calls[0] == 1:
                raise TierIOError("injected: the host tier failed")
            return real_spill_many(*args)

        monkeypatch.setattr(node._spill, "spill_many", first_fails)
        first = np.arange(160) + 8000
        store_all(node, kv_model, first)
        for i in range(6):  # the 7th store evicts first's last 6 (the spill is held back)
            store_all(node, kv_model, np.arange(160) + 9000 + 200 * i)
        store_all(node, kv_model, first)  # back on the device
        for i in range(6):  # and evicted again: first is the coldest now
            store_all(node, kv_model, np.arange(160) + 16000 + 200 * i)
        assert not any(node._block_keys.holds(key) for key in _chain(first)[4:])
        go.set()
        node.drain_spills()
        node._maintain()
        held = node.lookup(first)
        assert held.blocks_per_tier.get("cpu", 0) > 0
        if held.lease_id is not None:
            node.release(held.lease_id)
        _assert_registry_matches_lookups(registry, node, [first])
    finally:
        node.shutdown()
