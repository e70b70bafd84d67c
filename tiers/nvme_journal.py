"""On-disk formats of the NVMe tier: the slot header and the append-only journal beside a file.

Slot layout (``slot_bytes = round_up(page_bytes + 64, 4096)``, so every slot starts 4096-aligned
and an ``O_DIRECT`` transfer of whole slots is legal)::

    offset 0                    page_bytes                 slot_bytes - 64     slot_bytes
    | page data ............... | zero padding ............ | header (64 bytes) |

    header = magic "KVPAGE01" | page_bytes u64 | tag i64 | seq u64 | xxh3_64(page) u64
             | reserved u64 | xxh3_64(previous 48 bytes) u64 | 8 zero bytes

Journal: a 64-byte file header naming the layout, then fixed 48-byte records, each with its
own checksum::

    record = magic u32 | kind u8 | 3 pad | slot i64 | tag i64 | seq u64 | xxh3_64(page) u64
             | xxh3_64(previous 40 bytes) u64

A ``PUT`` is appended only after its page (data and header) reached the file, so a crash at any
point leaves a journal whose every intact ``PUT`` names a page that was completely written. A
``DEL`` names the exact ``(slot, seq)`` it retires. Replay stops at the first record that is
short or fails its checksum (a torn append). Recovery still re-reads each page and checks its
header and checksum, so a page whose bytes were later damaged is never resurrected.

Concurrency: :class:`Journal` serialises its appends and rewrites with its own lock; the
:class:`~tiers.nvme_tier.NvmeTier` that owns it orders appends against compaction itself.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import xxhash

from tiers.nvme_file_io import FileIO, fsync_dir

logger = logging.getLogger(__name__)

ALIGN = 4096
SLOT_HEADER_BYTES = 64
_SLOT_HEADER = struct.Struct("<8sQqQQQ")  # 48 bytes, then its checksum (8) and 8 zero bytes
_SLOT_MAGIC = b"KVPAGE01"

_FILE_HEADER = struct.Struct("<8sIQQQII")  # magic, version, page_bytes, slot_bytes, slots, file i/n
_FILE_HEADER_BYTES = 64
_JOURNAL_MAGIC = b"KVJRNL01"
_JOURNAL_VERSION = 1

_RECORD = struct.Struct("<IB3xqqQQ")  # 40 bytes, then its checksum
RECORD_BYTES = _RECORD.size + 8
_RECORD_MAGIC = 0x4B564A52


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def slot_bytes_for(page_bytes: int) -> int:
    return round_up(page_bytes + SLOT_HEADER_BYTES, ALIGN)


def page_checksum(data: object) -> int:
    """xxh3_64 of a page (any buffer). Releases the GIL for large pages."""
    return xxhash.xxh3_64_intdigest(data)  # type: ignore[arg-type]


def encode_slot_header(page_bytes: int, tag: int, seq: int, checksum: int) -> bytes:
    head = _SLOT_HEADER.pack(_SLOT_MAGIC, page_bytes, tag, seq, checksum, 0)
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + bytes(8)


@dataclass(slots=True, frozen=True)
class SlotHeader:
    page_bytes: int
    tag: int
    seq: int
    checksum: int


def decode_slot_header(raw: bytes | memoryview) -> SlotHeader | None:
    """The header, or ``None`` if it is not one (never written, torn or damaged)."""
    raw = bytes(raw)
    if len(raw) != SLOT_HEADER_BYTES:
        return None
    head, (stored,) = raw[: _SLOT_HEADER.size], struct.unpack_from("<Q", raw, _SLOT_HEADER.size)
    if xxhash.xxh3_64_intdigest(head) != stored:
        return None
    magic, page_bytes, tag, seq, checksum, _ = _SLOT_HEADER.unpack(head)
    if magic != _SLOT_MAGIC:
        return None
    return SlotHeader(page_bytes, tag, seq, checksum)


class RecordKind(IntEnum):
    PUT = 1
    DEL = 2


@dataclass(slots=True, frozen=True)
class JournalRecord:
    kind: RecordKind
    slot: int  # local to the file
    tag: int
    seq: int
    checksum: int

    def encode(self) -> bytes:
        body = _RECORD.pack(_RECORD_MAGIC, self.kind, self.slot, self.tag, self.seq, self.checksum)
        return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


@dataclass(slots=True, frozen=True)
class JournalLayout:
    """What the file beside the journal holds; a mismatch means its pages are not ours."""

    page_bytes: int
    slot_bytes: int
    num_slots: int
    file_index: int
    file_count: int

    def encode(self) -> bytes:
        head = _FILE_HEADER.pack(
            _JOURNAL_MAGIC, _JOURNAL_VERSION, self.page_bytes, self.slot_bytes, self.num_slots,
            self.file_index, self.file_count,
        )
        body = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
        return body.ljust(_FILE_HEADER_BYTES, b"\0")


def _decode_layout(raw: bytes) -> JournalLayout | None:
    if len(raw) < _FILE_HEADER_BYTES:
        return None
    head = raw[: _FILE_HEADER.size]
    (stored,) = struct.unpack_from("<Q", raw, _FILE_HEADER.size)
    if xxhash.xxh3_64_intdigest(head) != stored:
        return None
    magic, version, page_bytes, slot_bytes, num_slots, index, count = _FILE_HEADER.unpack(head)
    if magic != _JOURNAL_MAGIC or version != _JOURNAL_VERSION:
        return None
    return JournalLayout(page_bytes, slot_bytes, num_slots, index, count)


def _decode_records(raw: bytes) -> Iterator[JournalRecord]:
    """Intact records in order; stops at the first torn or damaged one."""
    for start in range(0, len(raw) - RECORD_BYTES + 1, RECORD_BYTES):
        body = raw[start : start + _RECORD.size]
        (stored,) = struct.unpack_from("<Q", raw, start + _RECORD.size)
        if xxhash.xxh3_64_intdigest(body) != stored:
            return
        magic, kind, slot, tag, seq, checksum = _RECORD.unpack(body)
        if magic != _RECORD_MAGIC or kind not in (RecordKind.PUT, RecordKind.DEL):
            return
        yield JournalRecord(RecordKind(kind), slot, tag, seq, checksum)


def replay(path: Path, layout: JournalLayout) -> tuple[dict[int, JournalRecord], int]:
    """The live ``PUT`` per local slot after replaying ``path``, and the highest seq seen.

    A missing journal, or one written for another layout (page size changed), yields nothing:
    those pages cannot be ours. Records for slots beyond ``layout.num_slots`` are ignored.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}, 0
    found = _decode_layout(raw)
    if found is None or (found.page_bytes, found.slot_bytes) != (layout.page_bytes, layout.slot_bytes):
        logger.warning("journal %s is for another layout (%s); starting empty", path, found)
        return {}, 0
    live: dict[int, JournalRecord] = {}
    max_seq = 0
    count = 0
    for record in _decode_records(raw[_FILE_HEADER_BYTES:]):
        count += 1
        max_seq = max(max_seq, record.seq)
        if record.kind == RecordKind.PUT:
            live[record.slot] = record
        elif (current := live.get(record.slot)) is not None and current.seq == record.seq:
            del live[record.slot]
    torn = (len(raw) - _FILE_HEADER_BYTES) - count * RECORD_BYTES
    if torn:
        logger.warning("journal %s: ignored %d bytes after the last intact record", path, torn)
    return {s: r for s, r in live.items() if 0 <= s < layout.num_slots}, max_seq


