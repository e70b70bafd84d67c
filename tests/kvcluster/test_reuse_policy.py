"""The ``reuse`` eviction policy through a real prefix index: it learns which requests come
back (their generated length, whether they extended a cached prefix) and keeps those."""

from __future__ import annotations

import numpy as np
import pytest

from kvcluster.core.block_pool import BlockPool
from kvcluster.core.eviction import make_policy
from kvcluster.core.prefix_index import PrefixIndex
from kvcluster.core.reuse_model import ReuseModel, ReuseRecord, StoredRequests
from kvcluster.errors import InvalidArgument

BLOCK = 4


def make_index(policy: str, num_blocks: int, native: bool) -> PrefixIndex:
    return PrefixIndex(BlockPool(num_blocks), BLOCK, policy=make_policy(policy), native=native)


def serve(index: PrefixIndex, tokens: list[int], generated_tokens: int) -> int:
    """One request as an engine runs it: look up, pin the hit, make room, store all of its
    prompt with the length it generated. Returns the tokens found cached."""
    pool = index.pool
    match = index.lookup(tokens)
    matched = match.matched_tokens
    full = matched // BLOCK
    needed = -(-len(tokens) // BLOCK) - full
    lease = index.acquire(match) if matched else None
    try:
        if needed > pool.num_free:
            index.evict(needed - pool.num_free)
        fresh = pool.allocate(needed)
        assert fresh is not None
        table = np.concatenate([match.block_ids[:full], fresh]) if full else fresh
        index.insert(tokens, table, generated_tokens=generated_tokens)
        pool.decref(fresh)
    finally:
        if lease is not None:
            index.release(lease)
    index.check_invariants()
    return matched


def chats_among_one_offs(index: PrefixIndex, rounds: int) -> list[int]:
    """Each round: a chat's first turn (short answer), two one-offs with long answers, then
    the chat's second turn. Returns what each second turn found cached."""
    found = []
    for r in range(rounds):
        base = 1000 * r
        first = list(range(base, base + 12))
        serve(index, first, 4)
        serve(index, list(range(base + 100, base + 112)), 700)
        serve(index, list(range(base + 200, base + 212)), 700)
        found.append(serve(index, first + list(range(base + 50, base + 58)), 4))
    return found


@pytest.mark.parametrize("native", [True, False])
def test_it_keeps_the_chats_that_come_back_where_lru_does_not(native: bool) -> None:
    # 7 blocks: the two one-offs of a round push all but the first block of an LRU's first
    # turn out every time.
    assert max(chats_among_one_offs(make_index("lru", 7, native), 30)) <= BLOCK
    index = make_index("reuse", 7, native)
    found = chats_among_one_offs(index, 30)
    assert found[10:] == [12] * 20  # once learned, every second turn finds its whole first turn
    chances = index.policy.reuse_model.chances()
    first_turns, one_offs = chances[(2, False)], chances[(9, False)]
    assert first_turns[1] >= first_turns[0] // 2 and one_offs[1] == 0


@pytest.mark.parametrize("native", [True, False])
def test_a_continuation_is_credited_after_the_continued_request_was_evicted(native: bool) -> None:
    index = make_index("reuse", 16, native)
    first = list(range(100, 110))
    serve(index, first, 4)
    assert index.evict(16) == 3 and len(index) == 0  # nothing of it is cached any more
    assert index.lookup([*first, 7, 8, 9]).matched_tokens == 0
    assert index.policy.reuse_model.chances() == {(2, False): (1, 1)}  # yet it came back
    index.lookup([*first, 7])  # credited once
    assert index.policy.reuse_model.chances() == {(2, False): (1, 1)}
    serve(index, [5, 6, 7, 8, 9], 4)  # diverges from the first block: no credit
    assert index.policy.reuse_model.chances() == {(2, False): (2, 1)}


@pytest.mark.parametrize("native", [True, False])
def test_a_store_that_fails_counts_nothing(native: bool) -> None:
    index = make_index("reuse", 16, native)
    table = index.pool.allocate(2)
    assert table is not None
    index.insert(list(range(8)), table, generated_tokens=3)
    before = index.policy.reuse_model.chances()
    with pytest.raises(InvalidArgument, match="already hold cached tokens"):
        index.insert(list(range(20, 28)), table, generated_tokens=3)  # blocks hold other tokens
    with pytest.raises(InvalidArgument, match="generated_tokens must be an integer >= 0 or None, got -3"):
        index.insert(list(range(20, 28)), index.pool.allocate(2), generated_tokens=-3)
    assert index.policy.reuse_model.chances() == before
    index.check_invariants()


def test_generated_tokens_are_checked_under_every_policy() -> None:
    index = make_index("lru", 8, True)
    with pytest.raises(InvalidArgument, match="generated_tokens must be an integer >= 0 or None, got True"):
        index.insert([1, 2, 3], index.pool.allocate(1), generated_tokens=True)  # type: ignore[arg-type]
    index.insert([1, 2, 3], index.pool.allocate(1), generated_tokens=np.int64(12))


def test_the_model_buckets_by_log_length_and_extension() -> None:
    assert ReuseModel.bucket(0, False) == (0, False)
    assert ReuseModel.bucket(700, True) == (9, True)
    assert ReuseModel.bucket(None, False) == (-1, False)
    assert ReuseModel.bucket(10**12, False) == (24, False)  # merged above 2**24
    model = ReuseModel()
    assert model.log_chance((2, False)) == pytest.approx(np.log(0.5))  # no data: even odds
    for continued in (True, True, False):
        record = ReuseRecord((2, False))
        model.count(record)
        if continued:
            model.credit(record)
            model.credit(record)  # once only
    assert model.chances() == {(2, False): (3, 2)}
    assert model.log_chance((2, False)) == pytest.approx(np.log(3 / 5))
    assert model.neutral_log_chance() == pytest.approx(np.log(3 / 5))


def test_stored_requests_are_bounded_and_match_whole_prefixes_only() -> None:
    def ids(*values: int) -> bytes:
        return np.asarray(values, dtype=np.int64).tobytes()

    stored = StoredRequests(family_bytes=2 * 8, max_families=2, per_family=2)
    a, b, c, d = (ReuseRecord((0, False)) for _ in range(4))
    stored.remember(ids(1, 2, 3), a)
    stored.remember(ids(1, 2, 4, 5), b)
    assert stored.continued_by(ids(1, 2, 3, 9)) == [a]
    assert stored.continued_by(ids(1, 2, 4)) == []  # shorter than b's tokens
    assert stored.continued_by(ids(1, 2, 4, 5, 6)) == [b]
    stored.remember(ids(1, 2, 6), c)  # a third in the family: the oldest, a, goes
    assert stored.continued_by(ids(1, 2, 3, 9)) == []
    stored.remember(ids(7, 8), d)
    stored.remember(ids(9, 9), ReuseRecord((0, False)))  # a third family: (1, 2) goes
    assert len(stored) == 2 and stored.continued_by(ids(1, 2, 6)) == []
    d.continued = True
    assert stored.continued_by(ids(7, 8, 1)) == []  # credited already


@pytest.mark.parametrize("native", [True, False])
def test_a_store_credits_the_request_it_extends_never_itself(native: bool) -> None:
    index = make_index("reuse", 32, native)
    first = index.pool.allocate(3)
    assert first is not None
    index.insert(list(range(12)), first, generated_tokens=4)
    # A store (no lookup first) that extends it: its cached prefix ends in the first's node.
    index.insert(list(range(20)), np.concatenate([first, index.pool.allocate(2)]), generated_tokens=700)
    assert index.policy.reuse_model.chances() == {(2, False): (1, 1), (9, True): (1, 0)}
