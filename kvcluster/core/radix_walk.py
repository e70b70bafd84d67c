"""Walking the prefix index's radix tree over int64 bytes, and packing prompts for it.

Everything here works on ``bytes`` of native int64 ids (see :mod:`kvcluster.core.radix_node`):
an edge is matched with one ``bytes.startswith`` (``memcmp``) and the first differing token is
found by a few ``startswith`` calls (short edges) or one vectorised numpy comparison (long
ones), never by a Python loop over tokens. Batches of prompts are joined into one buffer with
one C call and walked with offsets, so a batch costs no per-prompt copies.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from operator import attrgetter, itemgetter
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from kvcluster.core.radix_node import ID_BYTES, UNRANKED, RadixNode
from kvcluster.core.token_input import TokenInput, as_block_table, as_token_array
from kvcluster.errors import InvalidArgument

try:  # the optional native walk (kvcluster/core/_radixwalk.c), built by installs with a compiler
    from kvcluster.core import _radixwalk as native_walk  # type: ignore[attr-defined]
except ImportError:  # the Python walks below compute the same results
    native_walk = None

Int64Array = npt.NDArray[np.int64]

BISECT_TOKENS = 64
INT64 = np.dtype(np.int64)
_DTYPE = attrgetter("dtype")
_NDIM = attrgetter("ndim")
_FIRST = itemgetter(0)
_SECOND = itemgetter(1)


def common_prefix(key: bytes, query: bytes, pos: int, end: int) -> int:
    """Bytes (a multiple of 8, at least 8) that ``key`` shares with ``query[pos:end]``.

    The caller knows the first token matches (it found the child by it). The second token is
    checked first: two prompts that share a first token by chance usually differ there.
    """
    limit = min(len(key), end - pos) // ID_BYTES
    if limit <= BISECT_TOKENS:
        if limit == 1 or not query.startswith(key[: 2 * ID_BYTES], pos, end):
            return ID_BYTES
        view = memoryview(query)
        low, high = 2, limit
        while low < high:
            mid = (low + high + 1) >> 1
            if key.startswith(view[pos : pos + mid * ID_BYTES]):
                low = mid
            else:
                high = mid - 1
        return low * ID_BYTES
    stored = np.frombuffer(key, dtype=np.int64, count=limit)
    given = np.frombuffer(query, dtype=np.int64, count=limit, offset=pos)
    differs = stored != given
    first = int(differs.argmax())
    return (first if differs[first] else limit) * ID_BYTES


Descend = Callable[[RadixNode, bytes, int, int], tuple[RadixNode, int]]
"""``descend(root, query, pos, end)``: the Python :func:`descend` or the native one."""
WalkBatch = Callable[[RadixNode, bytes, list[int], int], tuple[list[int], list[RadixNode | None], list[RadixNode], int]]
"""``walk_batch(root, buffer, bounds, shortest)``: the Python :func:`walk_batch` or the native one."""
InsertWalkResult = tuple[
    list[RadixNode], list[bytes], list[RadixNode], list[int], list[int],
    list[tuple[int, RadixNode]], list[RadixNode], int, int, int, int,
]
InsertWalk = Callable[..., InsertWalkResult]
"""The Python :func:`insert_walk` or the native one (same arguments and result)."""


def descend(root: RadixNode, query: bytes, pos: int = 0, end: int | None = None) -> tuple[RadixNode, int]:
    """Walk ``query[pos:end]`` (int64 bytes) down from ``root``.

    Returns the node the longest match ends in and the byte offset in ``query`` where the
    match ends. The node is either the one whose end the walk stopped at, or a child whose
    edge matched only partly (``start < match < end``); the root for a miss.
    """
    node = root
    if end is None:
        end = len(query)
    while pos < end:
        child = node.children.get(query[pos : pos + ID_BYTES])
        if child is None:
            return node, pos
        key = child.key
        if query.startswith(key, pos, end):
            pos += len(key)
            node = child
            continue
        return child, pos + common_prefix(key, query, pos, end)
    return node, pos


def walk_batch(
    root: RadixNode, buffer: bytes, bounds: list[int], shortest: int
) -> tuple[list[int], list[RadixNode | None], list[RadixNode], int]:
    """The Python form of ``_radixwalk.walk_batch``: where each match ends (its start for
    a miss), its node (None for a miss), the hit nodes in order, and the bytes matched."""
    positions: list[int] = []  # where each match ends (its start for a miss)
    nodes: list[RadixNode | None] = []
    add_position = positions.append
    add_node = nodes.append
    startswith = buffer.startswith
    start = 0
    for end in bounds[1:]:
        # _descend, inlined: this loop is the hot path of batched lookups.
        node = root
        pos = start
        while True:
            child = node.children.get(buffer[pos : pos + 8])  # ID_BYTES
            if child is None:
                break
            key = child.key
            if startswith(key, pos, end):
                pos += len(key)
                node = child
                if pos < end:
                    continue
                break
            pos += common_prefix(key, buffer, pos, end)
            node = child
            break
        if pos - start < shortest:
            add_position(start)
            add_node(None)
        else:
            add_position(pos)
            add_node(node)
        start = end
    hit_nodes = cast("list[RadixNode]", list(filter(None, nodes)))  # a node is never falsy
    hit_bytes = sum(positions) - sum(bounds) + bounds[-1]  # a miss adds 0
    return positions, nodes, hit_nodes, hit_bytes


def insert_walk(
    root: RadixNode,
    tokens: bytes,
    blocks: bytes,
    bounds: list[int],
    block_bounds: list[int],
    shortest: int,
    bs: int,
    next_id: int,
    now: float,
    namespace: str,
    node_type: type[RadixNode],
    leaf_children: dict[bytes, RadixNode],
    split: Callable[[RadixNode, int, int], RadixNode],
) -> InsertWalkResult:
    """The structural loop of a batch insert (``PrefixIndex._insert_items``).

    Item ``i`` is ``tokens[bounds[i]:bounds[i + 1]]`` (int64 bytes) with its block table
    ``blocks[block_bounds[i]:block_bounds[i + 1]]``; items shorter than ``shortest`` bytes are
    skipped. Each item walks the tree as the earlier items left it, splits the edge the walk
    stopped in (``split(node, depth, node_id)`` returns the new upper node, numbered
    ``node_id``), then either marks where a cached sequence ends or adds a new leaf (numbered
    from ``next_id``) adopting the item's blocks past the last whole block it shares.

    Returns ``(leaves, adopted, uppers, straddles, pinned_straddles, present, marked,
    new_bytes, splits, skipped, next_id)``: the new leaves in order and the blocks each adopts,
    the split-off upper nodes, the blocks straddling a split (and those of pinned nodes), the
    already cached items as ``(leaves before it, node)``, the nodes newly marked terminal, the
    new token bytes, the splits, the skipped items and the next free node id.
    ``_radixwalk.insert_walk`` is the same loop in C.
    """
    leaves: list[RadixNode] = []
    adopted: list[bytes] = []
    uppers: list[RadixNode] = []
    straddles: list[int] = []
    pinned_straddles: list[int] = []
    present: list[tuple[int, RadixNode]] = []
    marked: list[RadixNode] = []
    new_bytes = splits = skipped = 0
    startswith = tokens.startswith
    new_node = object.__new__
    add_leaf = leaves.append
    add_own = adopted.append
    for start, end, block_start, block_end in zip(bounds, bounds[1:], block_bounds, block_bounds[1:]):
        if end - start < shortest:
            skipped += 1
            continue
        # descend, inlined (no tuple per item: this loop is the hot path of inserts).
        node = root
        pos = start
        while True:
            first = tokens[pos : pos + 8]  # ID_BYTES
            child = node.children.get(first)
            if child is None:
                break
            key = child.key
            if startswith(key, pos, end):
                pos += len(key)
                node = child
                if pos < end:
                    continue
                break
            pos += common_prefix(key, tokens, pos, end)
            node = child
            first = tokens[pos : pos + 8]
            break
        depth = (pos - start) >> 3
        if depth < node.end:  # the walk stopped inside node's edge: split it there
            splits += 1
            parent = split(node, depth, next_id)
            next_id += 1
            uppers.append(parent)
            if depth % bs:
                block = block_at(node.path_blocks, depth // bs)
                straddles.append(block)
                if node.pin_count:
                    pinned_straddles.append(block)
        else:
            parent = node
        if pos == end:  # already cached: keep its blocks, mark where this sequence ends
            if not parent.terminal:
                parent.terminal = True
                marked.append(parent)
            present.append((len(leaves), parent))
            continue
        low = (depth // bs) * 8  # ID_BYTES
        own = blocks[block_start + low : block_end]
        # RadixNode(tokens[pos:end], depth, parent, path, namespace, next_id, now), spelled
        # out to skip the class call's own cost (about 5% of a batch insert).
        leaf = new_node(node_type)
        leaf.key = tokens[pos:end]
        leaf.start = depth
        leaf.end = (end - start) >> 3
        leaf.parent = parent
        leaf.children = leaf_children
        leaf.path_blocks = parent.path_blocks[:low] + own
        leaf.namespace = namespace
        leaf.node_id = next_id
        leaf.last_access = now
        leaf.freq = 0
        leaf.pin_count = 0
        leaf.terminal = True
        leaf.reuse_value = UNRANKED
        leaf.reuse_owner = None
        children = parent.children
        if children:
            children[first] = leaf
        else:  # a leaf's children are a shared read-only empty mapping (see RadixNode)
            parent.children = {first: leaf}
        next_id += 1
        add_leaf(leaf)
        add_own(own)
        new_bytes += end - pos
    return (leaves, adopted, uppers, straddles, pinned_straddles, present, marked,
            new_bytes, splits, skipped, next_id)


def plain_sizes(arrays: list[Any]) -> list[int] | None:
    """The lengths of ``arrays`` if every one is a non-empty 1-D int64 numpy array (the common
    case, checked with C loops over the batch, not a Python loop per entry), else None."""
    count = len(arrays)
    if (
        list(map(type, arrays)).count(np.ndarray) == count
        and list(map(_DTYPE, arrays)).count(INT64) == count
        and list(map(_NDIM, arrays)).count(1) == count
    ):
        sizes = list(map(len, arrays))
        if 0 not in sizes:
            return sizes
    return None


def token_arrays(prompts: Iterable[TokenInput], what: str) -> tuple[list[Int64Array], Int64Array]:
    """Each prompt as a non-empty 1-D int64 array (int64 arrays pass through untouched), and
    their lengths."""
    try:
        given = prompts if type(prompts) is list else list(prompts)
    except TypeError:
        raise InvalidArgument(f"{what}s must be an iterable of token sequences, got {prompts!r:.80}") from None
    sizes = plain_sizes(given)
    if sizes is not None:
        return cast(list[Int64Array], given), np.array(sizes, dtype=np.int64)
    arrays: list[Int64Array] = []
    for i, prompt in enumerate(given):
        if type(prompt) is np.ndarray and prompt.dtype is INT64 and prompt.ndim == 1 and prompt.size:
            arrays.append(cast(Int64Array, prompt))
        else:
            arrays.append(as_token_array(prompt, f"{what} {i}"))
    return arrays, sizes_of(arrays)


def sizes_of(arrays: list[Int64Array]) -> Int64Array:
    """The lengths of 1-D arrays, as an int64 array."""
    return np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))


def byte_bounds(sizes: Int64Array) -> list[int]:
    """Byte offsets of items of ``sizes`` ids laid back to back: 0, then each item's end."""
    bounds = np.empty(sizes.size + 1, dtype=np.int64)
    bounds[0] = 0
    np.cumsum(sizes * ID_BYTES, out=bounds[1:])
    return cast(list[int], bounds.tolist())


