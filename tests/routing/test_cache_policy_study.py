"""The cache-policy study's learned policy: it learns which requests come back, online."""

from __future__ import annotations

from benchmarks.cache_policy_study import LRU, Cache, ReusePredicting, leading
from routing.simulator import TraceRequest


def chats_among_one_offs(rounds: int) -> list[TraceRequest]:
    """Each round: a chat's first turn (a short answer), two one-off prompts with long
    answers that nothing extends, then the chat's second turn, which extends the first (its
    partial last block completed, one block more)."""
    requests: list[TraceRequest] = []

    def add(ids: tuple[int, ...], output_tokens: int) -> None:
        requests.append(TraceRequest(float(len(requests)), len(ids) * 512 - 100, output_tokens, ids))

    for r in range(rounds):
        base = 100 * r
        add((base, base + 1, base + 2), 4)
        add((base + 10, base + 11, base + 12), 700)
        add((base + 20, base + 21, base + 22), 700)
        add((base, base + 1, base + 3, base + 4), 4)
    return requests


def second_turn_hits(cache: Cache, requests: list[TraceRequest]) -> list[int]:
    hits = []
    for t, request in enumerate(requests):
        if t % 4 == 3:
            hits.append(leading(cache, request.block_ids))
        cache.access(request.block_ids, t)
    return hits


def test_it_learns_to_keep_the_chat_that_comes_back_over_one_offs() -> None:
    requests = chats_among_one_offs(30)
    capacity = 6  # the two one-offs of a round fill an LRU and push the first turn out
    assert second_turn_hits(LRU(capacity), requests) == [0] * 30
    learned = ReusePredicting(capacity, requests)
    hits = second_turn_hits(learned, requests)
    # Once it has seen that first turns come back and one-offs do not, every second turn
    # finds the two full blocks of its first turn (the partial third one ranks lowest).
    assert hits[10:] == [2] * 20
    assert learned.chance_of((2, False)) > 0.9  # log2(4 + 1) = 2: first turns, extended
    assert learned.chance_of((9, False)) < 0.1  # log2(700 + 1) = 9: one-offs
    assert learned.chance_of((2, True)) < 0.1  # second turns: never extended here
    assert learned.chance_of("tail") < 0.1  # no partial last block was ever hit


def test_it_keeps_nothing_beyond_its_capacity() -> None:
    requests = chats_among_one_offs(10)
    cache = ReusePredicting(4, requests)
    for t, request in enumerate(requests):
        cache.access(request.block_ids, t)
        assert len(cache.live) <= 4


def test_a_chain_head_never_ranks_below_a_tail_that_extends_it() -> None:
    # A first turn with a short answer (such requests have come back), then a prompt with a
    # long answer that shares only its first block (such requests never have): its low chance
    # must not demote the shared head below the first turn's other blocks, or a tree that
    # evicts leaves only could not follow the priorities.
    first_turn = TraceRequest(0.0, 3 * 512, 4, (1, 2, 3))
    one_off = TraceRequest(1.0, 2 * 512, 700, (1, 9))
    cache = ReusePredicting(100, [first_turn, one_off])
    cache.seen[(2, False)], cache.hits[(2, False)] = 100, 99
    cache.seen[(9, True)] = 100
    cache.access(first_turn.block_ids, 0)
    cache.access(one_off.block_ids, 1)
    head, middle, tail, other = (cache.live[b] for b in (1, 2, 3, 9))
    assert head > middle > tail  # the chain ranks deepest first, the head last to go
    assert head > other and middle > other  # the one-off's own block ranks lowest
