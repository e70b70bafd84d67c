"""Pin records of the prefix index and the pin budget arithmetic.

A pin keeps a cached prefix (a system prompt) from eviction: it covers the node the prefix
ends in and every ancestor. The pinned blocks are the distinct blocks those nodes own; they
may not exceed the budget (a fraction of the pool). A new pin that would exceed it displaces
pins of strictly lower priority, lowest priority and then oldest first, when that suffices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from kvcluster.core.block_pool import BlockPool
from kvcluster.core.eviction import EvictionPolicy
from kvcluster.core.radix_node import RadixNode, path_of
from kvcluster.core.radix_walk import block_at, descend
from kvcluster.core.token_input import TokenInput, as_token_array
from kvcluster.errors import InvalidArgument, PinBudgetExceeded

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PinRecord:
    """One pin: made with ``key`` (the tokens' bytes) in ``namespace``; covers ``tokens``
    tokens, ending at node ``end``; ``seq`` orders pins by age."""

    namespace: str
    key: bytes
    priority: int
    seq: int
    end: RadixNode
    tokens: int


def pinned_blocks_with(ends: Iterable[RadixNode], block_size: int) -> int:
    """Distinct blocks pinned if exactly the pins ending at ``ends`` were held."""
    nodes: dict[int, RadixNode] = {}
    for end in ends:
        for node in path_of(end):
            nodes[node.node_id] = node
    if not nodes:
        return 0
    return int(np.unique(np.concatenate([n.own_blocks(block_size) for n in nodes.values()])).size)


def pins_to_displace(
    pins: Iterable[PinRecord],
    end: RadixNode,
    priority: int,
    replacing: PinRecord | None,
    budget: int,
    block_size: int,
) -> list[PinRecord] | None:
    """The pins to release so that a new pin ending at ``end`` fits ``budget`` blocks: [] if it
    fits as is, None if releasing every pin of lower priority is still not enough.
    ``replacing`` (an earlier pin of the same tokens) is released in any case."""
    kept = [p for p in pins if p is not replacing]
    if pinned_blocks_with([p.end for p in kept] + [end], block_size) <= budget:
        return []
    displaced: list[PinRecord] = []
    for record in sorted((p for p in kept if p.priority < priority), key=lambda p: (p.priority, p.seq)):
        displaced.append(record)
        kept.remove(record)
        if pinned_blocks_with([p.end for p in kept] + [end], block_size) <= budget:
            return displaced
    return None


class _PinHost(Protocol):
    """What :class:`PinsMixin` uses of the index it is mixed into."""

    _roots: dict[str, RadixNode]
    _pins: dict[tuple[str, bytes], PinRecord]
    _next_pin_seq: int
    _pin_budget: int
    _pinned_blocks: int
    _bs: int
    _pool: BlockPool
    _policy: EvictionPolicy
    _tree_refs: npt.NDArray[np.int32]
    _pin_refs: npt.NDArray[np.int32]
    _clock: Callable[[], float]

    def _split(self, node: RadixNode, at: int, now: float, *, track: bool) -> RadixNode: ...

    def _rollback(self, undo: list[RadixNode], *, tracked: bool) -> None: ...

    def _unpin_record(self, record: PinRecord, *, touch: bool) -> None: ...


class PinsMixin:
    """The pin operations of :class:`~kvcluster.core.prefix_index.PrefixIndex` (kept here so
    the index module stays readable). Not thread-safe, like the index."""

    def pin(self: _PinHost, tokens: TokenInput, namespace: str = "default", priority: int = 0) -> int:
        """Keep the cached prefix of ``tokens`` from eviction until :meth:`unpin`.

        Returns the tokens pinned: the longest cached prefix of ``tokens`` (0: nothing cached,
        nothing pinned). Pinning the same tokens again updates the priority. If the pinned
        blocks would exceed the pin budget, pins of strictly lower priority are released
        (lowest, then oldest first) when that makes room; otherwise :class:`PinBudgetExceeded`
        and nothing changes.
        """
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidArgument(f"priority must be an integer, got {priority!r}")
        array = as_token_array(tokens)
        query = array.tobytes()
        root = self._roots.get(namespace)
        if root is None:
            return 0
        node, pos = descend(root, query)
        depth = pos >> 3
        if depth == 0:
            return 0
        key = (namespace, query)
        existing = self._pins.get(key)
        if existing is not None and existing.tokens == depth:
            existing.priority = priority
            return depth
        now = self._clock()
        upper = None
        if depth < node.end:
            upper = self._split(node, depth, now, track=True)
            end = upper
        else:
            end = node
        displaced = pins_to_displace(self._pins.values(), end, priority, existing, self._pin_budget, self._bs)
        if displaced is None:
            if upper is not None:
                self._rollback([upper], tracked=True)
            raise PinBudgetExceeded(
                f"pinning {depth} tokens in namespace {namespace!r} would exceed the pin budget of "
                f"{self._pin_budget} blocks ({self._pinned_blocks} pinned); unpin something or "
                "raise pin_budget_fraction"
            )
        if upper is not None and depth % self._bs:
            straddle = np.array([block_at(node.path_blocks, depth // self._bs)], dtype=np.int64)
            self._pool.incref(straddle)
            self._tree_refs[straddle] += 1
            if node.pin_count:
                self._pin_refs[straddle] += 1
        for record in displaced:
            logger.info("pin of %s tokens (priority %s) displaced by priority %s", record.tokens, record.priority, priority)
            del self._pins[(record.namespace, record.key)]
            self._unpin_record(record, touch=True)
        if existing is not None:
            del self._pins[key]
            self._unpin_record(existing, touch=True)
        for n in path_of(end):
            if n.pin_count == 0:
                self._policy.untrack(n)
                own = n.own_blocks(self._bs)
                np.add.at(self._pin_refs, own, 1)
            n.pin_count += 1
        self._pinned_blocks = int(np.count_nonzero(self._pin_refs))
        self._pins[key] = PinRecord(namespace, query, priority, self._next_pin_seq, end, depth)
        self._next_pin_seq += 1
        return depth

    def unpin(self: _PinHost, tokens: TokenInput, namespace: str = "default") -> bool:
        """Release the pin made with these ``tokens``; False if there is none. The prefix counts
        as used now and becomes evictable again."""
        array = as_token_array(tokens)
        record = self._pins.pop((namespace, array.tobytes()), None)
        if record is None:
            return False
        self._unpin_record(record, touch=True)
        return True

    def is_pinned(self: _PinHost, tokens: TokenInput, namespace: str = "default") -> bool:
        """Whether a pin made with exactly these ``tokens`` is held (not unpinned or displaced)."""
        return (namespace, as_token_array(tokens).tobytes()) in self._pins

    def pins(self: _PinHost) -> list[tuple[str, int, int]]:
        """``(namespace, pinned tokens, priority)`` of every pin, oldest first."""
        return [(p.namespace, p.tokens, p.priority) for p in sorted(self._pins.values(), key=lambda p: p.seq)]

    def _unpin_record(self: _PinHost, record: PinRecord, *, touch: bool) -> None:
        now = self._clock()
        released = []
        for n in path_of(record.end):
            n.pin_count -= 1
            if n.pin_count == 0:
                np.subtract.at(self._pin_refs, n.own_blocks(self._bs), 1)
                released.append(n)
        for n in released:  # deepest first: ancestors end up behind their descendants
            if touch:
                n.last_access = now
            self._policy.track(n)
        self._pinned_blocks = int(np.count_nonzero(self._pin_refs))
