"""Deploy kvcluster onto a Ray cluster: one node actor per Ray node, plus the registry.

``deploy(config, address=...)`` (and ``kvcluster up``) is idempotent: it creates the actor of
every alive Ray node that has none yet (a node that joined since the last call gets one) and
leaves the others alone, then checks that every actor agrees with ``config`` on what makes
block hashes and pages comparable (config drift is refused, naming both values).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray

from kvcluster.config import KVClusterConfig
from kvcluster.errors import ClusterError, ConfigDrift
from kvcluster.node_types import NodeIdentity, identity_for
from kvcluster.ray_actors import (
    NODE_ACTOR_PREFIX,
    REGISTRY_ACTOR_NAME,
    create_node_actor,
    create_registry_actor,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Deployment:
    """The node actors of a deployment, by kvcluster node id."""

    namespace: str
    nodes: dict[str, Any]
    identities: dict[str, NodeIdentity]
    registry_actor: Any | None


def ensure_ray(address: str | None, namespace: str) -> None:
    """Connect this process to Ray (a local instance when ``address`` is None)."""
    if ray.is_initialized():
        return
    ray.init(address=address, namespace=namespace, log_to_driver=False, include_dashboard=False)


def kv_node_id(ray_node_id: str) -> str:
    """The kvcluster node id of a Ray node: stable for the node's lifetime, short to read."""
    return "node-" + ray_node_id[:12]


def alive_ray_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def wait_for_nodes(count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(alive_ray_nodes()) < count:
        if time.monotonic() > deadline:
            raise ClusterError(
                f"only {len(alive_ray_nodes())} Ray node(s) alive after {timeout_s:.0f} s; "
                f"waited for {count}"
            )
        time.sleep(0.5)


def deploy(
    config: KVClusterConfig,
    address: str | None = None,
    *,
    wait_nodes: int = 0,
    timeout_s: float = 120.0,
) -> Deployment:
    """Create the missing node actors (and the embedded registry); refuse config drift."""
    namespace = config.cluster.ray_namespace
    ensure_ray(address or config.cluster.ray_address, namespace)
    if wait_nodes:
        wait_for_nodes(wait_nodes, timeout_s)
    registry_actor = None
    if config.registry.backend == "memory":
        registry_actor = create_registry_actor(
            namespace=namespace, init_args=(config.registry.model_dump(),)
        )
    config_data = config.model_dump(mode="json")
    existing = find_nodes(namespace)
    actors: dict[str, Any] = {}
    alive = sorted(alive_ray_nodes(), key=lambda n: n["NodeID"])
    base_port = config.cluster.metrics_port
    # Simulated nodes share one host, so each exporter takes its own port: base + index, and
    # a node that joined since the last run the first of those no running actor has.
    running = [existing[kv_node_id(n["NodeID"])] for n in alive if kv_node_id(n["NodeID"]) in existing]
    taken = set(_answers([a.metrics_port.remote() for a in running], timeout_s)) if base_port is not None else set()
    free_ports = (port for port in itertools.count(base_port or 0) if port not in taken)
    for node in alive:
        node_id = kv_node_id(node["NodeID"])
        port = None if base_port is None or node_id in existing else next(free_ports)
        actors[node_id] = create_node_actor(
            node_id,
            node["NodeID"],
            namespace=namespace,
            max_concurrency=config.cluster.actor_max_concurrency,
            init_args=(node_id, config_data, registry_actor, port),
        )
    identities = dict(zip(actors, _answers([a.identity.remote() for a in actors.values()], timeout_s), strict=True))
    want = identity_for(config, "<config>", 0)
    drift = [line for ident in identities.values() for line in ident.drift_from(want)]
    if drift:
        # The actors made by this call run the refused config: left alive, they would split
        # the cluster and refuse the right config on the next run.
        for node_id, actor in actors.items():
            if node_id not in existing:
                ray.kill(actor)
        raise ConfigDrift("node configuration differs from the cluster's", drift)
    logger.info("deployed %d node actor(s) in namespace %s", len(actors), namespace)
    return Deployment(namespace, actors, identities, registry_actor)


def _answers(refs: list[Any], timeout_s: float) -> list[Any]:
    """The node actors' answers; :class:`ClusterError` when one cannot start (its
    constructor failed) or does not answer within ``timeout_s`` (it cannot be scheduled:
    its node lacks the CPUs or memory it asks for), instead of a raw Ray error or a hang."""
    try:
        return list(ray.get(refs, timeout=timeout_s))
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(
            f"node actors did not answer within {timeout_s:.0f} s; does each Ray node have room "
            "for one (free CPUs and memory)?"
        ) from None
    except ray.exceptions.RayError as exc:
        raise ClusterError(f"a node actor failed to start: {exc}") from None


def find_nodes(namespace: str) -> dict[str, Any]:
    """The live node actors of ``namespace`` by node id (Ray must be initialised)."""
    nodes = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name, actor_ns = entry["name"], entry["namespace"]
        if actor_ns == namespace and name.startswith(NODE_ACTOR_PREFIX):
            try:
                nodes[name.removeprefix(NODE_ACTOR_PREFIX)] = ray.get_actor(name, namespace=namespace)
            except ValueError:
                continue  # died between listing and lookup
    return nodes


def find_registry_actor(namespace: str) -> Any | None:
    try:
        return ray.get_actor(REGISTRY_ACTOR_NAME, namespace=namespace)
    except ValueError:
        return None


def undeploy(namespace: str) -> int:
    """Kill every node actor and the registry actor of ``namespace``; returns how many."""
    killed = 0
    for actor in find_nodes(namespace).values():
        # An actor that is already dead needs only the kill below.
        with contextlib.suppress(ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            ray.get(actor.shutdown.remote(), timeout=10)
        ray.kill(actor)
        killed += 1
    registry = find_registry_actor(namespace)
    if registry is not None:
        ray.kill(registry)
        killed += 1
    return killed
