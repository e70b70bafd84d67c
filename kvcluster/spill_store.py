"""Full blocks evicted from a node's device tier, kept in its host and NVMe tiers.

When the prefix index evicts a full block, the node demotes its page here instead of
dropping it, under the block's chain hash. A later lookup continues the prompt's hash chain
past the device match: every consecutive block found here (with its tokens verified) is a
hit on the host or NVMe tier. The :class:`~tiers.tiered_store.TieredStore` below moves pages
host → NVMe as the host tier fills, and discards the coldest when NVMe is full.

Warm restart: with NVMe enabled, each spilled block's metadata (hash, namespace, tokens) is
appended to a small log beside the page files; on start the log is replayed against the pages
the NVMe tier recovered, so a restarted node re-announces exactly what survived.

The metadata log
    Records are ``<u32 length, u32 crc32>`` + a msgpack payload, appended one write per spill
    (or batch). A page is kept only once its record is written: when the write fails (disk
    full, EIO) the record is cut off again and the page discarded, so nothing is kept that a
    restart could not verify, and the node announces only what it kept. Replay skips a torn
    or damaged record and resynchronises on the next intact one. Discarded pages leave dead
    records; the log is rewritten (temporary file, fsync, rename) at start and whenever dead
    records outnumber live ones plus ``compact_min_records``, so a crash at any point leaves
    either the old log or the new one.

Concurrency: ``TieredStore`` is thread-safe; the metadata map and the log are guarded by
``_lock``. A running compaction holds it only to snapshot the live records and, at the end, to
copy over the records appended meanwhile and rename; the bulk write and fsync run unlocked.
Lookups (``continue_chain``, ``location``, ``read``) never take it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import numpy.typing as npt
import torch

from kvcluster.errors import InvalidArgument, KVClusterError, PageCorrupt, TierIOError
from tiers.config import TiersConfig
from tiers.factory import build_tiered_store
from tiers.nvme_file_io import FileIO, PosixFileIO, fsync_dir
from tiers.page_store import check_batch, check_page
from tiers.tiered_store import TieredStore

logger = logging.getLogger(__name__)

_RECORD_HEADER = struct.Struct("<II")  # payload length, crc32 of the payload
# A record holds at most 4096 tokens (32 KiB) plus hashes and a namespace; a longer length
# field is damage, and the bound keeps a resync scan over garbage cheap.
_MAX_RECORD_BYTES = 1 << 20


def _pack(key: int, record: SpilledBlock) -> bytes:
    fields = (key, record.block_hash, record.family, record.position, record.namespace, record.tokens)
    return msgpack.packb(fields)  # type: ignore[no-any-return]


def _encode(key: int, record: SpilledBlock) -> bytes:
    payload = _pack(key, record)
    return _RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decode_at(data: memoryview, offset: int) -> tuple[int, int, SpilledBlock] | None:
    """The record at ``offset`` as (end offset, key, record), or None if it is torn or damaged."""
    length, crc = _RECORD_HEADER.unpack_from(data, offset)
    start = offset + _RECORD_HEADER.size
    if not 0 < length <= min(len(data) - start, _MAX_RECORD_BYTES):
        return None
    payload = data[start : start + length]
    if zlib.crc32(payload) != crc:
        return None
    try:
        key, block_hash, family, position, namespace, tokens = msgpack.unpackb(payload)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not (isinstance(key, int) and isinstance(block_hash, bytes) and isinstance(family, bytes)
            and isinstance(position, int) and isinstance(namespace, str) and isinstance(tokens, bytes)):
        return None
    return start + length, key, SpilledBlock(block_hash, family, position, namespace, tokens)


def _decode_log(data: bytes) -> tuple[list[tuple[int, SpilledBlock]], int]:
    """The intact records of a metadata log in order, and how many bytes were skipped.

    A torn or damaged record (a crash mid-append, or a failed append that could not be cut
    off) does not hide the ones after it: the scan moves on byte by byte to the next offset
    whose length and crc32 match a payload that decodes (a false match needs a crc32
    collision and a well-formed record).
    """
    view = memoryview(data)
    records: list[tuple[int, SpilledBlock]] = []
    offset = skipped = 0
    while offset + _RECORD_HEADER.size <= len(data):
        found = _decode_at(view, offset)
        if found is None:
            offset += 1
            skipped += 1
            continue
        offset, key, record = found
        records.append((key, record))
    return records, skipped + len(data) - offset


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
    """Spilled pages by block hash, plus what is needed to verify and re-announce them.

    ``meta_path`` is the metadata log (None: no warm restart); ``file_io`` its system calls
    (fault injection); ``compact_min_records`` the dead records tolerated beyond as many as
    are live before the log is compacted. A log that cannot be read or rewritten at start
    raises TierIOError. ``meta_write_failures`` counts failed log writes (their pages were
    not kept). ``on_dropped`` is called with the record of every kept block the tiers lose
    on their own (discarded for room, or corrupt when read), on whichever thread noticed, with
    no lock held; not for :meth:`discard`, whose caller knows.
    """

    def __init__(self, store: TieredStore, meta_path: Path | None, *, file_io: FileIO | None = None,
                 compact_min_records: int = 1024,
                 on_dropped: Callable[[SpilledBlock], None] | None = None) -> None:
        if compact_min_records < 0:
            raise InvalidArgument(f"compact_min_records must be >= 0, got {compact_min_records}")
        self._store = store
        self._lock = threading.Lock()
        self._blocks: dict[int, SpilledBlock] = {}
        self._meta_path = meta_path
        self._io: FileIO = file_io if file_io is not None else PosixFileIO()
        self._meta_fd = -1  # the log, open for appending; -1 without one or once closed
        self._meta_size = 0  # bytes of intact log: a failed append is cut back to this
        self._meta_records = 0  # records in the log, live and dead
        self._compact_min_records = compact_min_records
        self._compact_retry_at = 0  # after a failed compaction, the record count to retry at
        self._compact_tail: list[bytes] | None = None  # appended while a compaction runs
        self._meta_outage = 0  # failed log writes since the last good one (0: healthy)
        self.verify_failures = 0
        self.meta_write_failures = 0
        self._on_dropped = on_dropped
        store.add_discard_listener(self._forget)
        if meta_path is not None:
            try:
                self._replay(meta_path)
            except OSError as exc:
                raise TierIOError(
                    f"spill store: cannot recover the metadata log {meta_path}: {exc.strerror or exc}"
                ) from None

    @classmethod
    def from_config(cls, config: TiersConfig, *, page_bytes: int, node_id: str,
                    on_dropped: Callable[[SpilledBlock], None] | None = None) -> SpillStore:
        """Host (and, when enabled, NVMe) tiers below the node's device pages."""
        stem = f"kvcluster-{node_id}"
        store = build_tiered_store(config, page_bytes, file_stem=stem, include_device=False)
        meta_path = Path(config.nvme.paths[0]) / f"{stem}.blocks" if config.nvme.enabled else None
        try:
            return cls(store, meta_path, on_dropped=on_dropped)
        except KVClusterError:
            store.close()
            raise

    @property
    def store(self) -> TieredStore:
        return self._store

    def __len__(self) -> int:
        return len(self._blocks)

    # --- spilling ----------------------------------------------------------------------------

    def spill(self, block_hash: bytes, namespace: str, tokens: npt.NDArray[np.int64],
              page: torch.Tensor, *, family: bytes, position: int) -> str | None:
        """Keep ``page`` (uint8) under ``block_hash``; the tier it landed on, or None when it is
        not kept (no room, or its metadata could not be logged). A page of the wrong size or
        dtype raises InvalidKV."""
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
            kept = self._keep([(key, record)])
        self._maybe_compact()
        return tier if kept else None

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
                        out[i] = stored if self._keep([(keys[i], record)]) else None
                    continue
                tokens = np.frombuffer(block.token_bytes, dtype="<i8")
                out[i] = self.spill(block.block_hash, block.namespace, tokens, pages[i],
                                    family=block.family, position=block.position)
            return out
        with self._lock:
            entries = []
            for i, tier in zip(fresh, placed, strict=True):
                if tier is None:
                    continue
                block = blocks[i]
                entries.append((keys[i], SpilledBlock(block.block_hash, block.family, block.position,
                                                      block.namespace, block.token_bytes)))
                out[i] = tier
            if not self._keep(entries):
                for i in fresh:
                    out[i] = None
        self._maybe_compact()
        return out

    # --- the metadata log --------------------------------------------------------------------

    def _keep(self, entries: list[tuple[int, SpilledBlock]]) -> bool:
        """Under ``_lock``: log the just stored ``entries`` and map them; or, when the log
        write fails, discard their pages (nothing is kept that a restart could not find).
        Whether they are kept."""
        if not entries:
            return True
        if not self._append_meta([_encode(key, record) for key, record in entries]):
            for key, _ in entries:
                try:
                    self._store.discard(key)
                except KVClusterError as exc:  # pinned by a caller that guessed its key
                    logger.warning("spill store: page %d has no metadata and stays unused: %s", key, exc)
            return False
        for key, record in entries:
            if self._store.location(key) is not None:  # not discarded for room since its put
                self._blocks[key] = record
        return True

    def _append_meta(self, records: list[bytes]) -> bool:
        """Under ``_lock``: append ``records`` in one write; False if it failed. A failed or
        short write is cut off again, so no torn record sits before later ones."""
        if self._meta_fd < 0:
            return self._meta_path is None  # no log kept; or closed, and then nothing is kept
        data = b"".join(records)
        try:
            self._write_all(self._meta_fd, data)
        except OSError as exc:
            try:
                os.ftruncate(self._meta_fd, self._meta_size)
            except OSError:  # the torn bytes stay (replay skips them); append after them
                with contextlib.suppress(OSError):
                    self._meta_size = os.fstat(self._meta_fd).st_size
            self.meta_write_failures += 1
            if not self._meta_outage:
                logger.warning("spill store: cannot write the metadata log %s (%s); spilled pages "
                               "are not kept until it is writable again", self._meta_path, exc)
            self._meta_outage += 1
            return False
        if self._meta_outage:
            logger.info("spill store: metadata log %s writable again after %d failed write(s)",
                        self._meta_path, self._meta_outage)
            self._meta_outage = 0
        self._meta_size += len(data)
        self._meta_records += len(records)
        if self._compact_tail is not None:
            self._compact_tail.extend(records)
        return True

    def _write_all(self, fd: int, data: bytes) -> None:
        """Append ``data`` to ``fd``; a short write raises OSError like a failed one."""
        if data and (written := self._io.append(fd, data)) != len(data):
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")

    def _create_log(self, tmp: Path, data: bytes) -> int:
        """A new file ``tmp`` holding ``data``, fsynced; its fd, open for appending."""
        fd = self._io.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            self._write_all(fd, data)
            self._io.fsync(fd)
        except BaseException:
            self._io.close(fd)
            raise
        return fd

    def _maybe_compact(self) -> None:
        """Rewrite the log with only the live records once the dead ones outnumber them plus
        ``compact_min_records``. Called with ``_lock`` not held, on the spilling thread.

        Until the rename the old log is complete, so a crash leaves it (and a stray temporary
        file that the next rewrite truncates); after it, the new one. A failure keeps the old
        log and is retried after another ``compact_min_records`` appends.
        """
        path = self._meta_path
        with self._lock:
            if (path is None or self._meta_fd < 0 or self._compact_tail is not None
                    or self._meta_records < self._compact_retry_at
                    or self._meta_records <= 2 * len(self._blocks) + self._compact_min_records):
                return
            live = list(self._blocks.items())
            self._compact_tail = []
        tmp = path.with_suffix(".tmp")
        try:
            old_fd = self._swap_in_log(tmp, path, live)
        except OSError as exc:
            logger.warning("spill store: compacting %s failed (%s); keeping the log as it is", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            with self._lock:
                self._compact_tail = None
                self._compact_retry_at = self._meta_records + max(1, self._compact_min_records)
            return
        self._io.close(old_fd)
        try:
            fsync_dir(path.parent)
        except OSError as exc:  # a crash may bring the old log back: later spills are dropped then
            logger.warning("spill store: cannot fsync the directory of %s: %s", path, exc)

    def _swap_in_log(self, tmp: Path, path: Path, live: list[tuple[int, SpilledBlock]]) -> int:
        """Write ``live`` to ``tmp`` and fsync it unlocked; under ``_lock`` add the records
        appended since the snapshot, rename it over ``path`` and append to it from now on
        (its fd follows it through the rename). The old log's fd, for the caller to close."""
        data = b"".join(_encode(key, record) for key, record in live)
        fd = self._create_log(tmp, data)
        try:
            with self._lock:
                assert self._compact_tail is not None, "two compactions ran at once"
                if self._meta_fd < 0:
                    raise OSError(errno.EBADF, "the spill store was closed")
                tail = b"".join(self._compact_tail)
                if tail:
                    self._write_all(fd, tail)
                    self._io.fsync(fd)
                os.replace(tmp, path)
                dead = self._meta_records - len(live) - len(self._compact_tail)
                old_fd, self._meta_fd = self._meta_fd, fd
                self._meta_size = len(data) + len(tail)
                self._meta_records = len(live) + len(self._compact_tail)
                self._compact_tail = None
                self._compact_retry_at = 0
        except BaseException:
            self._io.close(fd)
            raise
        logger.info("spill store: compacted %s, dropping %d dead record(s)", path, dead)
        return old_fd

    def _replay(self, path: Path) -> None:
        """Load the metadata log, keep the records whose page survived, compact the log."""
        survivors = set(self._store.keys())
        if path.exists():
            records, skipped = _decode_log(path.read_bytes())
            if skipped:
                logger.warning("spill store: skipped %d damaged byte(s) in %s", skipped, path)
            for key, record in records:
                if key in survivors:
                    self._blocks[key] = record
        orphans = survivors - self._blocks.keys()
        for key in orphans:  # a page without metadata cannot be verified: drop it
            self._store.discard(key)
        tmp = path.with_suffix(".tmp")
        data = b"".join(_encode(key, record) for key, record in self._blocks.items())
        fd = self._create_log(tmp, data)
        try:
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            self._io.close(fd)
            raise
        self._meta_fd, self._meta_size, self._meta_records = fd, len(data), len(self._blocks)
        if self._blocks:
            logger.info("spill store: recovered %d block(s) from %s", len(self._blocks), path)

    def _forget(self, key: int) -> None:
        """The tiers lost ``key``'s page (discarded for room, or corrupt)."""
        with self._lock:
            record = self._blocks.pop(key, None)
        if record is not None and self._on_dropped is not None:
            self._on_dropped(record)

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
        with self._lock:
            if self._meta_fd >= 0:
                self._io.close(self._meta_fd)
                self._meta_fd = -1
