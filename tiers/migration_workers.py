"""The threads that run the tiered store's moves: a priority queue and a few workers.

Jobs are plain callables; lower priority numbers run first (prefetches before hit promotions
before watermark demotions), FIFO within a priority. A job that raises a KVClusterError (an
I/O error, a corrupt page) is logged: the store has already recorded its effect. Any other
exception is a bug: it is logged, kept, and re-raised from :meth:`MigrationWorkers.wait_idle`
so that it cannot go unnoticed, while the workers keep serving.

Thread-safe. The workers' lock is a leaf: it is never held while a job runs, so a job may
enqueue more jobs and callers may enqueue while holding their own locks.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from kvcluster.errors import InvalidArgument, KVClusterError

logger = logging.getLogger(__name__)

T = TypeVar("T")
_STOP_PRIORITY = 1 << 30


class MigrationWorkers:
    """``threads`` daemon threads draining one priority queue of jobs."""

    def __init__(self, threads: int, name: str = "tier-migrate") -> None:
        if threads <= 0:
            raise InvalidArgument(f"the number of migration threads must be positive, got {threads}")
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], None] | None]] = queue.PriorityQueue()
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._outstanding = 0
        self._error: BaseException | None = None
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    def enqueue(self, priority: int, job: Callable[[], None]) -> None:
        """Queue ``job``; raises InvalidArgument once closed."""
        with self._lock:
            if self._closed:
                raise InvalidArgument("the migration workers are closed")
            self._outstanding += 1
            self._queue.put((priority, next(self._sequence), job))

    def submit(self, priority: int, job: Callable[[], T]) -> Future[T]:
        """Queue ``job``; its result (or exception) goes to the returned Future."""
        future: Future[T] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(job())
            except BaseException as exc:
                future.set_exception(exc)
                if not isinstance(exc, KVClusterError):
                    raise

        self.enqueue(priority, run)
        return future

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running; False on timeout. Re-raises a job's bug."""
        with self._idle:
            done = self._idle.wait_for(lambda: self._outstanding == 0, timeout)
            error = self._error
        if error is not None:
            raise RuntimeError("a tier migration worker failed") from error
        return done

    def forget_error(self) -> BaseException | None:
        """The bug a job raised (it is then no longer re-raised), or None."""
        with self._lock:
            error, self._error = self._error, None
            return error

    def close(self) -> None:
        """Let queued jobs finish, then stop and join the threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._idle.wait_for(lambda: self._outstanding == 0)
        for _ in self._threads:
            self._queue.put((_STOP_PRIORITY, next(self._sequence), None))
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except KVClusterError as exc:
                logger.warning("tier migration failed: %s", exc)
            except BaseException as exc:  # a bug: keep it for wait_idle, keep serving
                logger.exception("tier migration worker hit an unexpected error")
                with self._lock:
                    self._error = self._error or exc
            finally:
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()
