"""The body of a node actor: built inside the Ray worker from plain, serialisable arguments.

Ray needs the remote methods spelled out on the class, so each one forwards to the
instrumented :class:`NodeEngine`. All state lives in the engine; this class only wires the
registry client, the metrics exporter and the engine together.
A prompt and its namespace arrive as the last arguments, in the frame of
:mod:`kvcluster.token_wire`; the actor keeps the long prompts its clients ask it to keep
(:mod:`kvcluster.prompt_memory`), so they can be sent again as references.
"""

from __future__ import annotations

from typing import Any

import ray

from kvcluster.config import KVClusterConfig
from kvcluster.errors import InvalidKV
from kvcluster.kv_payload import KVPages, KVPayload
from kvcluster.metrics import InstrumentedNode, NodeMetrics
from kvcluster.node_engine import NodeEngine
from kvcluster.node_handles import get_result
from kvcluster.node_types import LookupReply, NodeIdentity, NodeStats, StoreReply
from kvcluster.prompt_memory import PromptMemory
from kvcluster.registry_factory import build_registry
from kvcluster.token_wire import prompt_from_wire
from routing.registry import NodeLoad, PrefixRegistry


class NodeActor:
    def __init__(
        self,
        node_id: str,
        config_data: dict[str, Any],
        registry_actor: Any | None = None,
        metrics_port: int | None = None,
        *,
        registry: PrefixRegistry | None = None,
    ) -> None:
        """``registry`` (in-process clusters only) shares one registry object among nodes;
        otherwise one is built from the config (Redis, or a proxy to ``registry_actor``)."""
        config = KVClusterConfig.model_validate(config_data)
        if registry is None:
            registry = build_registry(config.registry, registry_actor)
        self._engine = NodeEngine(node_id, config, registry)
        self._lease_ttl_s = config.cluster.lease_ttl_s
        self._prompts = PromptMemory(config.cluster.prompt_memory_tokens)
        self._metrics = NodeMetrics(node_id)
        self._node = InstrumentedNode(self._engine, self._metrics)
        if metrics_port is not None:
            self._metrics.serve(metrics_port)

    @property
    def node_id(self) -> str:
        return self._engine.node_id

    def identity(self) -> NodeIdentity:
        return self._engine.identity()

    def ping(self) -> str:
        return self._engine.ping()

    def ray_node_id(self) -> str:
        """The Ray node this actor runs on (placement checks)."""
        return str(ray.get_runtime_context().get_node_id())

    def load(self) -> NodeLoad:
        return self._engine.load()

    def lookup(self, *prompt_wire: bytes) -> tuple[Any, ...]:
        """A :class:`LookupReply` in its wire form (``LookupReply.from_wire`` reads it)."""
        namespace, tokens = prompt_from_wire(prompt_wire, self._prompts)
        return self._node.lookup(tokens, namespace).to_wire()

    def fetch(self, lease_id: str, namespace: str | None = None) -> KVPayload:
        return self._engine.fetch(lease_id, namespace)

    def store(self, payload: KVPayload | None, lease_id: str | None, generated_tokens: int | None,
              *prompt_wire: bytes) -> tuple[Any, ...]:
        """A :class:`StoreReply` in its wire form."""
        namespace, tokens = prompt_from_wire(prompt_wire, self._prompts)
        return self._node.store(tokens, payload, namespace, lease_id, generated_tokens).to_wire()

    def end_conversation(self, keep_tokens: int, *prompt_wire: bytes) -> int:
        """:meth:`NodeEngine.end_conversation` of the prompt in ``prompt_wire``."""
        namespace, tokens = prompt_from_wire(prompt_wire, self._prompts)
        return self._engine.end_conversation(tokens, namespace, keep_tokens)

    def release(self, lease_id: str | None) -> bool:
        """Release ``lease_id``; ``None`` (an export that found nothing) is a no-op."""
        return lease_id is not None and self._engine.release(lease_id)

    def release_reply(self, reply: Any) -> bool:
        """Release the lease of a lookup whose answer the client did not use (a speculative
        lookup on a node the router did not pick); Ray hands over the reply itself."""
        lease_id = LookupReply.from_wire(reply).lease_id
        return lease_id is not None and self._engine.release(lease_id)

    @ray.method(num_returns=2)  # type: ignore[untyped-decorator]
    def export_pinned(self, *prompt_wire: bytes) -> tuple[KVPages | None, str | None]:
        """The pages of the longest prefix held and the lease that pins them, as two objects:
        the caller hands the first to a peer's :meth:`import_prefix`, then releases the second.

        Ray stores the pages after this returns, while the lease still pins them, so they go
        into the object store in one copy straight from the pool (no gather first).
        """
        namespace, tokens = prompt_from_wire(prompt_wire, self._prompts)
        return self._node.export_pinned(tokens, namespace)

    def import_prefix(self, pages: list[Any], *prompt_wire: bytes) -> StoreReply:
        """Cache the pages of a peer's :meth:`export_pinned`: ``pages`` holds one item, the
        pages themselves or (through Ray) the reference to them, fetched here.

        Why a reference inside a list: Ray resolves an argument before it sends the task,
        so a direct argument would reach this node only after the export had finished and
        reported back to the caller, and only then would the transfer start. Sent at once
        with the reference, this call is already waiting when the export stores its pages,
        and the transfer starts then, as a plain ``ray.get`` of an object would.
        """
        namespace, tokens = prompt_from_wire(prompt_wire, self._prompts)
        if not isinstance(pages, list) or len(pages) != 1:
            raise InvalidKV(f"import_prefix takes a list of one pages object, got {type(pages).__name__}")
        payload = pages[0]
        if isinstance(payload, ray.ObjectRef):
            payload = self._receive(payload)
        return self._node.import_prefix(tokens, payload, namespace)

    def _receive(self, ref: ray.ObjectRef) -> Any:
        """The pages behind ``ref``, waited for through the raylet first, for at most a
        lease's life: the source pins them only that long."""
        return get_result(ref, self._lease_ttl_s, "the export of a pull", wait_local=True)

    def drain_spills(self) -> bool:
        """Wait for queued spills and the tier moves they set off (False: still moving)."""
        return self._engine.drain_spills(timeout_s=60)

    def sync_registry(self) -> bool:
        """Wait until the registry has every event queued so far (an import publishes in the
        background); False if it could not be reached."""
        return self._engine.sync_registry(timeout_s=60)

    def stats(self) -> NodeStats:
        return self._engine.stats()

    def metrics_text(self) -> str:
        return self._metrics.exposition()

    def metrics_port(self) -> int | None:
        return self._metrics.port

    def check_invariants(self) -> bool:
        self._engine.check_invariants()
        return True

    def shutdown(self) -> None:
        self._engine.shutdown()
        self._metrics.close()
