"""Fault injection as a wrapper: a :class:`FileIO` whose chosen calls fail like a bad disk.

Used by tests and chaos runs; never by the default configuration. Example::

    faulty = FaultInjectingFileIO(PosixFileIO())
    tier = NvmeTier(paths, num_slots, page_bytes, file_io=faulty)
    faulty.fail("pwritev", errno.ENOSPC, times=1)   # the next data write fails with ENOSPC

Thread-safe: the armed faults are guarded by a lock.
"""

from __future__ import annotations

import errno as errno_codes
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kvcluster.errors import InvalidArgument
from tiers.nvme_file_io import Buffer, FileIO

_OPERATIONS = ("open", "pwritev", "preadv", "append", "fsync", "fdatasync")


@dataclass(slots=True)
class _Fault:
    errno: int
    times: int  # how many more calls fail; -1 means until cleared
    skip: int  # calls that pass before the first failure


class FaultInjectingFileIO:
    """Wraps ``inner``; :meth:`fail` arms a fault for one operation, :meth:`clear` disarms."""

    def __init__(self, inner: FileIO) -> None:
        self._inner = inner
        self._faults: dict[str, _Fault] = {}
        self._lock = threading.Lock()
        self.injected = 0  # how many calls were failed

    def fail(self, operation: str, error: int = errno_codes.EIO, times: int = 1, after: int = 0) -> None:
        """Make the next ``times`` calls of ``operation`` (after ``after`` good ones) raise."""
        if operation not in _OPERATIONS:
            raise InvalidArgument(f"unknown operation {operation!r}; allowed: {', '.join(_OPERATIONS)}")
        if times == 0 or times < -1 or after < 0:
            raise InvalidArgument(f"times must be positive or -1 and after >= 0, got {times}, {after}")
        with self._lock:
            self._faults[operation] = _Fault(error, times, after)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _check(self, operation: str) -> None:
        with self._lock:
            fault = self._faults.get(operation)
            if fault is None:
                return
            if fault.skip > 0:
                fault.skip -= 1
                return
            if fault.times > 0:
                fault.times -= 1
                if fault.times == 0:
                    del self._faults[operation]
            self.injected += 1
            code = fault.errno
        raise OSError(code, f"{os.strerror(code)} (injected into {operation})")

    def open(self, path: str, flags: int, mode: int) -> int:
        self._check("open")
        return self._inner.open(path, flags, mode)

    def close(self, fd: int) -> None:
        self._inner.close(fd)

    def pwritev(self, fd: int, buffers: Sequence[Buffer], offset: int) -> int:
        self._check("pwritev")
        return self._inner.pwritev(fd, buffers, offset)

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int) -> int:
        self._check("preadv")
        return self._inner.preadv(fd, buffers, offset)

    def append(self, fd: int, data: bytes) -> int:
        self._check("append")
        return self._inner.append(fd, data)

    def fsync(self, fd: int) -> None:
        self._check("fsync")
        self._inner.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._check("fdatasync")
        self._inner.fdatasync(fd)
