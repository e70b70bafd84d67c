"""The node of the prefix index's compressed radix tree, and the byte encoding it stores.

Token ids and block ids are stored as ``bytes`` of native int64 (8 bytes per id):

- an edge ``key`` holds the run of tokens the node adds to its parent's prefix, so matching an
  edge is one ``bytes.startswith`` (a ``memcmp``), never a Python loop per token;
- ``path_blocks`` holds the block ids covering *every* token from the root to the node's end,
  so a match's blocks are one slice of one node, whatever the depth.

Which blocks a node owns (holds one reference on)::

    tokens      0 ........ 15 | 16 ...... 31 | 32 .... 47      block_size 16
    parent P    [0, 20)  -> blocks at index 0, 1             (path_blocks = [a0, a1])
    child  C    [20, 40) -> blocks at index 1, 2             (path_blocks = [a0, b1, b2])

A node covering tokens ``[start, end)`` owns ``path_blocks[start // bs : ceil(end / bs)]``.
Block index 1 straddles the edge boundary at 20, so both P and C hold a reference on the block
they use there. They may use *different* blocks (``a1`` and ``b1``): ``b1`` was written by the
sequence that created C, so its rows 0..3 hold the same K/V as ``a1``'s (the prefix is the
same) and rows 4..15 hold C's tokens, while ``a1``'s rows 4..15 may belong to another branch.
A match that ends inside C therefore takes index 1 from C's path, one that ends at 20 from P's.

Nodes are plain slotted objects; the index owns them and keeps every invariant (see
``PrefixIndex.check_invariants``). Not thread-safe.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import TYPE_CHECKING, cast

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from kvcluster.core.reuse_model import ReuseRecord

#: Bytes per token id and per block id in keys and paths (native int64).
ID_BYTES = 8

#: The ``reuse_value`` of a node no use has ranked yet (below any rank a use gives).
UNRANKED = -math.inf


#: The children of every leaf: one shared, read-only empty mapping, so a leaf costs no dict
#: (and the garbage collector one object less per leaf). Code that adds a child replaces it
#: with a real dict; writing into it raises TypeError instead of corrupting other leaves.
LEAF_CHILDREN = cast("dict[bytes, RadixNode]", MappingProxyType({}))


def ids_from_bytes(raw: bytes) -> npt.NDArray[np.int64]:
    """A read-only int64 view of ``raw`` (no copy)."""
    return np.frombuffer(raw, dtype=np.int64)


class RadixNode:
    """One edge of the tree and the node it ends in.

    ``key``: the edge's tokens (bytes, int64; empty only for a namespace's root).
    ``start``/``end``: the token positions ``[start, end)`` the edge covers.
    ``children``: first token of the child's edge (8 bytes) -> child (``LEAF_CHILDREN`` for a
    leaf: replace it, never write into it).
    ``path_blocks``: block ids (bytes, int64) covering tokens ``[0, end)``, never mutated.
    ``node_id``: unique within the index, never reused (matches name their node by it).
    ``last_access``/``freq``: recency (clock seconds) and use count, read by the policies.
    ``pin_count``: pins covering this node; a pinned node is never evicted.
    ``terminal``: an inserted sequence ends exactly here (what ``remove`` forgets).
    ``reuse_value``/``reuse_owner``: for the ``reuse`` policy, the node's priority (never
    lowered by a use) and the record of the last request that stored or touched it on a store.
    """

    __slots__ = (
        "children",
        "end",
        "freq",
        "key",
        "last_access",
        "namespace",
        "node_id",
        "parent",
        "path_blocks",
        "pin_count",
        "reuse_owner",
        "reuse_value",
        "start",
        "terminal",
    )

    def __init__(
        self,
        key: bytes,
        start: int,
        parent: RadixNode | None,
        path_blocks: bytes,
        namespace: str,
        node_id: int,
        now: float,
    ) -> None:
        self.key = key
        self.start = start
        self.end = start + len(key) // ID_BYTES
        self.parent = parent
        self.children: dict[bytes, RadixNode] = LEAF_CHILDREN
        self.path_blocks = path_blocks
        self.namespace = namespace
        self.node_id = node_id
        self.last_access = now
        self.freq = 0
        self.pin_count = 0
        self.terminal = True
        self.reuse_value = UNRANKED
        self.reuse_owner: ReuseRecord | None = None

    def __repr__(self) -> str:
        return (
            f"RadixNode(id={self.node_id}, ns={self.namespace!r}, tokens=[{self.start}, "
            f"{self.end}), children={len(self.children)}, pins={self.pin_count})"
        )

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def own_block_range(self, block_size: int) -> tuple[int, int]:
        """Indices ``[lo, hi)`` into ``path_blocks`` of the blocks this node holds a reference on."""
        return self.start // block_size, -(-self.end // block_size)

    def own_blocks(self, block_size: int) -> npt.NDArray[np.int64]:
        lo, hi = self.own_block_range(block_size)
        return ids_from_bytes(self.path_blocks[lo * ID_BYTES : hi * ID_BYTES])

    def tokens(self) -> npt.NDArray[np.int64]:
        """The edge's tokens as a read-only array."""
        return ids_from_bytes(self.key)

    def path_tokens(self) -> bytes:
        """All tokens from the root to this node's end (bytes, int64)."""
        keys = []
        node: RadixNode | None = self
        while node is not None:
            keys.append(node.key)
            node = node.parent
        return b"".join(reversed(keys))


def path_of(node: RadixNode) -> list[RadixNode]:
    """``node`` and its ancestors below the root, deepest first."""
    out = []
    current: RadixNode | None = node
    while current is not None and current.parent is not None:
        out.append(current)
        current = current.parent
    return out
