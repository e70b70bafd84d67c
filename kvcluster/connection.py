"""Entry points that hand out a :class:`KVClient`: to a Ray deployment, or in-process."""

from __future__ import annotations

import time
from collections.abc import Callable

from kvcluster.client import KVClient
from kvcluster.config import KVClusterConfig, load_config
from kvcluster.deploy import ensure_ray, find_nodes, find_registry_actor
from kvcluster.errors import ClusterError
from kvcluster.node_actor import NodeActor
from kvcluster.node_handles import LocalNodeHandle, NodeHandle, RayNodeHandle
from kvcluster.registry_factory import build_registry


def _as_config(config: KVClusterConfig | str | None) -> KVClusterConfig:
    return config if isinstance(config, KVClusterConfig) else load_config(config)


def connect(config: KVClusterConfig | str | None = None, address: str | None = None) -> KVClient:
    """A client of the kvcluster deployment on the Ray cluster at ``address``.

    ``config`` is a config object or a YAML path; it must match the deployment's (block size,
    hashing, model). Run ``kvcluster up`` (or :func:`kvcluster.deploy`) first.
    """
    cfg = _as_config(config)
    namespace = cfg.cluster.ray_namespace
    ensure_ray(address or cfg.cluster.ray_address, namespace)
    actors = find_nodes(namespace)
    if not actors:
        raise ClusterError(
            f"no kvcluster node actors in Ray namespace {namespace!r}; run 'kvcluster up' first"
        )
    registry_actor = find_registry_actor(namespace) if cfg.registry.backend == "memory" else None
    if cfg.registry.backend == "memory" and registry_actor is None:
        raise ClusterError(f"the embedded registry actor of namespace {namespace!r} is missing")
    registry = build_registry(cfg.registry, registry_actor)
    handles: dict[str, NodeHandle] = {nid: RayNodeHandle(nid, a) for nid, a in actors.items()}
    return KVClient(cfg, registry, handles)


def connect_local(
    config: KVClusterConfig | str | None = None,
    *,
    num_nodes: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> KVClient:
    """A client of an in-process cluster: ``num_nodes`` (default ``cluster.local_nodes``)
    node engines sharing one registry, no Ray. For tests, notebooks and single-host engines.
    ``client.close()`` shuts the nodes down."""
    cfg = _as_config(config)
    registry = build_registry(cfg.registry, clock=clock)
    count = num_nodes if num_nodes is not None else cfg.cluster.local_nodes
    data = cfg.model_dump(mode="json")
    nodes = [NodeActor(f"local-{i}", data, registry=registry) for i in range(count)]
    handles: dict[str, NodeHandle] = {n.identity().node_id: LocalNodeHandle(n) for n in nodes}

    def shutdown() -> None:
        for node in nodes:
            node.shutdown()
        registry.close()

    return KVClient(cfg, registry, handles, clock=clock, on_close=shutdown)
