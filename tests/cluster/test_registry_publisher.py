"""The node's registry publisher: group commit of concurrent flushes, and failures."""

from __future__ import annotations

import threading
import time

import numpy as np

from kvcluster.errors import RegistryUnavailable
from kvcluster.registry_publisher import RegistryPublisher
from routing.block_hashing import BLOCK_HASH_DTYPE
from routing.config import RegistryConfig
from routing.registry import BlockEvent, EventBatch, NodeLoad, PublishResult, PublishStatus, Tier


class SlowRegistry:
    """Records every batch; with ``hold``, the first publish waits until the test lets it go."""

    index_stride = 1

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[EventBatch] = []
        self.hold = hold
        self.first_started = threading.Event()
        self.release_first = threading.Event()
        self.fail = False

    def register_node(self, node_id: str, previous_epoch: int = 0) -> int:
        return previous_epoch + 1

    def publish(self, batch: EventBatch) -> PublishResult:
        if self.fail:
            raise RegistryUnavailable("registry down")
        if self.hold and not self.first_started.is_set():
            self.first_started.set()
            assert self.release_first.wait(10)
        self.batches.append(batch)
        return PublishResult(PublishStatus.APPLIED, batch.seq, 1)


def event(i: int) -> BlockEvent:
    key = np.array([i.to_bytes(16, "big")], dtype=BLOCK_HASH_DTYPE)
    return BlockEvent.stored(key, Tier.GPU)


def publisher(registry: SlowRegistry) -> RegistryPublisher:
    made = RegistryPublisher("n0", registry, RegistryConfig(), load=lambda: NodeLoad(),  # type: ignore[arg-type]
                             announce_all=list, clock=time.monotonic)
    assert made.register()  # announces nothing: no publish
    return made


def published(registry: SlowRegistry) -> list[bytes]:
    return [e.hashes[0].tobytes() for batch in registry.batches for e in batch.events]


def test_concurrent_flushes_share_batches_and_return_only_once_published() -> None:
    registry = SlowRegistry(hold=True)
    pub = publisher(registry)
    returned: list[int] = []

    def store(i: int) -> None:
        pub.add(event(i))
        assert pub.flush()
        # Returning means this call's event is in a batch the registry has taken.
        assert i.to_bytes(16, "big") in published(registry)
        returned.append(i)

    first = threading.Thread(target=store, args=(0,))
    first.start()
    assert registry.first_started.wait(10)  # batch 1 (event 0) is in flight
    others = [threading.Thread(target=store, args=(i,)) for i in range(1, 20)]
    for thread in others:
        thread.start()
    time.sleep(0.2)
    assert returned == []  # nobody returns while their events wait behind the first batch
    registry.release_first.set()
    for thread in [first, *others]:
        thread.join(10)
    assert sorted(returned) == list(range(20))
    assert sorted(published(registry)) == [i.to_bytes(16, "big") for i in range(20)]  # each once
    assert [batch.seq for batch in registry.batches] == list(range(1, len(registry.batches) + 1))
    assert len(registry.batches) <= 3  # 20 flushes, one round trip in flight at a time


def test_a_flush_with_nothing_queued_sends_nothing() -> None:
    registry = SlowRegistry()
    pub = publisher(registry)
    assert pub.flush() and registry.batches == []


def test_a_failed_publish_drops_the_batch_and_waits_for_a_resync() -> None:
    registry = SlowRegistry()
    pub = publisher(registry)
    registry.fail = True
    pub.add(event(1))
    assert not pub.flush() and pub.errors == 1
    registry.fail = False
    pub.add(event(2))
    assert not pub.flush()  # events since the outage wait for the re-announce of a new epoch
    assert pub.register() and pub.epoch == 2
    pub.add(event(3))
    assert pub.flush()
    assert published(registry) == [(3).to_bytes(16, "big")]


def test_publish_soon_returns_before_the_batch_is_published_then_publishes_it() -> None:
    registry = SlowRegistry(hold=True)
    pub = publisher(registry)
    pub.add(event(1))
    pending = pub.publish_soon()
    assert registry.first_started.wait(10)  # the publisher's thread is inside publish
    assert not pending.done() and registry.batches == []
    pub.add(event(2))
    later = pub.publish_soon()  # queued behind the first, in order
    registry.release_first.set()
    assert pending.result(timeout=10) and later.result(timeout=10)
    assert published(registry) == [(1).to_bytes(16, "big"), (2).to_bytes(16, "big")]
    assert [batch.seq for batch in registry.batches] == [1, 2]


def test_stop_waits_for_the_background_publishes() -> None:
    registry = SlowRegistry(hold=True)
    pub = publisher(registry)
    pub.add(event(7))
    pub.publish_soon()
    assert registry.first_started.wait(10)
    threading.Timer(0.05, registry.release_first.set).start()
    pub.stop()
    assert published(registry) == [(7).to_bytes(16, "big")]


def test_publish_soon_after_stop_publishes_before_returning() -> None:
    registry = SlowRegistry()
    pub = publisher(registry)
    pub.stop()
    pub.add(event(9))
    assert pub.publish_soon().result(timeout=0)
    assert published(registry) == [(9).to_bytes(16, "big")]
