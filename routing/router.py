"""The router: pick the node for a request from the registry's view of prefixes and load.

For every live node the registry reports how many leading blocks of the prompt it holds and
on which tier. The router scores each node::

    affinity = sum(tier_weight[t] * blocks_on[t]) / prompt_blocks         (0..1)
    score    = affinity - load_weight * inflight / (mean_inflight + 1)
               + free_blocks_weight * free_fraction

and takes the best score among the nodes that are not overloaded. A node is overloaded when
taking this request would lift it above ``ceil(imbalance_threshold * (total_inflight + 1) /
nodes)`` (consistent hashing with bounded loads, Mirrokni et al. 2018): cache affinity never
piles more than that on one node. In-flight counts are those of each node's last heartbeat
plus the requests this router sent it since, so a burst between heartbeats spreads too.

Fallbacks keep a prefix on one node when the registry cannot help. When no eligible node
holds any leading block, the router walks a consistent-hash ring (``virtual_nodes`` points
per node) from the first block's key and takes, of the first ``fallback_choices`` eligible
nodes, the one it sent the fewest recent requests (each request's weight halving every
``placement_half_life_requests`` routed), then the least loaded (ties: ring order; 1 = plain
consistent hashing): a new prefix gets a stable home, while the nodes share the prefixes
that keep coming back in proportion to their requests rather than to the arcs of the ring
(the power of d choices). While the registry is unreachable there is no fresh load, so the
router takes the first node on the ring of the known nodes. An unreachable registry is
logged once per outage, counted, and retried after ``registry_retry_s`` (doubling up to
``registry_retry_max_s``); the router recovers by itself when it answers again. Every
decision carries a one-line explanation.

Thread-safety: thread-safe. Registry calls run unlocked; the routing state (per-node counters,
the ring, the outage backoff) is updated under ``self._lock``, held only for the scoring.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from kvcluster.errors import (
    InvalidArgument,
    NoLiveNodes,
    RegistryDataError,
    RegistryUnavailable,
    RoutingError,
)
from routing.block_hashing import BlockHashArray, BlockHasher, as_token_array
from routing.config import RouterConfig
from routing.registry import DEFAULT_NAMESPACE, NodeInfo, PrefixHolding, PrefixRegistry, check_chain

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a request goes and why.

    ``matched_blocks``/``blocks_per_tier``: the leading blocks the chosen node holds (by the
    registry; the node verifies tokens). ``scores``: every considered node's score (empty in
    a fallback without registry data). ``fallback``: ``None``, ``"no_match"``,
    ``"registry_unavailable"`` or ``"no_live_nodes"`` (the registry knows no live node, e.g.
    just after it restarted empty: ring affinity over the nodes known before). ``best_holder``: the node holding the most weighted prefix
    (``None`` when nobody holds any), with its blocks and in-flight count, so a caller can
    decide to pull the prefix to the chosen node when load overrode affinity.
    """

    node_id: str
    matched_blocks: int
    blocks_per_tier: dict[str, int]
    scores: dict[str, float]
    reason: str
    fallback: str | None
    prompt_blocks: int
    best_holder: str | None = None
    holder_blocks: int = 0
    holder_in_flight: int = 0


@dataclass(frozen=True, slots=True)
class RouterStats:
    routed: int
    by_prefix: int
    overload_overrides: int
    no_match_fallbacks: int
    unavailable_fallbacks: int
    registry_failures: int
    no_live_fallbacks: int


