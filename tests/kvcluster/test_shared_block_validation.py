"""``create_sequence(shared_blocks=...)`` refuses blocks that cannot hold the shared prefix:
a block id given twice, or a block whose page holds fewer written rows than the shared
tokens it is said to hold. Refused with :class:`InvalidArgument`, the engine unchanged."""

from __future__ import annotations

import pytest

from kvcluster.core.kv_engine import PagedKVEngine
from kvcluster.errors import InvalidArgument
from tests.kvcluster.test_kv_engine import NARROW, assert_same_state, make_kv, snapshot


@pytest.fixture
def engine() -> PagedKVEngine:
    return PagedKVEngine(NARROW, block_size=4, num_blocks=16, max_context=32)


def test_shared_blocks_may_not_repeat_a_block(engine: PagedKVEngine) -> None:
    seq = engine.create_sequence([1, 2, 3, 4], make_kv(NARROW, 4))
    (block,) = engine.block_table(seq).tolist()
    before = snapshot(engine)
    with pytest.raises(InvalidArgument, match="repeat"):
        engine.create_sequence([1, 2, 3, 4, 1, 2, 3, 4], shared_blocks=[block, block], shared_tokens=8)
    assert_same_state(before, engine)


@pytest.mark.parametrize(
    ("order", "tokens"),
    [
        ("partial_first", 8),  # a partial block before the last one
        ("in_order", 8),  # the last block claimed full, but only 2 of its rows are written
        ("in_order", 7),  # ... 3 rows claimed, 2 written
    ],
)
def test_shared_blocks_must_hold_the_shared_rows(engine: PagedKVEngine, order: str, tokens: int) -> None:
    seq = engine.create_sequence([1, 2, 3, 4, 5, 6], make_kv(NARROW, 6))  # blocks: 4 rows, 2 rows
    full, partial = engine.block_table(seq).tolist()
    shared = [partial, full] if order == "partial_first" else [full, partial]
    before = snapshot(engine)
    with pytest.raises(InvalidArgument, match="fewer written rows"):
        engine.create_sequence([1, 2, 3, 4, 5, 6, 7, 0][:tokens], shared_blocks=shared, shared_tokens=tokens)
    assert_same_state(before, engine)


def test_shared_blocks_holding_the_shared_rows_are_accepted(engine: PagedKVEngine) -> None:
    kv = make_kv(NARROW, 6)
    seq = engine.create_sequence([1, 2, 3, 4, 5, 6], kv)
    table = engine.block_table(seq)
    for shared_tokens in (1, 4, 5, 6):  # inside, at and past a block boundary, up to the rows written
        used = table[: -(-shared_tokens // 4)]
        child = engine.create_sequence([1, 2, 3, 4, 5, 6][:shared_tokens], shared_blocks=used,
                                       shared_tokens=shared_tokens)
        assert engine.read_kv(child).equal(kv[:, :, :shared_tokens])
        engine.free(child)
    engine.check_invariants()
