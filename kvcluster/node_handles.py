"""How the client reaches a node: in-process, or through its Ray actor.

A :class:`NodeHandle` calls one node's methods by name. ``LocalNodeHandle`` calls a
``NodeEngine`` (or its instrumented wrapper) directly: the in-process cluster used by tests,
notebooks and single-machine engines. ``RayNodeHandle`` calls the node actor and translates
Ray's failures into :class:`NodeUnavailable` at this boundary, so the client never sees a raw
Ray exception.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import ray

from kvcluster.errors import KVClusterError, NodeUnavailable


class NodeHandle(Protocol):
    node_id: str
    #: Whether a submitted call runs concurrently with the caller (False: it already ran).
    concurrent: bool

    def call(self, method: str, *args: Any) -> Any: ...

    async def acall(self, method: str, *args: Any) -> Any: ...

    def submit(self, method: str, *args: Any) -> Any:
        """Start a call and return something :meth:`resolve` turns into its result."""
        ...

    def resolve(self, pending: Any) -> Any: ...


class LocalNodeHandle:
    concurrent = False

    def __init__(self, node: Any) -> None:
        self.node = node
        self.node_id: str = node.node_id

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.node, method)(*args)

    async def acall(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.node, method), *args)

    def submit(self, method: str, *args: Any) -> Any:
        return self.call(method, *args)

    def resolve(self, pending: Any) -> Any:
        return pending


#: Node methods whose reply (K/V pages) is usually past Ray's inline limit, so it arrives
#: through the object store; :meth:`RayNodeHandle.call` waits for it to be local first.
OBJECT_STORE_REPLIES = frozenset({"fetch"})


def get_result(ref: Any, timeout_s: float | None, source: str, *, wait_local: bool = False) -> Any:
    """The object behind ``ref`` (the result of ``source``, named in errors). A cluster error
    raised there comes back as itself; any other failure, or no result within ``timeout_s``,
    as :class:`NodeUnavailable`.

    ``wait_local``: first wait, without taking the object store's client lock, until the
    object is on this node. Why: a ``ray.get`` of an object-store result that is not local
    yet holds the process's plasma-client lock for up to a second per retry while the object
    is pulled. With many threads fetching at once, the core worker's own I/O thread starves
    on that lock (it takes it to release buffers), and that thread also answers the location
    requests the very pulls are waiting for: the process stalled for minutes in a 128-thread
    load test (Ray 2.60). ``ray.wait(fetch_local=True)`` waits through the raylet instead,
    so the get that follows finds the object local and holds the lock only briefly.
    """
    try:
        if wait_local:
            ready, _ = ray.wait([ref], timeout=timeout_s, fetch_local=True)
            if not ready:
                raise NodeUnavailable(f"{source} did not answer within {timeout_s} s")
        return ray.get(ref, timeout=timeout_s)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
        raise _as_cluster_error(exc, source) from None


def _as_cluster_error(exc: Exception, source: str) -> KVClusterError:
    """What a failed Ray call of ``source`` means to a caller."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.as_instanceof_cause()
        if isinstance(cause, KVClusterError):
            return cause
        return NodeUnavailable(f"{source} failed: {exc}")
    return NodeUnavailable(f"{source} is unavailable: {type(exc).__name__}")


class RayNodeHandle:
    concurrent = True

    def __init__(self, node_id: str, actor: Any, timeout_s: float | None = 60.0) -> None:
        self.node_id = node_id
        self.actor = actor
        self._timeout_s = timeout_s

    def call(self, method: str, *args: Any) -> Any:
        return self.resolve(self.submit(method, *args), wait_local=method in OBJECT_STORE_REPLIES)

    def submit(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.actor, method).remote(*args)
        except ray.exceptions.RayError as exc:
            raise NodeUnavailable(f"node {self.node_id}: {type(exc).__name__}: {exc}") from None

    def resolve(self, pending: Any, *, wait_local: bool = False) -> Any:
        """The call's result; ``wait_local``: first wait, without taking the object store's
        client lock, until the result is on this node (see :func:`get_result`)."""
        return get_result(pending, self._timeout_s, f"node {self.node_id}", wait_local=wait_local)

    async def acall(self, method: str, *args: Any) -> Any:
        """The call's result, awaited; within the handle's timeout, as :meth:`call` (a node
        that hangs, rather than dies, would otherwise hold the caller forever)."""
        ref = self.submit(method, *args)
        try:
            return await asyncio.wait_for(_awaited(ref), self._timeout_s)
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
            raise NodeUnavailable(f"node {self.node_id} did not answer within {self._timeout_s} s") from None
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            raise _as_cluster_error(exc, f"node {self.node_id}") from None


async def _awaited(ref: Any) -> Any:
    """``await ref`` as a coroutine, which ``asyncio.wait_for`` can cancel (the call goes on
    in the actor; only this wait ends)."""
    return await ref
