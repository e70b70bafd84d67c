"""Which per-node cache policy could bring the simulator within 95% of an infinite cache?

    .venv/bin/python -m benchmarks.cache_policy_study [--trace FILE] [--capacity-fraction 0.4]
                                                      [--cluster]

One cache holding ``--capacity-fraction`` of the trace's unique blocks (default 40%: the
eight simulated nodes' 5% each, put together, so routing plays no part) replays a
Mooncake-format trace in arrival order. A request's hits are its leading cached blocks, as in
:mod:`routing.simulator`; afterwards the policy decides which of its blocks to keep. Printed:
how many unique blocks are seen only once, and each policy's block hit rate beside the
infinite cache's.

- ``lru``: the simulator's cache (a chain touched deepest first, so tails go before prefixes);
- ``leaf-first lru``: evict the least recently used cached block with no cached child (the
  radix-tree order of SGLang). Because an ancestor is used whenever a descendant is, it is the
  same order as ``lru`` on a trace of prefix chains: the two figures are equal;
- ``lfu``: least used first, least recent among equals; counts kept for every block ever seen
  (global), or only while a block is cached (the ``lfu`` of ``kvcluster.core.eviction``);
- admission filters: ``doorkeeper`` (LRU that keeps a block only from its second sighting,
  remembered in a ghost set), ``2q`` (Johnson & Shasha), ``arc`` (Megiddo & Modha) and
  ``s3-fifo`` (Yang et al., SOSP 2023: 10% probation FIFO, main FIFO with reinsertion, ghost);
- ``belady``: the offline optimum at block level (evict the block used again farthest in the
  future; a block never used again is not kept): the upper bound of any policy;
- two offline oracles bolted onto a two-class cache (blocks used once, evicted first and
  least recent first, below blocks used twice or more): one that never keeps a block that will
  not be used again after its first use (perfect admission), one that evicts first every
  reused block that will not be used again (it knows when a prompt family ends).

With ``--cluster``, each online policy also runs as the per-node cache of the simulator
(:func:`routing.simulator.simulate`, 8 nodes x 5%): the router, round-robin and consistent
hashing over the same cache policy, with hit rate, load imbalance and routing overhead; and
so do ``belady`` and the admission oracle, as the bounds of any per-node policy.

The oracles show where the online policies lose: ``belady`` reaches the infinite cache's hit
rate, so capacity is not what is missing; what is missing is knowing, at a prompt's first
sighting, whether it will come back.

``reuse-predicting`` (:class:`ReusePredicting`) learns that online from features an engine
has when a request finishes: how many tokens it generated, and whether its prompt extended
a known prefix. On the shared Mooncake trace short answers are followed up and long ones
mostly are not, so one cache of the combined capacity reaches ~96% of the infinite cache
(LRU 85%); split over 8 nodes behind the router it reaches ~92% (imbalance 1.03), and ~94%
with the engine's shorter recency horizon (2 turnovers instead of 10). Its one constant, the
recency ``horizon``, was chosen on this trace, so read these figures as what such a policy
can do here, not as a general result. Per node behind the router, the offline optimum
(``belady`` with the trace's future) reaches 99.6%, and a two-class LRU with a perfect
admission oracle 95.6%: what an online policy lacks is the knowledge of which prompts
come back.
"""

from __future__ import annotations

import argparse
import heapq
import math
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import Protocol

from routing.simulator import (
    MOONCAKE_BLOCK_TOKENS,
    PolicyResult,
    SimulationConfig,
    TraceRequest,
    load_mooncake_trace,
    simulate,
)

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "synthetic_trace.jsonl"
NEVER = float("inf")
Chain = tuple[int, ...]


class Cache(Protocol):
    def __contains__(self, block: object) -> bool: ...

    def access(self, ids: Chain, t: int) -> None: ...


def leading(cache: Container[int], ids: Chain) -> int:
    count = 0
    for block in ids:
        if block not in cache:
            break
        count += 1
    return count


class LRU:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, block: object) -> bool:
        return block in self.blocks

    def access(self, ids: Chain, t: int) -> None:
        for block in reversed(ids):  # deepest first: the chain head is freshest
            if block in self.blocks:
                self.blocks.move_to_end(block)
            else:
                self.blocks[block] = None
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


