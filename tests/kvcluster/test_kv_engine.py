"""PagedKVEngine: block tables, K/V round trips, fork + copy-on-write, admission, bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kvcluster.core.kv_engine import EngineStats, PagedKVEngine, SequenceId
from kvcluster.errors import (
    CapacityError,
    ContextTooLong,
    InvalidArgument,
    InvalidKV,
    InvalidTokens,
    UnknownSequence,
)
from kvcluster.model_spec import PRESETS, ModelSpec

TINY = PRESETS["tiny-llama"]  # 2 layers, 2 KV heads, head_dim 16, float32, vocab 32000
# 16 bytes per token: long sequences stay cheap.
NARROW = ModelSpec(
    name="narrow", num_layers=1, num_attention_heads=2, num_kv_heads=1, head_dim=2,
    hidden_size=8, intermediate_size=8, vocab_size=1000, dtype="float32",
)


def make_kv(spec: ModelSpec, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, spec.kv_components, n, spec.kv_heads_per_rank, spec.kv_head_dim)
    return torch.randn(shape, generator=g).to(spec.torch_dtype)


def snapshot(engine: PagedKVEngine) -> dict[str, Any]:
    """Everything observable about the engine's state."""
    return {
        "free": engine.pool.num_free,
        "refs": engine.pool.ref_counts_view().copy(),
        "free_stack": engine.pool._free_stack[: engine.pool.num_free].copy(),
        "seqs": {
            s: (engine.tokens(s).tolist(), engine.block_table(s).tolist())
            for s in engine.sequence_ids()
        },
        "stats": engine.stats(),
        "pages": engine.pages.pages.clone(),
        "fill": engine.pages.rows_filled.copy(),
    }


def assert_same_state(before: dict[str, Any], engine: PagedKVEngine) -> None:
    after = snapshot(engine)
    assert after["free"] == before["free"]
    np.testing.assert_array_equal(after["refs"], before["refs"])
    np.testing.assert_array_equal(after["free_stack"], before["free_stack"])
    assert after["seqs"] == before["seqs"]
    assert after["stats"] == before["stats"]
    assert torch.equal(after["pages"], before["pages"])
    np.testing.assert_array_equal(after["fill"], before["fill"])
    engine.check_invariants()


@pytest.fixture
def engine() -> PagedKVEngine:
    return PagedKVEngine(TINY, block_size=16, num_blocks=32)


# --- construction ----------------------------------------------------------------------------


def test_construction_shapes_and_defaults() -> None:
    e = PagedKVEngine(TINY, num_blocks=8)
    assert e.block_size == 16
    assert e.max_context == 32768
    assert e.spec is TINY
    assert tuple(e.pages.pages.shape) == (8, 2, 2, 16, 2, 16)
    assert e.pool.num_free == 8
    assert e.num_sequences() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_blocks": 0},
        {"num_blocks": 4, "block_size": 0},
        {"num_blocks": 4, "max_context": 0},
        {"num_blocks": 4, "max_context": 131073},
    ],
)
def test_construction_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        PagedKVEngine(TINY, **kwargs)


