"""The NVMe tier: pages in preallocated files of 4096-aligned slots, checksummed and journaled.

One file per configured directory (``<dir>/<stem>.pages``, journal ``<dir>/<stem>.journal``);
global slot ``s`` lives in file ``s % F`` at local slot ``s // F``, so consecutive slots stripe
across disks. The on-disk formats are in :mod:`tiers.nvme_journal`.

I/O
    Files are opened with ``O_DIRECT`` where the filesystem allows it (probed at open with an
    aligned write and read; ``o_direct="auto"`` falls back to buffered I/O and logs why). A batch
    is sorted by file and slot, cut into runs of consecutive slots and then into about
    ``2 * io_threads`` equal chunks of at most ``chunk_bytes``; each chunk is one ``pwritev`` or
    ``preadv`` run by one of the ``io_threads`` threads (the calls release the GIL). A page
    whose memory is 4096-aligned and whose size is a multiple of 4096 (pages of the host tier)
    is written from, or read into, its own memory with no copy; other pages go through a
    per-thread aligned staging buffer.

Integrity
    Every page carries an xxh3_64 checksum in its slot header, verified on every read against
    the value kept in memory: a page that fails is counted, marked corrupt, retired from the
    journal and reported as :class:`~kvcluster.errors.PageCorrupt` (``PagesCorrupt`` for a
    batch); its bytes are never returned. A short read (a truncated file) counts as corrupt.

Durability and warm restart
    A write reaches the file before its ``PUT`` record is appended to the journal, so a killed
    process loses nothing that was written. For power loss, ``fsync=True`` adds device
    flushes: with ``fsync_interval_s=0`` each batch is fdatasync'ed before its records are
    appended and the journal is fsync'ed after; with an interval (the default, 50 ms) a
    background thread group-commits (fdatasync the files, then fsync the journals) so the
    flushes cost the writers nothing. A power loss then forgets at most the last interval's
    pages; a record whose page did not reach the device fails its checksum at recovery, so a
    torn page is never revived. At open the journal is replayed, every surviving page is re-read
    and verified, the journal is compacted to those pages, and :meth:`NvmeTier.recovered_pages`
    says which tag (the caller's key) sits in which slot. After ``kill -9`` mid-write this finds
    exactly the pages whose write had completed.

Faults
    ENOSPC, EIO and short transfers raise :class:`~kvcluster.errors.TierIOError`; the slots of a
    failed write hold nothing recoverable and the caller keeps its page where it was.

Concurrency
    Thread-safe. ``_lock`` guards slot metadata and is never held during I/O; journal appends
    are serialised per file by the journal (lock order: journal, then ``_lock``). Concurrent
    reads and writes of *different* slots run in parallel; the caller must not read a slot
    while writing it, nor use a slot after freeing it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from kvcluster.errors import (
    InvalidArgument,
    NotFound,
    PagesCorrupt,
    TierError,
    TierIOError,
)
from tiers.nvme_file_io import Buffer, FileIO, PosixFileIO
from tiers.nvme_journal import (
    ALIGN,
    SLOT_HEADER_BYTES,
    Journal,
    JournalLayout,
    JournalRecord,
    RecordKind,
    decode_slot_header,
    encode_slot_header,
    page_checksum,
    replay,
    slot_bytes_for,
)
from tiers.page_store import (
    NO_TAG,
    PageBatch,
    SlotFreeStack,
    Slots,
    SlotsDelegate,
    TierStats,
    as_slots,
    check_batch,
    copy_bytes,
)

logger = logging.getLogger(__name__)

DirectMode = Literal["auto", "always", "never"]
_UNWRITTEN, _WRITTEN, _CORRUPT = 0, 1, 2
_DEL_FLUSH_THRESHOLD = 256
_INT64_MAX = 2**63 - 1


def probe_o_direct(directory: Path, file_io: FileIO | None = None) -> str | None:
    """``None`` if an aligned ``O_DIRECT`` write and read work in ``directory``, else why not."""
    if not hasattr(os, "O_DIRECT"):
        return "this platform has no O_DIRECT"
    io = file_io if file_io is not None else PosixFileIO()
    probe = directory / f".kvcluster-odirect-probe-{os.getpid()}-{threading.get_ident()}"
    buffer = _aligned_array(ALIGN)
    try:
        fd = io.open(str(probe), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        return f"open with O_DIRECT failed: {exc.strerror}"
    try:
        io.pwritev(fd, [buffer.data], 0)
        io.preadv(fd, [buffer.data], 0)
    except OSError as exc:
        return f"an aligned O_DIRECT transfer failed: {exc.strerror}"
    finally:
        io.close(fd)
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def _aligned_array(num_bytes: int) -> npt.NDArray[np.uint8]:
    """Zeroed memory aligned to the OS page (anonymous mmap), as a numpy array."""
    return np.frombuffer(mmap.mmap(-1, max(num_bytes, ALIGN)), dtype=np.uint8)[:num_bytes]


@dataclass(slots=True)
class _PageFile:
    path: Path
    fd: int
    direct: bool
    num_slots: int
    journal: Journal


@dataclass(slots=True)
class _Chunk:
    """Pages ``positions`` (indices into a batch) at consecutive local slots of one file."""

    file: int
    first: int
    positions: list[int]


@dataclass(slots=True, frozen=True)
class _Expected:
    tag: int
    seq: int
    checksum: int


class NvmeTier(SlotsDelegate):
    """``num_slots`` page slots spread over one file per directory in ``paths``."""

    medium = "nvme"

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        num_slots: int,
        page_bytes: int,
        *,
        name: str = "nvme",
        o_direct: DirectMode = "auto",
        io_threads: int = 4,
        fsync: bool = True,
        fsync_interval_s: float = 0.05,
        file_stem: str = "kvcluster-pages",
        recover: bool = True,
        chunk_bytes: int = 32 * 2**20,
        compact_after: int = 65536,
        file_io: FileIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not paths:
            raise InvalidArgument("the NVMe tier needs at least one directory")
        if num_slots < len(paths) or page_bytes <= 0:
            raise InvalidArgument(
                f"the NVMe tier needs page_bytes > 0 and at least one slot per path, got "
                f"{num_slots} slots of {page_bytes} bytes over {len(paths)} paths"
            )
        if io_threads <= 0 or chunk_bytes <= 0:
            raise InvalidArgument(f"io_threads and chunk_bytes must be positive, got {io_threads}, {chunk_bytes}")
        if o_direct not in ("auto", "always", "never"):
            raise InvalidArgument(f"o_direct must be auto, always or never, got {o_direct!r}")
        self.name = name
        self.page_bytes = page_bytes
        self.slot_bytes = slot_bytes_for(page_bytes)
        self._tail_bytes = self.slot_bytes - page_bytes
        self._io = file_io if file_io is not None else PosixFileIO()
        if fsync_interval_s < 0:
            raise InvalidArgument(f"fsync_interval_s must be >= 0, got {fsync_interval_s}")
        # Flush per batch, or group-commit from a background thread (see the module docstring).
        self._fsync = fsync and fsync_interval_s == 0
        self._group_commit = fsync and fsync_interval_s > 0
        self._commit_interval = fsync_interval_s
        self._dirty: set[int] = set()
        self._stop = threading.Event()
        self._committer: threading.Thread | None = None
        self._clock = clock
        self._slots = SlotFreeStack(num_slots)
        self._lock = threading.Lock()
        self._state = np.zeros(num_slots, dtype=np.int8)
        self._seq = np.zeros(num_slots, dtype=np.uint64)
        self._checksum = np.zeros(num_slots, dtype=np.uint64)
        self._tag = np.full(num_slots, NO_TAG, dtype=np.int64)
        self._next_seq = 1
        self._pending_dels: list[tuple[int, int, int, int]] = []
        self._journal_lock = threading.Lock()  # order: _journal_lock, then _lock
        self._compact_after = compact_after
        self._flush_queued = False
        self._checksum_failures = 0
        self._io_errors = 0
        self._closed = False
        iov_max = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
        self._pages_per_chunk = max(1, min(chunk_bytes // self.slot_bytes, iov_max // 2))
        self._local = threading.local()
        self._io_threads = io_threads
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix=f"{name}-io")
        self._files: list[_PageFile] = []
        self._recovered: dict[int, int] = {}
        try:
            for index, directory in enumerate(paths):
                self._files.append(self._open_file(Path(directory), index, len(paths), o_direct, file_stem))
            self._recover(enabled=recover)
        except OSError as exc:  # replaying or rewriting a journal (full disk, EIO, permissions)
            self.close()
            raise TierIOError(f"tier {name}: cannot recover its journal: {exc.strerror or exc}") from None
        except BaseException:
            self.close()
            raise
        if self._group_commit:
            self._committer = threading.Thread(target=self._commit_loop, name=f"{name}-commit", daemon=True)
            self._committer.start()
        modes = {f.direct for f in self._files}
        self.io_mode = "o_direct" if modes == {True} else "buffered" if modes == {False} else "mixed"
        logger.info(
            "tier %s: %d slots of %d bytes (%d on disk) in %d files, %s, %d recovered",
            name, num_slots, page_bytes, self.slot_bytes, len(self._files), self.io_mode,
            len(self._recovered),
        )

    # --- opening and recovery ----------------------------------------------------------------

    def _open_file(
        self, directory: Path, index: int, count: int, o_direct: DirectMode, stem: str
    ) -> _PageFile:
        if not directory.is_dir():
            raise InvalidArgument(f"NVMe path {str(directory)!r} is not a directory")
        direct = False
        if o_direct != "never":
            reason = probe_o_direct(directory, self._io)
            if reason is None:
                direct = True
            elif o_direct == "always":
                raise InvalidArgument(f"O_DIRECT is required but unusable in {directory}: {reason}")
            else:
                logger.warning("tier %s: buffered I/O in %s because %s", self.name, directory, reason)
        local_slots = (self._slots.num_slots - index + count - 1) // count
        path = directory / f"{stem}.pages"
        flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0)
        try:
            fd = self._io.open(str(path), flags, 0o600)
        except OSError as exc:
            raise TierIOError(f"cannot open {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._io.close(fd)
            raise TierError(f"{path} is in use by another process (locked)") from None
        try:
            os.posix_fallocate(fd, 0, local_slots * self.slot_bytes)
        except OSError as exc:
            self._io.close(fd)
            raise TierIOError(
                f"cannot preallocate {local_slots * self.slot_bytes} bytes for {path}: {exc.strerror}"
            ) from None
        layout = JournalLayout(self.page_bytes, self.slot_bytes, local_slots, index, count)
        journal = Journal(directory / f"{stem}.journal", layout, self._io, self._fsync)
        return _PageFile(path, fd, direct, local_slots, journal)

    def _recover(self, enabled: bool) -> None:
        """Replay each journal, verify the pages it names, compact it to the survivors."""
        count = len(self._files)
        candidates: dict[int, _Expected] = {}
        max_seq = 0
        for index, page_file in enumerate(self._files):
            live: dict[int, JournalRecord] = {}
            if enabled:
                live, seen = replay(page_file.journal.path, page_file.journal.layout)
                max_seq = max(max_seq, seen)
            for local, record in live.items():
                if record.tag != NO_TAG:
                    candidates[local * count + index] = _Expected(record.tag, record.seq, record.checksum)
        slots = as_slots(sorted(candidates))
        bad = set(self._transfer_read(slots, [None] * len(slots), [candidates[int(s)] for s in slots])) if len(slots) else set()
        by_tag: dict[int, int] = {}
        for slot in (int(s) for s in slots):
            if slot in bad:
                continue
            # Two slots claiming one tag cannot come from this tier; keep the newer write.
            other = by_tag.get(candidates[slot].tag)
            if other is None or candidates[other].seq < candidates[slot].seq:
                by_tag[candidates[slot].tag] = slot
        keep = sorted(by_tag.values())
        if bad:
            self._checksum_failures += len(bad)
            logger.warning("tier %s: %d journaled pages failed verification at open and were dropped", self.name, len(bad))
        if keep:
            self._slots.mark_allocated(keep)
        for slot in keep:
            expected = candidates[slot]
            self._state[slot] = _WRITTEN
            self._tag[slot] = expected.tag
            self._seq[slot] = expected.seq
            self._checksum[slot] = expected.checksum
        self._next_seq = max_seq + 1
        for index, page_file in enumerate(self._files):
            page_file.journal.rewrite(self._live_records(index))
        self._recovered = {int(self._tag[s]): s for s in keep}

    def recovered_pages(self) -> dict[int, int]:
        """``{tag: slot}`` of the pages found again at open (empty for a fresh tier)."""
        return dict(self._recovered)

    def _live_records(self, file_index: int) -> list[JournalRecord]:
        count = len(self._files)
        slots = np.nonzero(self._state == _WRITTEN)[0]
        slots = slots[slots % count == file_index]
        return [
            JournalRecord(RecordKind.PUT, int(s) // count, int(self._tag[s]), int(self._seq[s]), int(self._checksum[s]))
            for s in slots
        ]

    # --- allocation --------------------------------------------------------------------------


    def free(self, slots: Sequence[int] | Slots) -> None:
        """Free ``slots``. In memory only, so callers may hold their own locks.

        Their journal records are retired lazily (``DEL`` records ride along with the next
        append, or a background flush once many are pending, or :meth:`close`). A freed page
        whose ``DEL`` did not reach the journal before a crash may therefore be found again
        after the restart, with its correct bytes; a slot that was rewritten never is.
        """
        ids = as_slots(slots)
        with self._lock:
            self._slots.check_allocated(ids)
            self._retire_locked(ids[self._state[ids] != _UNWRITTEN])
            self._state[ids] = _UNWRITTEN
            self._tag[ids] = NO_TAG
            self._slots.free(ids)
            flush = len(self._pending_dels) >= _DEL_FLUSH_THRESHOLD and not self._flush_queued
            self._flush_queued |= flush
        if flush:
            self._pool.submit(self._flush_retired)

    def _retire_locked(self, slots: Slots) -> None:
        self._pending_dels += [(int(s), int(self._tag[s]), int(self._seq[s]), 0) for s in slots]

    def _flush_retired(self) -> None:
        with self._lock:
            self._flush_queued = False
        try:
            self._journal(RecordKind.DEL, [])
        except OSError as exc:
            self._count_io_error()
            logger.warning("tier %s: could not retire freed slots in the journal: %s", self.name, exc)

    # --- writes ------------------------------------------------------------------------------

    def write(self, slot: int, page: torch.Tensor, tag: int = NO_TAG) -> None:
        self.write_batch([slot], [page], [tag])

    def write_batch(
        self, slots: Sequence[int] | Slots, pages: PageBatch, tags: Sequence[int] | None = None
    ) -> None:
        """Write and checksum ``pages`` into ``slots``, then journal them under ``tags``.

        All or nothing for the caller: on TierIOError no page of the batch is journaled and
        the slots hold nothing readable (reads raise NotFound until rewritten).
        """
        ids = as_slots(slots)
        batch = check_batch(ids, pages, self.page_bytes)
        tag_list = [NO_TAG] * len(ids) if tags is None else [int(t) for t in tags]
        if len(tag_list) != len(ids):
            raise InvalidArgument(f"{len(tag_list)} tags given for {len(ids)} slots")
        for tag in tag_list:
            if not (tag == NO_TAG or 0 <= tag <= _INT64_MAX):
                raise InvalidArgument(f"tag {tag} is outside [0, 2**63)")
        if len(ids) == 0:
            return
        with self._lock:
            self._slots.check_allocated(ids)
            if len(np.unique(ids)) != len(ids):
                raise InvalidArgument(f"slots {ids.tolist()} repeat a slot")
            # Until the journal says otherwise these slots hold nothing readable. What they held
            # is retired; even before that reaches the journal, its header no longer matches.
            self._retire_locked(ids[self._state[ids] != _UNWRITTEN])
            self._state[ids] = _UNWRITTEN
            first_seq = self._next_seq
            self._next_seq += len(ids)
        seqs = list(range(first_seq, first_seq + len(ids)))
        host_pages = [p if p.device.type == "cpu" else p.cpu() for p in batch]
        sums = self._transfer_write(ids, host_pages, tag_list, seqs)
        records = [(int(s), t, q, c) for s, t, q, c in zip(ids, tag_list, seqs, sums)]

        def commit() -> None:
            with self._lock:
                self._tag[ids] = tag_list
                self._seq[ids] = seqs
                self._checksum[ids] = sums
                self._state[ids] = _WRITTEN

        try:
            self._journal(RecordKind.PUT, records, commit)
        except OSError as exc:
            self._count_io_error()
            raise TierIOError(f"tier {self.name}: journal append failed: {exc.strerror or exc}") from None

    def _journal(
        self,
        kind: RecordKind,
        records: Sequence[tuple[int, int, int, int]],
        then: Callable[[], None] | None = None,
    ) -> None:
        """Append ``(slot, tag, seq, checksum)`` records of ``kind``, preceded by the pending
        ``DEL`` records, to their files' journals; then run ``then``.

        Everything happens under ``_journal_lock``, so a compaction (which snapshots the live
        pages under the same lock) sees either neither or both of an append and what ``then``
        commits. A journal grown past its bound is compacted here.
        """
        count = len(self._files)
        with self._journal_lock:
            with self._lock:
                retired, self._pending_dels = self._pending_dels, []
            per_file: list[list[JournalRecord]] = [[] for _ in self._files]
            for record_kind, batch in ((RecordKind.DEL, retired), (kind, records)):
                for slot, tag, seq, checksum in batch:
                    per_file[slot % count].append(JournalRecord(record_kind, slot // count, tag, seq, checksum))
            try:
                for index, file_records in enumerate(per_file):
                    if file_records:
                        self._files[index].journal.append(file_records)
            except OSError:
                with self._lock:  # retry the retirements with the next append
                    self._pending_dels = retired + self._pending_dels
                raise
            if then is not None:
                then()
            with self._lock:
                live = int(np.count_nonzero(self._state == _WRITTEN))
            for index, page_file in enumerate(self._files):
                if page_file.journal.records > 4 * live // count + self._compact_after:
                    with self._lock:
                        snapshot = self._live_records(index)
                    page_file.journal.rewrite(snapshot)
                    logger.info("tier %s: compacted %s to %d records", self.name, page_file.journal.path, len(snapshot))

    def _transfer_write(
        self, ids: Slots, pages: Sequence[torch.Tensor], tags: list[int], seqs: list[int]
    ) -> list[int]:
        sums = [0] * len(ids)

        def run(chunk: _Chunk) -> None:
            page_file = self._files[chunk.file]
            buffers: list[Buffer] = []
            arena = self._arena()
            used = 0
            for pos in chunk.positions:
                page = pages[pos]
                if self._zero_copy(page, page_file.direct):
                    data = page.numpy().data
                    sums[pos] = page_checksum(data)
                    tail = arena[used : used + self._tail_bytes]
                    used += self._tail_bytes
                    buffers += [data, tail.data]
                else:
                    slot_buf = arena[used : used + self.slot_bytes]
                    used += self.slot_bytes
                    copy_bytes(torch.from_numpy(slot_buf[: self.page_bytes]), page)
                    slot_buf[self.page_bytes :] = 0
                    sums[pos] = page_checksum(slot_buf[: self.page_bytes])
                    tail = slot_buf[self.page_bytes :]
                    buffers.append(slot_buf.data)
                tail[:] = 0
                tail[-SLOT_HEADER_BYTES:] = np.frombuffer(
                    encode_slot_header(self.page_bytes, tags[pos], seqs[pos], sums[pos]), dtype=np.uint8
                )
            expected = len(chunk.positions) * self.slot_bytes
            done = self._io.pwritev(page_file.fd, buffers, chunk.first * self.slot_bytes)
            if done != expected:
                raise OSError(errno.ENOSPC, f"short write ({done} of {expected} bytes)")

        touched = self._run_chunks(run, self._plan(ids))
        if self._group_commit:
            with self._lock:
                self._dirty |= touched
        elif self._fsync:
            try:
                for index in touched:
                    self._io.fdatasync(self._files[index].fd)
            except OSError as exc:
                self._count_io_error()
                raise TierIOError(f"tier {self.name}: fdatasync failed: {exc.strerror or exc}") from None
        return sums

    # --- reads -------------------------------------------------------------------------------

    def read(self, slot: int) -> torch.Tensor:
        out = torch.empty(self.page_bytes, dtype=torch.uint8)
        self.read_batch_into([slot], [out])
        return out

    def read_into(self, slot: int, out: torch.Tensor) -> None:
        self.read_batch_into([slot], [out])

    def read_batch_into(self, slots: Sequence[int] | Slots, out: PageBatch) -> None:
        """Read and verify pages into ``out``. Pages that fail their checksum are counted and
        reported together as PagesCorrupt after the rest were read; their ``out`` entries then
        hold unspecified bytes that must not be used."""
        ids = as_slots(slots)
        check_batch(ids, out, self.page_bytes)
        with self._lock:
            self._slots.check_allocated(ids)
            states = self._state[ids]
            if (states == _UNWRITTEN).any():
                raise NotFound(f"slots {ids[states == _UNWRITTEN].tolist()} of {self.name} were never written")
            expected = [
                _Expected(int(self._tag[s]), int(self._seq[s]), int(self._checksum[s])) for s in ids
            ]
        already = [int(s) for s in ids[states == _CORRUPT]]
        readable = np.nonzero(states == _WRITTEN)[0]
        targets = [out[int(i)] for i in readable]
        bad = self._transfer_read(ids[readable], targets, [expected[int(i)] for i in readable])
        for device in {t.device for t in targets if t.is_cuda}:
            torch.cuda.synchronize(device)  # staged host-to-device copies have landed
        if bad:
            self._mark_corrupt(as_slots(bad))
        if bad or already:
            raise PagesCorrupt(f"tier {self.name}: slots {sorted(bad + already)} failed their checksum", bad + already)

    def _mark_corrupt(self, slots: Slots) -> None:
        with self._lock:
            fresh = slots[self._state[slots] == _WRITTEN]
            self._state[fresh] = _CORRUPT
            self._checksum_failures += len(fresh)
            self._retire_locked(fresh)
        logger.error("tier %s: pages in slots %s failed their checksum; dropped", self.name, fresh.tolist())

    def _transfer_read(
        self, ids: Slots, outs: Sequence[torch.Tensor | None], expected: Sequence[_Expected]
    ) -> list[int]:
        """Read ``ids`` into ``outs`` (None: verify only); the slots that failed verification."""
        bad: list[int] = []
        bad_lock = threading.Lock()

        def run(chunk: _Chunk) -> None:
            page_file = self._files[chunk.file]
            arena = self._arena()
            buffers: list[Buffer] = []
            views: list[tuple[memoryview, npt.NDArray[np.uint8], bool]] = []
            used = 0
            for pos in chunk.positions:
                target = outs[pos]
                if target is not None and self._zero_copy(target, page_file.direct):
                    data = target.numpy().data
                    tail = arena[used : used + self._tail_bytes]
                    used += self._tail_bytes
                    buffers += [data, tail.data]
                    views.append((data, tail, False))
                else:
                    slot_buf = arena[used : used + self.slot_bytes]
                    used += self.slot_bytes
                    buffers.append(slot_buf.data)
                    views.append((slot_buf[: self.page_bytes].data, slot_buf[self.page_bytes :], True))
            done = self._io.preadv(page_file.fd, buffers, chunk.first * self.slot_bytes)
            failed = []
            for k, (pos, (data, tail, staged)) in enumerate(zip(chunk.positions, views)):
                want = expected[pos]
                header = decode_slot_header(tail[-SLOT_HEADER_BYTES:].tobytes()) if done >= (k + 1) * self.slot_bytes else None
                if (
                    header is None
                    or header.page_bytes != self.page_bytes
                    or (header.tag, header.seq, header.checksum) != (want.tag, want.seq, want.checksum)
                    or page_checksum(data) != want.checksum
                ):
                    failed.append(int(ids[pos]))
                    continue
                target = outs[pos]
                if staged and target is not None:
                    copy_bytes(target, torch.frombuffer(data, dtype=torch.uint8))
            if failed:
                with bad_lock:
                    bad.extend(failed)

        self._run_chunks(run, self._plan(ids))
        return sorted(bad)

    # --- chunked parallel I/O ----------------------------------------------------------------

    def _zero_copy(self, page: torch.Tensor, direct: bool) -> bool:
        """Can ``page``'s own memory be an iovec? (host, contiguous, aligned for O_DIRECT)"""
        if page.device.type != "cpu" or not page.is_contiguous():
            return False
        return not direct or (page.data_ptr() % ALIGN == 0 and self.page_bytes % ALIGN == 0)

    def _arena(self) -> npt.NDArray[np.uint8]:
        """This thread's aligned staging buffer, big enough for one chunk of whole slots."""
        arena: npt.NDArray[np.uint8] | None = getattr(self._local, "arena", None)
        if arena is None:
            arena = _aligned_array(self._pages_per_chunk * self.slot_bytes)
            self._local.arena = arena
        return arena

    def _plan(self, ids: Slots) -> list[_Chunk]:
        """Chunks of consecutive local slots per file. A batch is cut into about
        ``2 * io_threads`` equal chunks (so one chunk's checksums overlap another's transfer
        and the threads finish together), none longer than ``chunk_bytes``."""
        count = len(self._files)
        limit = min(self._pages_per_chunk, max(1, -(-len(ids) // (2 * self._io_threads))))
        order = sorted(range(len(ids)), key=lambda i: (int(ids[i]) % count, int(ids[i]) // count))
        chunks: list[_Chunk] = []
        for i in order:
            slot = int(ids[i])
            file, local = slot % count, slot // count
            last = chunks[-1] if chunks else None
            if (
                last is not None
                and last.file == file
                and last.first + len(last.positions) == local
                and len(last.positions) < limit
            ):
                last.positions.append(i)
            else:
                chunks.append(_Chunk(file, local, [i]))
        return chunks

    def _run_chunks(self, run: Callable[[_Chunk], None], chunks: list[_Chunk]) -> set[int]:
        """Run ``run`` over ``chunks`` on the I/O threads; the files touched.

        Waits for every chunk (their buffers are in use) before raising the first OSError as
        TierIOError.
        """
        if self._closed:
            raise TierError(f"tier {self.name} is closed")
        error: OSError | None = None
        if len(chunks) == 1:
            try:
                run(chunks[0])
            except OSError as exc:
                error = exc
        else:
            futures: list[Future[None]] = [self._pool.submit(run, c) for c in chunks]
            for future in futures:
                try:
                    future.result()
                except OSError as exc:
                    error = error or exc
        if error is not None:
            self._count_io_error()
            raise TierIOError(
                f"tier {self.name}: {errno.errorcode.get(error.errno or 0, 'I/O error')}: "
                f"{error.strerror or error}"
            ) from None
        return {c.file for c in chunks}

    def flush(self) -> None:
        """Make every page written so far, and its journal record, durable on the device."""
        with self._lock:
            dirty, self._dirty = self._dirty | set(range(len(self._files))), set()
        self._commit(dirty)

    def _commit(self, files: set[int]) -> None:
        """fdatasync the data of ``files`` first, then fsync their journals (group commit)."""
        try:
            for index in sorted(files):
                self._io.fdatasync(self._files[index].fd)
            for index in sorted(files):
                self._files[index].journal.sync()
        except OSError as exc:
            self._count_io_error()
            with self._lock:
                self._dirty |= files  # try again next time
            logger.warning("tier %s: group commit failed: %s", self.name, exc)

    def _commit_loop(self) -> None:
        while not self._stop.wait(self._commit_interval):
            with self._lock:
                dirty, self._dirty = self._dirty, set()
            if dirty:
                self._commit(dirty)

    def _count_io_error(self) -> None:
        with self._lock:
            self._io_errors += 1

    # --- lifecycle ---------------------------------------------------------------------------

    def files(self) -> Iterator[Path]:
        """The page files (for tools and tests)."""
        return (f.path for f in self._files)

    def slot_location(self, slot: int) -> tuple[Path, int]:
        """``(file, byte offset)`` of ``slot`` (for tools and corruption tests)."""
        count = len(self._files)
        return self._files[slot % count].path, (slot // count) * self.slot_bytes

    def stats(self) -> TierStats:
        with self._lock:
            return self._slot_stats(
                self.name, self.medium, self.page_bytes,
                checksum_failures=self._checksum_failures, io_errors=self._io_errors,
                io_mode=getattr(self, "io_mode", "closed"),
            )

    def close(self) -> None:
        """Wait for I/O in flight, close the journals and files (releasing their locks)."""
        if self._closed:
            return
        self._stop.set()
        if self._committer is not None:
            self._committer.join()
        self._pool.shutdown(wait=True)
        if self._files:
            self._flush_retired()
            if self._group_commit:
                self.flush()
        self._closed = True
        for page_file in self._files:
            page_file.journal.close()
            with contextlib.suppress(OSError):
                self._io.close(page_file.fd)
        self._files = []
