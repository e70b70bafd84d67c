"""Trace replay: the real router and registry against per-node caches of a given capacity.

A Mooncake-format trace (one JSON object per line: ``timestamp`` in ms, ``input_length`` and
``output_length`` in tokens, ``hash_ids``: one id per 512-token block, equal ids at equal
positions meaning an identical prefix) is replayed in arrival order through a simulated
cluster of ``nodes`` nodes. Each node caches ``capacity_fraction`` of the trace's unique
blocks in an LRU. Policies compared on the same trace:

- ``router``: :class:`routing.router.Router` over an :class:`InMemoryRegistry`; every node
  publishes what it stores and evicts, and heartbeats its load before every request;
- ``round_robin``, ``random`` (seeded) and ``consistent_hash`` (the ring on the first block);
- ``infinite``: one cache that never evicts (the upper bound of any routing).

Cache model: a request's leading cached blocks on its node are hits; then its blocks are
stored, touched deepest first so that a chain's first block is its most recently used and
eviction takes tails before the prefixes they extend (as vLLM frees blocks in reverse).
Load model: a request occupies its node from arrival for ``uncached_tokens / prefill_tps +
output_tokens / decode_tps`` seconds; a node's in-flight count is what it reports.

The per-node cache is pluggable (``cache_factory``: capacity -> a :class:`BlockCache`), so a
study can replay the cluster with another eviction policy; :class:`LRUBlockCache` is the
default. ``kvcluster simulate --node-cache index:POLICY`` replays with the node engine's own
prefix index instead (:class:`kvcluster.sim_cache.IndexBlockCache`), its eviction policy
told each request's generated length.

Session ends (``session_ends``, ``kvcluster simulate --session-ends``): the trace has no
conversation ids, so the replay derives, from the whole trace, where each conversation ends
(:func:`conversation_ends`) and tells the node that served a conversation's last request
that it is over, as a client calling ``ChatSession.end()`` would. This measures what
explicit ends are worth; it is information a plain replay does not have.

Reported per policy: block hit rate, tokens saved, load imbalance (max / mean requests per
node) and the routing overhead per request (for the router: :meth:`Router.route_hashes`
minus the time spent inside registry calls).
"""

from __future__ import annotations

import heapq
import json
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kvcluster.errors import InvalidArgument
from routing.block_hashing import BLOCK_HASH_DTYPE, BlockHashArray, BlockHasher
from routing.config import RegistryConfig, RouterConfig
from routing.memory_registry import InMemoryRegistry
from routing.registry import BlockEvent, EventBatch, NodeLoad, PrefixRegistry, Tier
from routing.router import HashRing, Router, ring_key

MOONCAKE_BLOCK_TOKENS = 512
POLICIES = ("router", "round_robin", "random", "consistent_hash")
_KEY_DTYPE = np.dtype([("id", "<u8"), ("tag", "<u8")])
_KEY_TAG = int.from_bytes(b"mooncake", "little")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    timestamp_s: float
    input_tokens: int
    output_tokens: int
    block_ids: tuple[int, ...]