def validated_items(
    items: Iterable[tuple[TokenInput, Any]], block_size: int, num_blocks: int
) -> tuple[list[Int64Array], list[Int64Array], Int64Array]:
    """The token arrays, block tables and token counts of ``(tokens, block_ids)`` items, shapes
    checked.

    Token values and block ranges are left to one vectorised check over the whole batch;
    int64 arrays of the right length pass through untouched (checked with ``map`` over the
    batch; anything else is converted item by item).
    """
    try:
        given = items if type(items) is list else list(items)
    except TypeError:
        raise InvalidArgument(f"items must be an iterable of (tokens, block_ids) pairs, got {items!r:.80}") from None
    if given:
        try:
            pairs = list(map(len, given)).count(2) == len(given)
        except TypeError:
            pairs = False
        if pairs:
            arrays = list(map(_FIRST, given))
            tables = list(map(_SECOND, given))
            token_counts = plain_sizes(arrays)
            table_sizes = plain_sizes(tables) if token_counts is not None else None
            if token_counts is not None and table_sizes is not None:
                sizes = np.array(token_counts, dtype=np.int64)
                if np.array_equal(np.array(table_sizes, dtype=np.int64), -(-sizes // block_size)):
                    return arrays, tables, sizes
    arrays = []
    tables = []
    for i, item in enumerate(given):
        try:
            tokens, block_ids = item
        except (TypeError, ValueError):
            raise InvalidArgument(f"item {i} must be a (tokens, block_ids) pair, got {item!r:.80}") from None
        array = tokens
        if type(array) is not np.ndarray or array.dtype is not INT64 or array.ndim != 1 or not array.size:
            array = as_token_array(tokens, f"item {i}: tokens")
        needed = -(-array.size // block_size)
        table = block_ids
        if type(table) is not np.ndarray or table.dtype is not INT64 or table.ndim != 1 or table.size != needed:
            table = as_block_table(block_ids, needed, num_blocks, f"item {i}: block_ids")
        arrays.append(cast(Int64Array, array))
        tables.append(table)
    return arrays, tables, sizes_of(arrays)



def join_ids(arrays: list[Int64Array]) -> bytes:
    """The arrays' int64 bytes, concatenated (one C call when all are contiguous)."""
    buffers = cast(list[Any], arrays)
    try:
        return b"".join(buffers)
    except TypeError:  # a non-contiguous view: bytes.join needs simple buffers
        return b"".join([cast(Any, np.ascontiguousarray(a)) for a in buffers])


def packed_bounds(offsets: Any, total: int) -> tuple[list[int], Int64Array]:
    """Byte bounds and sizes of packed prompts, or :class:`InvalidArgument`."""
    try:
        raw = np.asarray(offsets)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"offsets must be a 1-D sequence of integers: {exc}") from None
    if raw.ndim != 1 or raw.size < 2 or raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.integer):
        raise InvalidArgument(f"offsets must be a 1-D integer sequence of at least 2 entries, got {offsets!r:.80}")
    points = raw.astype(np.int64)
    sizes = np.diff(points)
    if points[0] != 0 or points[-1] != total or np.any(sizes <= 0):
        raise InvalidArgument(
            f"offsets must start at 0, end at len(tokens) = {total} and strictly increase "
            "(no empty prompt)"
        )
    return (points * ID_BYTES).tolist(), sizes


def block_at(path_blocks: bytes, index: int) -> int:
    """Block id number ``index`` of a node's ``path_blocks``."""
    return int.from_bytes(path_blocks[index * ID_BYTES : (index + 1) * ID_BYTES], sys.byteorder, signed=True)


def shared_boundary_blocks(
    new_ids: Int64Array,
    held: npt.NDArray[np.bool_],
    adopted: list[bytes],
    leaves: list[RadixNode],
    uppers: list[RadixNode],
    tree_refs: npt.NDArray[np.int32],
    block_size: int,
) -> tuple[int, list[int]]:
    """Sort the adopted blocks the tree already holds into the legitimate ones and the rest.

    ``adopted[i]`` are the blocks new leaf ``leaves[i]`` adopts, ``new_ids`` all of them in
    order, ``held`` which of those the tree already references (``tree_refs``), ``uppers`` the
    nodes split off in the same batch. Legitimate: a new leaf's first block, when the leaf
    starts inside that block below an existing node that owns the very same block (the tree
    adopted it from this sequence or a fork before, and no other branch holds it): it is
    shared, not copied. Returns how many such blocks there are and the offending block ids.
    """
    starts = np.cumsum([0] + [len(chunk) // ID_BYTES for chunk in adopted])
    new_uppers = {id(n) for n in uppers}
    shared, bad = 0, []
    for position in np.flatnonzero(held).tolist():
        block = int(new_ids[position])
        item = int(np.searchsorted(starts, position, side="right")) - 1
        leaf = leaves[item]
        parent = leaf.parent
        ok = (
            parent is not None
            and position == starts[item]
            and leaf.start % block_size != 0
            and id(parent) not in new_uppers
            and boundary_holders(parent, leaf.start // block_size, block_size) == (block, int(tree_refs[block]))
        )
        if ok:
            shared += 1
        else:
            bad.append(block)
    return shared, bad


def boundary_holders(node: RadixNode, index: int, block_size: int) -> tuple[int, int]:
    """Block number ``index`` of ``node``'s path and how many nodes from ``node`` up own that
    same block (several when edge boundaries fall inside it)."""
    block = block_at(node.path_blocks, index)
    holders = 0
    current: RadixNode | None = node
    while current is not None and current.parent is not None and current.end > index * block_size:
        if block_at(current.path_blocks, index) == block:
            holders += 1
        current = current.parent
    return block, holders
