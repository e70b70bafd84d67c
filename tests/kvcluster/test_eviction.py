"""Eviction policies on hand-built radix nodes: exact orders for lru, lfu, ttl and combinations."""

from __future__ import annotations

import pytest

from kvcluster.config import EVICTION_POLICIES
from kvcluster.core.eviction import POLICY_NAMES, EvictionPolicy, make_policy, parse_policy_name
from kvcluster.core.radix_node import RadixNode
from kvcluster.core.reuse_model import ReuseRecord
from kvcluster.errors import InvalidArgument


def node(name: int, parent: RadixNode | None = None) -> RadixNode:
    start = parent.end if parent is not None else 0
    return RadixNode(bytes([name]) * 8, start, parent, b"", "default", name, 0.0)


@pytest.fixture
def root() -> RadixNode:
    return RadixNode(b"", 0, None, b"", "default", 0, 0.0)


def names(policy: EvictionPolicy) -> list[int]:
    return [n.node_id for n in policy.order()]


def test_policy_names_match_the_config() -> None:
    assert set(POLICY_NAMES) == set(EVICTION_POLICIES)
    assert parse_policy_name("ttl+LFU") == ("lfu", "ttl")


def test_lru_orders_by_last_touch(root: RadixNode) -> None:
    policy = make_policy("lru")
    a, b, c = node(1, root), node(2, root), node(3, root)
    policy.track_many([a, b, c])
    policy.touch_path(a, 1.0)
    assert names(policy) == [2, 3, 1]
    assert policy.victim(2.0) is b
    policy.untrack(b)
    assert names(policy) == [3, 1] and len(policy) == 2 and b not in policy


def test_touching_a_path_puts_ancestors_behind_descendants(root: RadixNode) -> None:
    for name in ("lru", "lfu"):
        policy = make_policy(name)
        parent = node(1, root)
        child = node(2, parent)
        grandchild = node(3, child)
        other = node(4, root)
        policy.track_many([parent, child, grandchild, other])
        policy.touch_path(grandchild, 1.0)
        policy.touch_path(other, 2.0)
        assert names(policy) == [3, 2, 1, 4], name
        assert (parent.freq, child.freq, grandchild.freq, parent.last_access) == (1, 1, 1, 1.0)


def test_lfu_orders_by_count_then_recency(root: RadixNode) -> None:
    policy = make_policy("lfu")
    nodes = [node(i, root) for i in range(1, 6)]
    policy.track_many(nodes)
    for i, uses in zip(range(5), (3, 1, 2, 1, 0)):
        for _ in range(uses):
            policy.touch_path(nodes[i], float(i))
    assert names(policy) == [5, 2, 4, 3, 1]
    # Emptying the lowest buckets leaves stale counts in the heap; they are skipped lazily.
    for expected in (5, 2, 4, 3, 1):
        victim = policy.victim(0.0)
        assert victim is not None and victim.node_id == expected
        policy.untrack(victim)
    assert policy.victim(0.0) is None and len(policy) == 0


def test_pinned_nodes_are_stamped_but_not_reordered(root: RadixNode) -> None:
    policy = make_policy("lru")
    pinned = node(1, root)
    leaf = node(2, pinned)
    policy.track(leaf)  # the pinned parent is not tracked
    pinned.pin_count = 1
    policy.touch_path(leaf, 5.0)
    assert names(policy) == [2] and pinned.last_access == 5.0 and pinned.freq == 1


def test_ttl_expiry_and_lfu_ttl_victims(root: RadixNode) -> None:
    policy = make_policy("lfu+ttl", ttl_s=10.0)
    frequent, rare = node(1, root), node(2, root)
    policy.track_many([frequent, rare])
    for _ in range(3):
        policy.touch_path(frequent, 0.0)
    policy.touch_path(rare, 5.0)
    assert not policy.is_expired(frequent, 9.99) and policy.is_expired(frequent, 10.0)
    assert policy.victim(6.0) is rare  # nothing expired: least frequent first
    assert policy.victim(10.0) is frequent  # expired goes first, however often it was used
    assert policy.oldest() is frequent


def test_ttl_alone_evicts_in_expiry_order(root: RadixNode) -> None:
    policy = make_policy("ttl", ttl_s=1.0)
    a, b = node(1, root), node(2, root)
    policy.track_many([a, b])
    policy.touch_path(b, 1.0)
    policy.touch_path(a, 2.0)
    assert names(policy) == [2, 1] and policy.victim(0.0) is b


