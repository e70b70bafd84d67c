"""One node's KV cache: the paged engine, the prefix index, the spill tiers and the registry.

``NodeEngine`` is a plain class (unit-tested without Ray); ``kvcluster.ray_actors`` turns it
into the per-node actor. It composes:

- a :class:`PagedKVEngine` whose page buffer is the node's top (device) tier;
- a :class:`PrefixIndex` over that pool: token-granular longest-prefix match, eviction;
- a :class:`SpillStore` (host and NVMe tiers below the device tier): a block the index evicts
  is demoted there instead of being dropped, keyed by its block hash, and found again by
  continuing the prompt's hash chain past the device match;
- a :class:`RegistryPublisher` that publishes stored / removed / moved-tier events in batches,
  renews the heartbeat and re-announces everything after a registry restart.

Thread-safety: every public method may be called concurrently (the actor runs with
``max_concurrency`` > 1). ``_lock`` guards the engine, the index, the spill metadata and the
leases; it is held for bookkeeping and page copies only, never across registry I/O (events
are queued under the lock and published after it is released) or waits on tier moves.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from kvcluster.block_keys import TIERS_BY_NAME, BlockKey, BlockKeyTable, coalesced_events
from kvcluster.config import KVClusterConfig
from kvcluster.core.eviction import make_policy
from kvcluster.core.kv_engine import PagedKVEngine
from kvcluster.core.page_buffer import PageRows
from kvcluster.core.prefix_index import PrefixIndex
from kvcluster.core.prefix_records import EvictedBlock, Lease, PrefixMatch
from kvcluster.core.reuse_model import check_generated_tokens
from kvcluster.core.token_input import as_token_array, check_token_range
from kvcluster.errors import InvalidKV, InvalidTokens, PageCorrupt
from kvcluster.kv_payload import KVPages, KVPayload, dtype_name
from kvcluster.leases import LeaseTable
from kvcluster.node_types import LookupReply, NodeIdentity, NodeStats, StoreReply, identity_for
from kvcluster.registry_publisher import RegistryPublisher
from kvcluster.spill_store import SpilledBlock, SpillRequest, SpillStore, tier_key
from routing.block_hashing import BlockHasher
from routing.registry import BlockEvent, NodeLoad, PrefixRegistry, Tier

logger = logging.getLogger(__name__)

TokenArray = npt.NDArray[np.int64]

#: Past this many runs of consecutive blocks, an export gathers its device pages into one
#: array (a memcpy per page) rather than ship that many small buffers.
_MAX_EXPORT_SEGMENTS = 64


@dataclass(slots=True)
class _LeaseHold:
    """What one lease pins: the device blocks of the index match and the spilled pages.

    Device blocks hold tokens ``[0, device_tokens)``; spilled pages, when there are any, hold
    the whole blocks ``first_spilled, first_spilled + 1, ...`` up to ``matched_tokens``.
    """

    tokens: TokenArray
    device_match: PrefixMatch
    index_lease: Lease | None
    device_tokens: int
    first_spilled: int
    spill_keys: list[int]
    matched_tokens: int


@dataclass(slots=True)
class _PendingSpills:
    """Evicted blocks' pages, copied out of the pool, waiting to be written to the tiers:
    ``pages[i]`` (a row of one ``[n, page_bytes]`` uint8 tensor) belongs to ``keys[i]``."""

    keys: list[BlockKey]
    token_bytes: list[bytes]
    pages: torch.Tensor


def default_device() -> torch.device:
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


class NodeEngine:
    def __init__(
        self,
        node_id: str,
        config: KVClusterConfig,
        registry: PrefixRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
        device: torch.device | str | None = None,
        start_background: bool = True,
    ) -> None:
        self.node_id = node_id
        self._config = config
        self._clock = clock
        spec = config.model
        cache = config.cache
        self._block_size = cache.block_size
        self._device = torch.device(device) if device is not None else self._device_from(config)
        num_blocks = cache.num_blocks or max(
            1, config.tiers.gpu.capacity.resolve(_free_memory(self._device))
            // spec.bytes_per_block(cache.block_size)
        )
        self._engine = PagedKVEngine(
            spec,
            block_size=cache.block_size,
            num_blocks=int(num_blocks),
            max_context=cache.max_context,
            device=self._device,
        )
        eviction = cache.eviction
        self._index = PrefixIndex(
            self._engine.pool,
            cache.block_size,
            policy=make_policy(eviction.policy, ttl_s=eviction.ttl_s, clock=clock),
            clock=clock,
            bytes_per_block=spec.bytes_per_block(cache.block_size),
            pin_budget_fraction=eviction.pin_budget_fraction,
            min_prefix_tokens=eviction.min_prefix_tokens,
            memory_budget_bytes=eviction.memory_budget_bytes,
            on_evict=self._on_evict,
            vocab_size=spec.vocab_size,
        )
        self._engine.set_reclaimer(self._reclaim)
        self._engine.set_reclaimable(self._index.reclaimable_blocks)
        self._hasher = BlockHasher(
            algorithm=config.hashing.algorithm,
            block_size=cache.block_size,
            salt=config.hashing.salt.encode(),
            model_fingerprint=spec.fingerprint(),
        )
        # Spilled blocks the tiers lost on their own (a full NVMe tier discards its coldest
        # pages; a corrupt page is dropped when read), appended on the tier threads (a deque:
        # no lock there), unregistered by the next call's _finish or maintenance tick.
        self._dropped_spills: deque[SpilledBlock] = deque()
        self._spill: SpillStore | None = SpillStore.from_config(
            config.tiers, page_bytes=self._engine.pages.page_bytes, node_id=node_id,
            on_dropped=self._dropped_spills.append,
        )
        self._lock = threading.RLock()
        self._leases: LeaseTable[_LeaseHold] = LeaseTable(
            config.cluster.lease_ttl_s, self._release_hold, clock
        )
        # Full device blocks and the chain hash of the prefix they end, so an evicted block
        # can be demoted (or unregistered) under the key the registry knows it by.
        self._block_keys = BlockKeyTable(self._engine.pool.num_blocks)
        self._pending_spills: list[_PendingSpills] = []
        # (key, token bytes, block id) of evicted blocks whose pages are not copied out yet
        self._evicted_pages: list[tuple[BlockKey, bytes, int]] = []
        # chain hash -> evictions of it whose spill outcome the writer has not published yet
        self._spilling: dict[bytes, int] = {}
        # One thread, so spills are written in eviction order and drain_spills() is a barrier.
        self._spill_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"spill-{node_id}")
        self._counters = {"hits": 0, "misses": 0, "hit_tokens": 0, "lookup_tokens": 0,
                          "migrations_in": 0, "migrations_out": 0, "ended_conversations": 0,
                          "demoted_tokens": 0, "dropped_spills": 0}
        self._publisher = RegistryPublisher(
            node_id,
            registry,
            config.registry,
            load=self.load,
            announce_all=self._all_held_blocks,
            clock=clock,
        )
        # Registering re-announces what the spill tiers recovered (warm restart).
        self._publisher.register()
        if start_background:
            self._publisher.start(maintenance=self._maintain)

    # --- identity and load -------------------------------------------------------------------

    @staticmethod
    def _device_from(config: KVClusterConfig) -> torch.device:
        wanted = config.tiers.gpu.device
        return default_device() if wanted == "auto" else torch.device(wanted)

    def identity(self) -> NodeIdentity:
        return identity_for(self._config, self.node_id, self._publisher.epoch)

    def load(self) -> NodeLoad:
        """Live leases stand for requests in flight: each is a prompt being served."""
        pool = self._engine.pool
        return NodeLoad(len(self._leases), pool.num_free + self._index.reclaimable_blocks(), pool.num_blocks)

    def ping(self) -> str:
        return self.node_id

    # --- data path ---------------------------------------------------------------------------

    def _tokens(self, tokens: object, *, check_range: bool = True) -> TokenArray:
        array = as_token_array(tokens)
        if check_range:
            check_token_range(array, 0, self._config.model.vocab_size)
        if array.size > self._engine.max_context:
            raise InvalidTokens(
                f"a prompt of {array.size} tokens exceeds max_context {self._engine.max_context}"
            )
        return array

    def lookup(self, tokens: object, namespace: str = "default") -> LookupReply:
        """Longest cached prefix of ``tokens`` across the device and spill tiers, leased."""
        # The index range-checks whatever it does not match (a matched token equals a
        # stored one, checked when it was stored), so a long cached prompt is not scanned.
        token_ids = self._tokens(tokens, check_range=False)
        bs = self._block_size
        with self._lock:
            match = self._index.lookup(token_ids, namespace)
            first_spilled = match.matched_tokens // bs
            spill_keys: list[int] = []
            if self._spill is not None and len(self._spill) and token_ids.size // bs > first_spilled:
                hashes = self._hasher.hash_chain(token_ids, namespace).tolist()
                spill_keys = self._spill.continue_chain(hashes, token_ids, first_spilled, bs, namespace)
            if spill_keys:
                device_tokens = first_spilled * bs
                matched = (first_spilled + len(spill_keys)) * bs
            else:
                device_tokens = matched = match.matched_tokens
            self._counters["lookup_tokens"] += int(token_ids.size)
            if matched == 0:
                self._counters["misses"] += 1
                return LookupReply(self.node_id, namespace, 0, {}, None, 0.0)
            self._counters["hits"] += 1
            self._counters["hit_tokens"] += matched
            index_lease = self._index.acquire(match) if match.hit else None
            if spill_keys:
                assert self._spill is not None
                self._spill.pin(spill_keys)
            # The match keeps its own immutable copy of the prompt: no second copy here.
            hold = _LeaseHold(match.tokens[:matched], match, index_lease, device_tokens,
                              first_spilled, spill_keys, matched)
            lease = self._leases.grant(namespace, hold)
            tiers = {"gpu": -(-device_tokens // bs)}
            for key in spill_keys:
                assert self._spill is not None
                tier = self._spill.location(key) or "cpu"
                tiers[tier] = tiers.get(tier, 0) + 1
        if spill_keys:
            assert self._spill is not None
            self._spill.prefetch(spill_keys)  # start promoting NVMe pages toward the host tier
        return LookupReply(self.node_id, namespace, matched, tiers, lease.lease_id, self._leases.ttl_s)

    def _release_hold(self, hold: _LeaseHold) -> None:
        if hold.index_lease is not None:
            self._index.release(hold.index_lease)
        if hold.spill_keys and self._spill is not None:
            self._spill.unpin(hold.spill_keys)

    def release(self, lease_id: str) -> bool:
        with self._lock:
            return self._leases.release(lease_id)

    def fetch(self, lease_id: str, namespace: str | None = None) -> KVPayload:
        """K/V of a leased prefix, ``(layers, kv_components, tokens, heads, dim)``.

        Normally ``matched_tokens`` long; shorter only if a spilled page failed its checksum
        (it is dropped and counted, never returned), in which case the K/V ends before it.
        """
        with self._lock:
            hold = self._leases.get(lease_id, namespace).hold
            # read_tokens gathers into new memory (never a view of the pages), so the result
            # stays valid after the lock is released and the blocks are reused.
            device_kv = self._engine.pages.read_tokens(
                hold.device_match.block_ids, 0, hold.device_tokens
            )
        if not hold.spill_keys:
            return KVPayload.from_tensor(device_kv)
        parts = [device_kv, *self._read_spilled(hold.spill_keys)]
        return KVPayload.from_tensor(torch.cat(parts, dim=2))

    def _read_spilled(self, keys: list[int]) -> list[torch.Tensor]:
        """Spilled pages as ``(L, C, block_size, H, D)`` tensors, stopping at a corrupt one."""
        shape = self._engine.pages.page_shape
        dtype = self._engine.pages.dtype
        return [raw.view(dtype).reshape(shape).to(self._device) for raw in self._read_spilled_raw(keys)]

    def _read_spilled_raw(self, keys: list[int]) -> list[torch.Tensor]:
        """Spilled pages as raw uint8 tensors, in order, stopping at a corrupt one."""
        assert self._spill is not None
        pages = []
        for key in keys:
            try:
                pages.append(self._spill.read(key))
            except PageCorrupt:
                logger.warning("node %s: spilled page %d is corrupt; dropped", self.node_id, key)
                break
        return pages

    def store(
        self,
        tokens: object,
        payload: KVPayload | None,
        namespace: str = "default",
        lease_id: str | None = None,
        generated_tokens: int | None = None,
    ) -> StoreReply:
        """Cache ``tokens``; ``payload`` holds the K/V of the tokens after the leased prefix
        (all of them without a lease). Publishes the full blocks to the registry.
        ``generated_tokens``: what the request generated, if known (the ``reuse`` policy
        learns from it)."""
        generated_tokens = check_generated_tokens(generated_tokens)
        token_ids = self._tokens(tokens)
        kv = payload.to_tensor(self._device) if payload is not None else None
        bs = self._block_size
        with self._lock:
            shared_blocks: npt.NDArray[np.int64] = np.empty(0, dtype=np.int64)
            shared_tokens = 0
            if lease_id is not None:
                hold = self._leases.get(lease_id, namespace).hold
                start = hold.matched_tokens
                if token_ids.size < start or not np.array_equal(token_ids[:start], hold.tokens):
                    raise InvalidTokens("tokens do not start with the leased prefix")
                shared_tokens = hold.device_tokens
                shared_blocks = hold.device_match.block_ids[: -(-shared_tokens // bs)]
                if hold.spill_keys:
                    # Promote: the spilled blocks become device blocks of the new sequence.
                    spilled = self._read_spilled(hold.spill_keys)
                    if len(spilled) < len(hold.spill_keys):
                        raise PageCorrupt("a leased spilled page is corrupt; store the full K/V")
                    new = [*spilled, kv] if kv is not None else spilled
                    kv = torch.cat(new, dim=2)
            reply = self._cache_sequence(token_ids, namespace, kv=kv, shared_blocks=shared_blocks,
                                         shared_tokens=shared_tokens, generated_tokens=generated_tokens)
        self._finish()
        return reply

    def _cache_sequence(self, token_ids: TokenArray, namespace: str, *,
                        kv: torch.Tensor | None = None,
                        kv_pages: PageRows | None = None,
                        shared_blocks: npt.NDArray[np.int64] | None = None,
                        shared_tokens: int = 0, generated_tokens: int | None = None) -> StoreReply:
        """Under ``_lock``: write the K/V into fresh blocks, hand them to the prefix index,
        queue their stored events. The temporary sequence is always freed."""
        seq = self._engine.create_sequence(
            token_ids, kv, kv_pages=kv_pages, shared_tokens=shared_tokens,
            shared_blocks=shared_blocks if shared_blocks is not None else (),
        )
        try:
            block_table = self._engine.block_table(seq)
            inserted = self._index.insert(token_ids, block_table, namespace, generated_tokens=generated_tokens)
        finally:
            self._engine.free(seq)
            self._capture_evicted_pages()  # an insert past the memory budget evicts
        # A skipped insert (under ``min_prefix_tokens``) cached nothing: nothing to announce.
        published = 0 if inserted.skipped else self._register_blocks(token_ids, block_table, namespace)
        return StoreReply(self.node_id, namespace, inserted.cached_tokens + inserted.new_tokens,
                          inserted.new_tokens, published)

    def _register_blocks(self, tokens: TokenArray, block_table: npt.NDArray[np.int64],
                         namespace: str) -> int:
        """Remember the hash of every full block the index now holds; queue a stored event."""
        hashes = self._hasher.hash_chain(tokens, namespace)
        if hashes.size == 0:
            return 0
        family = hashes[0].tobytes()
        blocks = block_table[: hashes.size]
        held = self._engine.pool.ref_counts(blocks) > 0
        self._block_keys.assign(blocks[held], hashes[held], np.flatnonzero(held), family, namespace)
        self._publisher.add(BlockEvent.stored(hashes, Tier.GPU, namespace=namespace))
        return int(hashes.size)

    def _on_evict(self, evicted: EvictedBlock) -> None:
        """Queue an evicted full block for demotion to the spill tiers, or unregister it.

        Runs under ``_lock`` inside an eviction. The page is still intact here, and stays so
        until :meth:`_capture_evicted_pages` (called by every path that evicts, before the
        block can be reused) copies all of an eviction's pages out in one gather. The tier
        writes wait for :meth:`_finish`, after the lock is released, so an eviction of a long
        prefix never stalls the node's other calls.
        """
        key = self._block_keys.pop(evicted.block_id)
        if key is None:
            return  # a partial block: never registered, nothing to keep
        if self._spill is not None and evicted.end - evicted.start == self._block_size:
            self._evicted_pages.append((key, evicted.token_bytes, evicted.block_id))
            self._spilling[key.block_hash] = self._spilling.get(key.block_hash, 0) + 1
            return
        self._publisher.add(key.event(None))

    def _reclaim(self, num_blocks: int) -> int:
        """The engine's reclaimer: evict from the prefix cache, then copy the evicted pages
        out before the engine hands their blocks to the allocation that asked."""
        freed = self._index.evict(num_blocks)
        self._capture_evicted_pages()
        return freed

    def _capture_evicted_pages(self) -> None:
        """Under ``_lock``: copy the pages of the blocks evicted since the last call into
        host memory (one gather), queued for the spill writer."""
        if not self._evicted_pages:
            return
        evicted, self._evicted_pages = self._evicted_pages, []
        rows = self._engine.pages.gather_pages(np.array([block for _, _, block in evicted], dtype=np.int64))
        self._pending_spills.append(_PendingSpills(
            [key for key, _, _ in evicted], [tokens for _, tokens, _ in evicted], torch.from_numpy(rows)
        ))

    def _finish(self, *, wait_for_registry: bool = True) -> None:
        """After a call released ``_lock``: hand queued spills to the spill writer, publish.

        The tier writes of a long evicted prefix (thousands of pages) run on the writer thread,
        so the call that caused the eviction returns without waiting for them; the moved-tier
        events follow when each batch is written. Without ``wait_for_registry`` the queued
        events are published on the publisher's thread and the call returns at once.
        """
        with self._lock:
            assert not self._evicted_pages, "evicted pages were not copied out before a reuse"
            pending, self._pending_spills = self._pending_spills, []
            if self._dropped_spills:
                self._unregister_dropped_spills()
        if pending:
            self._spill_writer.submit(self._write_spills, pending)
        if wait_for_registry:
            self._publisher.flush()
        else:
            self._publisher.publish_soon()

    def _write_spills(self, pending: list[_PendingSpills]) -> None:
        """On the spill writer: each eviction's pages in one batched put, then their
        moved-tier events (removed for the pages no tier had room for).

        A block stored again since its eviction is on the device now, and its stored event
        went out then: its late spill outcome is not published (a moved event would demote
        its registry entry to a lower tier, a removed one would unregister a block held); nor
        is that of a block evicted again since, whose later spill publishes the outcome that
        stands (a removed event first would make that moved one a no-op). The check and the
        events are made under ``_lock``, in order with every stored event.
        """
        assert self._spill is not None
        try:
            for batch in pending:
                requests = [SpillRequest(key.block_hash, key.namespace, tokens, key.family, key.position)
                            for key, tokens in zip(batch.keys, batch.token_bytes, strict=True)]
                tiers: list[str | None]
                try:
                    tiers = self._spill.spill_many(requests, batch.pages)
                except Exception:  # a fault of the spill tiers must not leave the registry believing it
                    logger.exception("node %s: spilling %d evicted page(s) failed; they are dropped",
                                     self.node_id, len(requests))
                    tiers = [None] * len(requests)
                with self._lock:
                    holds, spilling = self._block_keys.holds, self._spilling
                    outcomes: list[tuple[BlockKey, str | None]] = []
                    for key, tier in zip(batch.keys, tiers, strict=True):
                        left = spilling.pop(key.block_hash) - 1
                        if left:  # evicted again since: that later spill's outcome is the one
                            spilling[key.block_hash] = left
                        elif not holds(key.block_hash):
                            outcomes.append((key, tier))
                    for event in coalesced_events([key for key, _ in outcomes], [tier for _, tier in outcomes]):
                        self._publisher.add(event)
        finally:
            self._publisher.flush()

    def _unregister_dropped_spills(self) -> None:
        """Under ``_lock``: removed events for the spilled blocks the tiers lost, unless the
        block is held again (back on the device, or spilled anew). One still on its way to
        the spill tiers is decided after the writer publishes its outcome (a removed event
        before that moved one would unregister it for good: a moved event only updates)."""
        assert self._spill is not None
        holds, location = self._block_keys.holds, self._spill.location
        lost: list[BlockKey] = []
        deferred: list[SpilledBlock] = []
        while self._dropped_spills:
            record = self._dropped_spills.popleft()
            if record.block_hash in self._spilling:
                deferred.append(record)
            elif not holds(record.block_hash) and location(tier_key(record.block_hash)) is None:
                lost.append(BlockKey(record.block_hash, record.family, record.position, record.namespace))
        self._dropped_spills.extend(deferred)
        lost.sort(key=lambda key: (key.namespace, key.family, key.position))
        for event in coalesced_events(lost, [None] * len(lost)):
            self._publisher.add(event)
        self._counters["dropped_spills"] += len(lost)

    def drain_spills(self, timeout_s: float | None = None) -> bool:
        """Wait until every eviction queued so far is written to the spill tiers, and the
        moves between tiers they set off (a full host tier demoting to NVMe) are done; False
        if those moves are still running after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._spill_writer.submit(lambda: None).result(timeout=timeout_s)
        if self._spill is None:
            return True
        return self._spill.store.wait_idle(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def end_conversation(self, tokens: object, namespace: str = "default", keep_tokens: int = 0) -> int:
        """The conversation whose history is ``tokens`` is over: what only it cached, past
        its first ``keep_tokens`` tokens (the prefix it found cached when it began), is
        evicted first from now on (and so spilled to a lower tier first), ahead of blocks that
        may still be used. Returns the tokens demoted (see :meth:`PrefixIndex.demote`)."""
        token_ids = self._tokens(tokens, check_range=False)
        with self._lock:
            demoted = self._index.demote(token_ids, namespace, keep_tokens=keep_tokens)
            self._counters["ended_conversations"] += 1
            self._counters["demoted_tokens"] += demoted
        return demoted

    # --- migration ---------------------------------------------------------------------------

    def export_prefix(self, tokens: object, namespace: str = "default") -> KVPages | None:
        """The pages this node holds for the longest prefix of ``tokens`` (None: nothing), in
        page layout for :meth:`import_prefix` on a peer, copied out: safe to keep."""
        pages, lease_id = self.export_pinned(tokens, namespace)
        try:
            return None if pages is None else pages.copied()
        finally:
            if lease_id is not None:
                self.release(lease_id)

    def export_pinned(self, tokens: object, namespace: str = "default") -> tuple[KVPages | None, str | None]:
        """The pages of the longest prefix of ``tokens`` this node holds, and the lease that
        pins them (``(None, None)``: nothing held). The caller releases the lease once the
        pages are shipped; its TTL ends it if the caller never does.

        On a host pool the device pages are views of the pool (one per run of consecutive
        blocks, no copy), valid until the lease is released: whoever ships them copies them
        once, straight from the pool. A pinned block's pages never change (an append to a
        shared tail copies it first), so no lock is held while they are read. Spilled pages
        are read from their tier, pinned by the same lease.
        """
        reply = self.lookup(tokens, namespace)
        if reply.lease_id is None:
            return None, None
        pages = self._engine.pages
        try:
            with self._lock:
                hold = self._leases.get(reply.lease_id, namespace).hold
                device_ids = hold.device_match.block_ids[: -(-hold.device_tokens // self._block_size)]
                segments = (pages.page_views(device_ids, _MAX_EXPORT_SEGMENTS) or [pages.gather_pages(device_ids)]
                            if device_ids.size else [])
            num_tokens = hold.device_tokens
            if hold.spill_keys:  # then the device part is a whole number of blocks
                spilled = [raw.cpu().numpy().reshape(1, -1) for raw in self._read_spilled_raw(hold.spill_keys)]
                if spilled:  # none when the first spilled page is corrupt
                    segments.append(np.concatenate(spilled))
                    num_tokens += len(spilled) * self._block_size
            if not num_tokens:  # only spilled pages, the first corrupt: nothing to export
                self.release(reply.lease_id)
                return None, None
            with self._lock:
                self._counters["migrations_out"] += 1
        except BaseException:
            self.release(reply.lease_id)
            raise
        return KVPages(tuple(segments), dtype_name(pages.dtype), pages.page_shape, num_tokens), reply.lease_id

    def import_prefix(self, tokens: object, payload: KVPages | None,
                      namespace: str = "default") -> StoreReply:
        """Cache a prefix pulled from a peer: ``payload`` (from its :meth:`export_prefix`)
        holds the pages of the leading ``payload.num_tokens`` tokens, written as they are.
        Returns once they are cached here; their registry events are published right after,
        in the background."""
        token_ids = self._tokens(tokens)
        if payload is None:
            return StoreReply(self.node_id, namespace, 0, 0, 0)
        if not isinstance(payload, KVPages):
            raise InvalidKV(f"import_prefix takes KVPages, got {type(payload).__name__}")
        payload.check_compatible(self._engine.pages.dtype, self._engine.pages.page_shape)
        if not 0 < payload.num_tokens <= token_ids.size:
            raise InvalidKV(f"the pages hold {payload.num_tokens} tokens of a {token_ids.size}-token prompt")
        segments = payload.checked_segments()  # written where they go: no join, no extra copy
        with self._lock:
            reply = self._cache_sequence(token_ids[: payload.num_tokens], namespace, kv_pages=segments)
            self._counters["migrations_in"] += 1
        # The pull's caller sends its request here directly, so the registry may learn of the
        # blocks a round trip later (see :meth:`sync_registry`); the pull returns sooner.
        self._finish(wait_for_registry=False)
        return reply

    def sync_registry(self, timeout_s: float | None = None) -> bool:
        """Wait until every event queued so far is published (False: the registry failed
        and a resync is scheduled)."""
        return self._publisher.publish_soon().result(timeout=timeout_s)

    # --- maintenance and introspection -------------------------------------------------------

    def _maintain(self) -> None:
        with self._lock:
            self._leases.expire()
            self._index.evict_expired()
            self._index.enforce_memory_budget()
            self._capture_evicted_pages()
        self._finish()  # also unregisters the spilled blocks the tiers dropped meanwhile

    def _all_held_blocks(self) -> list[BlockEvent]:
        """Stored events for every block held, for a re-announce after a registry restart."""
        with self._lock:
            device = self._block_keys.held()
        held: list[tuple[BlockKey, Tier]] = [(key, Tier.GPU) for key in device]
        if self._spill is not None:
            for record in self._spill.held():
                held.append((BlockKey(record.block_hash, record.family, record.position,
                                      record.namespace), TIERS_BY_NAME[record.tier]))
        return [
            BlockEvent.stored([key.block_hash], tier, first_position=key.position,
                              family=key.family, namespace=key.namespace)
            for key, tier in held
        ]

    def set_registry_error_hook(self, hook: Callable[[], None] | None) -> None:
        self._publisher.set_error_hook(hook)

    def stats(self) -> NodeStats:
        with self._lock:
            engine = self._engine.stats()
            cache = self._index.stats()
            tiers: dict[str, dict[str, float]] = {
                "gpu": {"pages_used": engine.blocks_used, "pages_total": engine.blocks_total}
            }
            if self._spill is not None:
                tiers.update(self._spill.stats())
            return NodeStats(
                node_id=self.node_id,
                epoch=self._publisher.epoch,
                device=str(self._device),
                blocks_total=engine.blocks_total,
                blocks_free=engine.blocks_free,
                sequences=engine.sequences,
                leases=len(self._leases),
                hits=self._counters["hits"],
                misses=self._counters["misses"],
                hit_tokens=self._counters["hit_tokens"],
                lookup_tokens=self._counters["lookup_tokens"],
                tiers=tiers,
                evictions=dict(cache.evictions),
                migrations_in=self._counters["migrations_in"],
                migrations_out=self._counters["migrations_out"],
                ended_conversations=self._counters["ended_conversations"],
                demoted_tokens=self._counters["demoted_tokens"],
                registry_errors=self._publisher.errors,
                dropped_spills=self._counters["dropped_spills"],
            )

    def check_invariants(self) -> None:
        """Assert the engine, index and pool agree (tests and the load test call this)."""
        with self._lock:
            self._engine.check_invariants(external_refs=self._index.held_refs())

    def shutdown(self) -> None:
        """Stop the maintenance thread, release every lease, close the spill tiers."""
        self._publisher.stop()
        with self._lock:
            self._leases.release_all()
        self._spill_writer.shutdown(wait=True)
        if self._spill is not None:
            self._spill.close()


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