class LeafFirstLRU:
    """Evicts the least recently used leaf (a cached block none of whose children is cached)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.last: dict[int, int] = {}
        self.parent: dict[int, int | None] = {}
        self.children: Counter[int] = Counter()
        self.leaves: list[tuple[int, int]] = []  # (last use, block), stale entries skipped
        self.tick = 0

    def __contains__(self, block: object) -> bool:
        return block in self.last

    def access(self, ids: Chain, t: int) -> None:
        parent = None
        for block in ids:
            self.tick += 1
            if block not in self.last:
                self.parent[block] = parent
                if parent is not None:
                    self.children[parent] += 1
            self.last[block] = self.tick
            parent = block
        for block in ids:
            if not self.children[block]:
                heapq.heappush(self.leaves, (self.last[block], block))
        while len(self.last) > self.capacity:
            stamp, block = heapq.heappop(self.leaves)
            if self.last.get(block) != stamp or self.children[block]:
                continue
            del self.last[block]
            up = self.parent.pop(block)
            if up is not None and up in self.last:
                self.children[up] -= 1
                if not self.children[up]:
                    heapq.heappush(self.leaves, (self.last[up], up))


class PriorityCache(ABC):
    """Evicts the lowest ``(priority, tick)``; subclasses give a block's priority at each use
    (``None``: do not keep it). A min-heap with lazily skipped stale entries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.live: dict[int, tuple[float, int]] = {}
        self.heap: list[tuple[tuple[float, int], int]] = []
        self.tick = 0

    def __contains__(self, block: object) -> bool:
        return block in self.live

    @abstractmethod
    def priority(self, block: int, ids: Chain, depth: int, t: int) -> float | None:
        """The block's priority at this use; None: do not keep it."""

    def access(self, ids: Chain, t: int) -> None:
        for depth in range(len(ids) - 1, -1, -1):
            block = ids[depth]
            self.tick += 1
            priority = self.priority(block, ids, depth, t)
            if priority is None:
                self.live.pop(block, None)
                continue
            key = (priority, self.tick)
            self.live[block] = key
            heapq.heappush(self.heap, (key, block))
        while len(self.live) > self.capacity:
            key, block = heapq.heappop(self.heap)
            if self.live.get(block) == key:
                del self.live[block]


class LFU(PriorityCache):
    def __init__(self, capacity: int, global_counts: bool) -> None:
        super().__init__(capacity)
        self.counts: Counter[int] = Counter()
        self.global_counts = global_counts

    def priority(self, block: int, ids: Chain, depth: int, t: int) -> float | None:
        if not self.global_counts and block not in self.live:
            self.counts[block] = 0
        self.counts[block] += 1
        return self.counts[block]


class Belady(PriorityCache):
    """Offline: priority = minus the index of the next request using the block."""

    def __init__(self, capacity: int, next_use: list[list[float]]) -> None:
        super().__init__(capacity)
        self.next_use = next_use

    def priority(self, block: int, ids: Chain, depth: int, t: int) -> float | None:
        upcoming = self.next_use[t][depth]
        return None if upcoming == NEVER else -upcoming


class TwoClassOracle(PriorityCache):
    """Blocks used once below blocks used again (each class least recent first), plus one
    offline oracle: ``admission`` drops a first-used block that will not be used again;
    ``ends`` puts a reused block that will not be used again below everything."""

    def __init__(self, capacity: int, next_use: list[list[float]], oracle: str) -> None:
        super().__init__(capacity)
        self.next_use = next_use
        self.oracle = oracle
        self.counts: Counter[int] = Counter()

    def priority(self, block: int, ids: Chain, depth: int, t: int) -> float | None:
        self.counts[block] += 1
        dead = self.next_use[t][depth] == NEVER
        if self.counts[block] == 1:
            return None if self.oracle == "admission" and dead else 1
        return 0 if self.oracle == "ends" and dead else 2