class Journal:
    """Append-only log of one page file. Appends are atomic with respect to each other."""

    def __init__(self, path: Path, layout: JournalLayout, file_io: FileIO, fsync: bool) -> None:
        self.path = path
        self._layout = layout
        self._io = file_io
        self._fsync = fsync
        self._lock = threading.Lock()
        self._fd = -1
        self._records = 0
        self._size = 0  # bytes of intact journal; a failed append is cut back to this

    def rewrite(self, live: Iterable[JournalRecord]) -> None:
        """Atomically replace the journal by the layout header and ``live`` (compaction)."""
        with self._lock:
            self._rewrite_locked(live)

    def _rewrite_locked(self, live: Iterable[JournalRecord]) -> None:
        records = [r.encode() for r in live]
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = self._io.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._io.append(fd, self._layout.encode() + b"".join(records))
            self._io.fsync(fd)
        finally:
            self._io.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        if self._fd >= 0:
            self._io.close(self._fd)
        self._fd = self._io.open(str(self.path), os.O_WRONLY | os.O_APPEND, 0o600)
        self._records = len(records)
        self._size = _FILE_HEADER_BYTES + len(records) * RECORD_BYTES

    def append(self, records: Iterable[JournalRecord]) -> None:
        """Append ``records`` in one write (fsynced when configured). OSError propagates and
        a partial append is cut off again, so later records are not hidden behind it."""
        data = b"".join(r.encode() for r in records)
        if not data:
            return
        with self._lock:
            assert self._fd >= 0, "journal used before rewrite() opened it"
            try:
                written = self._io.append(self._fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, f"short journal append ({written} of {len(data)} bytes)")
                if self._fsync:
                    self._io.fsync(self._fd)
            except OSError:
                os.ftruncate(self._fd, self._size)
                raise
            self._records += len(data) // RECORD_BYTES
            self._size += len(data)

    def sync(self) -> None:
        """fsync the journal (group commit when appends do not fsync themselves)."""
        with self._lock:
            if self._fd >= 0:
                self._io.fsync(self._fd)

    @property
    def layout(self) -> JournalLayout:
        return self._layout

    @property
    def records(self) -> int:
        return self._records

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._io.close(self._fd)
                self._fd = -1
