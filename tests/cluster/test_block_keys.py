"""The node's table of registry keys per pool block, and the events built from it."""

from __future__ import annotations

import numpy as np
import pytest

from kvcluster.block_keys import BlockKey, BlockKeyTable, coalesced_events
from kvcluster.errors import InvalidArgument
from routing.block_hashing import BLOCK_HASH_DTYPE
from routing.registry import EventKind, Tier


def _hashes(*seeds: int) -> np.ndarray:
    return np.array([bytes([seed]) * 16 for seed in seeds], dtype=BLOCK_HASH_DTYPE)


def test_assign_pop_and_held_round_trip() -> None:
    table = BlockKeyTable(8)
    table.assign(np.array([5, 2, 7]), _hashes(1, 2, 3), np.array([0, 1, 2]), b"F" * 16, "tenant")
    assert len(table) == 3
    assert table.held() == [  # block id order
        BlockKey(b"\x02" * 16, b"F" * 16, 1, "tenant"),
        BlockKey(b"\x01" * 16, b"F" * 16, 0, "tenant"),
        BlockKey(b"\x03" * 16, b"F" * 16, 2, "tenant"),
    ]
    assert table.pop(2) == BlockKey(b"\x02" * 16, b"F" * 16, 1, "tenant")
    assert table.pop(2) is None  # forgotten
    assert table.pop(0) is None  # never keyed (a partial block)
    assert len(table) == 2
    assert [key.position for key in table.held()] == [0, 2]


def test_rekeying_a_block_counts_it_once_and_keeps_the_latest_chain() -> None:
    table = BlockKeyTable(4)
    table.assign(np.array([1, 2]), _hashes(1, 2), np.array([0, 1]), b"A" * 16, "x")
    table.assign(np.array([2, 3]), _hashes(9, 8), np.array([3, 4]), b"B" * 16, "y")
    assert len(table) == 3
    assert table.pop(2) == BlockKey(b"\x09" * 16, b"B" * 16, 3, "y")
    assert table.pop(1) == BlockKey(b"\x01" * 16, b"A" * 16, 0, "x")


def test_holds_follows_assign_rekey_and_pop() -> None:
    table = BlockKeyTable(4)
    table.assign(np.array([1, 2]), _hashes(1, 2), np.array([0, 1]), b"A" * 16, "x")
    assert table.holds(b"\x01" * 16) and table.holds(b"\x02" * 16)
    assert not table.holds(b"\x09" * 16)
    table.assign(np.array([2]), _hashes(9), np.array([3]), b"B" * 16, "y")  # block 2 re-keyed
    assert not table.holds(b"\x02" * 16) and table.holds(b"\x09" * 16)
    # The same hash keyed on a second block: popping the first keeps the second's.
    table.assign(np.array([3]), _hashes(1), np.array([0]), b"A" * 16, "x")
    table.pop(1)
    assert table.holds(b"\x01" * 16)
    table.pop(3)
    table.pop(2)
    assert not table.holds(b"\x01" * 16) and not table.holds(b"\x09" * 16)


def test_two_chains_with_two_blocks_each_keep_their_chain_tuples() -> None:
    # A (family, namespace) pair must be stored as one object per block, not unpacked into a row.
    table = BlockKeyTable(4)
    table.assign(np.array([0, 1]), _hashes(1, 2), np.array([0, 1]), b"A" * 16, "ns")
    assert {(key.family, key.namespace) for key in table.held()} == {(b"A" * 16, "ns")}


def test_assign_rejects_mismatched_columns_and_changes_nothing() -> None:
    table = BlockKeyTable(4)
    with pytest.raises(InvalidArgument, match="one shape"):
        table.assign(np.array([0, 1]), _hashes(1), np.array([0, 1]), b"A" * 16, "ns")
    assert len(table) == 0 and table.held() == []


def test_coalesced_events_split_runs_by_tier_chain_and_depth() -> None:
    family = b"\x00" * 16  # a chain's family is its first block's key
    keys = [BlockKey(bytes([i]) * 16, family, i, "ns") for i in range(4)]
    keys.append(BlockKey(b"\x09" * 16, b"\x09" * 16, 0, "ns"))
    events = coalesced_events(keys, ["cpu", "cpu", None, None, None])
    assert [(event.kind, event.tier, event.first_position, len(event.hashes)) for event in events] == [
        (EventKind.MOVED, Tier.CPU, 0, 2),
        (EventKind.REMOVED, None, 2, 2),
        (EventKind.REMOVED, None, 0, 1),
    ]