class Doorkeeper(LRU):
    """LRU that stores a block only at its second sighting (first sightings: a ghost set)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.ghost: set[int] = set()

    def access(self, ids: Chain, t: int) -> None:
        for block in reversed(ids):
            if block in self.blocks:
                self.blocks.move_to_end(block)
            elif block in self.ghost:
                self.ghost.discard(block)
                self.blocks[block] = None
            else:
                self.ghost.add(block)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


class TwoQ:
    """2Q: A1in FIFO (25%) for first uses, A1out ghost (50%), Am LRU for blocks seen again."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.kin, self.kout = max(1, capacity // 4), max(1, capacity // 2)
        self.a1in: OrderedDict[int, None] = OrderedDict()
        self.a1out: OrderedDict[int, None] = OrderedDict()
        self.am: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, block: object) -> bool:
        return block in self.a1in or block in self.am

    def access(self, ids: Chain, t: int) -> None:
        for block in reversed(ids):
            if block in self.am:
                self.am.move_to_end(block)
            elif block in self.a1in:
                continue
            elif block in self.a1out:
                del self.a1out[block]
                self._reclaim()
                self.am[block] = None
            else:
                self._reclaim()
                self.a1in[block] = None

    def _reclaim(self) -> None:
        if len(self.a1in) + len(self.am) < self.capacity:
            return
        if len(self.a1in) > self.kin or not self.am:
            block, _ = self.a1in.popitem(last=False)
            self.a1out[block] = None
            if len(self.a1out) > self.kout:
                self.a1out.popitem(last=False)
        else:
            self.am.popitem(last=False)