class HashRing:
    """A consistent-hash ring with ``virtual_nodes`` points per node (xxh3-64 positions)."""

    __slots__ = ("_owners", "_points")

    def __init__(self, nodes: Iterable[str], virtual_nodes: int) -> None:
        points = sorted(
            (xxhash.xxh3_64_intdigest(f"{node}#{i}".encode()), node)
            for node in nodes
            for i in range(virtual_nodes)
        )
        self._points = [p for p, _ in points]
        self._owners = [n for _, n in points]

    def walk(self, key: int) -> Iterable[str]:
        """Distinct nodes in ring order from ``key`` (the preference order of that key)."""
        if not self._points:
            return
        start = bisect.bisect_left(self._points, key)
        seen: set[str] = set()
        count = len(self._points)
        for i in range(count):
            node = self._owners[(start + i) % count]
            if node not in seen:
                seen.add(node)
                yield node

    def pick(self, key: int, allowed: Container[str]) -> str | None:
        for node in self.walk(key):
            if node in allowed:
                return node
        return None


def ring_key(first_block: bytes) -> int:
    """The ring position of a prefix: the first 8 bytes of its first block's key."""
    return int.from_bytes(first_block[:8], "big")


class Router:
    """Routes requests by longest weighted prefix, load-aware (see the module docstring)."""

    def __init__(
        self,
        registry: PrefixRegistry,
        config: RouterConfig,
        hasher: BlockHasher,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._config = config
        self._hasher = hasher
        self._clock = clock
        self._weights = (
            config.tier_weights.get("gpu", 1.0),
            config.tier_weights.get("cpu", 1.0),
            config.tier_weights.get("nvme", 1.0),
        )
        self._ring_nodes: frozenset[str] = frozenset()
        self._ring = HashRing((), config.virtual_nodes)
        self._known_nodes: list[str] = []
        # Requests sent to a node since its last heartbeat, and when that heartbeat was.
        self._routed_since: dict[str, int] = {}
        self._beat_at: dict[str, float] = {}
        # Requests routed to each node, each weighted unit * growth**k for the k-th request, so
        # that a request's weight relative to the newest halves every half-life without
        # touching every node per request; and each node's count as of its last heartbeat.
        self._recent: dict[str, float] = {}
        self._recent_at_beat: dict[str, float] = {}
        self._recent_unit = 1.0
        self._recent_growth = 2.0 ** (1.0 / config.placement_half_life_requests)
        self._retry_at = -math.inf
        self._backoff = config.registry_retry_s
        self._down = False
        self._lock = threading.Lock()
        self._routed = self._by_prefix = self._overrides = 0
        self._no_match = self._unavailable = self._failures = self._no_live = 0

    # --- public ------------------------------------------------------------------------------

    def route(
        self,
        tokens: npt.NDArray[np.integer] | Sequence[int],
        namespace: str = DEFAULT_NAMESPACE,
        *,
        candidates: Sequence[str] | None = None,
        hashes: BlockHashArray | None = None,
    ) -> RouteDecision:
        """Route a prompt: hash its full blocks, then :meth:`route_hashes`. ``hashes`` is the
        prompt's chain when the caller has computed it already (with this router's hasher)."""
        array = as_token_array(tokens)
        if hashes is None:
            hashes = self._hasher.hash_chain(array, namespace)
        fallback_key = None
        if hashes.size == 0:  # shorter than one block: keep equal short prompts together
            fallback_key = xxhash.xxh3_64_intdigest(namespace.encode() + array.tobytes())
        return self._route(hashes, namespace, candidates, fallback_key)

    def route_hashes(
        self,
        hashes: BlockHashArray,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        candidates: Sequence[str] | None = None,
    ) -> RouteDecision:
        """Route a prompt given as its chain of block keys (depth 0 first)."""
        return self._route(check_chain(hashes), namespace, candidates, None)

    def stats(self) -> RouterStats:
        with self._lock:
            return self._stats()

    def _stats(self) -> RouterStats:
        return RouterStats(self._routed, self._by_prefix, self._overrides, self._no_match,
                           self._unavailable, self._failures, self._no_live)

    @property
    def registry_down(self) -> bool:
        return self._down

    # --- internals ---------------------------------------------------------------------------

    def _route(
        self,
        hashes: BlockHashArray,
        namespace: str,
        candidates: Sequence[str] | None,
        fallback_key: int | None,
    ) -> RouteDecision:
        if candidates is not None and not candidates:
            raise InvalidArgument("candidates is empty: no node to route to")
        if fallback_key is None:
            fallback_key = ring_key(
                hashes[0].tobytes() if hashes.size else self._hasher.root(namespace)
            )
        now = self._clock()
        live: dict[str, NodeInfo] | None = None
        holdings: dict[str, PrefixHolding] = {}
        error: RoutingError | None = None
        if now >= self._retry_at:
            try:
                live = self._registry.live_nodes()
                if hashes.size and live:
                    holdings = self._registry.longest_prefix(hashes, namespace)
                with self._lock:
                    self._registry_up()
            except (RegistryUnavailable, RegistryDataError) as exc:  # a bad answer routes no better
                error = exc
                with self._lock:
                    self._registry_failed(exc, now)
                live = None
        if live is None:
            with self._lock:
                return self._ring_route(hashes, fallback_key, candidates, error)
        if live:
            known = sorted(live)
            if known != self._known_nodes:
                self._known_nodes = known
        if candidates is not None:
            allowed = set(candidates)
            live = {n: info for n, info in live.items() if n in allowed}
        if not live:
            # A registry that restarted empty knows no node until they re-register (within a
            # heartbeat); keep routing over the nodes known before (or the caller's).
            with self._lock:
                return self._ring_route(hashes, fallback_key, candidates, None)
        with self._lock:
            return self._score(hashes, live, holdings, fallback_key)

    def _effective_inflight(self, live: dict[str, NodeInfo]) -> dict[str, int]:
        now = self._clock()
        beats, since = self._beat_at, self._routed_since
        recent, recent_at_beat = self._recent, self._recent_at_beat
        out = {}
        for node_id, info in live.items():
            beat_at = now - info.heartbeat_age_s
            if beat_at > beats.get(node_id, -math.inf) + 1e-6:
                beats[node_id] = beat_at
                since[node_id] = 0
                recent_at_beat[node_id] = recent.get(node_id, 0.0)
                out[node_id] = info.load.inflight_requests
            else:
                out[node_id] = info.load.inflight_requests + since.get(node_id, 0)
        return out

    def _score(
        self,
        hashes: BlockHashArray,
        live: dict[str, NodeInfo],
        holdings: dict[str, PrefixHolding],
        fallback_key: int,
    ) -> RouteDecision:
        config = self._config
        inflight = self._effective_inflight(live)
        total = sum(inflight.values())
        mean = total / len(live)
        cap = math.ceil(config.imbalance_threshold * (total + 1) / len(live))
        prompt_blocks = max(1, int(hashes.size))
        w_gpu, w_cpu, w_nvme = self._weights
        load_penalty = config.load_weight / (mean + 1)
        free_weight = config.free_blocks_weight
        scores: dict[str, float] = {}
        eligible: dict[str, float] = {}
        best_holder, best_weighted = None, 0.0
        # score = affinity - load_weight * inflight / (mean + 1) + free_weight * free_fraction,
        # spelled out per node: this loop is most of the router's own time.
        for node_id, info in live.items():
            weighted = 0.0
            if holdings:
                holding = holdings.get(node_id)
                if holding is not None:
                    weighted = (w_gpu * holding.gpu_blocks + w_cpu * holding.cpu_blocks
                                + w_nvme * holding.nvme_blocks)
                    if weighted > best_weighted:
                        best_holder, best_weighted = node_id, weighted
            load = info.load
            total_blocks = load.total_blocks
            free_fraction = load.free_blocks / total_blocks if total_blocks else 1.0
            if free_fraction > 1.0:
                free_fraction = 1.0
            in_flight = inflight[node_id]
            score = weighted / prompt_blocks - load_penalty * in_flight + free_weight * free_fraction
            scores[node_id] = score
            if in_flight < cap:  # taking this request keeps it within the cap
                eligible[node_id] = score
        if not eligible:  # every node at the cap (possible only with threshold < 1 rounding)
            eligible = dict(scores)
        holder = holdings.get(best_holder) if best_holder else None
        eligible_holders = [n for n in eligible if n in holdings]
        if eligible_holders:
            top = max(eligible.values())
            tied = [n for n, s in eligible.items() if s >= top - 1e-12]
            chosen = tied[0] if len(tied) == 1 else self._ring_for(live).pick(fallback_key, set(tied))
            assert chosen is not None
            fallback = None
            self._by_prefix += 1
            held = holdings.get(chosen)
            if best_holder is not None and chosen != best_holder and best_holder not in eligible:
                self._overrides += 1
                reason = (
                    f"{best_holder} holds {holder.num_blocks if holder else 0}/{hashes.size} blocks "
                    f"but is overloaded ({inflight[best_holder]} in flight, cap {cap}); "
                    f"chose {chosen} ({_describe(held, hashes.size)}, score {scores[chosen]:.3f})"
                )
            else:
                runner_up = max((s for n, s in eligible.items() if n != chosen), default=None)
                reason = (
                    f"prefix: {chosen} {_describe(held, hashes.size)}, score {scores[chosen]:.3f}"
                    + (f" vs next {runner_up:.3f}" if runner_up is not None else "")
                    + f", {inflight[chosen]} in flight"
                )
        else:
            # A prompt shorter than the registry's stride is never found there: balancing it
            # by recent requests would only copy it onto every choice in turn.
            indexable = hashes.size >= self._registry.index_stride
            chosen = self._place_on_ring(fallback_key, live, eligible, indexable)
            fallback = "no_match"
            self._no_match += 1
            held = holdings.get(chosen)
            if best_holder is not None:
                self._overrides += 1
                reason = (
                    f"{best_holder} holds {holder.num_blocks if holder else 0}/{hashes.size} blocks "
                    f"but is overloaded ({inflight[best_holder]} in flight, cap {cap}); "
                    f"ring affinity on the first block -> {chosen}"
                )
            else:
                reason = f"no node holds a leading block; ring affinity on the first block -> {chosen}"
        self._routed += 1
        self._routed_since[chosen] = self._routed_since.get(chosen, 0) + 1
        self._count_recent(chosen)
        return RouteDecision(
            node_id=chosen,
            matched_blocks=held.num_blocks if held else 0,
            blocks_per_tier=held.blocks_per_tier if held else {"gpu": 0, "cpu": 0, "nvme": 0},
            scores=scores,
            reason=reason,
            fallback=fallback,
            prompt_blocks=int(hashes.size),
            best_holder=best_holder,
            holder_blocks=holder.num_blocks if holder else 0,
            holder_in_flight=inflight[best_holder] if best_holder else 0,
        )

    def _place_on_ring(
        self, key: int, live: dict[str, NodeInfo], eligible: Container[str], balance_recent: bool,
    ) -> str:
        """Of the first ``fallback_choices`` eligible nodes in the ring order of ``key``: the
        one this router sent the fewest recent requests (when ``balance_recent``), then the
        fewest in flight and then not full (as the nodes reported in ``live``), then ring
        order, so the first is the prefix's home.

        Recent requests, not in-flight ones, come first: what a node caches is what it was
        sent, so balancing placements balances both the requests and the cache pressure of
        the prefixes that come back (on the shared Mooncake trace in-flight first left the
        busiest node 4-19% above the mean, recent requests first 0-5%, for the same hit
        rate within noise). Every count here is as of the node's last heartbeat, not one
        that grows with every request: otherwise a prefix's second request would leave the
        node its first one just stored on. So a prefix keeps its node between heartbeats
        (its later requests find what the first stored, even before the registry indexes
        it), yet no node collects every new prefix that hashes to it. A prompt the registry
        never indexes (shorter than its stride) is placed by load alone, so it keeps its
        home while loads are even."""
        choices = []
        for node in self._ring_for(live).walk(key):
            if node in eligible:
                choices.append(node)
                if len(choices) == self._config.fallback_choices:
                    break
        assert choices, "the ring holds every live node and at least one is eligible"
        full_below = self._config.full_free_fraction

        def reported(node: str) -> tuple[int, bool]:
            load = live[node].load
            return load.inflight_requests, load.free_fraction < full_below

        if not balance_recent:
            return min(choices, key=reported)
        recent = self._recent_at_beat
        return min(choices, key=lambda node: (recent.get(node, 0.0), *reported(node)))

    def _count_recent(self, node: str) -> None:
        """Count a request routed to ``node`` in the recent counts (see ``__init__``)."""
        self._recent_unit *= self._recent_growth
        self._recent[node] = self._recent.get(node, 0.0) + self._recent_unit
        if self._recent_unit > 1e100:  # rescale long before a float overflows
            scale = self._recent_unit
            self._recent_unit = 1.0
            self._recent = {n: c / scale for n, c in self._recent.items()}
            self._recent_at_beat = {n: c / scale for n, c in self._recent_at_beat.items()}

    def _ring_for(self, nodes: Iterable[str]) -> HashRing:
        key = frozenset(nodes)
        if key != self._ring_nodes:
            self._ring_nodes = key
            self._ring = HashRing(sorted(key), self._config.virtual_nodes)
        return self._ring

    def _ring_route(
        self,
        hashes: BlockHashArray,
        fallback_key: int,
        candidates: Sequence[str] | None,
        error: RoutingError | None,
    ) -> RouteDecision:
        """Ring affinity over the caller's candidates or the last known live nodes, when the
        registry is unreachable (``error`` set, or still backing off) or knows no live node."""
        unavailable = error is not None or self._down
        nodes = list(candidates) if candidates is not None else self._known_nodes
        if not nodes:
            if unavailable:
                raise RegistryUnavailable(
                    "the registry is unreachable and no node is known yet to route to"
                    + (f": {error}" if error else "")
                )
            raise NoLiveNodes("the registry knows no live node and none was known before")
        chosen = self._ring_for(nodes).pick(fallback_key, set(nodes))
        assert chosen is not None
        self._routed += 1
        self._count_recent(chosen)
        if unavailable:
            self._unavailable += 1
            fallback = "registry_unavailable"
            reason = f"registry unavailable; ring affinity on the first block -> {chosen}"
        else:
            self._no_live += 1
            fallback = "no_live_nodes"
            reason = (
                f"the registry reports no live node{' among the candidates' if candidates else ''}"
                f"; ring affinity over {len(nodes)} known nodes -> {chosen}"
            )
        return RouteDecision(
            node_id=chosen,
            matched_blocks=0,
            blocks_per_tier={"gpu": 0, "cpu": 0, "nvme": 0},
            scores={},
            reason=reason,
            fallback=fallback,
            prompt_blocks=int(hashes.size),
        )

    def _registry_failed(self, exc: RoutingError, now: float) -> None:
        self._failures += 1
        if not self._down:
            logger.warning("prefix registry unavailable, routing by ring affinity: %s", exc)
            self._down = True
            self._backoff = self._config.registry_retry_s
        else:
            self._backoff = min(self._backoff * 2, self._config.registry_retry_max_s)
        self._retry_at = now + self._backoff

    def _registry_up(self) -> None:
        if self._down:
            logger.warning("prefix registry reachable again after %s failed attempts", self._failures)
            self._down = False
            self._backoff = self._config.registry_retry_s
        self._retry_at = -math.inf


def _describe(holding: PrefixHolding | None, prompt_blocks: int) -> str:
    if holding is None:
        return f"holds 0/{prompt_blocks} blocks"
    tiers = ", ".join(f"{t} {n}" for t, n in holding.blocks_per_tier.items() if n)
    return f"holds {holding.num_blocks}/{prompt_blocks} blocks ({tiers})"