def test_max_context_configurable_to_131072() -> None:
    assert PagedKVEngine(NARROW, num_blocks=4, max_context=131072).max_context == 131072


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 15, 16, 17, 32, 40])
def test_create_and_read_back(engine: PagedKVEngine, n: int) -> None:
    kv = make_kv(TINY, n)
    tokens = list(range(100, 100 + n))
    seq = engine.create_sequence(tokens, kv)
    assert engine.num_tokens(seq) == n
    assert engine.tokens(seq).tolist() == tokens
    assert engine.tokens(seq).dtype == np.int64
    table = engine.block_table(seq)
    assert table.tolist() == list(range(-(-n // 16)))  # fresh pool hands out 0, 1, 2, ...
    assert torch.equal(engine.read_kv(seq), kv)
    assert torch.equal(engine.read_kv(seq, 3 % n, n), kv[:, :, 3 % n :])
    k, v = engine.read_kv_layer(seq, 1)
    assert torch.equal(k, kv[1, 0]) and torch.equal(v, kv[1, 1])
    engine.check_invariants()


def test_decode_appends_one_token_at_a_time(engine: PagedKVEngine) -> None:
    seq = engine.create_sequence()
    assert engine.num_tokens(seq) == 0
    assert engine.block_table(seq).size == 0
    chunks = [make_kv(TINY, 1, seed=i) for i in range(50)]
    for i, kv in enumerate(chunks):
        engine.append(seq, [i], kv)
    assert engine.tokens(seq).tolist() == list(range(50))
    assert engine.block_table(seq).size == 4
    assert torch.equal(engine.read_kv(seq), torch.cat(chunks, dim=2))
    engine.check_invariants()


def test_mixed_chunk_appends(engine: PagedKVEngine) -> None:
    seq = engine.create_sequence([1, 2, 3], make_kv(TINY, 3, 1))
    parts = [make_kv(TINY, 3, 1)]
    for i, n in enumerate([13, 16, 5, 40, 1]):
        kv = make_kv(TINY, n, seed=10 + i)
        engine.append(seq, np.arange(n), kv)
        parts.append(kv)
    assert engine.num_tokens(seq) == 78
    assert torch.equal(engine.read_kv(seq), torch.cat(parts, dim=2))
    assert torch.equal(engine.read_kv(seq, 20, 50), torch.cat(parts, dim=2)[:, :, 20:50])
    engine.check_invariants()


def test_empty_append_is_a_no_op(engine: PagedKVEngine) -> None:
    seq = engine.create_sequence([1], make_kv(TINY, 1))
    before = snapshot(engine)
    engine.append(seq, [], make_kv(TINY, 0))
    assert_same_state(before, engine)


def test_numpy_integer_sequence_ids_are_accepted(engine: PagedKVEngine) -> None:
    seq = engine.create_sequence([1, 2], make_kv(TINY, 2))
    assert engine.num_tokens(np.int64(seq)) == 2  # type: ignore[arg-type]


def test_returned_arrays_are_copies(engine: PagedKVEngine) -> None:
    kv = make_kv(TINY, 20)
    seq = engine.create_sequence(list(range(20)), kv)
    engine.tokens(seq)[0] = 999
    engine.block_table(seq)[0] = 31
    engine.read_kv(seq).zero_()
    assert engine.tokens(seq)[0] == 0
    assert engine.block_table(seq)[0] == 0
    assert torch.equal(engine.read_kv(seq), kv)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "fp8_e4m3", "fp8_e5m2", "int8"])
def test_every_cache_dtype_round_trips_bit_exact(dtype: str) -> None:
    spec = TINY.model_copy(update={"dtype": dtype})
    e = PagedKVEngine(spec, num_blocks=8)
    kv = (torch.randn(2, 2, 21, 2, 16) * 4).to(spec.torch_dtype)
    seq = e.create_sequence(list(range(21)), kv)
    extra = (torch.randn(2, 2, 5, 2, 16) * 4).to(spec.torch_dtype)
    e.append(seq, list(range(5)), extra)
    out = e.read_kv(seq)
    assert out.dtype == spec.torch_dtype
    expected = torch.cat([kv, extra], dim=2)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


def test_mla_spec_stores_one_component() -> None:
    spec = ModelSpec(
        name="mla-tiny", num_layers=2, num_attention_heads=4, num_kv_heads=4, head_dim=8,
        hidden_size=32, intermediate_size=32, vocab_size=100, dtype="float32",
        kv_lora_rank=12, qk_rope_head_dim=4,
    )
    e = PagedKVEngine(spec, num_blocks=4)
    kv = make_kv(spec, 9)
    assert kv.shape == (2, 1, 9, 1, 16)
    seq = e.create_sequence(list(range(9)), kv)
    k, v = e.read_kv_layer(seq, 0)
    assert torch.equal(k, kv[0, 0]) and torch.equal(v, kv[0, 0])


# --- long sequences --------------------------------------------------------------------------


def test_32k_sequence_in_one_call_and_by_chunks() -> None:
    e = PagedKVEngine(NARROW, num_blocks=4096)
    n = 32768
    kv = make_kv(NARROW, n)
    tokens = np.arange(n) % NARROW.vocab_size
    seq = e.create_sequence(tokens, kv)
    assert e.block_table(seq).size == 2048
    assert torch.equal(e.read_kv(seq), kv)
    with pytest.raises(ContextTooLong, match="32768"):
        e.append(seq, [1], make_kv(NARROW, 1))
    other = e.create_sequence()
    for start in range(0, n, 4096 + 7):
        stop = min(n, start + 4096 + 7)
        e.append(other, tokens[start:stop], kv[:, :, start:stop])
    assert torch.equal(e.read_kv(other), kv)
    np.testing.assert_array_equal(e.tokens(other), tokens)
    e.check_invariants()


def test_131k_sequence() -> None:
    n = 131072
    e = PagedKVEngine(NARROW, num_blocks=n // 16 + 1, max_context=n)
    kv = make_kv(NARROW, n)
    tokens = np.arange(n) % NARROW.vocab_size
    seq = e.create_sequence(tokens[:100_000], kv[:, :, :100_000])
    e.append(seq, tokens[100_000:], kv[:, :, 100_000:])
    assert e.num_tokens(seq) == n
    assert e.block_table(seq).size == 8192
    assert torch.equal(e.read_kv(seq), kv)
    assert torch.equal(e.read_kv(seq, n - 5), kv[:, :, n - 5 :])
    with pytest.raises(ContextTooLong, match="131072"):
        e.append(seq, [0], make_kv(NARROW, 1))
    with pytest.raises(ContextTooLong):
        e.create_sequence(np.zeros(n + 1, dtype=np.int64), make_kv(NARROW, n + 1))
    e.check_invariants()
    e.free(seq)
    assert e.pool.num_free == e.pool.num_blocks


def test_ten_thousand_concurrent_sequences() -> None:
    e = PagedKVEngine(NARROW, num_blocks=10_000)
    kv = make_kv(NARROW, 5)
    ids = [e.create_sequence([1, 2, 3, 4, 5], kv) for _ in range(10_000)]
    assert e.num_sequences() == 10_000
    assert e.pool.num_free == 0
    assert len(set(ids)) == 10_000
    assert not e.can_allocate(1)
    e.check_invariants()
    assert torch.equal(e.read_kv(ids[-1]), kv)
    for seq in ids:
        e.free(seq)
    assert e.pool.num_free == 10_000


# --- fork and copy-on-write ------------------------------------------------------------------


def test_fork_shares_every_block(engine: PagedKVEngine) -> None:
    kv = make_kv(TINY, 40)
    parent = engine.create_sequence(list(range(40)), kv)
    free_before = engine.pool.num_free
    child = engine.fork(parent)
    assert child != parent
    assert engine.pool.num_free == free_before
    assert engine.block_table(child).tolist() == engine.block_table(parent).tolist()
    assert engine.pool.ref_counts(engine.block_table(parent)).tolist() == [2, 2, 2]
    assert engine.tokens(child).tolist() == list(range(40))
    assert torch.equal(engine.read_kv(child), kv)
    engine.check_invariants()


def test_append_into_shared_partial_block_copies_it(engine: PagedKVEngine) -> None:
    kv = make_kv(TINY, 20)
    parent = engine.create_sequence(list(range(20)), kv)  # blocks [0, 1], block 1 holds 4 rows
    child = engine.fork(parent)
    assert engine.blocks_needed(child, 1) == 1  # the copy
    assert engine.blocks_needed(child, 13) == 2  # the copy + one more block
    extra = make_kv(TINY, 3, seed=5)
    engine.append(child, [7, 8, 9], extra)
    assert engine.block_table(child).tolist() == [0, 2]
    assert engine.block_table(parent).tolist() == [0, 1]
    assert engine.pool.ref_counts([0, 1, 2]).tolist() == [2, 1, 1]
    assert engine.stats().cow_copies == 1
    assert torch.equal(engine.read_kv(child), torch.cat([kv, extra], dim=2))
    assert torch.equal(engine.read_kv(parent), kv)  # the parent's page was not touched
    # The parent now holds block 1 alone: it appends in place, no copy.
    assert engine.blocks_needed(parent, 1) == 0
    more = make_kv(TINY, 2, seed=6)
    engine.append(parent, [1, 2], more)
    assert engine.block_table(parent).tolist() == [0, 1]
    assert engine.stats().cow_copies == 1
    assert torch.equal(engine.read_kv(parent), torch.cat([kv, more], dim=2))
    assert torch.equal(engine.read_kv(child), torch.cat([kv, extra], dim=2))
    engine.check_invariants()


def test_full_blocks_are_never_copied(engine: PagedKVEngine) -> None:
    kv = make_kv(TINY, 32)
    parent = engine.create_sequence(list(range(32)), kv)
    child = engine.fork(parent)
    assert engine.blocks_needed(child, 1) == 1
    extra = make_kv(TINY, 1, seed=3)
    engine.append(child, [5], extra)
    assert engine.block_table(child).tolist() == [0, 1, 2]
    assert engine.stats().cow_copies == 0
    assert torch.equal(engine.read_kv(child), torch.cat([kv, extra], dim=2))
    assert torch.equal(engine.read_kv(parent), kv)


def test_fork_of_fork_and_free_in_any_order(engine: PagedKVEngine) -> None:
    kv = make_kv(TINY, 10)
    a = engine.create_sequence(list(range(10)), kv)
    b = engine.fork(a)
    c = engine.fork(b)
    assert engine.pool.ref_count(0) == 3
    engine.free(b)
    assert engine.pool.ref_count(0) == 2
    engine.append(c, [1], make_kv(TINY, 1, 9))
    assert engine.stats().cow_copies == 1
    engine.free(a)
    engine.free(c)
    assert engine.pool.num_free == 32
    engine.check_invariants()


def test_create_with_shared_prefix_blocks(engine: PagedKVEngine) -> None:
    kv = make_kv(TINY, 40)
    donor = engine.create_sequence(list(range(40)), kv)
    table = engine.block_table(donor)
    # Reuse 20 tokens: one full block and 4 rows of the second (a shared partial block).
    extra = make_kv(TINY, 6, seed=2)
    seq = engine.create_sequence(
        [*range(20), 1, 2, 3, 4, 5, 6], extra, shared_blocks=table[:2], shared_tokens=20
    )
    new_table = engine.block_table(seq)
    assert new_table[0] == table[0]
    assert new_table[1] not in table.tolist()  # copied, not written into the donor's page
    assert engine.stats().cow_copies == 1
    assert torch.equal(engine.read_kv(seq), torch.cat([kv[:, :, :20], extra], dim=2))
    assert torch.equal(engine.read_kv(donor), kv)
    assert engine.pool.ref_counts(table).tolist() == [2, 1, 1]
    engine.check_invariants()


@pytest.mark.parametrize("length", [1, 16, 40, 48])
def test_whole_pages_round_trip_between_engines(length: int) -> None:
    source = PagedKVEngine(TINY, block_size=16, num_blocks=32)
    target = PagedKVEngine(TINY, block_size=16, num_blocks=32)
    scatter = target.create_sequence(list(range(16)), make_kv(TINY, 16, seed=3))  # offsets the run
    kv = make_kv(TINY, length, seed=4)
    seq = source.create_sequence(list(range(length)), kv)
    rows = source.pages.gather_pages(source.block_table(seq))
    assert rows.shape == (-(-length // 16), source.pages.page_bytes) and rows.dtype == np.uint8
    rows.flags.writeable = False  # as it arrives from Ray's object store
    copy = target.create_sequence(list(range(length)), kv_pages=rows)
    assert torch.equal(target.read_kv(copy), kv)
    assert target.pages.rows_filled[target.block_table(copy)[-1]] == (length - 1) % 16 + 1
    target.free(scatter)
    target.check_invariants()


def test_whole_pages_in_segments_are_written_where_they_go_without_a_join() -> None:
    source = PagedKVEngine(TINY, block_size=16, num_blocks=32)
    target = PagedKVEngine(TINY, block_size=16, num_blocks=32)
    kv = make_kv(TINY, 90, seed=5)  # 6 pages, the last partial
    rows = source.pages.gather_pages(source.block_table(source.create_sequence(list(range(90)), kv)))
    # Free blocks scattered over the target's pool: the segments land on non-consecutive ids.
    holes = [target.create_sequence(list(range(16)), make_kv(TINY, 16, seed=i)) for i in range(8)]
    for hole in holes[::2]:
        target.free(hole)
    segments = (rows[:1], rows[1:4], rows[4:])
    for segment in segments:
        segment.flags.writeable = False  # as they arrive from Ray's object store
    copy = target.create_sequence(list(range(90)), kv_pages=segments)
    assert torch.equal(target.read_kv(copy), kv)
    assert target.pages.rows_filled[target.block_table(copy)[-1]] == 90 - 5 * 16
    before = snapshot(target)
    with pytest.raises(InvalidKV, match=r"kv_pages are uint8 \(1, 8192\), uint8 \(3, 8192\); 90 tokens"):
        target.create_sequence(list(range(90)), kv_pages=segments[:2])
    with pytest.raises(InvalidKV, match=r"kv_pages are no segments"):
        target.create_sequence(list(range(90)), kv_pages=())
    assert_same_state(before, target)
    target.check_invariants()


def test_whole_pages_after_a_shared_prefix_of_whole_blocks(engine: PagedKVEngine) -> None:
    kv = make_kv(TINY, 40)
    donor = engine.create_sequence(list(range(40)), kv)
    table = engine.block_table(donor)
    rows = engine.pages.gather_pages(table[1:])
    seq = engine.create_sequence(list(range(40)), kv_pages=rows, shared_blocks=table[:1], shared_tokens=16)
    assert torch.equal(engine.read_kv(seq), kv)
    assert engine.block_table(seq)[0] == table[0]
    engine.check_invariants()


def test_bad_pages_are_rejected_and_change_nothing(engine: PagedKVEngine) -> None:
    kv = make_kv(TINY, 40)
    donor = engine.create_sequence(list(range(40)), kv)
    table = engine.block_table(donor)
    rows = engine.pages.gather_pages(table)
    before = snapshot(engine)
    with pytest.raises(InvalidKV, match=r"kv_pages are uint8 \(3, 8192\); 20 tokens need uint8 \(2, 8192\)"):
        engine.create_sequence(list(range(20)), kv_pages=rows)
    with pytest.raises(InvalidKV, match="kv_pages are float32"):
        engine.create_sequence(list(range(40)), kv_pages=rows.view(np.float32))
    with pytest.raises(InvalidArgument, match="not both"):
        engine.create_sequence(list(range(40)), kv, kv_pages=rows)
    with pytest.raises(InvalidArgument, match="whole blocks; shared_tokens is 20"):
        engine.create_sequence(list(range(40)), kv_pages=rows[1:], shared_blocks=table[:2], shared_tokens=20)
    assert_same_state(before, engine)


def test_create_with_only_shared_tokens_needs_no_kv(engine: PagedKVEngine) -> None:
    kv = make_kv(TINY, 40)
    donor = engine.create_sequence(list(range(40)), kv)
    table = engine.block_table(donor)
    free = engine.pool.num_free
    seq = engine.create_sequence(list(range(24)), shared_blocks=table[:2], shared_tokens=24)
    assert engine.pool.num_free == free
    assert engine.block_table(seq).tolist() == table[:2].tolist()
    assert torch.equal(engine.read_kv(seq), kv[:, :, :24])
    engine.free(donor)
    # Block 1 still has 16 rows of the donor, but only this sequence holds it now: in place.
    engine.append(seq, [3], make_kv(TINY, 1, 4))
    assert engine.block_table(seq).tolist() == table[:2].tolist()
    assert engine.stats().cow_copies == 0
    engine.check_invariants()


def test_external_references_are_declared_to_check_invariants(engine: PagedKVEngine) -> None:
    seq = engine.create_sequence(list(range(20)), make_kv(TINY, 20))
    engine.pool.incref([0])  # e.g. the prefix cache adopting block 0
    with pytest.raises(AssertionError, match="ref counts"):
        engine.check_invariants()
    engine.check_invariants({0: 1})
    extra = np.zeros(32, dtype=np.int64)
    extra[0] = 1
    engine.check_invariants(extra)
    engine.free(seq)
    assert engine.pool.num_free == 31
    engine.check_invariants({0: 1})


# --- admission and capacity ------------------------------------------------------------------


def test_blocks_needed_and_can_allocate(engine: PagedKVEngine) -> None:
    assert engine.blocks_needed(None, 0) == 0
    assert engine.blocks_needed(None, 1) == 1
    assert engine.blocks_needed(None, 16) == 1
    assert engine.blocks_needed(None, 17) == 2
    seq = engine.create_sequence(list(range(10)), make_kv(TINY, 10))
    assert engine.blocks_needed(seq, 6) == 0
    assert engine.blocks_needed(seq, 7) == 1
    assert engine.can_allocate(31 * 16)
    assert not engine.can_allocate(31 * 16 + 1)
    assert engine.can_allocate(6 + 31 * 16, seq)
    assert not engine.can_allocate(7 + 31 * 16, seq)
    with pytest.raises(InvalidArgument):
        engine.blocks_needed(None, -1)


def test_capacity_error_names_the_numbers_and_changes_nothing() -> None:
    e = PagedKVEngine(TINY, num_blocks=4)
    a = e.create_sequence(list(range(40)), make_kv(TINY, 40))  # 3 blocks
    before = snapshot(e)
    with pytest.raises(CapacityError, match=r"needs 2 blocks .* only 1 are free and 0 reclaimable"):
        e.create_sequence(list(range(17)), make_kv(TINY, 17))
    assert_same_state(before, e)
    with pytest.raises(CapacityError, match="needs 2 blocks"):
        e.append(a, list(range(25)), make_kv(TINY, 25))
    assert_same_state(before, e)
    # The copy-on-write block counts too: fork, then the fork's append needs 1 + 1.
    b = e.fork(a)
    before = snapshot(e)
    with pytest.raises(CapacityError, match="needs 2 blocks"):
        e.append(b, list(range(9)), make_kv(TINY, 9))
    assert_same_state(before, e)
    e.append(b, [1], make_kv(TINY, 1))  # 1 block (the copy) fits
    e.check_invariants()


def test_capacity_error_with_shared_blocks_releases_them() -> None:
    e = PagedKVEngine(TINY, num_blocks=3)
    donor = e.create_sequence(list(range(20)), make_kv(TINY, 20))
    table = e.block_table(donor)
    before = snapshot(e)
    with pytest.raises(CapacityError):
        e.create_sequence(list(range(60)), make_kv(TINY, 40), shared_blocks=table, shared_tokens=20)
    assert_same_state(before, e)


class FakeCache:
    """A stand-in prefix cache holding references on blocks it may give back."""

    def __init__(self, engine: PagedKVEngine, blocks: list[int]) -> None:
        self.engine = engine
        self.held = list(blocks)
        self.calls: list[int] = []

    def reclaimable(self) -> int:
        refs = self.engine.pool.ref_counts_view()
        return sum(1 for b in self.held if refs[b] == 1)

    def reclaim(self, missing: int) -> int:
        self.calls.append(missing)
        refs = self.engine.pool.ref_counts_view()
        victims = [b for b in self.held if refs[b] == 1][:missing]
        for b in victims:
            self.held.remove(b)
        self.engine.pool.decref(victims)
        return len(victims)

    def refs(self) -> dict[int, int]:
        return dict.fromkeys(self.held, 1)


def test_reclaimer_frees_cache_blocks_when_the_pool_is_short() -> None:
    e = PagedKVEngine(TINY, num_blocks=4)
    donor = e.create_sequence(list(range(64)), make_kv(TINY, 64))
    table = e.block_table(donor).tolist()
    cache = FakeCache(e, table)
    e.pool.incref(table)
    e.free(donor)  # the cache alone holds the 4 blocks now
    e.set_reclaimer(cache.reclaim)
    e.set_reclaimable(cache.reclaimable)
    assert e.pool.num_free == 0
    assert e.can_allocate(64)
    assert not e.can_allocate(65)
    seq = e.create_sequence(list(range(20)), make_kv(TINY, 20))
    assert cache.calls == [2]
    assert len(cache.held) == 2
    e.check_invariants(cache.refs())
    # Not enough even after reclaiming: the reclaimer is not called in vain.
    with pytest.raises(CapacityError, match="0 are free and 2 reclaimable"):
        e.append(seq, list(range(50)), make_kv(TINY, 50))
    assert cache.calls == [2]
    e.check_invariants(cache.refs())


def test_shared_blocks_are_pinned_before_reclaiming() -> None:
    e = PagedKVEngine(TINY, num_blocks=3)
    donor = e.create_sequence(list(range(48)), make_kv(TINY, 48))
    table = e.block_table(donor).tolist()
    cache = FakeCache(e, table)
    e.pool.incref(table)
    e.free(donor)
    e.set_reclaimer(cache.reclaim)
    e.set_reclaimable(cache.reclaimable)
    # Reuse block 0 and 1 and append 16 new tokens: the reclaimer must not evict 0 or 1.
    kv = make_kv(TINY, 48, seed=1)
    seq = e.create_sequence(
        list(range(48)), kv[:, :, 32:], shared_blocks=table[:2], shared_tokens=32
    )
    assert cache.calls == [1]
    assert cache.held == table[:2]
    assert e.block_table(seq).tolist() == table  # block 2 was evicted and reused
    e.check_invariants(cache.refs())


def test_reclaimer_without_a_count_is_tried_and_may_fail() -> None:
    e = PagedKVEngine(TINY, num_blocks=2)
    e.create_sequence(list(range(32)), make_kv(TINY, 32))
    calls: list[int] = []

    def reclaim(missing: int) -> int:
        calls.append(missing)
        return 0

    e.set_reclaimer(reclaim)
    before = snapshot(e)
    with pytest.raises(CapacityError):
        e.create_sequence([1], make_kv(TINY, 1))
    assert calls == [1]
    assert_same_state(before, e)


# --- bad input: each raises and changes nothing ----------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([1.5, 2.0], "integers"),
        (np.array([1.0, 2.0]), "float64"),
        (["a", "b"], "integers"),
        ([True, False], "bool"),
        ([[1, 2], [3, 4]], "1-D"),
        ([1, -1], "token id -1"),
        ([1, 32000], "token id 32000"),
        ([2**70], "outside the vocabulary"),
        ([1, None], "integers"),
        (np.array([5], dtype=np.uint64) + np.uint64(2**63), "outside the vocabulary"),
    ],
)
def test_bad_tokens_are_rejected(engine: PagedKVEngine, tokens: Any, message: str) -> None:
    seq = engine.create_sequence([1, 2, 3], make_kv(TINY, 3))
    before = snapshot(engine)
    n = len(tokens)
    with pytest.raises(InvalidTokens, match=message):
        engine.append(seq, tokens, make_kv(TINY, n))
    with pytest.raises(InvalidTokens, match=message):
        engine.create_sequence(tokens, make_kv(TINY, n))
    assert_same_state(before, engine)


@pytest.mark.parametrize(
    ("kv", "message"),
    [
        (torch.zeros(2, 2, 3, 2), "shape"),
        (torch.zeros(2, 2, 4, 2, 16), "shape"),  # 4 tokens of K/V for 3 token ids
        (torch.zeros(1, 2, 3, 2, 16), "shape"),
        (torch.zeros(2, 1, 3, 2, 16), "shape"),
        (torch.zeros(2, 2, 3, 4, 16), "shape"),
        (torch.zeros(2, 2, 3, 2, 8), "shape"),
        (torch.zeros(2, 2, 3, 2, 16, dtype=torch.float16), "dtype"),
        (torch.zeros(2, 2, 3, 2, 16, device="meta"), "meta"),
        (np.zeros((2, 2, 3, 2, 16), dtype=np.float32), "torch.Tensor"),
    ],
)
def test_bad_kv_is_rejected(engine: PagedKVEngine, kv: Any, message: str) -> None:
    seq = engine.create_sequence([1, 2, 3], make_kv(TINY, 3))
    before = snapshot(engine)
    with pytest.raises(InvalidKV, match=message):
        engine.append(seq, [4, 5, 6], kv)
    with pytest.raises(InvalidKV, match=message):
        engine.create_sequence([4, 5, 6], kv)
    assert_same_state(before, engine)


def test_missing_kv_for_new_tokens_is_rejected(engine: PagedKVEngine) -> None:
    before = snapshot(engine)
    with pytest.raises(InvalidKV, match="kv is required for the 3"):
        engine.create_sequence([1, 2, 3])
    assert_same_state(before, engine)


def test_beyond_max_context_is_rejected() -> None:
    e = PagedKVEngine(TINY, num_blocks=16, max_context=40)
    with pytest.raises(ContextTooLong, match="41 tokens exceeds max_context 40"):
        e.create_sequence(list(range(41)), make_kv(TINY, 41))
    seq = e.create_sequence(list(range(30)), make_kv(TINY, 30))
    before = snapshot(e)
    with pytest.raises(ContextTooLong, match="appending 11 token"):
        e.append(seq, list(range(11)), make_kv(TINY, 11))
    assert not e.can_allocate(11, seq)
    assert e.can_allocate(10, seq)
    assert_same_state(before, e)
    e.append(seq, list(range(10)), make_kv(TINY, 10))
    assert e.num_tokens(seq) == 40


def test_unknown_and_freed_sequences(engine: PagedKVEngine) -> None:
    seq = engine.create_sequence([1, 2], make_kv(TINY, 2))
    engine.free(seq)
    before = snapshot(engine)
    calls = [
        lambda: engine.append(seq, [1], make_kv(TINY, 1)),
        lambda: engine.fork(seq),
        lambda: engine.free(seq),
        lambda: engine.tokens(seq),
        lambda: engine.num_tokens(seq),
        lambda: engine.block_table(seq),
        lambda: engine.read_kv(seq),
        lambda: engine.read_kv_layer(seq, 0),
        lambda: engine.blocks_needed(seq, 1),
        lambda: engine.can_allocate(1, seq),
    ]
    for call in calls:
        with pytest.raises(UnknownSequence, match=f"sequence {seq} was already freed"):
            call()
    with pytest.raises(UnknownSequence, match="unknown sequence 99"):
        engine.append(SequenceId(99), [1], make_kv(TINY, 1))
    with pytest.raises(UnknownSequence, match="unknown sequence -1"):
        engine.free(SequenceId(-1))
    with pytest.raises(UnknownSequence):
        engine.fork("abc")  # type: ignore[arg-type]
    with pytest.raises(UnknownSequence, match="unknown sequence False"):
        engine.fork(False)  # type: ignore[arg-type]
    assert_same_state(before, engine)


@pytest.mark.parametrize(
    ("blocks", "shared_tokens", "message"),
    [
        ([0], 17, "expected 2"),
        ([0, 1], 16, "expected 1"),
        ([], 5, "expected 1"),
        ([40], 5, "outside the pool"),
        ([5], 5, "are free"),
        ([0], 50, r"shared_tokens \(50\)"),
        ([0], -1, r"shared_tokens \(-1\)"),
        ([[0]], 5, "1-D"),
        ([0.5], 5, "integer block ids"),
    ],
)
def test_bad_shared_blocks_are_rejected(
    engine: PagedKVEngine, blocks: Any, shared_tokens: int, message: str
) -> None:
    engine.create_sequence(list(range(20)), make_kv(TINY, 20))
    before = snapshot(engine)
    new = 20 - max(0, shared_tokens)
    with pytest.raises(InvalidArgument, match=message):
        engine.create_sequence(
            list(range(20)), make_kv(TINY, max(new, 0)), shared_blocks=blocks,
            shared_tokens=shared_tokens,
        )
    assert_same_state(before, engine)


def test_bad_read_ranges_and_layers(engine: PagedKVEngine) -> None:
    seq = engine.create_sequence(list(range(10)), make_kv(TINY, 10))
    for start, end in [(-1, 5), (5, 4), (0, 11), (11, None)]:
        with pytest.raises(InvalidArgument, match="outside sequence"):
            engine.read_kv(seq, start, end)
    for layer in (-1, 2, True):
        with pytest.raises(InvalidArgument, match="layer"):
            engine.read_kv_layer(seq, layer)
    assert engine.read_kv(seq, 4, 4).shape == (2, 2, 0, 2, 16)


# --- statistics ------------------------------------------------------------------------------


def test_stats_count_exactly(engine: PagedKVEngine) -> None:
    a = engine.create_sequence(list(range(20)), make_kv(TINY, 20))  # 2 blocks, 20 slots filled
    engine.create_sequence(list(range(16)), make_kv(TINY, 16))  # 1 block, full
    engine.fork(a)  # shares; counts 20 more tokens stored, no slots
    stats = engine.stats()
    assert stats == EngineStats(
        block_size=16, blocks_total=32, blocks_free=29, blocks_used=3, sequences=3,
        tokens_stored=56, slots_allocated=48, slots_filled=36, cow_copies=0,
        utilisation=36 / 48, fragmentation=12 / 48,
    )


@pytest.mark.gpu
def test_engine_on_cuda_round_trips_and_rejects_host_kv() -> None:
    e = PagedKVEngine(TINY, num_blocks=8, device="cuda")
    kv = make_kv(TINY, 21).cuda()
    seq = e.create_sequence(list(range(21)), kv)
    child = e.fork(seq)
    extra = make_kv(TINY, 2, seed=1).cuda()
    e.append(child, [1, 2], extra)
    assert e.read_kv(seq).device.type == "cuda"
    assert torch.equal(e.read_kv(seq), kv)
    assert torch.equal(e.read_kv(child), torch.cat([kv, extra], dim=2))
    before = snapshot(e)
    with pytest.raises(InvalidKV, match="cuda"):
        e.append(seq, [1], make_kv(TINY, 1))
    assert_same_state(before, e)
