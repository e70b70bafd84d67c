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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from kvcluster.config import KVClusterConfig
from kvcluster.core.kv_engine import PagedKVEngine
from kvcluster.core.prefix_index import EvictedBlock, PrefixIndex, PrefixMatch
from kvcluster.core.eviction import make_policy
from kvcluster.errors import InvalidArgument, LeaseError
from kvcluster.kv_payload import KVPayload
from kvcluster.leases import LeaseTable
from kvcluster.node_types import (
    LookupReply,
    NodeIdentity,
    NodeLoad,
    NodeStats,
    StoreReply,
    identity_for,
)
from kvcluster.registry_publisher import RegistryPublisher
from kvcluster.spill_store import SpillStore
from routing.block_hashing import BlockHasher
from routing.registry import PrefixRegistry

logger = logging.getLogger(__name__)

TokenArray = npt.NDArray[np.int64]


@dataclass(slots=True)
class _LeaseHold:
    """What one lease pins: the device blocks of the index match and the spilled pages."""

    tokens: TokenArray
    device_match: PrefixMatch
    index_lease: object
    spill_keys: list[int]
    matched_tokens: int


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
        )
        self._engine.set_reclaimer(self._index.evict)
        self._engine.set_reclaimable(self._index.reclaimable_blocks)
        self._hasher = BlockHasher(
            algorithm=config.hashing.algorithm,
            block_size=cache.block_size,
            salt=config.hashing.salt.encode(),
            model_fingerprint=spec.fingerprint(),
        )
        self._spill = SpillStore.from_config(
            config.tiers,
            page_bytes=self._engine.pages.page_bytes,
            node_id=node_id,
        )
        self._lock = threading.RLock()
        self._leases: LeaseTable[_LeaseHold] = LeaseTable(
            config.cluster.lease_ttl_s, self._release_hold, clock
        )
        # Full device blocks and the chain hash of the prefix they end, so an evicted block
        # can be demoted (or unregistered) under the key the registry knows it by.
        self._block_hashes: dict[int, tuple[bytes, str]] = {}
        self._in_flight = 0
        self._counters = {"hits": 0, "misses": 0, "hit_tokens": 0, "lookup_tokens": 0,
                          "migrations_in": 0, "migrations_out": 0}
        self._publisher = RegistryPublisher(
            node_id,
            registry,
            config.registry,
            load=self.load,
            announce_all=self._all_held_blocks,
            clock=clock,
        )
        self._publisher.register()
        recovered = self._spill.recovered()
        if recovered:
            self._publisher.stored(recovered)
            self._publisher.flush()
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
        pool = self._engine.pool
        return NodeLoad(self._in_flight, pool.num_free, pool.num_blocks)

    def ping(self) -> str:
        return self.node_id
