"""The system calls of the NVMe tier behind a small interface, so faults can be injected.

:class:`PosixFileIO` is the real thing (``os.pwritev``/``os.preadv``, which release the GIL).
:class:`~tiers.fault_injection.FaultInjectingFileIO` wraps any :class:`FileIO` and makes chosen
calls fail with ENOSPC or EIO, the way a full or failing disk would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

Buffer = bytes | bytearray | memoryview


class FileIO(Protocol):
    """Thin wrappers of the POSIX calls the NVMe tier makes. Raise OSError like ``os.*``."""

    def open(self, path: str, flags: int, mode: int) -> int: ...
    def close(self, fd: int) -> None: ...
    def pwritev(self, fd: int, buffers: Sequence[Buffer], offset: int) -> int: ...
    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int) -> int: ...
    def append(self, fd: int, data: bytes) -> int: ...
    def fsync(self, fd: int) -> None: ...
    def fdatasync(self, fd: int) -> None: ...


class PosixFileIO:
    """:class:`FileIO` over the ``os`` module."""

    def open(self, path: str, flags: int, mode: int) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwritev(self, fd: int, buffers: Sequence[Buffer], offset: int) -> int:
        return os.pwritev(fd, buffers, offset)

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int) -> int:
        return os.preadv(fd, buffers, offset)  # type: ignore[arg-type]

    def append(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)


def fsync_dir(directory: Path) -> None:
    """fsync ``directory``, so that a rename or a new file in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
