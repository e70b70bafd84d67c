"""The kvcluster client: route a prompt to the node with its longest cached prefix, fetch
that prefix's K/V, store new K/V.

    client = kvcluster.connect(config, address="auto")     # a Ray cluster
    client = kvcluster.connect_local(config)                 # in-process nodes, no Ray
    with client.lookup(tokens, namespace="tenant-a") as result:
        kv = client.fetch(result)                            # (L, C, matched, H, D)
        ...run the model on result.remaining_tokens...
        client.store(tokens, new_kv, namespace="tenant-a", result=result)

``route_and_lookup`` costs one registry round trip (the router's ``longest_prefix``) and one
call to the chosen node, which verifies the tokens, matches token-granularly and pins what it
matched under a lease until ``release`` (or the lease's expiry).

Thread-safety: a client may be shared by any number of threads; it holds no per-request
state. The ``a``-prefixed methods are the asyncio forms (``aroute_and_lookup``, ``alookup``,
``afetch``, ``astore``, ``arelease``): the same routing, failover and prompt references, with the
registry's blocking round trip in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from kvcluster.config import KVClusterConfig
from kvcluster.core.reuse_model import check_generated_tokens
from kvcluster.core.token_input import check_keep_tokens
from kvcluster.errors import (
    InvalidKV,
    InvalidTokens,
    KVClusterError,
    NodeUnavailable,
    UnknownPrompt,
)
from kvcluster.kv_payload import KVPayload
from kvcluster.migration import MigrationDecision, MigrationPlanner
from kvcluster.node_handles import NodeHandle
from kvcluster.node_types import LookupReply, StoreReply
from kvcluster.prompt_memory import PROMPT_ID_BYTES, SentPrompts
from kvcluster.token_wire import PromptWire, frame_to_wire, prompt_ids, prompt_to_wire, wire_dtype
from routing.block_hashing import BlockHashArray, BlockHasher
from routing.chain_cache import ChainCache
from routing.registry import PrefixRegistry
from routing.router import RouteDecision, Router

logger = logging.getLogger(__name__)

TokenArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class RouteResult:
    """Where a prompt went and what that node holds of it.

    ``matched_tokens`` leading tokens are cached on ``node_id`` (``blocks_per_tier`` says
    where) and pinned by ``lease_id`` until released; ``remaining_tokens`` are the ones an
    engine still has to compute. ``explanation`` is the router's short account of its choice.
    """

    node_id: str
    namespace: str
    tokens: TokenArray = field(repr=False)
    matched_tokens: int
    blocks_per_tier: dict[str, int]
    lease_id: str | None
    explanation: str
    migration: MigrationDecision | None = None

    @property
    def remaining_tokens(self) -> TokenArray:
        return self.tokens[self.matched_tokens :]

    @property
    def hit_ratio(self) -> float:
        return self.matched_tokens / self.tokens.size if self.tokens.size else 0.0


@dataclass(frozen=True, slots=True)
class ClientStats:
    speculative_hits: int
    speculative_misses: int


@dataclass(frozen=True, slots=True)
class StoreResult:
    node_id: str
    namespace: str
    cached_tokens: int
    new_tokens: int


def as_tokens(tokens: Any, vocab_size: int) -> TokenArray:
    """Validate prompt tokens once, on the client, before anything crosses a process."""
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise InvalidTokens(f"tokens must be a 1-D sequence of ints, got shape {array.shape}")
    if array.size == 0:
        raise InvalidTokens("tokens must not be empty")
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidTokens(f"tokens must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InvalidTokens(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return array


class KVClient:
    """A client of one kvcluster deployment (see the module docstring)."""

    def __init__(
        self,
        config: KVClusterConfig,
        registry: PrefixRegistry,
        nodes: Mapping[str, NodeHandle],
        *,
        clock: Callable[[], float] = time.monotonic,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._spec = config.model
        self._nodes = dict(nodes)
        self._registry = registry
        self._hasher = BlockHasher(
            algorithm=config.hashing.algorithm,
            block_size=config.cache.block_size,
            salt=config.hashing.salt.encode(),
            model_fingerprint=config.model.fingerprint(),
        )
        self._router = Router(registry, config.router, self._hasher, clock=clock)
        self._planner = MigrationPlanner(config.model, config.migration)
        self._on_close = on_close
        self._wire_dtype = wire_dtype(config.model.vocab_size)
        # Prefix family (first block key) -> the node its last lookup went to, LRU-bounded.
        self._affinity: OrderedDict[bytes, str] = OrderedDict()
        self._affinity_lock = threading.Lock()
        self._speculative_hits = 0
        self._speculative_misses = 0
        cache_tokens = config.cluster.chain_cache_tokens
        self._chains = ChainCache(self._hasher, cache_tokens) if cache_tokens else None
        kept_tokens = config.cluster.prompt_memory_tokens
        self._sent = SentPrompts(kept_tokens * self._wire_dtype.itemsize, clock) if kept_tokens else None
        self._delta_min_bytes = config.cluster.prompt_delta_min_tokens * self._wire_dtype.itemsize

    @property
    def nodes(self) -> list[str]:
        return sorted(self._nodes)

    @property
    def router(self) -> Router:
        return self._router

    # --- the core call -----------------------------------------------------------------------

    def route_and_lookup(self, tokens: Any, namespace: str = "default") -> RouteResult:
        """Route ``tokens`` to the best node, look the prefix up there and lease it.

        With ``cluster.speculative_lookup``, the lookup is sent to the node this prompt's
        prefix family (its first block) went to last *before* the registry answers, so the
        two round trips overlap; the answer is used only if the router picks that node (and
        no migration targets it), otherwise its lease is released by the node at once and
        the chosen node is asked.
        """
        token_ids = as_tokens(tokens, self._spec.vocab_size)
        ids = prompt_ids(token_ids, self._wire_dtype)
        bs = self._config.cache.block_size
        # The family is the first block's key: enough to start the speculative lookup, and
        # the rest of the chain is hashed while it is in flight.
        family = None
        if self._config.cluster.speculative_lookup and token_ids.size >= bs:
            family = self._hasher.hash_chain(token_ids[:bs], namespace)[0].tobytes()
        speculation = self._speculate(family, namespace, ids)
        hashes = self._hash_chain(token_ids, namespace)
        excluded: set[str] = set()
        while True:
            try:
                decision, migration = self._decide(token_ids, namespace, hashes, excluded)
            except BaseException:
                if speculation is not None:  # its lease is not left to expire
                    self._discard_speculation(speculation[0], speculation[1])
                raise
            handle = self._nodes[decision.node_id]
            try:
                reply: LookupReply | None = None
                if speculation is not None:
                    guessed, pending, base = speculation
                    speculation = None
                    if guessed == decision.node_id and (migration is None or migration.action != "pull"):
                        reply = LookupReply.from_wire(
                            self._call_with_prompt(handle, "lookup", (), namespace, ids, (pending, base))
                        )
                        self._count_speculation(hit=True)
                    else:
                        self._discard_speculation(guessed, pending)
                if reply is None:
                    reply = LookupReply.from_wire(self._call_with_prompt(handle, "lookup", (), namespace, ids))
            except NodeUnavailable:
                excluded.add(decision.node_id)
                logger.warning("node %s unavailable; routing elsewhere", decision.node_id)
                if len(excluded) == len(self._nodes):
                    raise
                continue
            self._remember(family, reply.node_id)
            return RouteResult(
                node_id=reply.node_id,
                namespace=namespace,
                tokens=token_ids,
                matched_tokens=reply.matched_tokens,
                blocks_per_tier=reply.blocks_per_tier,
                lease_id=reply.lease_id,
                explanation=decision.reason,
                migration=migration,
            )

    def _decide(self, token_ids: TokenArray, namespace: str, hashes: BlockHashArray | None,
                excluded: set[str], *, migrate: bool = True) -> tuple[RouteDecision, MigrationDecision | None]:
        """The router's choice among the nodes not ``excluded``, and the migration planned
        (and, for a pull, done) when it left the best holder for load."""
        decision = self._router.route(token_ids, namespace, candidates=self._candidates(excluded), hashes=hashes)
        return decision, self._maybe_migrate(token_ids, namespace, decision) if migrate else None

    def _hash_chain(self, tokens: TokenArray, namespace: str) -> BlockHashArray:
        if self._chains is None:
            return self._hasher.hash_chain(tokens, namespace)
        return self._chains.hash_chain(tokens, namespace)

    def _speculate(self, family: bytes | None, namespace: str, ids: bytes) -> tuple[str, Any, bytes | None] | None:
        """Start the lookup on the family's last node, if it is known and calls there run
        concurrently with this thread (a Ray actor; in-process nodes would run it inline).
        Returns the node, the pending reply and the kept prompt its frame refers to."""
        if family is None:
            return None
        with self._affinity_lock:
            node = self._affinity.get(family)
        handle = self._nodes.get(node) if node is not None else None
        if node is None or handle is None:
            return None
        started = self._start_with_prompt(handle, "lookup", (), namespace, ids)
        return None if started is None else (node, *started)

    def _node_wire(self, node: str, namespace: str, ids: bytes, *, full: bool = False) -> tuple[PromptWire, bytes | None]:
        """The frame of a prompt (id bytes ``ids``) for ``node``, and the kept prompt it refers
        to (None: sent in full). A long prompt is kept by the node under a fresh random id and
        recorded here; unless ``full``, it is sent as a reference to the longest prompt the node
        keeps that it starts with, plus the ids after that (a prompt the node keeps whole is
        just the reference, and is not kept twice)."""
        sent = self._sent
        if sent is None or len(ids) < self._delta_min_bytes or sent.paused(node):
            return frame_to_wire(namespace, self._wire_dtype, ids), None
        base = None if full else sent.base_for(node, namespace, ids)
        if base is None:
            base_id, reference = None, None
        else:
            base_id, reference = base[0], (base[0], base[1] // self._wire_dtype.itemsize)
            if base[1] == len(ids):  # the very prompt the node keeps
                return frame_to_wire(namespace, self._wire_dtype, ids, base=reference), base_id
        prompt_id = os.urandom(PROMPT_ID_BYTES)
        wire = frame_to_wire(namespace, self._wire_dtype, ids, remember_as=prompt_id, base=reference)
        sent.record(node, namespace, prompt_id, ids)
        return wire, base_id

    def _start_with_prompt(self, handle: NodeHandle, method: str, args: tuple[Any, ...], namespace: str,
                           ids: bytes) -> tuple[Any, bytes | None] | None:
        """Start ``handle.method(*args, *prompt frame)`` without waiting, for
        :meth:`_call_with_prompt` to finish; None where calls do not run concurrently (an
        in-process node) or the start failed (the call is then made, and fails, there)."""
        if not handle.concurrent:
            return None
        wire, base = self._node_wire(handle.node_id, namespace, ids)
        try:
            return handle.submit(method, *args, *wire), base
        except NodeUnavailable:
            return None

    def _call_with_prompt(self, handle: NodeHandle, method: str, args: tuple[Any, ...], namespace: str,
                          ids: bytes, submitted: tuple[Any, bytes | None] | None = None) -> Any:
        """``handle.method(*args, *prompt frame)``, or the result of the call already
        ``submitted`` (its pending reply and the kept prompt its frame refers to). A node that
        no longer keeps the referred prompt answers UnknownPrompt before doing anything; the
        prompt then goes again in full."""
        base = None
        try:
            if submitted is None:  # (an in-process node runs the call within submit)
                wire, base = self._node_wire(handle.node_id, namespace, ids)
                pending = handle.submit(method, *args, *wire)
            else:
                pending, base = submitted
            reply = handle.resolve(pending)
        except UnknownPrompt:
            if base is None:  # not about a reference of ours
                raise
            return handle.call(method, *args, *self._full_wire_after_unknown(handle.node_id, namespace, ids, base))
        if base is not None and self._sent is not None:
            self._sent.accepted(handle.node_id)
        return reply

    async def _acall_with_prompt(self, handle: NodeHandle, method: str, args: tuple[Any, ...],
                                 namespace: str, ids: bytes) -> Any:
        """The asyncio form of :meth:`_call_with_prompt` (never a submitted call)."""
        wire, base = self._node_wire(handle.node_id, namespace, ids)
        try:
            reply = await handle.acall(method, *args, *wire)
        except UnknownPrompt:
            if base is None:
                raise
            return await handle.acall(method, *args, *self._full_wire_after_unknown(handle.node_id, namespace, ids, base))
        if base is not None and self._sent is not None:
            self._sent.accepted(handle.node_id)
        return reply

    def _full_wire_after_unknown(self, node: str, namespace: str, ids: bytes, base: bytes) -> PromptWire:
        """After ``node`` answered UnknownPrompt to a frame referring to ``base``: forget that
        it keeps ``base``; return the prompt's full frame."""
        if self._sent is not None:
            self._sent.forget(node, namespace, base, ids)
        return self._node_wire(node, namespace, ids, full=True)[0]

    def _discard_speculation(self, node: str, pending: Any) -> None:
        """Have ``node`` release the lease of a lookup that lost to the router's choice; the
        node takes the reply itself (an object reference), so nothing waits for it here."""
        self._count_speculation(hit=False)
        with contextlib.suppress(NodeUnavailable):
            self._nodes[node].submit("release_reply", pending)

    def _count_speculation(self, *, hit: bool) -> None:
        with self._affinity_lock:
            if hit:
                self._speculative_hits += 1
            else:
                self._speculative_misses += 1

    def _remember(self, family: bytes | None, node: str) -> None:
        if family is None:
            return
        with self._affinity_lock:
            self._affinity[family] = node
            self._affinity.move_to_end(family)
            if len(self._affinity) > self._config.cluster.affinity_entries:
                self._affinity.popitem(last=False)

    def stats(self) -> ClientStats:
        """This client's speculative lookups: used (the router chose the guessed node) and
        discarded."""
        with self._affinity_lock:
            return ClientStats(self._speculative_hits, self._speculative_misses)

    def _wire(self, namespace: str, tokens: TokenArray) -> PromptWire:
        return prompt_to_wire(namespace, tokens, self._wire_dtype)

    def _candidates(self, excluded: set[str]) -> list[str]:
        return [node for node in self._nodes if node not in excluded]

    def _maybe_migrate(
        self, tokens: TokenArray, namespace: str, decision: RouteDecision
    ) -> MigrationDecision | None:
        """When the router left the best holder for load, pull its prefix if that is cheapest."""
        holder = decision.best_holder
        if holder is None or holder == decision.node_id or holder not in self._nodes:
            return None
        held_tokens = decision.holder_blocks * self._config.cache.block_size
        plan = self._planner.decide(
            holder=holder,
            target=decision.node_id,
            prefix_tokens=held_tokens,
            holder_in_flight=decision.holder_in_flight,
        )
        if plan.action == "pull":
            try:
                self.migrate_prefix(tokens[:held_tokens], namespace, source=holder, target=decision.node_id)
            except KVClusterError as exc:  # a pull only saves the target a prefill: degrade to that
                logger.warning("pull %s -> %s failed (%s); the prefix is recomputed", holder, decision.node_id, exc)
                plan = dataclasses.replace(plan, action="recompute", reason=f"{plan.reason}; the pull failed: {exc}")
        return plan

    def migrate_prefix(self, tokens: Any, namespace: str, *, source: str, target: str) -> StoreResult:
        """Copy the K/V ``source`` holds for ``tokens`` onto ``target`` and register it there.

        The pages travel through Ray's object store straight from source to target (the
        client passes a reference, never the bytes); the source's lookups are not blocked.
        The source pins them with a lease until the target has them; the release is sent
        without waiting for its answer. The target publishes the blocks to the registry on
        its publisher's thread, so routing finds them there a round trip after this returns
        (a caller that needs it sooner sends its request to ``target`` directly).
        """
        token_ids = as_tokens(tokens, self._spec.vocab_size)
        start = time.perf_counter()
        src, dst = self.node_handle(source), self.node_handle(target)
        wire = self._wire(namespace, token_ids)
        pages, lease = src.submit("export_pinned", *wire)
        try:
            # In a list, so that the target fetches the pages itself (NodeActor.import_prefix).
            reply: StoreReply = dst.call("import_prefix", [pages], *wire)
        finally:
            with contextlib.suppress(NodeUnavailable):  # a dead source holds no lease
                src.submit("release", lease)
        elapsed = time.perf_counter() - start
        self._planner.record_transfer(reply.new_tokens * self._spec.bytes_per_token, elapsed)
        return StoreResult(reply.node_id, namespace, reply.cached_tokens, reply.new_tokens)

    # --- data -------------------------------------------------------------------------------

    def fetch(self, result: RouteResult) -> torch.Tensor:
        """K/V of ``result``'s matched prefix: ``(layers, kv_components, matched, heads, dim)``."""
        if not result.matched_tokens or result.lease_id is None:
            layers, comps, _, heads, dim = self._spec.page_shape(0)
            return torch.empty((layers, comps, 0, heads, dim), dtype=self._spec.torch_dtype)
        payload: KVPayload = self._nodes[result.node_id].call(
            "fetch", result.lease_id, result.namespace
        )
        return payload.to_tensor()

    def store(
        self,
        tokens: Any,
        kv: torch.Tensor,
        namespace: str = "default",
        *,
        result: RouteResult | None = None,
        node: str | None = None,
        generated_tokens: int | None = None,
    ) -> StoreResult:
        """Cache ``kv`` for ``tokens``.

        With ``result`` (from :meth:`route_and_lookup` on the same tokens' prefix), ``kv``
        covers ``tokens[result.matched_tokens:]`` and the node reuses the prefix its lease
        pins; otherwise ``kv`` covers all of ``tokens`` and goes to ``node`` or the routed one.
        ``generated_tokens``: how many tokens the request generated, if known; a node whose
        eviction policy is ``reuse`` learns from it which requests come back.
        """
        return self._send_store(self._store_request(tokens, kv, namespace, result, node, generated_tokens), namespace)

    def _send_store(self, request: tuple[NodeHandle, tuple[Any, ...], bytes], namespace: str) -> StoreResult:
        """Send a store checked by :meth:`_store_request`."""
        handle, args, ids = request
        reply = StoreReply.from_wire(self._call_with_prompt(handle, "store", args, namespace, ids))
        return StoreResult(reply.node_id, namespace, reply.cached_tokens, reply.new_tokens)

    def _store_request(
        self, tokens: Any, kv: torch.Tensor, namespace: str, result: RouteResult | None, node: str | None,
        generated_tokens: int | None,
    ) -> tuple[NodeHandle, tuple[Any, ...], bytes]:
        """Check a store's arguments; return the node's handle, the call's leading arguments
        and the prompt's id bytes."""
        generated_tokens = check_generated_tokens(generated_tokens)
        token_ids = as_tokens(tokens, self._spec.vocab_size)
        start = 0
        lease_id = None
        if result is not None:
            if result.namespace != namespace:
                raise InvalidKV(
                    f"the route result is for namespace {result.namespace!r}, not {namespace!r}"
                )
            if token_ids.size < result.matched_tokens or not np.array_equal(
                token_ids[: result.matched_tokens], result.tokens[: result.matched_tokens]
            ):
                raise InvalidTokens("tokens do not start with the route result's matched prefix")
            node, start, lease_id = result.node_id, result.matched_tokens, result.lease_id
        self._check_kv(kv, token_ids.size - start)
        if node is None:
            node = self._router.route(token_ids, namespace, candidates=self._candidates(set())).node_id
        payload = KVPayload.from_tensor(kv)
        return self.node_handle(node), (payload, lease_id, generated_tokens), prompt_ids(token_ids, self._wire_dtype)

    def _check_kv(self, kv: torch.Tensor, num_tokens: int) -> None:
        layers, comps, _, heads, dim = self._spec.page_shape(1)
        expected = (layers, comps, num_tokens, heads, dim)
        if not isinstance(kv, torch.Tensor) or tuple(kv.shape) != expected:
            shape = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
            raise InvalidKV(f"kv has shape {shape}; the model spec needs {expected}")
        if kv.dtype != self._spec.torch_dtype:
            raise InvalidKV(f"kv has dtype {kv.dtype}; the model spec stores {self._spec.torch_dtype}")

    def release(self, result: RouteResult) -> bool:
        """Release ``result``'s lease; False when it was already released or expired."""
        if result.lease_id is None:
            return False
        released: bool = self._nodes[result.node_id].call("release", result.lease_id)
        return released

    def end_conversation(self, tokens: Any, namespace: str = "default", *, node: str | None = None,
                         keep_tokens: int = 0) -> int:
        """Tell ``node`` (default: every node, since migrations may have copied it) that the
        conversation whose history is ``tokens`` is over: what only it cached there, past its
        first ``keep_tokens`` tokens, goes first when room is needed. A hint: nothing is freed
        and a later prompt that matches it promotes it again. Returns the tokens demoted.

        With ``node`` given, :class:`NodeUnavailable` if it does not answer; told to every
        node, one that does not answer is skipped (its copy just ages out as usual)."""
        ids, keep_tokens, targets = self._end_request(tokens, node, keep_tokens)
        started = [(self._nodes[n], self._start_with_prompt(self._nodes[n], "end_conversation", (keep_tokens,),
                                                              namespace, ids))
                   for n in targets]  # all started, then awaited
        demoted = 0
        for handle, submitted in started:
            try:
                demoted += self._call_with_prompt(handle, "end_conversation", (keep_tokens,), namespace, ids,
                                                  submitted)
            except NodeUnavailable:
                if node is not None:
                    raise
                logger.info("node %s did not take the end of a conversation; skipped", handle.node_id)
        return demoted

    def _end_request(self, tokens: Any, node: str | None, keep_tokens: object) -> tuple[bytes, int, list[str]]:
        """Check an end of conversation's arguments; return the prompt's id bytes, the
        tokens to keep and the nodes to tell (:class:`NodeUnavailable` for an unknown node)."""
        token_ids = as_tokens(tokens, self._spec.vocab_size)
        keep = check_keep_tokens(keep_tokens)
        if node is not None:
            self.node_handle(node)
        return prompt_ids(token_ids, self._wire_dtype), keep, [node] if node is not None else self.nodes

    @contextlib.contextmanager
    def lookup(self, tokens: Any, namespace: str = "default") -> Iterator[RouteResult]:
        """``route_and_lookup`` whose lease is released when the block exits, whatever happens."""
        result = self.route_and_lookup(tokens, namespace)
        try:
            yield result
        finally:
            with contextlib.suppress(NodeUnavailable):
                self.release(result)

    def session(self, conversation_id: str, namespace: str = "default") -> ChatSession:
        return ChatSession(self, conversation_id, namespace)

    # --- asyncio forms ----------------------------------------------------------------------

    async def aroute_and_lookup(self, tokens: Any, namespace: str = "default") -> RouteResult:
        """The asyncio form of :meth:`route_and_lookup`: the same routing, migration, re-routing
        around unavailable nodes and prompt references. The router's registry round trip (and
        a pull, when the router plans one) run in a worker thread, so the event loop is never
        blocked; lookups are not speculative (the registry answer comes first)."""
        token_ids = as_tokens(tokens, self._spec.vocab_size)
        ids = prompt_ids(token_ids, self._wire_dtype)
        hashes = self._hash_chain(token_ids, namespace)
        excluded: set[str] = set()
        while True:
            decision, migration = await asyncio.to_thread(self._decide, token_ids, namespace, hashes, excluded)
            handle = self._nodes[decision.node_id]
            call = asyncio.ensure_future(self._acall_with_prompt(handle, "lookup", (), namespace, ids))
            try:
                reply = LookupReply.from_wire(await asyncio.shield(call))
            except asyncio.CancelledError:
                # The lookup goes on at the node; the lease it grants is released when it answers.
                call.add_done_callback(functools.partial(self._release_unwanted, handle))
                raise
            except NodeUnavailable:
                excluded.add(decision.node_id)
                logger.warning("node %s unavailable; routing elsewhere", decision.node_id)
                if len(excluded) == len(self._nodes):
                    raise
                continue
            return RouteResult(reply.node_id, namespace, token_ids, reply.matched_tokens,
                               reply.blocks_per_tier, reply.lease_id, decision.reason, migration)

    @staticmethod
    def _release_unwanted(handle: NodeHandle, call: asyncio.Future[Any]) -> None:
        """Release the lease of a lookup whose caller was cancelled while it was in flight."""
        if call.cancelled() or call.exception() is not None:
            return
        lease_id = LookupReply.from_wire(call.result()).lease_id
        if lease_id is not None:
            with contextlib.suppress(NodeUnavailable):
                handle.submit("release", lease_id)

    async def afetch(self, result: RouteResult) -> torch.Tensor:
        if not result.matched_tokens or result.lease_id is None:
            return self.fetch(result)
        payload: KVPayload = await self._nodes[result.node_id].acall(
            "fetch", result.lease_id, result.namespace
        )
        return payload.to_tensor()

    async def astore(
        self,
        tokens: Any,
        kv: torch.Tensor,
        namespace: str = "default",
        *,
        result: RouteResult | None = None,
        node: str | None = None,
        generated_tokens: int | None = None,
    ) -> StoreResult:
        """The asyncio form of :meth:`store`."""
        if result is None and node is None:  # routing asks the registry: off the event loop
            token_ids = as_tokens(tokens, self._spec.vocab_size)
            check_generated_tokens(generated_tokens)
            self._check_kv(kv, token_ids.size)  # bad input is refused before routing counts it
            node = (await asyncio.to_thread(self._decide, token_ids, namespace, None, set(), migrate=False))[0].node_id
        handle, args, ids = self._store_request(tokens, kv, namespace, result, node, generated_tokens)
        reply = StoreReply.from_wire(await self._acall_with_prompt(handle, "store", args, namespace, ids))
        return StoreResult(reply.node_id, namespace, reply.cached_tokens, reply.new_tokens)

    async def arelease(self, result: RouteResult) -> bool:
        if result.lease_id is None:
            return False
        released: bool = await self._nodes[result.node_id].acall("release", result.lease_id)
        return released

    async def aend_conversation(self, tokens: Any, namespace: str = "default", *, node: str | None = None,
                                keep_tokens: int = 0) -> int:
        """The asyncio form of :meth:`end_conversation` (every node told at once)."""
        ids, keep_tokens, targets = self._end_request(tokens, node, keep_tokens)
        replies = await asyncio.gather(
            *(self._acall_with_prompt(self._nodes[n], "end_conversation", (keep_tokens,), namespace, ids)
              for n in targets),
            return_exceptions=True,
        )
        demoted = 0
        for node_id, reply in zip(targets, replies, strict=True):
            if isinstance(reply, NodeUnavailable) and node is None:
                logger.info("node %s did not take the end of a conversation; skipped", node_id)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                demoted += reply
        return demoted

    @contextlib.asynccontextmanager
    async def alookup(self, tokens: Any, namespace: str = "default") -> AsyncIterator[RouteResult]:
        """The asyncio form of :meth:`lookup`: the lease is released when the block exits."""
        result = await self.aroute_and_lookup(tokens, namespace)
        try:
            yield result
        finally:
            with contextlib.suppress(NodeUnavailable):
                await self.arelease(result)

    # --- lifecycle --------------------------------------------------------------------------

    def node_handle(self, node_id: str) -> NodeHandle:
        """The handle of one node, for operational calls (``stats``, ``drain_spills``,
        ``metrics_text``); :class:`NodeUnavailable` for an unknown node."""
        handle = self._nodes.get(node_id)
        if handle is None:
            raise NodeUnavailable(f"no node {node_id!r} in this deployment; nodes: {self.nodes}")
        return handle

    def node_stats(self) -> dict[str, Any]:
        return {node_id: handle.call("stats") for node_id, handle in self._nodes.items()}

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChatSession:
    """A multi-turn conversation that sticks to the node holding its history.

    Each turn sends the whole conversation so far plus the new user message; the node finds
    everything before the new message cached, so only the new tokens are computed. Ending it
    (:meth:`end`, or leaving a ``with`` block) tells that node the history will not be
    continued, so it makes room with it before anything that may still be used.
    """

    def __init__(self, client: KVClient, conversation_id: str, namespace: str) -> None:
        self._client = client
        self.conversation_id = conversation_id
        self.namespace = namespace
        self.history: TokenArray = np.empty(0, dtype=np.int64)
        self.node_id: str | None = None
        #: Tokens the first turn found cached (a shared system prompt): not the conversation's own.
        self.shared_tokens = 0
        self._ended = False

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()

    def prompt(self, user_tokens: Any) -> RouteResult:
        """Route the history plus ``user_tokens``; the caller computes the remaining tokens."""
        prompt = np.concatenate([self.history, self._turn_tokens(user_tokens)])
        result = self._client.route_and_lookup(prompt, self.namespace)
        if self.node_id is None:  # the first turn
            self.shared_tokens = result.matched_tokens
        self.node_id = result.node_id
        self._ended = False
        return result

    def complete(self, result: RouteResult, response_tokens: Any, kv: torch.Tensor) -> StoreResult:
        """Store the turn: ``kv`` covers the prompt's remaining tokens and the response (whose
        length is the turn's generated length, for a node that learns from it). Bad input is
        refused before anything changes, the lease included, so the turn can be completed again."""
        client = self._client
        response = self._turn_tokens(response_tokens)
        full = np.concatenate([result.tokens, response])
        request = client._store_request(full, kv, self.namespace, result, None, int(response.size))
        try:
            stored = client._send_store(request, self.namespace)
        finally:
            client.release(result)
        self.history = full
        return stored

    def _turn_tokens(self, tokens: Any) -> TokenArray:
        """A turn's tokens, checked as a prompt's are (a turn may be empty)."""
        array = np.asarray(tokens)
        if array.ndim == 1 and array.size == 0:
            return np.empty(0, dtype=np.int64)
        return as_tokens(array, self._client._spec.vocab_size)

    def end(self) -> int:
        """The conversation is over: its node demotes what only it cached past
        :attr:`shared_tokens` (see :meth:`KVClient.end_conversation`). Returns the tokens
        demoted; 0 when nothing was stored, when already ended, or when the node does not
        answer (a hint: its blocks then age out as usual). A later :meth:`prompt` continues
        the conversation anyway."""
        if self._ended or not self.history.size or self.node_id is None:
            return 0
        self._ended = True
        try:
            return self._client.end_conversation(self.history, self.namespace, node=self.node_id,
                                                 keep_tokens=self.shared_tokens)
        except NodeUnavailable:
            logger.info("conversation %s: node %s did not take its end", self.conversation_id, self.node_id)
            return 0
