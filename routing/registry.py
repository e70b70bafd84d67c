"""The global prefix registry: which node holds which blocks, on which tier, and who is alive.

This module defines the :class:`PrefixRegistry` protocol, its small value types and the
validation and event flattening that every backend shares. Two backends implement it and
pass one contract suite (``tests/routing/test_registry_contract.py``):

- :class:`routing.memory_registry.InMemoryRegistry` (embedded; in-process or a Ray actor);
- :class:`routing.redis_registry.RedisPrefixRegistry` (Redis; every mutation one Lua script).

Model
-----
A node registers and gets an *epoch*; a node that restarts registers again and gets a higher
one, and everything its old epoch registered stops counting at once (*fencing*). It renews its
liveness with :meth:`~PrefixRegistry.heartbeat` (carrying its load); a node that has not
renewed within ``node_ttl_s`` disappears from every answer.

A node reports what it holds in :class:`EventBatch` es numbered ``1, 2, 3, ...`` per epoch.
Each batch is applied atomically and exactly once, in sequence order: a batch seen before is a
duplicate (ignored); a batch that arrives ahead of a gap is buffered (up to
``max_buffered_batches`` ahead) and applied as soon as the gap is filled. So delivering
batches out of order or more than once ends in the state of applying each once, in order.

Events name runs of consecutive blocks of one chain: ``family`` (the key of the chain's first
block, which groups every chain that starts alike), ``first_position`` (the depth of the
first key in its chain) and the keys. The registry indexes only every ``stride``-th depth
(``index_stride_blocks``; depths ``stride-1, 2*stride-1, ...``), each such *checkpoint* key
standing for the ``stride`` blocks that end with it; events for other depths are dropped.
With ``stride == 1`` every block is indexed and answers are exact.

:meth:`~PrefixRegistry.longest_prefix` answers, for every live node, how many LEADING blocks
of a chain it holds (the largest ``k * stride`` such that it holds checkpoints ``1..k``) and
how many of those sit on each tier. Entries expire ``entry_ttl_s`` after their family was last
published to; nodes re-announce what they hold to keep them (and after a registry restart,
which :meth:`~PrefixRegistry.needs_resync` and a ``False`` heartbeat reveal).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum, IntEnum
from typing import Protocol, runtime_checkable

import numpy as np

from kvcluster.errors import InvalidArgument
from routing.block_hashing import (
    BLOCK_HASH_BYTES,
    BLOCK_HASH_DTYPE,
    BlockHash,
    BlockHashArray,
    as_block_hashes,
)

#: Node ids and namespaces end up in Redis key names: no braces (they would change the
#: Cluster hash tag), no glob characters (SCAN patterns), no whitespace.
_NAME_RE = re.compile(r"[A-Za-z0-9_.:@/+=\-]{1,128}")
DEFAULT_NAMESPACE = "default"
MAX_INCARNATIONS = 65535
#: Epochs stay below 2**53: Lua (the Redis backend) counts in doubles, exact only up to there.
MAX_EPOCH = 2**53 - 1


class Tier(IntEnum):
    """Where a block lives on its node, fastest first (the wire value is the int)."""

    GPU = 0
    CPU = 1
    NVME = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class EventKind(Enum):
    STORED = 1
    REMOVED = 2
    MOVED = 3


@dataclass(frozen=True, slots=True, eq=False)
class BlockEvent:
    """Blocks ``hashes`` (consecutive keys of one chain) were stored, removed or moved.

    ``family`` is the key of the chain's first block, ``first_position`` the depth of
    ``hashes[0]`` in the chain. ``tier`` is the new tier of STORED and MOVED events and
    ``None`` for REMOVED. Build with :meth:`stored`, :meth:`removed` or :meth:`moved`.
    """

    kind: EventKind
    family: BlockHash
    first_position: int
    hashes: BlockHashArray
    tier: Tier | None
    namespace: str = DEFAULT_NAMESPACE

    @classmethod
    def stored(cls, hashes: BlockHashArray | Sequence[bytes], tier: Tier, *,
               first_position: int = 0, family: bytes | None = None,
               namespace: str = DEFAULT_NAMESPACE) -> BlockEvent:
        return cls._make(EventKind.STORED, hashes, tier, first_position, family, namespace)

    @classmethod
    def removed(cls, hashes: BlockHashArray | Sequence[bytes], *, first_position: int = 0,
                family: bytes | None = None, namespace: str = DEFAULT_NAMESPACE) -> BlockEvent:
        return cls._make(EventKind.REMOVED, hashes, None, first_position, family, namespace)

    @classmethod
    def moved(cls, hashes: BlockHashArray | Sequence[bytes], tier: Tier, *,
              first_position: int = 0, family: bytes | None = None,
              namespace: str = DEFAULT_NAMESPACE) -> BlockEvent:
        return cls._make(EventKind.MOVED, hashes, tier, first_position, family, namespace)

    @classmethod
    def _make(cls, kind: EventKind, hashes: BlockHashArray | Sequence[bytes], tier: Tier | None,
              first_position: int, family: bytes | None, namespace: str) -> BlockEvent:
        array = as_block_hashes(hashes)
        if family is None:
            if first_position != 0 or array.size == 0:
                raise InvalidArgument(
                    "family (the chain's first block key) is required unless the event starts "
                    f"the chain (first_position={first_position}, {array.size} hashes)"
                )
            family = array[0].tobytes()
        if tier is not None:
            try:
                tier = Tier(tier)
            except ValueError:
                raise InvalidArgument(f"tier must be a Tier (0 gpu, 1 cpu, 2 nvme), got {tier!r}") from None
        event = cls(kind, BlockHash(bytes(family)), first_position, array, tier, namespace)
        validate_event(event)
        return event


@dataclass(frozen=True, slots=True, eq=False)
class EventBatch:
    """One node's events, applied atomically; ``seq`` counts 1, 2, 3... within ``epoch``."""

    node_id: str
    epoch: int
    seq: int
    events: tuple[BlockEvent, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """A node's load as of its last heartbeat (0 ``total_blocks`` means unknown capacity)."""

    inflight_requests: int = 0
    free_blocks: int = 0
    total_blocks: int = 0

    def __post_init__(self) -> None:
        for name in ("inflight_requests", "free_blocks", "total_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"NodeLoad.{name} must be an integer >= 0, got {value!r}")

    @property
    def free_fraction(self) -> float:
        """Share of the node's blocks that are free; 1.0 when the capacity is unknown."""
        return min(1.0, self.free_blocks / self.total_blocks) if self.total_blocks else 1.0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A live node: its epoch, its load and how long ago it last renewed."""

    node_id: str
    epoch: int
    load: NodeLoad
    heartbeat_age_s: float


@dataclass(frozen=True, slots=True)
class PrefixHolding:
    """How many leading blocks of a chain one node holds, split by tier."""

    num_blocks: int
    gpu_blocks: int = 0
    cpu_blocks: int = 0
    nvme_blocks: int = 0

    @property
    def blocks_per_tier(self) -> dict[str, int]:
        return {"gpu": self.gpu_blocks, "cpu": self.cpu_blocks, "nvme": self.nvme_blocks}


class PublishStatus(Enum):
    APPLIED = "applied"  # this batch (and any buffered ones it unblocked) applied
    DUPLICATE = "duplicate"  # already applied (or already buffered): nothing changed
    BUFFERED = "buffered"  # ahead of a gap: kept until the missing batches arrive
    OUT_OF_WINDOW = "out_of_window"  # too far ahead of the gap: dropped; re-announce
    RESYNC = "resync"  # the registry does not know this node: register again, re-announce


@dataclass(frozen=True, slots=True)
class PublishResult:
    status: PublishStatus
    applied_through: int  # highest sequence number applied for this node and epoch
    batches_applied: int = 0  # batches applied by this call (this one plus unblocked ones)


@dataclass(frozen=True, slots=True)
class RegistryStats:
    registered_nodes: int
    live_nodes: int
    families: int
    blocks: int  # distinct indexed block keys
    entries: int  # (block, node) records
    bytes: int | None  # memory of the block index (Redis: MEMORY USAGE of its keys)
    malformed_skipped: int  # entries or records that did not decode, skipped and counted


@runtime_checkable
class PrefixRegistry(Protocol):
    """Where prefixes live. Thread-safe in every backend.

    Expected outcomes return (an unknown node in :meth:`heartbeat` returns ``False``);
    misuse raises :class:`~kvcluster.errors.InvalidArgument`; a node publishing or renewing
    with an epoch that is not its current one raises :class:`~kvcluster.errors.FencedEpoch`;
    a registry that cannot be reached raises :class:`~kvcluster.errors.RegistryUnavailable`.
    """

    @property
    def index_stride(self) -> int:
        """Blocks per indexed checkpoint (answers are multiples of it)."""
        ...

    def register_node(self, node_id: str, *, previous_epoch: int = 0) -> int:
        """Start a new epoch for ``node_id`` (greater than its current one and than
        ``previous_epoch``) and return it. The old epoch's entries stop counting."""
        ...

    def heartbeat(self, node_id: str, epoch: int, load: NodeLoad) -> bool:
        """Renew liveness and report load. ``False``: unknown node (registry restarted or
        node purged): register again and re-announce what it holds."""
        ...

    def needs_resync(self, node_id: str, epoch: int) -> bool:
        """``True`` when the registry holds no record of ``node_id`` at ``epoch``."""
        ...

    def publish(self, batch: EventBatch) -> PublishResult:
        ...

    def publish_many(self, batches: Sequence[EventBatch]) -> list[PublishResult]:
        """Publish batches in order (pipelined by the Redis backend)."""
        ...

    def longest_prefix(
        self, hashes: BlockHashArray, namespace: str = DEFAULT_NAMESPACE
    ) -> dict[str, PrefixHolding]:
        """For every live node holding at least one leading checkpoint of the chain
        ``hashes`` (which starts at depth 0), its holding; nodes holding none are absent."""
        ...

    def live_nodes(self) -> dict[str, NodeInfo]:
        ...

    def purge_node(self, node_id: str) -> bool:
        """Forget ``node_id`` and its entries; ``False`` if it was unknown."""
        ...

    def clear_namespace(self, namespace: str) -> int:
        """Drop every entry of ``namespace``; returns the number of families removed."""
        ...

    def stats(self) -> RegistryStats:
        ...

    def close(self) -> None:
        ...


# --- validation and flattening shared by the backends --------------------------------------


def check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"{kind} must be 1-128 characters from letters, digits and _.:@/+=- , got {value!r}"
        )
    return value


def check_positive_int(kind: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidArgument(f"{kind} must be an integer >= 1, got {value!r}")
    return int(value)


def validate_event(event: BlockEvent) -> None:
    if not isinstance(event, BlockEvent):
        raise InvalidArgument(f"events must be BlockEvent, got {type(event).__name__}")
    if not isinstance(event.kind, EventKind):
        raise InvalidArgument(f"event kind must be an EventKind, got {event.kind!r}")
    if event.tier is not None and not isinstance(event.tier, Tier):
        raise InvalidArgument(f"event tier must be a Tier or None, got {event.tier!r}")
    check_name("namespace", event.namespace)
    if not isinstance(event.family, bytes) or len(event.family) != BLOCK_HASH_BYTES:
        raise InvalidArgument(f"family must be a {BLOCK_HASH_BYTES}-byte key, got {event.family!r:.60}")
    if (isinstance(event.first_position, bool) or not isinstance(event.first_position, int)
            or event.first_position < 0):
        raise InvalidArgument(f"first_position must be an integer >= 0, got {event.first_position!r}")
    if not isinstance(event.hashes, np.ndarray) or event.hashes.dtype != BLOCK_HASH_DTYPE \
            or event.hashes.ndim != 1:
        raise InvalidArgument("event hashes must be a 1-D V16 block-hash array")
    if event.first_position == 0 and event.hashes.size and event.hashes[0].tobytes() != event.family:
        raise InvalidArgument("an event starting at depth 0 must have family == hashes[0]")
    if (event.kind is EventKind.REMOVED) != (event.tier is None):
        raise InvalidArgument(f"{event.kind.name} events {'take no' if event.tier is None else 'need a'} tier")


def validate_batch(batch: EventBatch) -> None:
    """Raise :class:`InvalidArgument` naming the first bad field; changes nothing."""
    if not isinstance(batch, EventBatch):
        raise InvalidArgument(f"publish takes an EventBatch, got {type(batch).__name__}")
    check_name("node_id", batch.node_id)
    check_positive_int("epoch", batch.epoch)
    check_positive_int("seq", batch.seq)
    if not isinstance(batch.events, tuple | list):
        raise InvalidArgument(f"EventBatch.events must be a tuple of BlockEvent, got {type(batch.events).__name__}")
    for event in batch.events:
        validate_event(event)


def checkpoint_slice(first_position: int, stride: int) -> slice:
    """The indices of a run starting at depth ``first_position`` that are checkpoints
    (depth ``d`` with ``(d + 1) % stride == 0``)."""
    return slice((stride - 1 - first_position) % stride, None, stride)


def checkpoint_count(event: BlockEvent, stride: int) -> int:
    """How many registry operations ``event`` costs: its checkpoint keys (what
    :func:`flatten_events` and the Redis ops blob carry for it; other depths are dropped)."""
    return len(range(checkpoint_slice(event.first_position, stride).start, event.hashes.size, stride))


def split_event(event: BlockEvent, stride: int, max_ops: int) -> list[BlockEvent]:
    """``event`` cut into runs of consecutive positions of at most ``max_ops`` checkpoints
    each, in chain order; together they flatten to exactly the operations of ``event``.

    Each piece but the last ends on its ``max_ops``-th checkpoint; the blocks after the last
    checkpoint (dropped by the registry) ride with the last piece::

        stride 4, max_ops 2:  depth  0 1 2 3 4 5 6 7 8 9 10 11 12 13
                              ckpt         ^       ^           ^           (depth % 4 == 3)
                              piece  [ 0 .. 7 ][ 8 .. 13 ]
    """
    check_positive_int("max_ops", max_ops)
    total = checkpoint_count(event, stride)
    if total <= max_ops:
        return [event]
    first = checkpoint_slice(event.first_position, stride).start  # index of the first checkpoint
    # piece j ends just after checkpoint number (j + 1) * max_ops - 1 (0-based); the last at the end
    ends = [first + ((j + 1) * max_ops - 1) * stride + 1 for j in range((total - 1) // max_ops)]
    bounds = [0, *ends, event.hashes.size]
    return [_slice_event(event, start, end) for start, end in itertools.pairwise(bounds)]


def _slice_event(event: BlockEvent, start: int, end: int) -> BlockEvent:
    # The family is the chain's first key whichever piece this is, so a piece that does not
    # start at depth 0 stays valid (family is given, not derived from hashes[0]).
    return replace(event, first_position=event.first_position + start, hashes=event.hashes[start:end])


def lookup_probes(hashes: BlockHashArray, stride: int) -> BlockHashArray:
    """The checkpoint keys of a chain that starts at depth 0."""
    return hashes[stride - 1 :: stride]


def check_chain(hashes: object) -> BlockHashArray:
    if not isinstance(hashes, np.ndarray):
        return as_block_hashes(hashes)  # type: ignore[arg-type]
    if hashes.dtype != BLOCK_HASH_DTYPE or hashes.ndim != 1:
        raise InvalidArgument(f"hashes must be a 1-D V16 block-hash array, got {hashes.dtype}")
    return hashes


FlatOp = tuple[EventKind, int, str, bytes, bytes]
"""(kind, tier (-1 for removals), namespace, family, block key) of one indexed block."""


def flatten_events(events: Sequence[BlockEvent], stride: int) -> list[FlatOp]:
    """The per-checkpoint operations of ``events``, in order."""
    ops: list[FlatOp] = []
    for event in events:
        keys = event.hashes[checkpoint_slice(event.first_position, stride)].tolist()
        tier = -1 if event.tier is None else int(event.tier)
        ops.extend((event.kind, tier, event.namespace, event.family, key) for key in keys)
    return ops
