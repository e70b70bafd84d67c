"""In-process clusters for client tests: node actors (as plain objects) sharing one in-memory
registry, behind handles the test chooses, so every call the client makes is visible."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from kvcluster.client import KVClient
from kvcluster.config import KVClusterConfig
from kvcluster.errors import NodeUnavailable
from kvcluster.node_actor import NodeActor
from kvcluster.node_handles import LocalNodeHandle, NodeHandle
from kvcluster.registry_factory import build_registry

HandleT = TypeVar("HandleT", bound=NodeHandle)


class SwitchableHandle(LocalNodeHandle):
    """An in-process node that can be switched off: its calls raise NodeUnavailable while
    ``down`` is set."""

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.down = False

    def call(self, method: str, *args: Any) -> Any:
        if self.down:
            raise NodeUnavailable(f"node {self.node_id} is down")
        return super().call(method, *args)

    async def acall(self, method: str, *args: Any) -> Any:
        if self.down:
            raise NodeUnavailable(f"node {self.node_id} is down")
        return await super().acall(method, *args)


@contextmanager
def in_process_client(
    handle_for: Callable[[NodeActor], HandleT],
    *,
    nodes: int = 3,
    cache: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
) -> Iterator[tuple[KVClient, dict[str, HandleT], list[NodeActor]]]:
    """A client of ``nodes`` in-process nodes ``n0``, ``n1``, ... (shut down afterwards), the
    handle ``handle_for`` made for each, and the nodes themselves."""
    config = KVClusterConfig.from_dict({
        "cache": cache or {"num_blocks": 256},
        "tiers": {"cpu": {"capacity": "1MiB"}},
        "registry": {"index_stride_blocks": 1},
        "cluster": cluster or {},
    })
    registry = build_registry(config.registry)
    data = config.model_dump(mode="json")
    actors = [NodeActor(f"n{i}", data, registry=registry) for i in range(nodes)]
    handles = {actor.node_id: handle_for(actor) for actor in actors}

    def shutdown() -> None:
        for actor in actors:
            actor.shutdown()

    client = KVClient(config, registry, dict[str, NodeHandle](handles), on_close=shutdown)
    try:
        yield client, handles, actors
    finally:
        client.close()
