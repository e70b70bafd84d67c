"""Full blocks evicted from a node's device tier, kept in its host and NVMe tiers.

When the prefix index evicts a full block, the node demotes its page here instead of
dropping it, under the block's chain hash. A later lookup continues the prompt's hash chain
past the device match: every consecutive block found here (with its tokens verified) is a
hit on the host or NVMe tier. The :class:`~tiers.tiered_store.TieredStore` below moves pages
host → NVMe as the host tier fills, and discards the coldest when NVMe is full.

Warm restart: with NVMe enabled, each spilled block's metadata (hash, namespace, tokens) is
appended to a small log beside the page files; on start the log is replayed against the pages
the NVMe tier recovered, so a restarted node re-announces exactly what survived.

Concurrency: ``TieredStore`` is thread-safe; the metadata map is guarded by ``_lock``.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import numpy.typing as npt
import torch

from kvcluster.errors import KVClusterError, PageCorrupt
from tiers.config import TiersConfig
from tiers.factory import build_tiered_store
from tiers.page_store import check_batch, check_page
from tiers.tiered_store import TieredStore

logger = logging.getLogger(__name__)

_RECORD_HEADER = struct.Struct("<II")  # payload length, crc32 of the payload


def _pack(key: int, record: SpilledBlock) -> bytes:
    fields = (key, record.block_hash, record.family, record.position, record.namespace, record.tokens)
    return msgpack.packb(fields)  # type: ignore[no-any-return]


def tier_key(block_hash: bytes) -> int:
    """The tier key of a block hash: its first 63 bits (tiers take keys in [0, 2**63))."""
    return int.from_bytes(block_hash[:8], "little") >> 1


@dataclass(frozen=True, slots=True)
class SpilledBlock:
    """A spilled block: its chain hash, chain family and depth, namespace and tokens."""

    block_hash: bytes
    family: bytes
    position: int
    namespace: str
    tokens: bytes  # the block's token ids, int64 native


@dataclass(frozen=True, slots=True)
class SpillRequest:
    """One block to spill: its identity and tokens (its page travels in the batch)."""

    block_hash: bytes
    namespace: str
    token_bytes: bytes  # the block's token ids as little-endian int64
    family: bytes
    position: int


@dataclass(frozen=True, slots=True)
class HeldBlock:
    block_hash: bytes
    family: bytes
    position: int
    namespace: str
    tier: str


class SpillStore:
    """Spilled pages by block hash, plus what is needed to verify and re-announce them."""

    def __init__(self, store: TieredStore, meta_path: Path | None) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._blocks: dict[int, SpilledBlock] = {}
        self._meta_path = meta_path
        self._meta_file = None
        self.verify_failures = 0
        store.add_discard_listener(self._forget)
        if meta_path is not None:
            self._replay(meta_path)
            self._meta_file = open(meta_path, "ab")  # noqa: SIM115 - lives as long as the store

    @classmethod
    def from_config(cls, config: TiersConfig, *, page_bytes: int, node_id: str) -> SpillStore:
        """Host (and, when enabled, NVMe) tiers below the node's device pages."""
        stem = f"kvcluster-{node_id}"
        store = build_tiered_store(config, page_bytes, file_stem=stem, include_device=False)
        meta_path = Path(config.nvme.paths[0]) / f"{stem}.blocks" if config.nvme.enabled else None
        return cls(store, meta_path)

    @property
    def store(self) -> TieredStore:
        return self._store

    def __len__(self) -> int:
        return len(self._blocks)

    # --- spilling ----------------------------------------------------------------------------

    def spill(self, block_hash: bytes, namespace: str, tokens: npt.NDArray[np.int64],
              page: torch.Tensor, *, family: bytes, position: int) -> str | None:
        """Keep ``page`` (uint8) under ``block_hash``; the tier it landed on, or None if full.
        A page of the wrong size or dtype raises InvalidKV."""
        check_page(page, self._store.page_bytes)
        key = tier_key(block_hash)
        record = SpilledBlock(block_hash, family, position, namespace,
                              tokens.astype(np.int64).tobytes())
        existing = self._store.location(key)
        if existing is not None and key in self._blocks:
            return existing  # the same block was spilled before and is still kept
        try:
            tier = self._store.put(key, page)
        except KVClusterError as exc:  # capacity or I/O: the block is simply not kept
            logger.debug("spill of %s refused: %s", block_hash.hex(), exc)
            return None
        with self._lock:
            self._blocks[key] = record
            self._append_meta(key, record)
        return tier

    def spill_many(self, blocks: Sequence[SpillRequest], pages: torch.Tensor) -> list[str | None]:
        """:meth:`spill` for many blocks: ``pages[i]`` (rows of a ``[n, page_bytes]`` uint8
        tensor) for ``blocks[i]``, placed in one reservation and written in one batch per
        tier; per block the tier it landed on, or None when it is not kept. A bad batch
        raises InvalidKV."""
        check_batch(np.arange(len(blocks)), pages, self._store.page_bytes)
        keys = [tier_key(block.block_hash) for block in blocks]
        out: list[str | None] = [None] * len(blocks)
        fresh: list[int] = []
        absent: set[int] = set()  # fresh blocks whose key the store did not hold before
        seen: set[int] = set()
        for i, key in enumerate(keys):
            existing = self._store.location(key)
            if existing is not None and key in self._blocks:
                out[i] = existing  # the same block was spilled before and is still kept
            elif key not in seen:
                seen.add(key)
                fresh.append(i)
                if existing is None:
                    absent.add(i)
        if not fresh:
            return out
        try:
            placed = self._store.put_many([keys[i] for i in fresh],
                                          pages if len(fresh) == len(blocks) else pages[fresh])
        except KVClusterError as exc:  # e.g. a key mid-put elsewhere, or I/O: page by page
            logger.debug("batched spill of %d pages refused (%s); spilling one by one", len(fresh), exc)
            for i in fresh:
                block = blocks[i]
                stored = self._store.location(keys[i]) if i in absent else None
                if stored is not None:  # put_many wrote it before a write to another tier failed
                    record = SpilledBlock(block.block_hash, block.family, block.position, block.namespace,
                                          block.token_bytes)
                    with self._lock:
                        self._blocks[keys[i]] = record
                        self._append_meta(keys[i], record)
                    out[i] = stored
                    continue
                tokens = np.frombuffer(block.token_bytes, dtype="<i8")
                out[i] = self.spill(block.block_hash, block.namespace, tokens, pages[i],
                                    family=block.family, position=block.position)
            return out
        with self._lock:
            for i, tier in zip(fresh, placed, strict=True):
                if tier is None:
                    continue
                block = blocks[i]
                record = SpilledBlock(block.block_hash, block.family, block.position, block.namespace,
                                      block.token_bytes)
                self._blocks[keys[i]] = record
                self._append_meta(keys[i], record, flush=False)
                out[i] = tier
            if self._meta_file is not None:
                self._meta_file.flush()
        return out

    def _append_meta(self, key: int, record: SpilledBlock, *, flush: bool = True) -> None:
        if self._meta_file is None:
            return
        payload = _pack(key, record)
        self._meta_file.write(_RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        if flush:
            self._meta_file.flush()

    def _replay(self, path: Path) -> None:
        """Load the metadata log, keep the records whose page survived, compact the log."""
        survivors = set(self._store.keys())
        if path.exists():
            data = path.read_bytes()
            offset = 0
            while offset + _RECORD_HEADER.size <= len(data):
                length, crc = _RECORD_HEADER.unpack_from(data, offset)
                payload = data[offset + _RECORD_HEADER.size : offset + _RECORD_HEADER.size + length]
                if len(payload) != length or zlib.crc32(payload) != crc:
                    break  # a torn tail from a crash: everything before it is intact
                key, *fields = msgpack.unpackb(payload)
                if key in survivors:
                    self._blocks[key] = SpilledBlock(*fields)
                offset += _RECORD_HEADER.size + length
        orphans = survivors - self._blocks.keys()
        for key in orphans:  # a page without metadata cannot be verified: drop it
            self._store.discard(key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for key, record in self._blocks.items():
                payload = _pack(key, record)
                out.write(_RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        if self._blocks:
            logger.info("spill store: recovered %d block(s) from %s", len(self._blocks), path)

    def _forget(self, key: int) -> None:
        with self._lock:
            self._blocks.pop(key, None)

    # --- lookups -----------------------------------------------------------------------------

    def continue_chain(self, hashes: list[bytes], tokens: npt.NDArray[np.int64], first_block: int,
                       block_size: int, namespace: str) -> list[int]:
        """Keys of the spilled blocks ``first_block, first_block + 1, ...`` of the prompt,
        stopping at the first block that is absent or whose stored tokens differ."""
        keys: list[int] = []
        for index in range(first_block, len(hashes)):
            key = tier_key(hashes[index])
            record = self._blocks.get(key)
            if record is None or self._store.location(key) is None:
                break
            expected = tokens[index * block_size : (index + 1) * block_size]
            if (record.block_hash != hashes[index] or record.namespace != namespace
                    or record.tokens != expected.astype(np.int64).tobytes()):
                self.verify_failures += 1
                break
            keys.append(key)
        return keys

    def location(self, key: int) -> str | None:
        return self._store.location(key)

    def read(self, key: int) -> torch.Tensor:
        """The page of ``key`` (uint8); :class:`PageCorrupt` when its checksum fails."""
        try:
            return self._store.get(key)
        except PageCorrupt:
            self._forget(key)
            raise

    def pin(self, keys: list[int]) -> None:
        self._store.pin(keys)

    def unpin(self, keys: list[int]) -> None:
        # A pinned page that failed its checksum was dropped with its pins: nothing to undo.
        self._store.unpin([key for key in keys if key in self._store])

    def prefetch(self, keys: list[int]) -> None:
        if keys:
            self._store.prefetch(keys)

    def discard(self, key: int) -> None:
        """Forget ``key`` and free its page. Raises InvalidArgument (changing nothing) while
        it is pinned."""
        with self._lock:  # a spill of the same key cannot slip in between
            self._store.discard(key)
            self._blocks.pop(key, None)

    def held(self) -> list[HeldBlock]:
        """Every spilled block with the tier it is on now (for re-announcing)."""
        with self._lock:
            records = list(self._blocks.items())
        out = []
        for key, r in records:
            tier = self._store.location(key)
            if tier is not None:
                out.append(HeldBlock(r.block_hash, r.family, r.position, r.namespace, tier))
        return out

    def stats(self) -> dict[str, dict[str, float]]:
        return {
            name: {"pages_used": s.pages_used, "pages_total": s.pages_total,
                   "demotions": s.demotions, "promotions": s.promotions,
                   "checksum_failures": s.checksum_failures}
            for name, s in self._store.stats().items()
        }

    def close(self) -> None:
        self._store.close()
        if self._meta_file is not None:
            self._meta_file.close()
            self._meta_file = None
