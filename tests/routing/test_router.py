"""Router: scoring, tiers, load, the imbalance override, explanations and fallbacks."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest

from kvcluster.errors import InvalidArgument, NoLiveNodes, RegistryDataError, RegistryUnavailable
from routing.block_hashing import BlockHashArray, BlockHasher
from routing.config import RegistryConfig, RouterConfig
from routing.memory_registry import InMemoryRegistry
from routing.registry import BlockEvent, EventBatch, NodeLoad, PrefixHolding, Tier
from routing.router import HashRing, RouteDecision, Router, ring_key
from tests.routing.conftest import FakeClock

HASHER = BlockHasher("xxh3_128", 4)


def tokens(seed: int, blocks: int = 10) -> np.ndarray:
    return np.arange(blocks * 4, dtype=np.int32) + seed * 100_000


class Cluster:
    """An in-memory registry with registered nodes and a router over it."""

    def __init__(self, nodes: list[str], **router: Any) -> None:
        self.clock = FakeClock()
        self.registry = InMemoryRegistry(RegistryConfig(index_stride_blocks=1), clock=self.clock)
        self.epochs = {n: self.registry.register_node(n) for n in nodes}
        self.seqs = dict.fromkeys(nodes, 0)
        self.router = Router(self.registry, RouterConfig(**router), HASHER, clock=self.clock)

    def hold(self, node: str, chain: BlockHashArray, tier: Tier = Tier.GPU) -> None:
        self.seqs[node] += 1
        batch = EventBatch(node, self.epochs[node], self.seqs[node], (BlockEvent.stored(chain, tier),))
        self.registry.publish(batch)

    def load(self, node: str, inflight: int, free: int = 0, total: int = 0) -> None:
        self.clock.advance(0.001)
        assert self.registry.heartbeat(node, self.epochs[node], NodeLoad(inflight, free, total))


def test_longest_prefix_wins_and_explains() -> None:
    cluster = Cluster(["a", "b", "c"])
    chain = HASHER.hash_chain(tokens(1))
    cluster.hold("a", chain[:8])
    cluster.hold("b", chain[:4], Tier.CPU)
    decision = cluster.router.route(tokens(1))
    assert decision.node_id == "a"
    assert (decision.matched_blocks, decision.blocks_per_tier) == (8, {"gpu": 8, "cpu": 0, "nvme": 0})
    assert decision.fallback is None and decision.best_holder == "a" and decision.holder_blocks == 8
    # every live node is scored: affinity - load + free share (unknown capacity counts as free)
    assert decision.scores == pytest.approx({"a": 0.8 + 0.05, "b": 0.8 * 4 / 10 + 0.05, "c": 0.05})
    assert decision.reason.startswith("prefix: a holds 8/10 blocks (gpu 8), score 0.850 vs next 0.370")
    assert decision.prompt_blocks == 10


def test_route_equals_route_hashes() -> None:
    cluster = Cluster(["a", "b"])
    chain = HASHER.hash_chain(tokens(2))
    cluster.hold("b", chain[:3])
    by_tokens = cluster.router.route(tokens(2))
    cluster.load("b", 0)  # the heartbeat clears the request the router just sent to b
    by_hashes = cluster.router.route_hashes(chain)
    assert by_tokens.node_id == by_hashes.node_id == "b"
    assert by_tokens.scores == by_hashes.scores


def test_tier_weights() -> None:
    cluster = Cluster(["a", "b"])
    chain = HASHER.hash_chain(tokens(3))
    cluster.hold("a", chain[:8], Tier.NVME)  # 8 * 0.5 = 4
    cluster.hold("b", chain[:6], Tier.GPU)  # 6 * 1.0 = 6
    assert cluster.router.route_hashes(chain).node_id == "b"
    flat = Cluster(["a", "b"], tier_weights={"gpu": 1.0, "cpu": 1.0, "nvme": 1.0})
    flat.hold("a", chain[:8], Tier.NVME)
    flat.hold("b", chain[:6], Tier.GPU)
    decision = flat.router.route_hashes(chain)
    assert decision.node_id == "a" and decision.blocks_per_tier["nvme"] == 8


def test_load_lowers_the_score() -> None:
    cluster = Cluster(["a", "b"], imbalance_threshold=10.0, load_weight=0.5)
    chain = HASHER.hash_chain(tokens(4))
    cluster.hold("a", chain[:6])
    cluster.hold("b", chain[:5])
    cluster.load("a", 3)
    cluster.load("b", 0)
    decision = cluster.router.route_hashes(chain)
    # mean in flight 1.5: a = 0.6 - 0.5 * 3 / 2.5 + 0.05, b = 0.5 - 0 + 0.05
    assert decision.scores == pytest.approx({"a": 0.05, "b": 0.55})
    assert decision.node_id == "b" and decision.best_holder == "a"


def test_free_blocks_break_ties() -> None:
    cluster = Cluster(["a", "b"])
    chain = HASHER.hash_chain(tokens(5))
    cluster.hold("a", chain[:5])
    cluster.hold("b", chain[:5])
    cluster.load("a", 0, free=10, total=100)
    cluster.load("b", 0, free=90, total=100)
    assert cluster.router.route_hashes(chain).node_id == "b"


def test_imbalance_threshold_overrides_affinity() -> None:
    cluster = Cluster(["a", "b", "c", "d"], imbalance_threshold=1.5, load_weight=0.0)
    hot = HASHER.hash_chain(tokens(6))
    cluster.hold("a", hot)
    for node, inflight in (("a", 6), ("b", 1), ("c", 1), ("d", 0)):
        cluster.load(node, inflight)
    # cap = ceil(1.5 * (8 + 1) / 4) = 4 < 6 + 1: a may not take more
    decision = cluster.router.route_hashes(hot)
    assert decision.node_id != "a"
    assert decision.best_holder == "a" and decision.holder_blocks == 10 and decision.holder_in_flight == 6
    assert decision.fallback == "no_match"
    assert "a holds 10/10 blocks but is overloaded (6 in flight, cap 4)" in decision.reason
    assert cluster.router.stats().overload_overrides == 1
    # the spill-over is sticky: with similar loads the prefix keeps its ring home
    for node in "bcd":
        cluster.load(node, 0)
    home = cluster.router.route_hashes(hot).node_id
    assert home != "a"
    assert cluster.router.route_hashes(hot).node_id == home
    # once a's load is back under the cap, affinity wins again
    for node in "bcd":
        cluster.load(node, 1)
    cluster.load("a", 2)
    assert cluster.router.route_hashes(hot).node_id == "a"


def test_overloaded_holder_loses_to_a_partial_holder() -> None:
    cluster = Cluster(["a", "b", "c"], load_weight=0.0, imbalance_threshold=1.5)
    chain = HASHER.hash_chain(tokens(7))
    cluster.hold("a", chain)
    cluster.hold("b", chain[:3])
    cluster.load("a", 9)
    decision = cluster.router.route_hashes(chain)
    assert decision.node_id == "b" and decision.matched_blocks == 3 and decision.fallback is None
    assert decision.reason.startswith("a holds 10/10 blocks but is overloaded")


def test_requests_between_heartbeats_count_as_load() -> None:
    cluster = Cluster(["a", "b", "c", "d"], imbalance_threshold=1.25)
    hot = HASHER.hash_chain(tokens(8))
    cluster.hold("a", hot)
    picks = Counter(cluster.router.route_hashes(hot).node_id for _ in range(40))
    # bounded loads: nobody gets more than ceil(1.25 * 40 / 4) = 13 of a burst of 40
    assert max(picks.values()) <= 13 and picks["a"] == max(picks.values())
    # a heartbeat resets what the router added on its own
    for node in "abcd":
        cluster.load(node, 0)
    assert cluster.router.route_hashes(hot).node_id == "a"


def test_no_match_uses_ring_affinity() -> None:
    nodes = [f"n{i}" for i in range(8)]
    cluster = Cluster(nodes, fallback_choices=1)
    picks = {}
    for seed in range(200):
        chain = HASHER.hash_chain(tokens(seed, 3))
        first = cluster.router.route_hashes(chain)
        assert first.fallback == "no_match" and first.matched_blocks == 0
        assert first.reason == f"no node holds a leading block; ring affinity on the first block -> {first.node_id}"
        picks[seed] = first.node_id
        for node in nodes:  # loads reset, so only affinity decides
            cluster.load(node, 0)
        # a longer prompt with the same first block lands on the same node
        assert cluster.router.route_hashes(HASHER.hash_chain(tokens(seed, 9))).node_id == first.node_id
        for node in nodes:
            cluster.load(node, 0)
    spread = Counter(picks.values())
    assert len(spread) == 8 and max(spread.values()) < 50


def test_ring_moves_only_the_keys_of_a_removed_node() -> None:
    nodes = [f"n{i}" for i in range(8)]
    full, smaller = HashRing(nodes, 64), HashRing(nodes[:-1], 64)
    rng = np.random.default_rng(0)
    keys = [int(k) for k in rng.integers(0, 2**63, 2000)]
    before = {k: full.pick(k, set(nodes)) for k in keys}
    after = {k: smaller.pick(k, set(nodes[:-1])) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "n7" for k in moved)
    assert all(full.pick(k, set(nodes[:-1])) == after[k] for k in keys)
    assert list(HashRing([], 4).walk(5)) == []
    assert ring_key(bytes(range(16))) == int.from_bytes(bytes(range(8)), "big")


class FlakyRegistry:
    """Fault injection by wrapping: raises ``error`` (RegistryUnavailable) while ``down``."""

    def __init__(self, inner: InMemoryRegistry) -> None:
        self.inner = inner
        self.down = False
        self.calls = 0
        self.error: Exception = RegistryUnavailable("injected: connection refused")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.down:
                raise self.error
            return attr(*args, **kwargs)

        return call


def test_registry_outage_falls_back_logs_once_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster(["a", "b", "c"], registry_retry_s=1.0, registry_retry_max_s=4.0)
    flaky = FlakyRegistry(cluster.registry)
    router = Router(flaky, RouterConfig(registry_retry_s=1.0, registry_retry_max_s=4.0), HASHER,
                    clock=cluster.clock)  # type: ignore[arg-type]
    chain = HASHER.hash_chain(tokens(9))
    cluster.hold("c", chain)
    assert router.route_hashes(chain).node_id == "c"
    flaky.down = True
    with caplog.at_level(logging.WARNING, logger="routing.router"):
        first = router.route_hashes(chain)
        calls = flaky.calls
        again = [router.route_hashes(chain) for _ in range(5)]  # within the backoff: no calls
    assert flaky.calls == calls
    assert first.fallback == "registry_unavailable" and first.scores == {}
    assert {d.node_id for d in again} == {first.node_id}
    assert first.node_id == HashRing(["a", "b", "c"], 64).pick(ring_key(chain[0].tobytes()), {"a", "b", "c"})
    assert first.reason == f"registry unavailable; ring affinity on the first block -> {first.node_id}"
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    assert router.registry_down and router.stats().registry_failures == 1
    # retried after the backoff, which doubles while it stays down (1 s, 2 s, 4 s, 4 s)
    for wait, failures in ((1.0, 2), (2.0, 3), (4.0, 4), (4.0, 5)):
        cluster.clock.advance(wait - 0.01)
        router.route_hashes(chain)
        assert router.stats().registry_failures == failures - 1
        cluster.clock.advance(0.01)
        router.route_hashes(chain)
        assert router.stats().registry_failures == failures
    flaky.down = False
    for node in "abc":
        assert cluster.registry.heartbeat(node, cluster.epochs[node], NodeLoad())
    cluster.clock.advance(4.0)
    recovered = router.route_hashes(chain)
    assert (recovered.node_id, recovered.fallback, router.registry_down) == ("c", None, False)
    stats = router.stats()
    assert stats.unavailable_fallbacks == 1 + 5 + 8 and stats.by_prefix == 2


def test_an_error_reply_from_the_registry_degrades_like_an_outage() -> None:
    """A registry that answers with an error (a Redis error reply, a reply it cannot parse)
    routes no better than one that does not answer: the request still gets a node."""
    cluster = Cluster(["a", "b", "c"])
    flaky = FlakyRegistry(cluster.registry)
    router = Router(flaky, RouterConfig(), HASHER, clock=cluster.clock)  # type: ignore[arg-type]
    chain = HASHER.hash_chain(tokens(9))
    cluster.hold("c", chain)
    assert router.route_hashes(chain).node_id == "c"
    flaky.down, flaky.error = True, RegistryDataError("injected: ERR unexpected reply")
    decision = router.route_hashes(chain)
    assert decision.fallback == "registry_unavailable"
    assert "ERR unexpected reply" not in decision.reason  # the reason names the fallback, the log the error
    assert router.registry_down and router.stats().registry_failures == 1
    flaky.down = False
    cluster.clock.advance(RouterConfig().registry_retry_s)
    assert router.route_hashes(chain).node_id == "c" and not router.registry_down


def test_outage_before_any_answer() -> None:
    cluster = Cluster(["a"])
    flaky = FlakyRegistry(cluster.registry)
    flaky.down = True
    router = Router(flaky, RouterConfig(), HASHER, clock=cluster.clock)  # type: ignore[arg-type]
    chain = HASHER.hash_chain(tokens(10))
    with pytest.raises(RegistryUnavailable, match="no node is known"):
        router.route_hashes(chain)
    decision = router.route_hashes(chain, candidates=["x", "y"])
    assert decision.node_id in ("x", "y") and decision.fallback == "registry_unavailable"


def test_candidates_restrict_the_choice() -> None:
    cluster = Cluster(["a", "b", "c"])
    chain = HASHER.hash_chain(tokens(11))
    cluster.hold("a", chain)
    cluster.hold("b", chain[:2])
    decision = cluster.router.route_hashes(chain, candidates=["b", "c"])
    assert decision.node_id == "b" and set(decision.scores) == {"b", "c"}
    # candidates the registry does not know: ring affinity among them
    unknown = cluster.router.route_hashes(chain, candidates=["zz"])
    assert (unknown.node_id, unknown.fallback) == ("zz", "no_live_nodes")
    with pytest.raises(InvalidArgument):
        cluster.router.route_hashes(chain, candidates=[])


def test_no_live_nodes() -> None:
    cluster = Cluster(["a"])
    cluster.clock.advance(60)
    with pytest.raises(NoLiveNodes):
        cluster.router.route(tokens(1))


def test_registry_without_live_nodes_keeps_the_known_ones() -> None:
    cluster = Cluster(["a", "b", "c"])
    chain = HASHER.hash_chain(tokens(14))
    assert cluster.router.route_hashes(chain).fallback == "no_match"
    cluster.clock.advance(60)  # every node silent (e.g. the registry restarted empty)
    decision = cluster.router.route_hashes(chain)
    assert decision.fallback == "no_live_nodes"
    assert decision.node_id == HashRing(["a", "b", "c"], 64).pick(ring_key(chain[0].tobytes()), {"a", "b", "c"})
    assert decision.reason == f"the registry reports no live node; ring affinity over 3 known nodes -> {decision.node_id}"
    assert cluster.router.stats().no_live_fallbacks == 1


def test_short_prompts_stick_together() -> None:
    nodes = [f"n{i}" for i in range(8)]
    cluster = Cluster(nodes)
    picks = set()
    for _ in range(3):
        picks.add(cluster.router.route([1, 2, 3]).node_id)
        for node in nodes:
            cluster.load(node, 0)
    assert len(picks) == 1
    assert cluster.router.route([1, 2, 3]).prompt_blocks == 0
    spread = {cluster.router.route([i, 2, 3]).node_id for i in range(40)}
    assert len(spread) > 1


def test_holdings_with_stride() -> None:
    clock = FakeClock()
    registry = InMemoryRegistry(RegistryConfig(index_stride_blocks=4), clock=clock)
    epoch = registry.register_node("a")
    registry.register_node("b")
    chain = HASHER.hash_chain(tokens(12))
    registry.publish(EventBatch("a", epoch, 1, (BlockEvent.stored(chain, Tier.CPU),)))
    assert registry.longest_prefix(chain) == {"a": PrefixHolding(8, 0, 8, 0)}
    decision = Router(registry, RouterConfig(), HASHER, clock=clock).route_hashes(chain)
    assert (decision.node_id, decision.matched_blocks) == ("a", 8)


def test_new_prefixes_take_the_less_loaded_of_two_ring_choices() -> None:
    nodes = [f"n{i}" for i in range(4)]
    cluster = Cluster(nodes, fallback_choices=2)
    chain = HASHER.hash_chain(tokens(13))
    key = ring_key(chain[0].tobytes())
    first, second = list(HashRing(nodes, 64).walk(key))[:2]
    assert cluster.router.route_hashes(chain).node_id == first
    for node in nodes:
        cluster.load(node, 3 if node == first else 0)
    assert cluster.router.route_hashes(chain).node_id == second
    plain = Cluster(nodes, fallback_choices=1)
    for node in nodes:
        plain.load(node, 3 if node == first else 0)
    assert plain.router.route_hashes(chain).node_id == first


def test_new_prefixes_go_to_the_choice_sent_fewer_recent_requests() -> None:
    nodes = [f"n{i}" for i in range(4)]
    cluster = Cluster(nodes, fallback_choices=2)
    chain = HASHER.hash_chain(tokens(16))
    first, second = list(HashRing(nodes, 64).walk(ring_key(chain[0].tobytes())))[:2]
    busy = HASHER.hash_chain(tokens(17))
    cluster.hold(first, busy)
    for _ in range(3):  # prefix hits on the home, no requests on the second choice
        assert cluster.router.route_hashes(busy).node_id == first
    # counts as of the last heartbeat: none seen yet, so the home still takes the new prefix
    assert cluster.router.route_hashes(chain).node_id == first
    for node in nodes:
        cluster.load(node, 0)
    decision = cluster.router.route_hashes(chain)
    assert decision.node_id == second and decision.fallback == "no_match"
    # between heartbeats the choice holds, so the prefix's next request finds what it stored
    assert cluster.router.route_hashes(chain).node_id == second
    # in-flight load only breaks ties in recent requests
    for node in nodes:
        cluster.load(node, 5 if node == second else 0)
    assert cluster.router.route_hashes(chain).node_id == second


def test_recent_request_counts_fade_with_the_half_life() -> None:
    nodes = ["a", "b"]
    chain = HASHER.hash_chain(tokens(18))
    first, second = list(HashRing(nodes, 64).walk(ring_key(chain[0].tobytes())))
    old, new = HASHER.hash_chain(tokens(19)), HASHER.hash_chain(tokens(20))

    def place_after_history(half_life: int) -> str:
        """40 requests to the home long ago, 12 to the other node lately; then a new prefix."""
        cluster = Cluster(nodes, fallback_choices=2, placement_half_life_requests=half_life)
        cluster.hold(first, old)
        cluster.hold(second, new)
        for held, times in ((old, 40), (new, 12)):
            for _ in range(times):
                cluster.router.route_hashes(held)
        for node in nodes:
            cluster.load(node, 0)
        return cluster.router.route_hashes(chain).node_id

    # the 12 recent requests outweigh the 40 spread over the four half-lives before them
    assert place_after_history(10) == first
    # without the fading the 40 still count in full
    assert place_after_history(1_000_000) == second


def test_recent_counts_survive_rescaling() -> None:
    nodes = ["a", "b"]
    cluster = Cluster(nodes, fallback_choices=2, placement_half_life_requests=1)  # doubles per request
    chain = HASHER.hash_chain(tokens(21))
    first, second = list(HashRing(nodes, 64).walk(ring_key(chain[0].tobytes())))
    on_first, on_second = HASHER.hash_chain(tokens(22)), HASHER.hash_chain(tokens(24))
    cluster.hold(first, on_first)
    cluster.hold(second, on_second)
    for _ in range(2000):  # 2**2000 overflows a float unless the counts are rescaled
        cluster.router.route_hashes(on_second)
    for _ in range(3):  # the latest requests outweigh all before them (14 units to 2)
        cluster.router.route_hashes(on_first)
    for node in nodes:
        cluster.load(node, 0)
    # overflowed counts would both be inf, a tie that ring order gives to the home
    assert cluster.router.route_hashes(chain).node_id == second


def test_prompts_shorter_than_the_stride_keep_their_home_despite_recent_requests() -> None:
    clock = FakeClock()
    registry = InMemoryRegistry(RegistryConfig(index_stride_blocks=4), clock=clock)
    epochs = {n: registry.register_node(n) for n in ("a", "b")}
    router = Router(registry, RouterConfig(fallback_choices=2), HASHER, clock=clock)
    short = HASHER.hash_chain(tokens(23))[:3]  # never indexed with a stride of 4
    home = router.route_hashes(short).node_id
    for _ in range(5):
        clock.advance(0.01)
        for node, epoch in epochs.items():
            registry.heartbeat(node, epoch, NodeLoad(0, 0, 0))
        assert router.route_hashes(short).node_id == home


def test_a_new_prefix_avoids_a_full_home_when_an_equally_loaded_choice_has_room() -> None:
    nodes = [f"n{i}" for i in range(4)]
    chain = HASHER.hash_chain(tokens(14))
    first, second = list(HashRing(nodes, 64).walk(ring_key(chain[0].tobytes())))[:2]

    def pick(loads: dict[str, tuple[int, int, int]]) -> RouteDecision:
        cluster = Cluster(nodes, fallback_choices=2)  # fresh: no recent requests anywhere
        for node in nodes:
            cluster.load(node, *loads[node])
        return cluster.router.route_hashes(chain)

    # the home has none of its blocks free, the others half
    decision = pick({n: (0, 0 if n == first else 50, 100) for n in nodes})
    assert decision.node_id == second and "ring affinity" in decision.reason
    # every choice full: the home again
    assert pick({n: (0, 0, 100) for n in nodes}).node_id == first
    # load comes before room
    assert pick({n: (0 if n == first else 2, 0 if n == first else 50, 100) for n in nodes}).node_id == first
    # unknown capacity counts as room
    assert pick({n: (0, 0, 0) for n in nodes}).node_id == first


def test_concurrent_routing_keeps_counts() -> None:
    cluster = Cluster([f"n{i}" for i in range(4)], imbalance_threshold=1.25)
    chain = HASHER.hash_chain(tokens(15))
    cluster.hold("n0", chain)
    picks: list[str] = []
    guard = threading.Lock()

    def work() -> None:
        for _ in range(100):
            node = cluster.router.route_hashes(chain).node_id
            with guard:
                picks.append(node)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(picks) == 400 and cluster.router.stats().routed == 400
    # bounded loads hold under concurrency: ceil(1.25 * 400 / 4) = 125
    assert max(Counter(picks).values()) <= 125


def test_an_unindexed_prompt_keeps_its_node_between_heartbeats() -> None:
    # Nothing holds the prompt yet (or it is shorter than the registry's stride): its later
    # requests must land where the first one went, although that node now has more requests
    # routed to it than the others.
    cluster = Cluster(["a", "b", "c", "d"])
    for node in "abcd":
        cluster.load(node, 0)
    chain = HASHER.hash_chain(tokens(42))
    first = cluster.router.route_hashes(chain).node_id
    assert [cluster.router.route_hashes(chain).node_id for _ in range(5)] == [first] * 5
    # A heartbeat that reports the home node busy moves new requests to the next candidate.
    cluster.load(first, 8)
    assert cluster.router.route_hashes(chain).node_id != first
