"""Build the prefix registry a config asks for: Redis, the embedded one, or a proxy to the
embedded one running in a Ray actor (a multi-node cluster with no Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from kvcluster.errors import RegistryUnavailable
from routing.config import RegistryConfig
from routing.registry import PrefixRegistry
from routing.registry_factory import open_registry


class RemoteRegistry:
    """A :class:`PrefixRegistry` whose backend is the ``InMemoryRegistry`` in a Ray actor.

    Each call is one actor round trip. Ray failures become :class:`RegistryUnavailable`, and
    the registry's own errors (``FencedEpoch``, ``InvalidArgument``) are re-raised as such.
    """

    def __init__(
        self,
        actor: Any,
        index_stride: int,
        *,
        live_nodes_refresh_s: float = 0.25,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._actor = actor
        self._timeout_s = timeout_s
        self._stride = index_stride
        # Liveness changes on the heartbeat's timescale, so the router's per-request
        # live_nodes() is served from a copy at most this old (as the Redis backend does);
        # a route then costs one registry round trip, not two.
        self._refresh_s = live_nodes_refresh_s
        self._clock = clock
        self._live: tuple[float, Any] | None = None
        self._live_lock = threading.Lock()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return ray.get(getattr(self._actor, method).remote(*args, **kwargs), timeout=self._timeout_s)
        except ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            raise RegistryUnavailable(f"registry actor: {type(exc).__name__}") from None

    @property
    def index_stride(self) -> int:
        return self._stride

    def register_node(self, node_id: str, *, previous_epoch: int = 0) -> int:
        return int(self._call("register_node", node_id, previous_epoch=previous_epoch))

    def heartbeat(self, node_id: str, epoch: int, load: Any) -> bool:
        return bool(self._call("heartbeat", node_id, epoch, load))

    def needs_resync(self, node_id: str, epoch: int) -> bool:
        return bool(self._call("needs_resync", node_id, epoch))

    def publish(self, batch: Any) -> Any:
        return self._call("publish", batch)

    def publish_many(self, batches: Any) -> Any:
        return self._call("publish_many", batches)

    def longest_prefix(self, hashes: Any, namespace: str = "default") -> Any:
        return self._call("longest_prefix", hashes, namespace)

    def live_nodes(self) -> Any:
        with self._live_lock:
            cached = self._live
        now = self._clock()
        if cached is not None and now - cached[0] < self._refresh_s:
            return cached[1]
        nodes = self._call("live_nodes")
        with self._live_lock:
            self._live = (now, nodes)
        return nodes

    def purge_node(self, node_id: str) -> bool:
        return bool(self._call("purge_node", node_id))

    def clear_namespace(self, namespace: str) -> int:
        return int(self._call("clear_namespace", namespace))

    def stats(self) -> Any:
        return self._call("stats")

    def close(self) -> None:
        """The actor outlives this proxy; nothing to close."""


def build_registry(
    config: RegistryConfig,
    registry_actor: Any | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> PrefixRegistry:
    """A proxy to ``registry_actor`` when the embedded registry runs in a Ray actor;
    otherwise the backend the config names (``routing.registry_factory.open_registry``)."""
    if config.backend == "memory" and registry_actor is not None:
        return RemoteRegistry(  # type: ignore[return-value]
            registry_actor,
            config.index_stride_blocks,
            live_nodes_refresh_s=min(0.5, config.heartbeat_interval_s / 4),
            clock=clock,
        )
    return open_registry(config, clock=clock)