class ARC:
    def __init__(self, capacity: int) -> None:
        self.c, self.p = capacity, 0
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, block: object) -> bool:
        return block in self.t1 or block in self.t2

    def _replace(self, block: int) -> None:
        if self.t1 and (len(self.t1) > self.p or (block in self.b2 and len(self.t1) == self.p)):
            self.b1[self.t1.popitem(last=False)[0]] = None
        else:
            self.b2[self.t2.popitem(last=False)[0]] = None

    def access(self, ids: Chain, t: int) -> None:
        c = self.c
        for block in reversed(ids):
            if block in self.t1:
                del self.t1[block]
                self.t2[block] = None
            elif block in self.t2:
                self.t2.move_to_end(block)
            elif block in self.b1:
                self.p = min(c, self.p + max(len(self.b2) // max(len(self.b1), 1), 1))
                self._replace(block)
                del self.b1[block]
                self.t2[block] = None
            elif block in self.b2:
                self.p = max(0, self.p - max(len(self.b1) // max(len(self.b2), 1), 1))
                self._replace(block)
                del self.b2[block]
                self.t2[block] = None
            else:
                l1 = len(self.t1) + len(self.b1)
                if l1 == c:
                    if len(self.t1) < c:
                        self.b1.popitem(last=False)
                        self._replace(block)
                    else:
                        self.t1.popitem(last=False)
                elif l1 + len(self.t2) + len(self.b2) >= c:
                    if l1 + len(self.t2) + len(self.b2) == 2 * c:
                        self.b2.popitem(last=False)
                    self._replace(block)
                self.t1[block] = None


class S3FIFO:
    """S3-FIFO: a 10% FIFO for new blocks; those used again there move to the main FIFO
    (reinserted while their use count, capped at 3, is positive); the rest leave a ghost that
    sends them straight to main when they come back."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.small_capacity = max(1, capacity // 10)
        self.main_capacity = capacity - self.small_capacity
        self.small: OrderedDict[int, None] = OrderedDict()
        self.main: OrderedDict[int, None] = OrderedDict()
        self.ghost: OrderedDict[int, None] = OrderedDict()
        self.freq: dict[int, int] = {}

    def __contains__(self, block: object) -> bool:
        return block in self.small or block in self.main

    def access(self, ids: Chain, t: int) -> None:
        for block in reversed(ids):
            if block in self.freq:
                self.freq[block] = min(self.freq[block] + 1, 3)
                continue
            while len(self.small) + len(self.main) >= self.capacity:
                if len(self.small) >= self.small_capacity or not self.main:
                    self._evict_small()
                else:
                    self._evict_main()
            if block in self.ghost:
                del self.ghost[block]
                self.main[block] = None
            else:
                self.small[block] = None
            self.freq[block] = 0

    def _evict_small(self) -> None:
        block, _ = self.small.popitem(last=False)
        if self.freq[block]:
            self.main[block] = None
            self.freq[block] = 0
            if len(self.main) > self.main_capacity:
                self._evict_main()
            return
        del self.freq[block]
        self.ghost[block] = None
        if len(self.ghost) > self.main_capacity:
            self.ghost.popitem(last=False)

    def _evict_main(self) -> None:
        while True:
            block, _ = self.main.popitem(last=False)
            if not self.freq[block]:
                del self.freq[block]
                return
            self.freq[block] -= 1
            self.main[block] = None


class ReusePredicting(PriorityCache):
    """Online learned priorities (in the spirit of LRB, Song et al., NSDI 2020): a block's
    worth is the chance that a later request extends the last request that used it.

    Each request falls in a bucket of features an engine knows once the request has
    finished (its blocks stay pinned while it runs): ``log2(generated tokens + 1)`` and
    whether the prompt extended a prefix already seen. A bucket's chance is learned from
    what happened so far, ``(extended + 1) / (requests + 2)``: a request counts as extended
    when a later prompt's leading run of known blocks ends inside it. The trailing partial
    block of a prompt (``input_tokens`` not a multiple of the block) is hit only by a
    prompt that repeats it exactly, so it gets a chance of its own, learned the same way.
    A block's priority is ``log(chance) + tick / (horizon * capacity)``: recency still
    counts, a factor e per ``horizon`` cache turnovers. Nothing is known in advance.

    Two rules make it what a node engine could run on its radix tree:

    - a use never lowers a block's priority (the new one is the larger of the two). A chain
      head is used whenever any of its tails is, so it never ranks below them: the lowest
      priority is always a leaf, as a tree that evicts leaves only needs (a heap over the
      nodes, no scan), instead of a later short-lived request demoting a shared prefix
      below the tails that extend it;
    - an engine matches a prompt before the request runs, when its generated length is not
      known yet: the blocks a request finds cached are touched with the chance of all
      requests so far, and only its new blocks wait for its own bucket.

    Both cost nothing here: on the shared trace they gain a few tenths of a point.
    """

    def __init__(self, capacity: int, requests: Sequence[TraceRequest], horizon: float = 10.0,
                 block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> None:
        super().__init__(capacity)
        self.by_chain = {r.block_ids: r for r in requests}
        self.block_tokens = block_tokens
        self.recency = 1.0 / (horizon * capacity)
        self.last_user: dict[int, int] = {}  # block -> the latest request that used it
        self.tail_of: dict[int, int] = {}  # request -> its partial trailing block
        self.bucket_of: dict[int, tuple[int, bool]] = {}
        self.extended: set[int] = set()
        self.seen: Counter[tuple[int, bool] | str] = Counter()
        self.hits: Counter[tuple[int, bool] | str] = Counter()
        self.serial = 0
        self.chance = self.tail_chance = self.neutral = 0.0
        self.found = 0  # leading blocks of the current request already cached

    def chance_of(self, bucket: tuple[int, bool] | str) -> float:
        return (self.hits[bucket] + 1) / (self.seen[bucket] + 2)

    def access(self, ids: Chain, t: int) -> None:
        request = self.by_chain[ids]
        serial, self.serial = self.serial, self.serial + 1
        known = leading(self.last_user, ids)
        if known:
            extended = self.last_user[ids[known - 1]]
            if extended not in self.extended:
                self.extended.add(extended)
                self.hits[self.bucket_of[extended]] += 1
            if self.tail_of.get(extended) == ids[known - 1]:
                self.hits["tail"] += 1
        bucket = (int(math.log2(request.output_tokens + 1)), known > 0)
        self.bucket_of[serial] = bucket
        self.seen[bucket] += 1
        partial = request.input_tokens % self.block_tokens != 0
        if partial and ids:
            self.tail_of[serial] = ids[-1]
            self.seen["tail"] += 1
        for block in ids:
            self.last_user[block] = serial
        self.chance = math.log(self.chance_of(bucket))
        self.tail_chance = math.log(self.chance_of("tail")) if partial else self.chance
        requests = sum(n for b, n in self.seen.items() if b != "tail")
        self.neutral = math.log((sum(n for b, n in self.hits.items() if b != "tail") + 1) / (requests + 2))
        self.found = leading(self, ids)
        super().access(ids, t)

    def priority(self, block: int, ids: Chain, depth: int, t: int) -> float | None:
        chance = self.tail_chance if depth == len(ids) - 1 else self.chance
        if depth < self.found:  # matched before the request ran: its bucket was not known yet
            chance = max(chance, self.neutral)
        held = self.live.get(block)
        priority = chance + self.tick * self.recency
        return priority if held is None or held[0] < priority else held[0]


class NodeCache:
    """A study cache as a simulated node's cache (:class:`routing.simulator.BlockCache`): the
    blocks stored and evicted by a request are found by comparing what is cached before and
    after it. ``trace_clock``, shared by the nodes of one replay, numbers requests by their
    place in the trace (the offline policies look up the future by it); else each node
    numbers its own."""

    def __init__(self, cache: Cache, capacity: int, trace_clock: list[int] | None = None) -> None:
        self.cache = cache
        self.capacity = capacity
        self.held: dict[int, tuple[int, int]] = {}  # block -> (family, depth)
        self.clock = trace_clock if trace_clock is not None else [0]  # the next request's number

    def __len__(self) -> int:
        return len(self.held)

    def leading_hits(self, ids: Sequence[int]) -> int:
        return leading(self.cache, tuple(ids))

    def insert(self, ids: Sequence[int], generated_tokens: int | None = None,
               ) -> tuple[list[int], list[tuple[int, int, int]]]:
        chain = tuple(ids)  # the learned policy reads the request's generated length itself
        self.cache.access(chain, self.clock[0])
        self.clock[0] += 1  # the simulator serves every request once, in order
        family = chain[0] if chain else 0
        stored = [d for d, b in enumerate(chain) if b not in self.held and b in self.cache]
        evicted = [(b, f, d) for b, (f, d) in self.held.items() if b not in self.cache]
        for block, _, _ in evicted:
            del self.held[block]
        for depth in stored:
            self.held[chain[depth]] = (family, depth)
        return stored, evicted


ONLINE: dict[str, Callable[[int], Cache]] = {
    "lru": LRU,
    "lfu, global counts": lambda c: LFU(c, global_counts=True),
    "lfu, counts while cached": lambda c: LFU(c, global_counts=False),
    "arc": ARC,
    "s3-fifo": S3FIFO,
}


def cluster_study(requests: Sequence[TraceRequest]) -> None:
    config = SimulationConfig(nodes=8, capacity_fraction=0.05)
    print(f"\n{'node cache':<26}{'routing':<17}{'hit rate':>9}{'% of inf':>10}{'imbalance':>10}"
          f"{'overhead us':>12}")
    online = dict(ONLINE)
    online["reuse-predicting"] = lambda c: ReusePredicting(c, requests)
    # The horizon of the engine's ``reuse`` policy (REUSE_HORIZON_TURNOVERS), for comparison.
    online["reuse-predicting, hz 2"] = lambda c: ReusePredicting(c, requests, horizon=2.0)
    for name, make in online.items():

        def node_cache(capacity: int, make: Callable[[int], Cache] = make) -> NodeCache:
            return NodeCache(make(capacity), capacity)

        report = simulate(requests, config, ("router", "round_robin", "consistent_hash"), cache_factory=node_cache)
        for r in report.results:
            _cluster_row(name, r, report.infinite_hit_rate)
    # Offline bounds per node: each node knows when each block is used next in the trace
    # (on any node: routing keeps a prefix's requests together, so it is nearly its own).
    upcoming = next_uses([r.block_ids for r in requests])
    offline: dict[str, Callable[[int], Cache]] = {
        "belady (offline)": lambda c: Belady(c, upcoming),
        "oracle admission": lambda c: TwoClassOracle(c, upcoming, "admission"),
    }
    for name, make in offline.items():
        for policy in ("router", "consistent_hash"):
            clock = [0]

            def timed_cache(capacity: int, make: Callable[[int], Cache] = make, clock: list[int] = clock) -> NodeCache:
                return NodeCache(make(capacity), capacity, clock)

            report = simulate(requests, config, (policy,), cache_factory=timed_cache)
            _cluster_row(name, report.results[0], report.infinite_hit_rate)


def _cluster_row(name: str, r: PolicyResult, infinite: float) -> None:
    print(f"{name:<26}{r.policy:<17}{r.hit_rate:>9.2%}{r.hit_rate / infinite:>10.1%}"
          f"{r.imbalance:>10.3f}{r.overhead_us_mean:>12.1f}")


def next_uses(chains: Sequence[Chain]) -> list[list[float]]:
    """``[i][k]``: the index of the next request after ``i`` holding ``chains[i][k]``."""
    upcoming: list[list[float]] = [[] for _ in chains]
    seen_at: dict[int, float] = {}
    for i in range(len(chains) - 1, -1, -1):
        upcoming[i] = [seen_at.get(b, NEVER) for b in chains[i]]
        for block in chains[i]:
            seen_at[block] = i
    return upcoming


def hit_rate(cache: Cache | None, chains: Sequence[Chain]) -> float:
    """Leading-block hit rate; ``None``: the infinite cache."""
    seen: set[int] = set()
    hits = total = 0
    for t, ids in enumerate(chains):
        hits += leading(seen if cache is None else cache, ids)
        total += len(ids)
        if cache is None:
            seen.update(ids)
        else:
            cache.access(ids, t)
    return hits / total if total else 0.0


def family_sizes(chains: Sequence[Chain]) -> Counter[int]:
    """How many prompt families (requests sharing a first block) have n requests."""
    families: defaultdict[int, int] = defaultdict(int)
    for ids in chains:
        if ids:
            families[ids[0]] += 1
    return Counter(families.values())


def study(requests: Sequence[TraceRequest], capacity: int) -> list[tuple[str, float]]:
    chains = [r.block_ids for r in requests]
    upcoming = next_uses(chains)
    policies: dict[str, Cache] = {
        "lru (simulator)": LRU(capacity),
        "leaf-first lru": LeafFirstLRU(capacity),
        "lfu, global counts": LFU(capacity, global_counts=True),
        "lfu, counts while cached": LFU(capacity, global_counts=False),
        "doorkeeper lru": Doorkeeper(capacity),
        "2q": TwoQ(capacity),
        "arc": ARC(capacity),
        "s3-fifo": S3FIFO(capacity),
        "reuse-predicting (learned)": ReusePredicting(capacity, requests),
        "belady (offline)": Belady(capacity, upcoming),
        "2-class + oracle admission": TwoClassOracle(capacity, upcoming, "admission"),
        "2-class + oracle family ends": TwoClassOracle(capacity, upcoming, "ends"),
    }
    return [(name, hit_rate(cache, chains)) for name, cache in policies.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake-format trace")
    parser.add_argument("--capacity-fraction", type=float, default=0.40,
                        help="the cache's share of the unique blocks (default 0.40 = 8 x 5%%)")
    parser.add_argument("--cluster", action="store_true",
                        help="also replay the 8-node simulation with each online policy per node")
    args = parser.parse_args()
    requests = load_mooncake_trace(args.trace)
    chains = [r.block_ids for r in requests]
    uses = Counter(b for ids in chains for b in ids)
    unique = len(uses)
    once = sum(1 for n in uses.values() if n == 1)
    # as the simulator sizes it: 8 nodes x int(5% of unique) when the fraction is 8 x 5%
    capacity = max(1, int(unique * args.capacity_fraction))
    if abs(args.capacity_fraction - 0.40) < 1e-9:
        capacity = 8 * int(unique * 0.05)
    sizes = family_sizes(chains)
    print(f"{len(chains)} requests, {sum(uses.values()):,} block uses, {unique:,} unique blocks; "
          f"{once:,} ({once / unique:.1%}) used only once, {unique - once:,} used again")
    print(f"{sum(sizes.values()):,} prompt families (first block); {sizes[1]:,} with one request")
    print(f"capacity {capacity:,} blocks = {capacity / unique:.1%} of the unique blocks, "
          f"{capacity / (unique - once):.1%} of those used again")
    infinite = hit_rate(None, chains)
    print(f"{'policy':<32}{'hit rate':>9}{'% of inf':>10}")
    print(f"{'infinite':<32}{infinite:>9.2%}{1:>10.1%}")
    for name, rate in study(requests, capacity):
        print(f"{name:<32}{rate:>9.2%}{rate / infinite:>10.1%}")
    if args.cluster:
        cluster_study(requests)


if __name__ == "__main__":
    main()
