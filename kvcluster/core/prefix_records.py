"""The values the prefix index hands out: matches, leases, insert results, evicted blocks, stats.

All are frozen slotted dataclasses holding only immutable data (ints, strings, ``bytes`` of
native int64 ids), so a caller can keep them across later mutations of the index and never
reach into its tree. Arrays are exposed as read-only numpy views of those bytes (no copy).
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import overload

import numpy as np
import numpy.typing as npt

from kvcluster.core.eviction import EvictionReason
from kvcluster.core.radix_node import ID_BYTES, RadixNode, ids_from_bytes

Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The longest cached prefix of a prompt, as found by one lookup (a snapshot).

    ``matched_tokens`` of the ``total_tokens`` looked up are cached; ``block_ids`` hold their
    K/V, ``ceil(matched_tokens / block_size)`` blocks. The match is *token-granular*: when
    ``matched_tokens`` is not a multiple of the block size, only the first
    ``partial_tokens`` rows of the last block belong to this prompt, and a sequence built on it
    copies that block before writing into it (``PagedKVEngine.create_sequence(shared_blocks=...,
    shared_tokens=matched_tokens)`` does). A miss has ``matched_tokens == 0`` and no blocks.

    The blocks are only guaranteed to stay cached while a :class:`Lease` holds them
    (``PrefixIndex.acquire``, which checks that the prefix is still cached in these blocks).
    """

    namespace: str
    matched_tokens: int
    total_tokens: int
    block_size: int
    block_bytes: bytes = field(repr=False)
    prompt_bytes: bytes = field(repr=False)
    # The index that found the match and its count of dropped nodes then: while nothing was
    # dropped since, the match is still cached and acquire skips re-walking it.
    origin: object = field(default=None, repr=False, compare=False)
    drops_seen: int = field(default=-1, repr=False, compare=False)

    @property
    def hit(self) -> bool:
        return self.matched_tokens > 0

    @property
    def block_ids(self) -> Int64Array:
        """Block ids covering the matched tokens (read-only int64 array)."""
        return ids_from_bytes(self.block_bytes)

    @property
    def num_blocks(self) -> int:
        return len(self.block_bytes) // ID_BYTES

    @property
    def full_blocks(self) -> int:
        """Blocks entirely covered by the match."""
        return self.matched_tokens // self.block_size

    @property
    def partial_tokens(self) -> int:
        """Rows of the last block that the match uses when it ends inside it, else 0."""
        return self.matched_tokens % self.block_size

    @property
    def tokens(self) -> Int64Array:
        """The prompt looked up (read-only int64 array)."""
        return ids_from_bytes(self.prompt_bytes)

    @property
    def remaining(self) -> Int64Array:
        """The prompt's tokens after the match, still to be computed (read-only int64 array)."""
        return ids_from_bytes(self.prompt_bytes)[self.matched_tokens :]

    @property
    def num_remaining(self) -> int:
        return self.total_tokens - self.matched_tokens

    @property
    def savings_ratio(self) -> float:
        """Fraction of the prompt whose K/V need not be computed (0.0 for a miss)."""
        return self.matched_tokens / self.total_tokens if self.total_tokens else 0.0


@dataclass(frozen=True, slots=True)
class Lease:
    """References held on a match's blocks so they are never evicted while a reader uses them.

    Release it exactly once with ``PrefixIndex.release``.
    """

    lease_id: int
    namespace: str
    matched_tokens: int
    block_bytes: bytes = field(repr=False)

    @property
    def block_ids(self) -> Int64Array:
        return ids_from_bytes(self.block_bytes)


@dataclass(frozen=True, slots=True)
class InsertResult:
    """What one insert did.

    ``cached_tokens`` leading tokens were already in the tree and kept their blocks;
    ``new_tokens`` were added, holding ``adopted_blocks`` new references on the caller's blocks.
    ``split`` says an edge was split to branch off. ``skipped`` means the sequence was shorter
    than ``min_prefix_tokens`` and nothing was cached.
    """

    cached_tokens: int
    new_tokens: int
    adopted_blocks: int
    split: bool = False
    skipped: bool = False


