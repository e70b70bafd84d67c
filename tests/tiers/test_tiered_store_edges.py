"""Tiered store: what a move request reports when keys vanish under it, and use after close."""

from __future__ import annotations

import pytest

from kvcluster.errors import KVClusterError
from tests.tiers.conftest import random_pages
from tiers.host_tier import HostTier
from tiers.tiered_store import TieredStore

P = 4096


def _store(stores: list[TieredStore], top: int, bottom: int, **kw: object) -> TieredStore:
    store = TieredStore(
        [HostTier(top, P, name="top", pinned="never"), HostTier(bottom, P, name="bottom", pinned="never")],
        high_watermark=1.0, low_watermark=1.0, promote_on_hit=False, **kw,  # type: ignore[arg-type]
    )
    stores.append(store)
    return store


def test_a_key_discarded_during_a_prefetch_is_reported_missing_once(stores: list[TieredStore]) -> None:
    store = _store(stores, top=2, bottom=8, batch_pages=1)
    pages = random_pages(3, P, 1)
    for key in range(3):
        store.put(key, pages[key])
    store.demote([0, 1]).result(timeout=10)
    assert [store.location(key) for key in range(3)] == ["bottom"] * 3

    def discard_2_after_0(key: int, src: str, dst: str) -> None:
        if key == 0 and dst == "top":
            store.discard(2)

    store.add_move_listener(discard_2_after_0)
    result = store.prefetch([0, 1, 2]).result(timeout=10)
    assert result.moved == (0, 1)
    assert result.missing == (2,)


def test_a_read_after_close_raises_a_project_error(stores: list[TieredStore]) -> None:
    store = _store(stores, top=2, bottom=2)
    store.put(0, random_pages(1, P, 2)[0])
    store.close()
    with pytest.raises(KVClusterError, match="closed"):
        store.get(0)
