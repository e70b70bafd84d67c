"""The embedded prefix registry: plain Python dicts behind one lock.

The default with no Redis configured. It runs in-process, or inside a Ray actor for a
multi-node local cluster (``ray.remote(InMemoryRegistry).remote(config.model_dump())``: the
construction arguments are plain picklable values). Semantics are those of the protocol in
:mod:`routing.registry`, checked by the same contract suite as the Redis backend.

Layout: ``families[(namespace, family)] -> {block key -> {incarnation -> tier}}``. Each
registration of a node gets a fresh small *incarnation* id; fencing an old epoch is just
forgetting its incarnation, so its entries stop matching at once and are reclaimed by the
next sweep (a purge, or the periodic expiry sweep) instead of in the caller's path. An id
forgotten since the last sweep is *retired*: reissuing it (once the 16-bit id counter comes
round to it) runs the sweep first, so a recycled id never adopts its old records.

Time comes from the injected ``clock`` (seconds, monotonic), so tests drive TTLs directly.
Thread-safety: every public method takes ``self._lock``; nothing is called out while held.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvcluster.errors import FencedEpoch, InvalidArgument, RoutingError
from routing.config import RegistryConfig
from routing.registry import (
    DEFAULT_NAMESPACE,
    MAX_EPOCH,
    MAX_INCARNATIONS,
    EventBatch,
    EventKind,
    FlatOp,
    NodeInfo,
    NodeLoad,
    PrefixHolding,
    PublishResult,
    PublishStatus,
    RegistryStats,
    check_chain,
    check_name,
    check_positive_int,
    flatten_events,
    lookup_probes,
    validate_batch,
)

FamilyKey = tuple[str, bytes]


@dataclass(slots=True)
class _Node:
    epoch: int
    incarnation: int
    last_beat: float
    load: NodeLoad = field(default_factory=NodeLoad)
    applied_through: int = 0
    # seq -> (flattened ops, time buffered): batches that arrived ahead of a gap.
    pending: dict[int, tuple[list[FlatOp], float]] = field(default_factory=dict)


@dataclass(slots=True)
class _Family:
    entries: dict[bytes, dict[int, int]]  # block key -> {incarnation -> tier}
    expires_at: float


class InMemoryRegistry:
    """A :class:`~routing.registry.PrefixRegistry` in process memory (see module docstring)."""

    def __init__(
        self,
        config: RegistryConfig | Mapping[str, Any] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config is None:
            config = RegistryConfig()
        elif not isinstance(config, RegistryConfig):
            config = RegistryConfig.model_validate(dict(config))
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._incarnations: dict[int, str] = {}
        self._retired: set[int] = set()  # ids forgotten since the last sweep
        self._next_incarnation = 0
        self._families: dict[FamilyKey, _Family] = {}
        self._next_sweep = clock() + config.entry_ttl_s / 4

    @property
    def index_stride(self) -> int:
        return self._config.index_stride_blocks

    @property
    def config(self) -> RegistryConfig:
        return self._config

    # --- nodes -----------------------------------------------------------------------------

    def register_node(self, node_id: str, *, previous_epoch: int = 0) -> int:
        check_name("node_id", node_id)
        if (isinstance(previous_epoch, bool) or not isinstance(previous_epoch, int)
                or not 0 <= previous_epoch < MAX_EPOCH):
            raise InvalidArgument(f"previous_epoch must be an integer in [0, 2**53 - 1), got {previous_epoch!r}")
        with self._lock:
            now = self._clock()
            old = self._nodes.get(node_id)
            epoch = max(old.epoch if old else 0, previous_epoch) + 1
            if old is not None:
                self._forget(old.incarnation)
            incarnation = self._allocate_incarnation(node_id, now)
            self._nodes[node_id] = _Node(epoch, incarnation, now)
            return epoch

    def _forget(self, incarnation: int) -> None:
        if self._incarnations.pop(incarnation, None) is not None:
            self._retired.add(incarnation)

    def _allocate_incarnation(self, node_id: str, now: float) -> int:
        for _ in range(MAX_INCARNATIONS):
            self._next_incarnation = self._next_incarnation % MAX_INCARNATIONS + 1
            if self._next_incarnation not in self._incarnations:
                if self._next_incarnation in self._retired:
                    self._sweep(now)  # its old records must go before the id is reissued
                self._incarnations[self._next_incarnation] = node_id
                return self._next_incarnation
        raise RoutingError(f"no free incarnation id for node {node_id!r} ({MAX_INCARNATIONS} in use)")

    def heartbeat(self, node_id: str, epoch: int, load: NodeLoad) -> bool:
        check_name("node_id", node_id)
        check_positive_int("epoch", epoch)
        if not isinstance(load, NodeLoad):
            raise InvalidArgument(f"load must be a NodeLoad, got {type(load).__name__}")
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                return False
            if node.epoch != epoch:
                raise FencedEpoch(f"node {node_id!r} renewed with epoch {epoch}; current is {node.epoch}")
            node.last_beat = self._clock()
            node.load = load
            return True

    def needs_resync(self, node_id: str, epoch: int) -> bool:
        check_name("node_id", node_id)
        with self._lock:
            node = self._nodes.get(node_id)
            return node is None or node.epoch != epoch

    def live_nodes(self) -> dict[str, NodeInfo]:
        with self._lock:
            now = self._clock()
            return {
                node_id: NodeInfo(node_id, node.epoch, node.load, now - node.last_beat)
                for node_id, node in self._nodes.items()
                if now - node.last_beat <= self._config.node_ttl_s
            }

    def purge_node(self, node_id: str) -> bool:
        check_name("node_id", node_id)
        with self._lock:
            node = self._nodes.pop(node_id, None)
            if node is None:
                return False
            self._forget(node.incarnation)
            self._sweep(self._clock())
            return True

    # --- events ----------------------------------------------------------------------------

    def publish(self, batch: EventBatch) -> PublishResult:
        validate_batch(batch)
        ops = flatten_events(batch.events, self.index_stride)
        with self._lock:
            return self._publish_locked(batch, ops)

    def publish_many(self, batches: Sequence[EventBatch]) -> list[PublishResult]:
        """Publish in order. Every batch is attempted; if some were fenced,
        :class:`FencedEpoch` is raised after all (the others took effect)."""
        prepared = []
        for batch in batches:
            validate_batch(batch)
            prepared.append((batch, flatten_events(batch.events, self.index_stride)))
        results: list[PublishResult] = []
        fenced: FencedEpoch | None = None
        with self._lock:
            for batch, ops in prepared:
                try:
                    results.append(self._publish_locked(batch, ops))
                except FencedEpoch as exc:
                    fenced = fenced or exc
        if fenced is not None:
            raise fenced
        return results

    def _publish_locked(self, batch: EventBatch, ops: list[FlatOp]) -> PublishResult:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        node = self._nodes.get(batch.node_id)
        if node is None:
            return PublishResult(PublishStatus.RESYNC, 0)
        if node.epoch != batch.epoch:
            raise FencedEpoch(
                f"node {batch.node_id!r} published with epoch {batch.epoch}; current is {node.epoch}"
            )
        self._drop_stale_pending(node, now)
        if batch.seq <= node.applied_through or batch.seq in node.pending:
            return PublishResult(PublishStatus.DUPLICATE, node.applied_through)
        if batch.seq > node.applied_through + 1:
            if batch.seq > node.applied_through + 1 + self._config.max_buffered_batches:
                return PublishResult(PublishStatus.OUT_OF_WINDOW, node.applied_through)
            node.pending[batch.seq] = (ops, now)
            return PublishResult(PublishStatus.BUFFERED, node.applied_through)
        self._apply(ops, node.incarnation, now)
        node.applied_through = batch.seq
        applied = 1
        while node.applied_through + 1 in node.pending:
            buffered, _ = node.pending.pop(node.applied_through + 1)
            self._apply(buffered, node.incarnation, now)
            node.applied_through += 1
            applied += 1
        return PublishResult(PublishStatus.APPLIED, node.applied_through, applied)

    def _drop_stale_pending(self, node: _Node, now: float) -> None:
        ttl = self._config.entry_ttl_s
        for seq in [s for s, (_, at) in node.pending.items() if now - at > ttl]:
            del node.pending[seq]

    def _apply(self, ops: list[FlatOp], incarnation: int, now: float) -> None:
        """Apply ops; every entry touched also loses the records of forgotten incarnations
        (a restarted node's re-announcement cleans up after its old epoch)."""
        expires_at = now + self._config.entry_ttl_s
        families = self._families
        known = self._incarnations
        for kind, tier, namespace, family_key, key in ops:
            fkey = (namespace, family_key)
            family = families.get(fkey)
            if family is not None and family.expires_at <= now:
                del families[fkey]
                family = None
            if kind is EventKind.STORED:
                if family is None:
                    family = families[fkey] = _Family({}, expires_at)
                stored = family.entries.setdefault(key, {})
                _drop_forgotten(stored, known)
                stored[incarnation] = tier
            elif family is not None:
                holders = family.entries.get(key)
                if holders is not None:
                    _drop_forgotten(holders, known)
                    if incarnation in holders:
                        if kind is EventKind.REMOVED:
                            del holders[incarnation]
                        else:
                            holders[incarnation] = tier
                    if not holders:
                        del family.entries[key]
            if family is not None:
                family.expires_at = expires_at
                if not family.entries:
                    del families[fkey]

    # --- lookups ---------------------------------------------------------------------------

    def longest_prefix(
        self, hashes: Any, namespace: str = DEFAULT_NAMESPACE
    ) -> dict[str, PrefixHolding]:
        chain = check_chain(hashes)
        check_name("namespace", namespace)
        stride = self.index_stride
        probes = lookup_probes(chain, stride).tolist()
        if not probes:
            return {}
        with self._lock:
            now = self._clock()
            fkey = (namespace, chain[0].tobytes())
            family = self._families.get(fkey)
            if family is None:
                return {}
            if family.expires_at <= now:
                del self._families[fkey]
                return {}
            ttl = self._config.node_ttl_s
            live = {
                node.incarnation: node_id
                for node_id, node in self._nodes.items()
                if now - node.last_beat <= ttl
            }
            lead: dict[int, int] = {}
            per_tier: dict[int, list[int]] = {}
            entries = family.entries
            for depth, key in enumerate(probes):
                holders = entries.get(key)
                if not holders:
                    break
                extended = False
                for incarnation, tier in holders.items():
                    if incarnation in live and lead.get(incarnation, 0) == depth:
                        lead[incarnation] = depth + 1
                        per_tier.setdefault(incarnation, [0, 0, 0])[tier] += 1
                        extended = True
                if not extended:
                    break
        return {
            live[inc]: PrefixHolding(n * stride, *(c * stride for c in per_tier[inc]))
            for inc, n in lead.items()
        }

    # --- maintenance -----------------------------------------------------------------------

    def clear_namespace(self, namespace: str) -> int:
        check_name("namespace", namespace)
        with self._lock:
            now = self._clock()
            doomed = [key for key in self._families if key[0] == namespace]
            # an expired family awaiting the sweep is not counted: it was already gone
            return sum(self._families.pop(key).expires_at > now for key in doomed)

    def sweep(self) -> int:
        """Reclaim records of forgotten incarnations and expired families now (O(entries));
        returns the records removed."""
        with self._lock:
            before = sum(len(h) for f in self._families.values() for h in f.entries.values())
            self._sweep(self._clock())
            return before - sum(len(h) for f in self._families.values() for h in f.entries.values())

    def _sweep(self, now: float) -> None:
        """Drop expired families and the records of forgotten incarnations (O(entries))."""
        self._next_sweep = now + self._config.entry_ttl_s / 4
        self._retired.clear()
        known = self._incarnations
        for fkey in list(self._families):
            family = self._families[fkey]
            if family.expires_at <= now:
                del self._families[fkey]
                continue
            for key in list(family.entries):
                holders = family.entries[key]
                for incarnation in [i for i in holders if i not in known]:
                    del holders[incarnation]
                if not holders:
                    del family.entries[key]
            if not family.entries:
                del self._families[fkey]

    def stats(self) -> RegistryStats:
        with self._lock:
            now = self._clock()
            ttl = self._config.node_ttl_s
            live = sum(1 for n in self._nodes.values() if now - n.last_beat <= ttl)
            families = [f for f in self._families.values() if f.expires_at > now]
            blocks = sum(len(f.entries) for f in families)
            entries = sum(len(h) for f in families for h in f.entries.values())
            size = sum(
                sys.getsizeof(f.entries)
                + sum(sys.getsizeof(k) + sys.getsizeof(h) for k, h in f.entries.items())
                for f in families
            )
            return RegistryStats(len(self._nodes), live, len(families), blocks, entries, size, 0)

    def close(self) -> None:
        """Nothing to release; present for the protocol."""


def _drop_forgotten(holders: dict[int, int], known: Mapping[int, str]) -> None:
    for incarnation in [i for i in holders if i not in known]:
        del holders[incarnation]