@dataclass(frozen=True, slots=True)
class EvictedBlock:
    """A block leaving the cache, reported to ``on_evict`` *before* its reference is dropped.

    The block held tokens ``[start, end)`` of the prefix ``prefix_bytes`` (every token from
    position 0 to the end of the evicted node, shared by the blocks of one eviction), so a
    listener can copy the page to a lower tier under the prefix's hash chain.
    """

    namespace: str
    block_id: int
    block_index: int
    start: int
    end: int
    reason: EvictionReason
    prefix_bytes: bytes = field(repr=False)

    @property
    def tokens(self) -> Int64Array:
        """The tokens whose K/V the block holds (rows ``0 .. end - start``)."""
        return ids_from_bytes(self.token_bytes)

    @property
    def token_bytes(self) -> bytes:
        """:attr:`tokens` as raw little-endian int64 bytes (no array is built)."""
        return self.prefix_bytes[self.start * ID_BYTES : self.end * ID_BYTES]

    @property
    def prefix_tokens(self) -> Int64Array:
        """Every token from position 0 up to and including the block's last row."""
        return ids_from_bytes(self.prefix_bytes[: self.end * ID_BYTES])


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of the prefix index's counters.

    A lookup is a *hit* when it matched at least one token (``min_prefix_tokens`` considered).
    ``evictions`` counts blocks returned to the pool per reason (``capacity``, ``ttl``,
    ``memory_budget``, ``explicit``), ``evicted_nodes`` the tree nodes dropped per reason (a
    partial eviction, which trims a leaf, frees blocks and drops no node).
    ``blocks_used`` is the number of distinct blocks the tree references and ``bytes_used``
    their K/V bytes (0 when the index was not told ``bytes_per_block``).
    """

    hits: int
    misses: int
    hit_tokens: int
    lookup_tokens: int
    inserts: int
    inserted_tokens: int
    evictions: dict[str, int]
    evicted_nodes: dict[str, int]
    blocks_used: int
    bytes_used: int
    pinned_blocks: int
    pins: int
    leases: int
    nodes: int
    namespaces: int

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Fraction of lookups that hit (0.0 before any lookup)."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def token_hit_rate(self) -> float:
        """Fraction of looked-up tokens served from the cache."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    @property
    def total_evicted_blocks(self) -> int:
        return sum(self.evictions.values())


@dataclass(frozen=True, slots=True)
class InsertBatchResult:
    """Totals of one ``PrefixIndex.insert_many`` call (see :class:`InsertResult`)."""

    items: int
    cached_tokens: int
    new_tokens: int
    adopted_blocks: int
    splits: int
    skipped: int


class MatchBatch(SequenceABC[PrefixMatch]):
    """The results of ``PrefixIndex.lookup_many``, one per prompt, in order.

    The counts are kept as plain integers; ``batch[i]`` builds prompt ``i``'s
    :class:`PrefixMatch` on access from what the lookup captured (the prompts' bytes, where
    each match ended, and the matched node's block path and id, which never change for a
    node), so it is the same snapshot :meth:`PrefixIndex.lookup` would have returned.
    """

    __slots__ = ("_block_size", "_bounds", "_buffer", "_nodes", "_positions", "namespace")

    def __init__(
        self,
        namespace: str,
        block_size: int,
        buffer: bytes,
        bounds: list[int],
        positions: list[int],
        nodes: list[RadixNode | None],
    ) -> None:
        assert len(bounds) == len(positions) + 1 == len(nodes) + 1
        self.namespace = namespace
        self._block_size = block_size
        self._buffer = buffer
        self._bounds = bounds  # byte offset of each prompt in buffer, plus the end
        self._positions = positions  # byte offset where each prompt's match ends
        self._nodes = nodes

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, index: int) -> PrefixMatch: ...

    @overload
    def __getitem__(self, index: slice) -> list[PrefixMatch]: ...

    def __getitem__(self, index: int | slice) -> PrefixMatch | list[PrefixMatch]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]
        start, end, pos = self._bounds[i], self._bounds[i + 1], self._positions[i]
        matched = (pos - start) // ID_BYTES
        total = (end - start) // ID_BYTES
        node = self._nodes[i]
        prompt = self._buffer[start:end]
        if not matched or node is None:
            return PrefixMatch(self.namespace, 0, total, self._block_size, b"", prompt)
        blocks = node.path_blocks[: -(-matched // self._block_size) * ID_BYTES]
        return PrefixMatch(self.namespace, matched, total, self._block_size, blocks, prompt)

    @property
    def matched_tokens(self) -> npt.NDArray[np.int64]:
        starts = np.asarray(self._bounds[:-1], dtype=np.int64)
        return (np.asarray(self._positions, dtype=np.int64) - starts) // ID_BYTES

    @property
    def total_tokens(self) -> npt.NDArray[np.int64]:
        return np.asarray(np.diff(np.asarray(self._bounds, dtype=np.int64)) // ID_BYTES, dtype=np.int64)

    @property
    def hits(self) -> int:
        return int(np.count_nonzero(self.matched_tokens))
