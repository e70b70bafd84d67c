"""The invariants of a :class:`~kvcluster.core.prefix_index.PrefixIndex`, checked from scratch.

Used by ``PrefixIndex.check_invariants`` (tests, debugging): it recomputes the reference
counts, pin counts and eviction order from the trees and compares them with what the index
maintains incrementally. O(nodes + blocks). Reads the index's internals by design.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvcluster.core.radix_node import ID_BYTES, RadixNode

if TYPE_CHECKING:
    from kvcluster.core.prefix_index import PrefixIndex


def check_index_invariants(index: PrefixIndex, *, deep: bool = True) -> None:
    """Assert every invariant of ``index`` (O(nodes + blocks); used by the tests)."""
    bs = index._bs
    tree = np.zeros_like(index._tree_refs)
    pin_refs = np.zeros_like(index._pin_refs)
    seen: dict[int, RadixNode] = {}
    pin_counts: dict[int, int] = {}
    for record in index._pins.values():
        n: RadixNode | None = record.end
        assert record.end.end == record.tokens, "a pin does not end at its node's end"
        while n is not None and n.parent is not None:
            pin_counts[n.node_id] = pin_counts.get(n.node_id, 0) + 1
            n = n.parent
    for namespace, root in index._roots.items():
        assert root.parent is None and root.key == b"" and root.end == 0 and root.namespace == namespace
        stack = [root]
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                assert child.parent is node, f"{child} has the wrong parent"
                assert child.key and len(child.key) % ID_BYTES == 0, f"{child} has a bad key"
                assert child.key[:ID_BYTES] == first, f"{child} is filed under the wrong first token"
                assert child.start == node.end, f"{child} does not start where its parent ends"
                assert child.end == child.start + len(child.key) // ID_BYTES
                assert child.namespace == namespace
                assert len(child.path_blocks) == -(-child.end // bs) * ID_BYTES, f"{child} path length"
                shared = (child.start // bs) * ID_BYTES
                assert child.path_blocks[:shared] == node.path_blocks[:shared], f"{child} path differs from parent's"
                assert child.pin_count == pin_counts.get(child.node_id, 0), f"{child} pin count"
                own = child.own_blocks(bs)
                assert np.unique(own).size == own.size, f"{child} holds a block twice"
                np.add.at(tree, own, 1)
                if child.pin_count:
                    np.add.at(pin_refs, own, 1)
                seen[child.node_id] = child
                stack.append(child)
    assert len(seen) == index._nodes, f"node count {index._nodes} but {len(seen)} nodes in the trees"
    for record in index._pins.values():
        assert seen.get(record.end.node_id) is record.end, f"pin of {record.tokens} tokens ends in a dead node"
    assert np.array_equal(tree, index._tree_refs), "tree reference counts drifted"
    assert np.array_equal(pin_refs, index._pin_refs), "pin reference counts drifted"
    assert index._blocks_used == int(np.count_nonzero(tree)), "blocks_used drifted"
    assert index._pinned_blocks == int(np.count_nonzero(pin_refs)), "pinned_blocks drifted"
    assert index._pinned_blocks <= index._pin_budget or not index._pins, "pins exceed the budget"
    held = index.held_refs()
    rc = index._pool.ref_counts_view()
    assert np.all(rc >= held), "the index holds more references than the pool counts"
    policy = index._policy
    tracked = [n for n in seen.values() if not n.pin_count]
    assert len(policy) == len(tracked), f"policy tracks {len(policy)} nodes, expected {len(tracked)}"
    if deep:
        order = policy.order()
        assert len(order) == len(tracked) and set(map(id, order)) == set(map(id, tracked))
        position = {id(n): i for i, n in enumerate(order)}
        for n in order:
            parent = n.parent
            if parent is not None and parent.parent is not None and not parent.pin_count:
                assert position[id(parent)] > position[id(n)], f"{parent} is ahead of its child {n}"
        if policy.uses_reuse:
            for n in seen.values():
                parent = n.parent
                if parent is not None and parent.parent is not None:
                    assert parent.reuse_value >= n.reuse_value, f"{parent} ranks below its child {n}"
            assert len(policy._ranked) == len(tracked), "the rank heap holds untracked nodes"
            for n in tracked:
                assert policy._ranked[n] == (n.reuse_value, -n.end, n.node_id), f"{n}'s rank entry is stale"
        if policy.uses_recency:
            recency = list(policy.iter_recency())
            times = [n.last_access for n in recency]
            assert times == sorted(times), "recency order is not sorted by last use"
