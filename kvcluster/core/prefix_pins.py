"""Pin records of the prefix index and the pin budget arithmetic.

A pin keeps a cached prefix (a system prompt) from eviction: it covers the node the prefix
ends in and every ancestor. The pinned blocks are the distinct blocks those nodes own; they
may not exceed the budget (a fraction of the pool). A new pin that would exceed it displaces
pins of strictly lower priority, lowest priority and then oldest first, when that suffices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from kvcluster.core.radix_node import RadixNode, path_of


@dataclass(slots=True)
class PinRecord:
    """One pin: made with ``key`` (the tokens' bytes) in ``namespace``; covers ``tokens``
    tokens, ending at node ``end``; ``seq`` orders pins by age."""

    namespace: str
    key: bytes
    priority: int
    seq: int
    end: RadixNode
    tokens: int


def pinned_blocks_with(ends: Iterable[RadixNode], block_size: int) -> int:
    """Distinct blocks pinned if exactly the pins ending at ``ends`` were held."""
    nodes: dict[int, RadixNode] = {}
    for end in ends:
        for node in path_of(end):
            nodes[node.node_id] = node
    if not nodes:
        return 0
    return int(np.unique(np.concatenate([n.own_blocks(block_size) for n in nodes.values()])).size)


def pins_to_displace(
    pins: Iterable[PinRecord],
    end: RadixNode,
    priority: int,
    replacing: PinRecord | None,
    budget: int,
    block_size: int,
) -> list[PinRecord] | None:
    """The pins to release so that a new pin ending at ``end`` fits ``budget`` blocks: [] if it
    fits as is, None if releasing every pin of lower priority is still not enough.
    ``replacing`` (an earlier pin of the same tokens) is released in any case."""
    kept = [p for p in pins if p is not replacing]
    if pinned_blocks_with([p.end for p in kept] + [end], block_size) <= budget:
        return []
    displaced: list[PinRecord] = []
    for record in sorted((p for p in kept if p.priority < priority), key=lambda p: (p.priority, p.seq)):
        displaced.append(record)
        kept.remove(record)
        if pinned_blocks_with([p.end for p in kept] + [end], block_size) <= budget:
            return displaced
    return None
