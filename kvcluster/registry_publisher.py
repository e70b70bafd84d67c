"""A node's side of the prefix registry: batched events, heartbeats, resync.

Events (blocks stored, removed, moved to another tier) are queued by the node under its own
lock and published here as numbered :class:`EventBatch` es after that lock is released, so no
registry round trip ever runs inside the node's critical section.

A maintenance thread renews the heartbeat every ``heartbeat_interval_s`` with the node's load.
When the registry was unreachable (events may have been lost) or answers that it does not
know the node (it restarted empty, or purged the node), the publisher registers a new epoch,
which fences off everything the old one published, and re-announces every block the node
holds, so routing recovers within one heartbeat period. Entries are also re-announced every
``entry_ttl_s / 2`` so that live entries never expire.

Publishing is a group commit: a call that flushes returns once its own events are published,
but only one flush per node publishes at a time (one batch in flight), and it carries
everything queued until it began. Concurrent stores on a busy node therefore share round
trips (and Redis Lua calls) instead of each paying one, and batches reach the registry in
sequence order.

No batch carries more than ``max_batch_ops`` registry operations (checkpoint keys, counted as
the registry counts them): a flush with more queued (a re-announce of a node holding a million
blocks) sends consecutive batches one after another, splitting an event that is larger than
the limit by itself into runs of consecutive positions. Each batch is applied atomically on
its own; if one fails, the rest are not sent and the publisher resyncs (a new epoch fences
the batches that did get through, and the re-announce replaces them).

A call that need not wait (a pull's import: the request that caused it is sent to the
importing node directly) asks for :meth:`publish_soon`: its events go out on the publisher's
own thread, as the next group commit, and the call returns as soon as they are queued.

Registry failures never propagate to the data path: they are counted, logged once per outage,
and repaired by the next successful resync.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from kvcluster.errors import RegistryDataError, RoutingError
from routing.config import RegistryConfig
from routing.registry import (
    BlockEvent,
    EventBatch,
    NodeLoad,
    PrefixRegistry,
    PublishStatus,
    checkpoint_count,
    split_event,
)

logger = logging.getLogger(__name__)


class RegistryPublisher:
    def __init__(
        self,
        node_id: str,
        registry: PrefixRegistry,
        config: RegistryConfig,
        *,
        load: Callable[[], NodeLoad],
        announce_all: Callable[[], list[BlockEvent]],
        clock: Callable[[], float],
    ) -> None:
        self._node_id = node_id
        self._registry = registry
        self._config = config
        self._load = load
        self._announce_all = announce_all
        self._clock = clock
        self._stride = registry.index_stride
        self._lock = threading.Lock()  # guards the queue, epoch, seq and the outage flag
        self._publish_lock = threading.Lock()  # one batch in flight at a time
        self._pending: list[BlockEvent] = []
        # Events ever queued, and how many of them a publish has carried: a flush waits until
        # the second passes the first as it was when the flush began.
        self._queued = 0
        self._carried = 0
        self.epoch = 0
        self._seq = 0
        self._needs_resync = True
        self._outage_logged = False
        self._last_announce = clock()
        self.errors = 0
        self._on_error: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # publish_soon's flushes: one thread, so they queue behind each other in order
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kvpublish-{node_id}")

    def set_error_hook(self, hook: Callable[[], None] | None) -> None:
        self._on_error = hook

    # --- registration ------------------------------------------------------------------------

    def register(self) -> bool:
        """Start a new epoch and re-announce everything; False if the registry is down."""
        try:
            epoch = self._registry.register_node(self._node_id, previous_epoch=self.epoch)
        except RoutingError as exc:  # unreachable, or an error reply (OOM, MISCONF): retry next tick
            self._failed(exc)
            return False
        with self._lock:
            self.epoch = epoch
            self._seq = 0
            self._pending.clear()
            self._carried = self._queued  # what was queued belongs to the fenced epoch
            self._needs_resync = False
        self._pending_extend(self._announce_all())
        self._last_announce = self._clock()
        return self.flush()

    # --- events ------------------------------------------------------------------------------

    def add(self, event: BlockEvent) -> None:
        with self._lock:
            self._pending.append(event)
            self._queued += 1

    def _pending_extend(self, events: list[BlockEvent]) -> None:
        with self._lock:
            self._pending.extend(events)
            self._queued += len(events)

    def flush(self) -> bool:
        """Publish the events queued so far; return once they are published, by this call or
        by a concurrent one that carried them, in one or more consecutive batches of at most
        ``max_batch_ops`` operations each. False (events dropped, resync scheduled) when the
        registry cannot be reached, fenced this epoch or lost earlier batches of it."""
        with self._lock:
            if self._needs_resync or not self.epoch:
                return not self._needs_resync
            wanted = self._queued
            if self._carried >= wanted:
                return True
        with self._publish_lock:
            with self._lock:
                if self._needs_resync:
                    return False
                if self._carried >= wanted:
                    return True  # a batch published while this call waited carried them
                events, self._pending = self._pending, []
                carried = self._queued
                epoch = self.epoch
            for chunk in _chunks(events, self._stride, self._config.max_batch_ops):
                with self._lock:
                    if self._needs_resync:
                        return False  # a heartbeat failed meanwhile: the resync re-announces
                    if self.epoch != epoch:
                        # Re-registered meanwhile (which counted these events as carried): its
                        # re-announce, published next, supersedes the rest of this flush.
                        break
                    self._seq += 1
                    batch = EventBatch(self._node_id, epoch, self._seq, chunk)
                try:
                    result = self._registry.publish(batch)
                except RoutingError as exc:  # unreachable, fenced, or an error reply (OOM, MISCONF)
                    self._failed(exc)
                    return False
                if result.status not in (PublishStatus.APPLIED, PublishStatus.DUPLICATE):
                    # The registry lost this epoch's earlier batches (restarted empty or from an
                    # older snapshot): nothing would fill the gap, so register and re-announce.
                    self._failed(RegistryDataError(f"batch {batch.seq} was {result.status.value}"))
                    return False
            with self._lock:
                # max: a re-registration meanwhile may have moved it past this flush
                self._carried = max(self._carried, carried)
        self._recovered()
        return True

    def publish_soon(self) -> Future[bool]:
        """Publish the events queued so far on the publisher's thread, without waiting; the
        future holds what :meth:`flush` returned there. After :meth:`stop` (a call that was
        still running during shutdown) they are published here, before this returns."""
        try:
            return self._background.submit(self.flush)
        except RuntimeError:  # the executor is shut down
            done: Future[bool] = Future()
            done.set_result(self.flush())
            return done

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        if self._on_error is not None:
            self._on_error()
        with self._lock:
            self._needs_resync = True
            self._pending.clear()
            self._carried = self._queued
        if not self._outage_logged:
            logger.warning("node %s: registry unavailable (%s); will resync", self._node_id, exc)
            self._outage_logged = True

    def _recovered(self) -> None:
        if self._outage_logged:
            logger.warning("node %s: registry reachable again", self._node_id)
            self._outage_logged = False

    # --- maintenance -------------------------------------------------------------------------

    def tick(self) -> None:
        """One maintenance step: heartbeat, resync if needed, periodic re-announce, flush."""
        if self._needs_resync or not self.epoch:
            self.register()
            return
        try:
            known = self._registry.heartbeat(self._node_id, self.epoch, self._load())
        except RoutingError as exc:
            self._failed(exc)
            return
        self._recovered()
        if not known:
            logger.warning("node %s: the registry lost this node; re-registering", self._node_id)
            self.register()
            return
        if self._clock() - self._last_announce > self._config.entry_ttl_s / 2:
            self._pending_extend(self._announce_all())
            self._last_announce = self._clock()
        self.flush()

    def start(self, maintenance: Callable[[], None]) -> None:
        """Run ``maintenance()`` then :meth:`tick` every heartbeat interval on a daemon thread."""

        def loop() -> None:
            while not self._stop.wait(self._config.heartbeat_interval_s):
                try:
                    maintenance()
                    self.tick()
                except Exception:  # the maintenance thread must survive any one bad tick
                    logger.exception("node %s: maintenance tick failed", self._node_id)

        self._thread = threading.Thread(target=loop, name=f"kvnode-{self._node_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._background.shutdown(wait=True)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _chunks(events: Sequence[BlockEvent], stride: int, max_ops: int) -> Iterator[tuple[BlockEvent, ...]]:
    """``events`` in order, cut into runs of at most ``max_ops`` checkpoint operations (an
    event over the limit by itself is split into consecutive pieces first). Events without a
    checkpoint cost the registry nothing and ride along with their neighbours. Yields nothing
    for no events."""
    chunk: list[BlockEvent] = []
    ops = 0
    for event in events:
        cost = checkpoint_count(event, stride)
        pieces = [(event, cost)] if cost <= max_ops else [
            (piece, checkpoint_count(piece, stride)) for piece in split_event(event, stride, max_ops)
        ]
        for piece, cost in pieces:
            if chunk and ops + cost > max_ops:
                yield tuple(chunk)
                chunk, ops = [], 0
            chunk.append(piece)
            ops += cost
    if chunk:
        yield tuple(chunk)