def load_mooncake_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Parse a Mooncake trace; raises :class:`InvalidArgument` naming the bad line."""
    requests: list[TraceRequest] = []
    with Path(path).open() as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                ids = raw["hash_ids"]
                request = TraceRequest(
                    float(raw["timestamp"]) / 1000.0,
                    int(raw["input_length"]),
                    int(raw["output_length"]),
                    tuple(int(i) for i in ids),
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidArgument(f"{path}:{number}: not a Mooncake trace record ({exc})") from None
            if not isinstance(ids, list) or request.input_tokens < 0 or request.output_tokens < 0 \
                    or any(i < 0 for i in request.block_ids):
                raise InvalidArgument(f"{path}:{number}: negative lengths or ids")
            requests.append(request)
    if not requests:
        raise InvalidArgument(f"{path}: no requests in the trace")
    return sorted(requests, key=lambda r: r.timestamp_s)


def block_keys(block_ids: Sequence[int]) -> BlockHashArray:
    """16-byte registry keys for trace block ids (the id, then the tag ``mooncake``)."""
    keys = np.empty(len(block_ids), dtype=_KEY_DTYPE)
    keys["id"] = block_ids
    keys["tag"] = _KEY_TAG
    return keys.view(BLOCK_HASH_DTYPE)


class BlockCache(Protocol):
    """What the simulated cluster needs of a node's cache."""

    capacity: int

    def __len__(self) -> int: ...

    def leading_hits(self, ids: Sequence[int]) -> int:
        """How many leading blocks of ``ids`` are cached."""
        ...

    def insert(self, ids: Sequence[int], generated_tokens: int | None = None,
               ) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Store/touch a served chain whose request generated ``generated_tokens``; returns
        (depths newly stored, evicted (id, family, depth)): exactly what the node publishes
        to the registry."""
        ...

    def end(self, ids: Sequence[int], keep: int) -> None:
        """The conversation whose history is ``ids`` is over: its blocks past the first
        ``keep`` go first when room is needed."""
        ...


CacheFactory = Callable[[int], BlockCache]


class LRUBlockCache:
    """A node's block cache: LRU over block ids, ``capacity`` blocks.

    Each entry remembers its chain's first id and its depth, so an eviction can be published
    under the family the registry files it by.
    """

    __slots__ = ("_blocks", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise InvalidArgument(f"cache capacity must be >= 1 block, got {capacity}")
        self.capacity = capacity
        self._blocks: OrderedDict[int, tuple[int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def leading_hits(self, ids: Sequence[int]) -> int:
        count = 0
        for block in ids:
            if block not in self._blocks:
                break
            count += 1
        return count

    def insert(self, ids: Sequence[int], generated_tokens: int | None = None,
               ) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Store/touch a chain; returns (depths newly stored, evicted (id, family, depth)).
        LRU has no use for ``generated_tokens``."""
        blocks = self._blocks
        family = ids[0] if ids else 0
        new: list[int] = []
        for depth in range(len(ids) - 1, -1, -1):  # deepest first: the chain head is freshest
            block = ids[depth]
            if block in blocks:
                blocks.move_to_end(block)
            else:
                blocks[block] = (family, depth)
                new.append(depth)
        evicted = []
        while len(blocks) > self.capacity:
            block, (fam, depth) = blocks.popitem(last=False)
            evicted.append((block, fam, depth))
        new.reverse()
        if not evicted:
            return new, evicted
        # A block stored and evicted by the same insert (a chain longer than the cache) was
        # never announced: it is neither published as stored nor as removed.
        added = {ids[d] for d in new}
        gone = {block for block, _, _ in evicted}
        return [d for d in new if ids[d] not in gone], [e for e in evicted if e[0] not in added]


    def end(self, ids: Sequence[int], keep: int) -> None:
        """To the front of the LRU, deepest first (so the chain's tail goes before its head)."""
        blocks = self._blocks
        for block in ids[keep:]:
            if block not in blocks:
                break
            blocks.move_to_end(block, last=False)


