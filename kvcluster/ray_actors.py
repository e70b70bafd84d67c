"""The only place that turns plain classes into Ray actors.

``NodeEngine`` and the in-memory registry are ordinary Python classes, unit-tested without
Ray. The functions here apply ``ray.remote`` with the options a deployment needs: one node
actor per Ray node (hard node affinity), named so clients find them, detached so that the
``kvcluster up`` process can exit, and ``max_concurrency`` > 1 so that lookups are never
serialised behind a migration or a large fetch (NodeEngine is thread-safe for that reason).
"""

from __future__ import annotations

import gc
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvcluster.node_actor import NodeActor
from routing.memory_registry import InMemoryRegistry

NODE_ACTOR_PREFIX = "kvnode:"

#: glibc malloc settings for the node actor's process. Ray runs actor calls on a pool of
#: threads, each with its own malloc arena, and glibc hands every large buffer (a fetch's
#: gathered K/V, a store's payload) back to the kernel when freed, so each call paid fresh
#: page faults on every megabyte it touched: a 16 MiB export took ~110 ms in the actor against
#: ~4 ms with these settings (measured here). One arena and high mmap/trim thresholds keep
#: freed buffers in the heap for the next call.
#: numpy advises the kernel to back every array of 4 MiB or more with transparent huge pages.
#: Where the kernel's THP defrag setting is ``madvise`` (the common default), the first touch
#: of such memory compacts physical memory synchronously: an export's freshly gathered
#: 16 MiB stalled 40-60 ms in about half the calls of a threaded actor, against ~2 ms without
#: the advice (measured here), and a page copy gains little from huge pages.
NODE_PROCESS_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "NUMPY_MADVISE_HUGEPAGE": "0",
}
REGISTRY_ACTOR_NAME = "kvregistry"


class RayNodeActor(NodeActor):
    """A node actor in a Ray worker process of its own, which it may tune as a whole.

    Once built, it collects garbage and freezes every object alive (``gc.freeze``): the
    ~200,000 objects of the imported modules (torch, numpy, Ray) and of the engine's
    start-up then sit outside the collector's generations. A full collection, triggered by
    the many small objects a store or an import allocates, otherwise walks all of them while
    holding the GIL: 220-370 ms stalls of every call in the node, against ~4 ms once frozen
    (measured here during the migration benchmark). Pauses are exported as
    ``kvcluster_gc_pause_seconds``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        gc.collect()
        gc.freeze()
        self._metrics.watch_gc()


def node_actor_name(node_id: str) -> str:
    return NODE_ACTOR_PREFIX + node_id


def create_node_actor(
    node_id: str,
    ray_node_id: str,
    *,
    namespace: str,
    max_concurrency: int,
    init_args: tuple[Any, ...],
) -> Any:
    """Create (or find, if it exists) the node actor pinned to ``ray_node_id``.

    Idempotent: ``get_if_exists`` returns the live actor of that name instead of a second one.
    """
    actor_cls = ray.remote(RayNodeActor)
    return actor_cls.options(  # type: ignore[attr-defined]
        name=node_actor_name(node_id),
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=max_concurrency,
        max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray_node_id, soft=False),
        runtime_env={"env_vars": NODE_PROCESS_ENV},
    ).remote(*init_args)


def create_registry_actor(*, namespace: str, init_args: tuple[Any, ...]) -> Any:
    """The embedded registry in a Ray actor, for a multi-node cluster with no Redis."""
    actor_cls = ray.remote(InMemoryRegistry)
    return actor_cls.options(  # type: ignore[attr-defined]
        name=REGISTRY_ACTOR_NAME,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=32,
    ).remote(*init_args)
