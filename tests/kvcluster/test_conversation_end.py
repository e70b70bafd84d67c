"""Ending a conversation: ``PrefixIndex.demote`` puts what only it cached first in line for
eviction, under every policy (``SessionManager.close(ended=True)``: see test_sessions.py)."""

from __future__ import annotations

import pytest

from kvcluster.errors import InvalidArgument, InvalidTokens
from tests.kvcluster.prefix_cache_helpers import Cache, make_cache, snapshot

SYSTEM = list(range(1, 9))  # 8 tokens: two blocks of 4
OURS = SYSTEM + list(range(100, 112))  # the conversation that ends
THEIRS = SYSTEM + list(range(200, 212))  # one still going on
POLICIES = ["lru", "lfu", "reuse", "lru+ttl", "lfu+ttl", "reuse+ttl"]


def cache_with_two_conversations(policy: str) -> Cache:
    cache = make_cache(policy=policy, ttl_s=1000.0 if "ttl" in policy else None)
    for tokens in (OURS, THEIRS, OURS):  # ours is the most recently and most often used
        cache.clock.advance(1.0)
        cache.index.lookup(tokens)
        cache.store(tokens)
    return cache


@pytest.mark.parametrize("policy", POLICIES)
def test_an_ended_conversation_is_evicted_before_one_still_going_on(policy: str) -> None:
    cache = cache_with_two_conversations(policy)
    index = cache.index
    assert index.demote(OURS, keep_tokens=len(SYSTEM)) == len(OURS) - len(SYSTEM)
    index.check_invariants()
    first = index.policy.order()[0]
    assert (first.start, first.end) == (len(SYSTEM), len(OURS))
    freed = index.evict(3)  # the conversation's own three blocks
    assert freed == 3
    assert index.peek(OURS) == len(SYSTEM)
    assert index.peek(THEIRS) == len(THEIRS)
    assert sorted(e.tokens.tolist() for e in cache.evicted) == [OURS[8:12], OURS[12:16], OURS[16:20]]
    index.check_invariants()


def test_without_the_end_the_same_eviction_takes_the_other_conversation() -> None:
    """The control: the order above is the demotion's doing, not the policy's."""
    for policy in POLICIES:
        cache = cache_with_two_conversations(policy)
        cache.index.evict(3)
        assert cache.index.peek(OURS) == len(OURS), policy
        assert cache.index.peek(THEIRS) == len(SYSTEM), policy


@pytest.mark.parametrize("policy", ["lru", "lfu", "reuse"])
def test_a_later_use_promotes_an_ended_conversation_again(policy: str) -> None:
    cache = cache_with_two_conversations(policy)
    cache.index.demote(OURS, keep_tokens=len(SYSTEM))
    for _ in range(2):
        cache.clock.advance(1.0)
        cache.index.lookup(OURS)  # reopened after all
    cache.index.evict(3)
    assert cache.index.peek(OURS) == len(OURS)
    assert cache.index.peek(THEIRS) == len(SYSTEM)


def test_ttl_expiry_keeps_meeting_the_oldest_first() -> None:
    """A demoted node is stamped as old as the oldest one, so the recency order stays sorted
    by last use: expiry of the nodes before it is not held up, and it expires with them."""
    cache = make_cache(policy="lru+ttl", ttl_s=10.0)
    cache.store([50, 51, 52, 53])
    cache.clock.advance(8.0)
    cache.store(OURS)
    cache.index.demote(OURS)
    cache.clock.advance(3.0)  # the first store is expired; ours was stored 3 s ago
    assert cache.index.evict_expired() == 1 + 5
    assert cache.index.peek([50, 51, 52, 53]) == 0 and cache.index.peek(OURS) == 0


def test_the_shared_prefix_goes_too_when_nothing_else_uses_it() -> None:
    cache = make_cache()
    cache.store(OURS)
    assert cache.index.demote(OURS) == len(OURS)
    assert cache.index.evict(1) == 1
    assert cache.index.peek(OURS) == 16  # its last block went first


def test_keep_tokens_stops_at_the_node_that_covers_them() -> None:
    cache = make_cache()
    cache.store(SYSTEM)
    cache.store(OURS)  # the node [8, 20) below the system prompt's [0, 8)
    assert cache.index.demote(OURS, keep_tokens=9) == 0  # [8, 20) holds token 8, which is kept
    assert cache.index.demote(OURS, keep_tokens=8) == 12


def test_nothing_moves_when_a_longer_sequence_goes_through_the_end() -> None:
    cache = make_cache()
    cache.store(OURS)
    cache.store([*OURS, 300, 301, 302, 303])  # a fork or a retry continued it
    before = snapshot(cache)
    assert cache.index.demote(OURS) == 0
    assert cache.index.demote(OURS[:-2]) == 0  # ends inside an edge
    assert snapshot(cache) == before


def test_a_branch_point_stops_the_walk() -> None:
    cache = make_cache()
    cache.store(OURS)
    cache.store([*OURS[:12], 400, 401, 402, 403])  # another branch from token 12
    assert cache.index.demote(OURS) == len(OURS) - 12
    cache.index.evict(2)
    assert cache.index.peek(OURS) == 12
    assert cache.index.peek([*OURS[:12], 400, 401, 402, 403]) == 16


def test_a_pinned_node_stops_the_walk() -> None:
    cache = make_cache()
    cache.store(OURS)
    cache.index.pin([*SYSTEM, 100, 101, 102, 103])
    assert cache.index.demote(OURS) == len(OURS) - 12
    cache.index.check_invariants()


def test_what_is_not_cached_demotes_nothing() -> None:
    cache = make_cache()
    cache.store(OURS)
    before = snapshot(cache)
    assert cache.index.demote(THEIRS) == 0  # matches only the system prompt, inside an edge
    assert cache.index.demote([999]) == 0
    assert cache.index.demote(OURS, "other-tenant") == 0
    assert snapshot(cache) == before


def test_a_partly_evicted_history_demotes_what_is_left() -> None:
    cache = make_cache()
    cache.store(OURS)
    cache.store(THEIRS)
    cache.index.evict(2)  # lru: the tail of ours, the older one
    assert cache.index.peek(OURS) == 12
    assert cache.index.demote(OURS, keep_tokens=len(SYSTEM)) == 4
    cache.index.check_invariants()


@pytest.mark.parametrize(
    ("tokens", "kwargs", "error"),
    [
        (OURS, {"keep_tokens": -1}, InvalidArgument),
        (OURS, {"keep_tokens": True}, InvalidArgument),
        (OURS, {"keep_tokens": 1.5}, InvalidArgument),
        (OURS, {"namespace": 3}, InvalidArgument),
        ([], {}, InvalidTokens),
        ([1, -2], {}, InvalidTokens),
    ],
)
def test_bad_input_changes_nothing(tokens: list[int], kwargs: dict[str, object], error: type[Exception]) -> None:
    cache = cache_with_two_conversations("reuse")
    before = snapshot(cache)
    with pytest.raises(error):
        cache.index.demote(tokens, **kwargs)  # type: ignore[arg-type]
    assert snapshot(cache) == before