def _runs(depths: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs ``[start, stop)`` of sorted depths."""
    start = prev = None
    for depth in depths:
        if start is None:
            start = prev = depth
        elif depth == prev + 1:  # type: ignore[operator]
            prev = depth
        else:
            yield start, prev + 1  # type: ignore[operator]
            start = prev = depth
    if start is not None:
        yield start, prev + 1  # type: ignore[operator]


class TimedRegistry:
    """Wraps a registry and accumulates the seconds spent inside it (to separate router
    overhead from registry time)."""

    def __init__(self, inner: PrefixRegistry) -> None:
        self.inner = inner
        self.seconds = 0.0

    @property
    def index_stride(self) -> int:
        return self.inner.index_stride

    def live_nodes(self) -> Any:
        start = time.perf_counter()
        try:
            return self.inner.live_nodes()
        finally:
            self.seconds += time.perf_counter() - start

    def longest_prefix(self, hashes: BlockHashArray, namespace: str = "default") -> Any:
        start = time.perf_counter()
        try:
            return self.inner.longest_prefix(hashes, namespace)
        finally:
            self.seconds += time.perf_counter() - start


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    nodes: int = 8
    capacity_fraction: float = 0.05
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    prefill_tokens_per_s: float = 10_000.0
    decode_tokens_per_s: float = 30.0
    seed: int = 0
    router: RouterConfig = field(default_factory=RouterConfig)
    session_ends: bool = False

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise InvalidArgument(f"nodes must be >= 1, got {self.nodes}")
        if not 0 < self.capacity_fraction <= 1:
            raise InvalidArgument(f"capacity_fraction must be in (0, 1], got {self.capacity_fraction}")
        if self.block_tokens < 1 or self.prefill_tokens_per_s <= 0 or self.decode_tokens_per_s <= 0:
            raise InvalidArgument("block_tokens and the token rates must be positive")


@dataclass(frozen=True, slots=True)
class PolicyResult:
    policy: str
    requests: int
    hit_blocks: int
    total_blocks: int
    tokens_saved: int
    total_tokens: int
    requests_per_node: tuple[int, ...]
    overhead_us_mean: float
    overhead_us_p50: float
    overhead_us_p99: float
    registry_us_mean: float = 0.0
    overload_overrides: int = 0
    no_match_fallbacks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def imbalance(self) -> float:
        mean = sum(self.requests_per_node) / len(self.requests_per_node)
        return max(self.requests_per_node) / mean if mean else 0.0


@dataclass(frozen=True, slots=True)
class SimulationReport:
    config: SimulationConfig
    requests: int
    unique_blocks: int
    capacity_blocks: int
    infinite_hit_rate: float
    infinite_tokens_saved: int
    results: tuple[PolicyResult, ...]

    def result(self, policy: str) -> PolicyResult:
        for result in self.results:
            if result.policy == policy:
                return result
        raise InvalidArgument(f"no result for policy {policy!r}")

    def table(self) -> str:
        """A plain-text table of every policy side by side."""
        header = (f"{'policy':<16}{'hit rate':>9}{'% of inf':>9}{'tokens saved':>14}"
                  f"{'imbalance':>10}{'overhead us (mean/p50/p99)':>29}")
        lines = [
            f"{self.requests} requests, {self.unique_blocks} unique blocks; "
            f"{self.config.nodes} nodes x {self.capacity_blocks} blocks "
            f"({self.config.capacity_fraction:.0%} of unique each)",
            header,
            "-" * len(header),
        ]
        for r in self.results:
            share = r.hit_rate / self.infinite_hit_rate if self.infinite_hit_rate else 0.0
            lines.append(
                f"{r.policy:<16}{r.hit_rate:>9.2%}{share:>9.1%}{r.tokens_saved:>14,}"
                f"{r.imbalance:>10.3f}"
                f"{f'{r.overhead_us_mean:.1f} / {r.overhead_us_p50:.1f} / {r.overhead_us_p99:.1f}':>29}"
            )
        lines.append(
            f"{'infinite (1 node)':<16}{self.infinite_hit_rate:>9.2%}{1:>9.1%}"
            f"{self.infinite_tokens_saved:>14,}{'-':>10}{'-':>29}"
        )
        return "\n".join(lines)


def infinite_cache(requests: Sequence[TraceRequest], block_tokens: int) -> tuple[float, int]:
    """Hit rate and tokens saved of one cache that never evicts."""
    seen: set[int] = set()
    hits = total = saved = 0
    for request in requests:
        ids = request.block_ids
        count = 0
        for block in ids:
            if block not in seen:
                break
            count += 1
        hits += count
        total += len(ids)
        saved += min(count * block_tokens, request.input_tokens)
        seen.update(ids)
    return (hits / total if total else 0.0), saved


def conversation_ends(requests: Sequence[TraceRequest], block_tokens: int) -> dict[int, int]:
    """Where each conversation of a trace ends: ``{i: first}`` for each request ``i`` after
    which no later request shares more of its chain than its conversation's first request
    ``first`` found already there (a system prompt, a document: not the conversation's own).

    A request continues the latest earlier one whose full blocks (``input_tokens //
    block_tokens``, at least one) its chain starts with, deepest first; a conversation is
    such a line of continuations. Two passes over prefix tries: O(blocks in the trace).
    """
    count = len(requests)
    first = list(range(count))
    seen_before = [0] * count
    trie: dict[int, Any] = {}  # block -> [children, the latest request whose full blocks end here]
    for j, request in enumerate(requests):
        children, depth, continued = trie, 0, -1
        for block in request.block_ids:
            node = children.get(block)
            if node is None:
                break
            depth += 1
            if node[1] >= 0:
                continued = node[1]
            children = node[0]
        seen_before[j] = depth
        if continued >= 0:
            first[j] = first[continued]
        full = request.input_tokens // block_tokens
        children = trie
        for depth, block in enumerate(request.block_ids, 1):
            node = children.setdefault(block, [{}, -1])
            if depth == full:
                node[1] = j
            children = node[0]
    ends: dict[int, int] = {}
    later: dict[int, Any] = {}  # block -> children, over the requests after the one at hand
    for i in range(count - 1, -1, -1):
        level, shared = later, 0
        for block in requests[i].block_ids:
            if block not in level:
                break
            level = level[block]
            shared += 1
        if shared <= seen_before[first[i]]:
            ends[i] = first[i]
        children = later
        for block in requests[i].block_ids:
            children = children.setdefault(block, {})
    return ends


def simulate(requests: Sequence[TraceRequest], config: SimulationConfig,
             policies: Sequence[str] = POLICIES,
             cache_factory: CacheFactory = LRUBlockCache) -> SimulationReport:
    """Replay ``requests`` under every policy, each node caching in ``cache_factory(capacity)``;
    see the module docstring."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise InvalidArgument(f"unknown policies {unknown}; allowed: {', '.join(POLICIES)}")
    unique = len({b for r in requests for b in r.block_ids})
    capacity = max(1, int(unique * config.capacity_fraction))
    inf_rate, inf_saved = infinite_cache(requests, config.block_tokens)
    results = tuple(_run_policy(p, requests, config, capacity, cache_factory) for p in policies)
    return SimulationReport(config, len(requests), unique, capacity, inf_rate, inf_saved, results)


class SimulatedCluster:
    """Simulated nodes: caches, in-flight requests, and (for the router) the registry."""

    def __init__(self, config: SimulationConfig, capacity: int, registry: InMemoryRegistry | None,
                 cache_factory: CacheFactory = LRUBlockCache) -> None:
        self.config = config
        self.node_ids = [f"node-{i}" for i in range(config.nodes)]
        self.caches = {n: cache_factory(capacity) for n in self.node_ids}
        self.finishing: dict[str, list[float]] = {n: [] for n in self.node_ids}
        self.registry = registry
        self.epochs = {n: registry.register_node(n) for n in self.node_ids} if registry else {}
        self.seqs = dict.fromkeys(self.node_ids, 0)

    def advance(self, now: float) -> None:
        for heap in self.finishing.values():
            while heap and heap[0] <= now:
                heapq.heappop(heap)
        if self.registry is not None:
            for node in self.node_ids:
                cache = self.caches[node]
                load = NodeLoad(len(self.finishing[node]), cache.capacity - len(cache), cache.capacity)
                self.registry.heartbeat(node, self.epochs[node], load)

    def serve(self, node: str, request: TraceRequest, keys: BlockHashArray, now: float) -> int:
        cache = self.caches[node]
        ids = request.block_ids
        hits = cache.leading_hits(ids)
        stored, evicted = cache.insert(ids, request.output_tokens)
        if self.registry is not None and (stored or evicted):
            self._publish(node, keys, stored, evicted)
        uncached = max(0, request.input_tokens - hits * self.config.block_tokens)
        service = (uncached / self.config.prefill_tokens_per_s
                   + request.output_tokens / self.config.decode_tokens_per_s)
        heapq.heappush(self.finishing[node], now + service)
        return hits

    def _publish(self, node: str, keys: BlockHashArray, stored: list[int],
                 evicted: list[tuple[int, int, int]]) -> None:
        assert self.registry is not None
        events = []
        family = keys[0].tobytes()
        for start, stop in _runs(stored):
            events.append(BlockEvent.stored(keys[start:stop], Tier.GPU, first_position=start, family=family))
        for block, fam, depth in evicted:
            events.append(BlockEvent.removed(block_keys([block]), first_position=depth,
                                             family=block_keys([fam])[0].tobytes()))
        self.seqs[node] += 1
        self.registry.publish(EventBatch(node, self.epochs[node], self.seqs[node], tuple(events)))


def _run_policy(policy: str, requests: Sequence[TraceRequest], config: SimulationConfig,
                capacity: int, cache_factory: CacheFactory) -> PolicyResult:
    clock_now = [0.0]

    def clock() -> float:
        return clock_now[0]

    registry = None
    router = None
    timed = None
    if policy == "router":
        registry = InMemoryRegistry(
            RegistryConfig(index_stride_blocks=1, entry_ttl_s=1e9, heartbeat_interval_s=1.0,
                           node_ttl_s=1e9, max_buffered_batches=1),
            clock=clock,
        )
        timed = TimedRegistry(registry)
        # The hasher only keys prompts shorter than one block; trace prompts are routed by ids.
        router = Router(timed, config.router, BlockHasher("xxh3_128", config.block_tokens), clock=clock)  # type: ignore[arg-type]
    cluster = SimulatedCluster(config, capacity, registry, cache_factory)
    ring = HashRing(cluster.node_ids, config.router.virtual_nodes)
    rng = random.Random(config.seed)
    choose: Callable[[int, BlockHashArray], str]
    if policy == "round_robin":
        def choose(i: int, keys: BlockHashArray) -> str:
            return cluster.node_ids[i % config.nodes]
    elif policy == "random":
        def choose(i: int, keys: BlockHashArray) -> str:
            return rng.choice(cluster.node_ids)
    elif policy == "consistent_hash":
        everyone = set(cluster.node_ids)

        def choose(i: int, keys: BlockHashArray) -> str:
            node = ring.pick(ring_key(keys[0].tobytes()) if keys.size else 0, everyone)
            assert node is not None
            return node
    else:
        assert router is not None and timed is not None

        def choose(i: int, keys: BlockHashArray) -> str:
            return router.route_hashes(keys).node_id

    # session ends: request -> its conversation's first; the first's hits are what the client
    # saw cached when the conversation began (ChatSession.shared_tokens)
    ends = conversation_ends(requests, config.block_tokens) if config.session_ends else {}
    hits_of = [0] * len(requests)
    per_node = dict.fromkeys(cluster.node_ids, 0)
    overheads = np.empty(len(requests))
    registry_times = np.zeros(len(requests))
    hit_blocks = total_blocks = saved = tokens = 0
    for i, request in enumerate(requests):
        clock_now[0] = request.timestamp_s
        cluster.advance(request.timestamp_s)
        keys = block_keys(request.block_ids)
        before = timed.seconds if timed else 0.0
        start = time.perf_counter()
        node = choose(i, keys)
        elapsed = time.perf_counter() - start
        inside = (timed.seconds - before) if timed else 0.0
        overheads[i] = elapsed - inside
        registry_times[i] = inside
        per_node[node] += 1
        hits = cluster.serve(node, request, keys, request.timestamp_s)
        hits_of[i] = hits
        if i in ends:
            cluster.caches[node].end(request.block_ids, hits_of[ends[i]])
        hit_blocks += hits
        total_blocks += len(request.block_ids)
        saved += min(hits * config.block_tokens, request.input_tokens)
        tokens += request.input_tokens
    stats = router.stats() if router else None
    micro = overheads * 1e6
    return PolicyResult(
        policy=policy,
        requests=len(requests),
        hit_blocks=hit_blocks,
        total_blocks=total_blocks,
        tokens_saved=saved,
        total_tokens=tokens,
        requests_per_node=tuple(per_node[n] for n in cluster.node_ids),
        overhead_us_mean=float(micro.mean()),
        overhead_us_p50=float(np.percentile(micro, 50)),
        overhead_us_p99=float(np.percentile(micro, 99)),
        registry_us_mean=float(registry_times.mean() * 1e6),
        overload_overrides=stats.overload_overrides if stats else 0,
        no_match_fallbacks=stats.no_match_fallbacks if stats else 0,
    )
