"""Records that cross the boundary between the client and the node actors.

They are small frozen, slotted dataclasses of plain values (numpy arrays at most), and
callers never see a node's internal structures. The replies of the per-request calls
(``lookup``, ``store``) cross as plain tuples (:meth:`LookupReply.to_wire`): Ray encodes
built-in values with msgpack but pickles any class, which cost ~200 us more per call on these
machines, a tenth of a lookup's round trip.
"""

from __future__ import annotations

import hashlib
from dataclasses import astuple, dataclass, field
from typing import Any

from kvcluster.config import KVClusterConfig


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """What must agree across a cluster for block hashes and pages to mean the same thing."""

    node_id: str
    epoch: int
    model_name: str
    model_fingerprint: str
    block_size: int
    hash_algorithm: str
    salt_digest: str

    def drift_from(self, expected: NodeIdentity) -> list[str]:
        """One line per field that differs from ``expected`` (empty when compatible)."""
        lines = []
        for name in ("model_fingerprint", "block_size", "hash_algorithm", "salt_digest"):
            ours, theirs = getattr(self, name), getattr(expected, name)
            if ours != theirs:
                lines.append(f"{name}: node {self.node_id} has {ours!r}, the cluster config has {theirs!r}")
        return lines


def identity_for(config: KVClusterConfig, node_id: str, epoch: int) -> NodeIdentity:
    """The identity a node running ``config`` must have."""
    return NodeIdentity(
        node_id=node_id,
        epoch=epoch,
        model_name=config.model.name,
        model_fingerprint=config.model.fingerprint(),
        block_size=config.cache.block_size,
        hash_algorithm=config.hashing.algorithm,
        salt_digest=hashlib.sha256(config.hashing.salt.encode()).hexdigest()[:16],
    )


@dataclass(frozen=True, slots=True)
class LookupReply:
    """What a node found for a prompt, and the lease that pins it.

    ``matched_tokens`` counts the leading prompt tokens whose K/V the node holds (token
    granular). ``lease_id`` is ``None`` when nothing matched: there is nothing to pin.
    """

    node_id: str
    namespace: str
    matched_tokens: int
    blocks_per_tier: dict[str, int]
    lease_id: str | None
    lease_expires_in_s: float

    def to_wire(self) -> tuple[Any, ...]:
        """The reply as built-in values only (see the module docstring)."""
        return astuple(self)

    @classmethod
    def from_wire(cls, wire: Any) -> LookupReply:
        """The reply :meth:`to_wire` encoded (a list after some transports); passes a
        ``LookupReply`` through."""
        return wire if isinstance(wire, cls) else cls(*wire)


@dataclass(frozen=True, slots=True)
class StoreReply:
    node_id: str
    namespace: str
    cached_tokens: int
    new_tokens: int
    published_blocks: int

    def to_wire(self) -> tuple[Any, ...]:
        """The reply as built-in values only (see the module docstring)."""
        return astuple(self)

    @classmethod
    def from_wire(cls, wire: Any) -> StoreReply:
        return wire if isinstance(wire, cls) else cls(*wire)


@dataclass(frozen=True, slots=True)
class NodeStats:
    node_id: str
    epoch: int
    device: str
    blocks_total: int
    blocks_free: int
    sequences: int
    leases: int
    hits: int
    misses: int
    hit_tokens: int
    lookup_tokens: int
    tiers: dict[str, dict[str, float]] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)
    migrations_in: int = 0
    migrations_out: int = 0
    ended_conversations: int = 0
    demoted_tokens: int = 0
    registry_errors: int = 0
    #: spilled blocks the tiers lost on their own (full NVMe, corrupt page), unregistered
    dropped_spills: int = 0
