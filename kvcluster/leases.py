"""Leases: a reader's pin on the blocks of a prefix match, released or expired.

A lease is what ``route_and_lookup`` hands out: while it lives, the blocks it covers are never
evicted, demoted or moved, so a later ``fetch`` or ``store`` reads exactly what was matched.
A client that crashes cannot leak pins forever: every lease expires ``ttl_s`` after it was
granted, and the node's maintenance thread releases it.

Concurrency: not thread-safe; the node engine calls it under its lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kvcluster.errors import InvalidArgument, LeaseError

HoldT = TypeVar("HoldT")


@dataclass(slots=True)
class Lease(Generic[HoldT]):
    lease_id: str
    namespace: str
    expires_at: float
    hold: HoldT = field(repr=False)


class LeaseTable(Generic[HoldT]):
    """Live leases by id. ``release_hold`` undoes whatever a lease's ``hold`` pins."""

    def __init__(
        self,
        ttl_s: float,
        release_hold: Callable[[HoldT], None],
        clock: Callable[[], float],
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        if ttl_s <= 0:
            raise InvalidArgument(f"lease ttl_s must be positive, got {ttl_s}")
        self._ttl_s = ttl_s
        self._release_hold = release_hold
        self._clock = clock
        self._new_id = new_id
        self._leases: dict[str, Lease[HoldT]] = {}

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, namespace: str, hold: HoldT) -> Lease[HoldT]:
        lease = Lease(self._new_id(), namespace, self._clock() + self._ttl_s, hold)
        self._leases[lease.lease_id] = lease
        return lease

    def get(self, lease_id: str, namespace: str | None = None) -> Lease[HoldT]:
        """The live lease ``lease_id``; :class:`LeaseError` if released, expired or foreign."""
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseError(f"lease {lease_id!r} is unknown, released or expired")
        if self._clock() >= lease.expires_at:
            self.release(lease_id)
            raise LeaseError(f"lease {lease_id!r} expired")
        if namespace is not None and namespace != lease.namespace:
            raise LeaseError(
                f"lease {lease_id!r} belongs to namespace {lease.namespace!r}, not {namespace!r}"
            )
        return lease

    def release(self, lease_id: str) -> bool:
        """Release ``lease_id``; False if it was already gone (releasing twice is harmless)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._release_hold(lease.hold)
        return True

    def expire(self) -> int:
        """Release every lease past its expiry; returns how many."""
        now = self._clock()
        expired = [lid for lid, lease in self._leases.items() if now >= lease.expires_at]
        for lease_id in expired:
            self.release(lease_id)
        return len(expired)

    def release_all(self) -> int:
        ids = list(self._leases)
        for lease_id in ids:
            self.release(lease_id)
        return len(ids)