def test_touch_many_equals_touch_path(root: RadixNode) -> None:
    for name in ("lru", "lfu", "lru+ttl"):
        kwargs = {"ttl_s": 3.0} if "ttl" in name else {}
        one, many = make_policy(name, **kwargs), make_policy(name, **kwargs)
        trees = []
        for policy in (one, many):
            parent = node(1, root)
            kids = [node(i, parent) for i in range(2, 6)]
            policy.track_many([parent, *kids])
            trees.append(kids)
        sequence = [0, 2, 1, 0, 3]
        for i in sequence:
            one.touch_path(trees[0][i], 1.0)
        many.touch_many([trees[1][i] for i in sequence], 1.0)
        assert names(one) == names(many), name


@pytest.mark.parametrize("bad", ["", "lru,ttl", "lru+", "mru", 3])
def test_bad_names_list_the_valid_policies(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="lru"):
        make_policy(bad)  # type: ignore[arg-type]


def test_reuse_ranks_a_store_by_its_bucket_and_never_lowers_a_rank(root: RadixNode) -> None:
    policy = make_policy("reuse")
    policy.attach(capacity_blocks=1000, block_size=8)
    model = policy.reuse_model
    # Short answers have come back, long ones have not.
    for generated, continued in ((4, True), (4, True), (4, True), (700, False), (700, False), (700, False)):
        record = policy.begin_store(generated, False)
        assert record is not None
        policy.end_store(stored=True)
        if continued:
            model.credit(record)
    assert model.chances() == {(2, False): (3, 3), (9, False): (3, 0)}
    head = node(1, root)
    chat, one_off = node(2, head), node(3, head)
    policy.track_many([head, chat, one_off])
    policy.begin_store(4, False)
    policy.touch_path(chat, 1.0)
    policy.end_store(stored=True)
    policy.begin_store(700, False)
    policy.touch_path(one_off, 2.0)  # later, but far less likely to come back
    policy.end_store(stored=True)
    assert names(policy) == [3, 2, 1]  # the head keeps the chat's rank: it ranks last
    assert head.reuse_value == chat.reuse_value > one_off.reuse_value
    assert head.reuse_owner is one_off.reuse_owner  # the last store that touched it
    rank = chat.reuse_value
    policy.touch_path(chat, 3.0)  # a lookup: the chance of all requests, lower than the chat's
    assert chat.reuse_value == rank and chat.last_access == 3.0
    assert policy.victim(3.0) is one_off
    policy.untrack(one_off)
    assert policy.victim(3.0) is chat and names(policy) == [2, 1]


def test_reuse_counts_only_stores_that_happened_and_credits_each_once(root: RadixNode) -> None:
    policy = make_policy("reuse")
    model = policy.reuse_model
    record = policy.begin_store(None, True)
    assert record is not None and record.bucket == (-1, True)
    policy.end_store(stored=False)  # a failed store changes nothing
    assert model.chances() == {}
    first = policy.begin_store(10, False)
    leaf = node(1, root)
    policy.track(leaf)
    policy.touch_path(leaf, 1.0)
    policy.end_store(stored=True)
    assert leaf.reuse_owner is first
    policy.begin_store(10, True)
    policy.end_store(stored=True, extended=leaf.reuse_owner)  # extends what `first` stored
    policy.touch_match(leaf, 2.0)  # and a lookup ending there again: credited once
    assert model.chances() == {(3, False): (1, 1), (3, True): (1, 0)}
    with pytest.raises(InvalidArgument, match="generated_tokens must be an integer >= 0 or None, got -1"):
        policy.begin_store(-1, False)


@pytest.mark.parametrize("name", ["reuse+lru", "lfu+reuse+ttl"])
def test_reuse_combines_with_ttl_only(name: str) -> None:
    with pytest.raises(InvalidArgument, match="cannot be combined; pick one of lru, lfu and reuse"):
        make_policy(name)
    assert make_policy("ttl+reuse", ttl_s=5.0).name == "reuse+ttl"


def test_reuse_with_ttl_evicts_expired_nodes_first(root: RadixNode) -> None:
    policy = make_policy("reuse+ttl", ttl_s=10.0)
    for bucket, continued in (((2, False), True), ((9, False), False)) * 3:
        record = ReuseRecord(bucket)
        policy.reuse_model.count(record)
        if continued:
            policy.reuse_model.credit(record)
    old, new = node(1, root), node(2, root)
    policy.track_many([old, new])
    policy.begin_store(4, False)
    policy.touch_path(old, 0.0)
    policy.end_store(stored=True)
    policy.begin_store(700, False)
    policy.touch_path(new, 5.0)
    policy.end_store(stored=True)
    assert policy.victim(6.0) is new  # by rank: the long answer is unlikely to come back...
    assert policy.victim(10.0) is old  # ...but old has expired
