"""routing.registry.split_event / checkpoint_count: an event cut into bounded pieces flattens
to exactly its own operations (what the publisher relies on to bound its batches)."""

from __future__ import annotations

import numpy as np
import pytest

from kvcluster.errors import InvalidArgument
from routing.block_hashing import BlockHasher
from routing.registry import (
    BlockEvent,
    Tier,
    checkpoint_count,
    flatten_events,
    split_event,
    validate_event,
)

CHAIN = BlockHasher("xxh3_128", 4).hash_chain(np.arange(4 * 64, dtype=np.int32))


def test_the_diagram_case_stride_4_max_2() -> None:
    event = BlockEvent.stored(CHAIN[:14], Tier.GPU)  # checkpoints at depths 3, 7, 11
    pieces = split_event(event, 4, 2)
    assert [(p.first_position, p.hashes.size) for p in pieces] == [(0, 8), (8, 6)]
    assert [checkpoint_count(p, 4) for p in pieces] == [2, 1]
    assert all(p.family == CHAIN[0].tobytes() for p in pieces)


@pytest.mark.parametrize("stride", [1, 3, 4, 16])
@pytest.mark.parametrize("first_position", [0, 1, 5, 15])
@pytest.mark.parametrize("size", [0, 1, 7, 16, 33])
@pytest.mark.parametrize("max_ops", [1, 2, 5])
def test_pieces_are_bounded_consecutive_and_flatten_to_the_event(
    stride: int, first_position: int, size: int, max_ops: int
) -> None:
    hashes = CHAIN[first_position : first_position + size]
    event = BlockEvent.removed(hashes, first_position=first_position, family=CHAIN[0].tobytes())
    expected = len(range(*checkpoint_slice_bounds(first_position, size, stride)))
    assert checkpoint_count(event, stride) == expected
    pieces = split_event(event, stride, max_ops)
    assert flatten_events(pieces, stride) == flatten_events([event], stride)
    assert all(checkpoint_count(p, stride) <= max_ops for p in pieces)
    # runs of consecutive positions, covering the event exactly, none empty unless it was
    positions = [p.first_position for p in pieces]
    sizes = [p.hashes.size for p in pieces]
    assert positions[0] == first_position and sum(sizes) == size
    assert positions == [first_position + sum(sizes[:i]) for i in range(len(pieces))]
    assert len(pieces) == max(1, -(-expected // max_ops))
    for piece in pieces:
        validate_event(piece)
        assert (piece.kind, piece.tier, piece.namespace) == (event.kind, event.tier, event.namespace)


def checkpoint_slice_bounds(first_position: int, size: int, stride: int) -> tuple[int, int, int]:
    """Brute force: the indices whose depth is a checkpoint."""
    indices = [i for i in range(size) if (first_position + i + 1) % stride == 0]
    return (indices[0], size, stride) if indices else (0, 0, 1)


def test_max_ops_must_be_positive() -> None:
    with pytest.raises(InvalidArgument, match="max_ops"):
        split_event(BlockEvent.stored(CHAIN[:4], Tier.GPU), 1, 0)
