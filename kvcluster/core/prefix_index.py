"""The node-local prefix cache: a token-granular compressed radix tree over a block pool.

One tree per namespace (tenant / cache salt): a lookup walks only its own namespace's tree, so
neither a match nor a timing difference ever crosses namespaces; a namespace that does not
exist yet is a miss. Nodes own references (``pool.incref``) on the blocks holding their tokens'
K/V (see :mod:`kvcluster.core.radix_node` for which blocks, including a block straddling an
edge boundary, which each node covering part of it references).

Lookups
    The prompt is turned into bytes once; each edge is compared with one ``bytes.startswith``
    (``memcmp``) against the stored tokens, so a hit is *verified* token by token (there are no
    hashes in the tree, a collision cannot return another prompt's K/V) and a 32K-token prompt
    costs a few ``memcmp`` calls, not a Python loop per token. The match is token-granular: it
    may end inside an edge and inside a block. ``lookup_many`` and ``lookup_packed`` (prompts
    back to back, as a batched prefill lays them out) amortise the per-call overhead; ``peek``
    answers without counting or touching anything.

Leases
    ``acquire(match)`` takes references on the match's blocks so nothing evicts them while a
    reader uses them. It walks the matched tokens again first and refuses (:class:`LeaseError`)
    unless the same blocks still hold them (the prefix may have been evicted since the lookup).

Inserts
    ``insert(tokens, block_ids)`` adopts the blocks of an already computed sequence (e.g. an
    engine sequence's block table). Tokens already in the tree keep their blocks; the rest
    becomes a new leaf (below a node, or below an edge split at the first differing token).
    Validation first, all or nothing (``insert_many`` and ``insert_packed`` too, for the
    whole batch). ``remove(tokens)`` forgets an inserted sequence and prunes the nodes it
    leaves empty; ``clear_namespace`` drops a namespace.

Eviction (see :mod:`kvcluster.core.eviction` for the orders)
    Only leaves whose every block is referenced by the tree alone are evicted: never a block a
    sequence or a :class:`Lease` holds, never a pinned prefix. Evicting a leaf may expose its
    parent as the next leaf. ``evict(n)`` is the engine's reclaimer; ``evict_expired()`` enforces
    the TTL; a memory budget in bytes is enforced after inserts. ``on_evict`` is told about each
    freed block before its reference is dropped so the node can spill the page to a lower tier.

Pins
    ``pin(tokens, priority=...)`` keeps a hot prefix (a system prompt) from eviction. Pinned
    blocks may not exceed ``pin_budget_fraction`` of the pool; a pin that would exceed it
    displaces pins of strictly lower priority if that makes room, else raises
    :class:`PinBudgetExceeded` and changes nothing (see :mod:`kvcluster.core.prefix_pins`).

Concurrency: not thread-safe. The owner (the node engine) serialises every call.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt

from kvcluster.core.block_pool import BlockPool
from kvcluster.core.eviction import EVICTION_REASONS, EvictionPolicy, EvictionReason, make_policy
from kvcluster.core.prefix_invariants import check_index_invariants
from kvcluster.core.prefix_pins import PinRecord, PinsMixin
from kvcluster.core.prefix_records import (
    CacheStats,
    EvictedBlock,
    InsertBatchResult,
    InsertResult,
    Lease,
    MatchBatch,
    PrefixMatch,
)
from kvcluster.core.radix_node import ID_BYTES, LEAF_CHILDREN, RadixNode, ids_from_bytes
from kvcluster.core.radix_walk import (
    Descend,
    InsertWalk,
    WalkBatch,
    byte_bounds,
    descend,
    insert_walk,
    join_ids,
    native_walk,
    packed_bounds,
    shared_boundary_blocks,
    token_arrays,
    validated_items,
    walk_batch,
)
from kvcluster.core.reuse_model import StoredRequests, check_generated_tokens
from kvcluster.core.token_input import (
    TokenInput,
    as_block_table,
    as_token_array,
    check_keep_tokens,
    check_token_range,
)
from kvcluster.errors import InvalidArgument, LeaseError

logger = logging.getLogger(__name__)

Int64Array = npt.NDArray[np.int64]
#: Batch inserts of at least this many items pause the cyclic garbage collector.
GC_PAUSE_ITEMS = 256
# The insert walks (radix_walk.py, _radixwalk.c) create leaves without the class call and set
# each of these slots themselves.
assert len(RadixNode.__slots__) == 14, "RadixNode gained a slot: set it in both insert walks too"
EvictionListener = Callable[[EvictedBlock], None]


class PrefixIndex(PinsMixin):
    """Longest-prefix index of the K/V blocks cached in one block pool.

    ``block_size`` must be the pool's pages' block size. ``policy`` is an
    :class:`EvictionPolicy` or a policy name. ``clock`` (default: the policy's, normally
    ``time.monotonic``) stamps uses for recency and TTL. ``bytes_per_block`` lets stats report
    bytes and is required for ``memory_budget_bytes``. ``vocab_size``, when given, bounds token
    ids. ``on_evict`` is called for each block eviction frees, before its reference is dropped;
    if it raises, that node stays cached and the exception propagates.
    """

    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        *,
        policy: EvictionPolicy | str = "lru",
        clock: Callable[[], float] | None = None,
        bytes_per_block: int | None = None,
        pin_budget_fraction: float = 0.25,
        min_prefix_tokens: int = 0,
        memory_budget_bytes: int | None = None,
        on_evict: EvictionListener | None = None,
        vocab_size: int | None = None,
        native: bool = True,
    ) -> None:
        if not isinstance(pool, BlockPool):
            raise InvalidArgument(f"pool must be a BlockPool, got {type(pool).__name__}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise InvalidArgument(f"block_size must be a positive integer, got {block_size!r}")
        if isinstance(policy, str):
            policy = make_policy(policy)
        if not isinstance(policy, EvictionPolicy):
            raise InvalidArgument(f"policy must be an EvictionPolicy or a name, got {policy!r}")
        if not 0.0 <= pin_budget_fraction <= 1.0:
            raise InvalidArgument(f"pin_budget_fraction must be in [0, 1], got {pin_budget_fraction!r}")
        if isinstance(min_prefix_tokens, bool) or not isinstance(min_prefix_tokens, int) or min_prefix_tokens < 0:
            raise InvalidArgument(f"min_prefix_tokens must be an integer >= 0, got {min_prefix_tokens!r}")
        if bytes_per_block is not None and (not isinstance(bytes_per_block, int) or bytes_per_block <= 0):
            raise InvalidArgument(f"bytes_per_block must be a positive integer, got {bytes_per_block!r}")
        if memory_budget_bytes is not None:
            if not isinstance(memory_budget_bytes, int) or memory_budget_bytes <= 0:
                raise InvalidArgument(f"memory_budget_bytes must be a positive integer, got {memory_budget_bytes!r}")
            if bytes_per_block is None:
                raise InvalidArgument("memory_budget_bytes needs bytes_per_block to count bytes")
        if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size <= 0):
            raise InvalidArgument(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self._pool = pool
        self._bs = block_size
        self._policy = policy
        policy.attach(pool.num_blocks, block_size)
        # reuse: who stored what, to credit continuations of requests no longer cached
        self._stored_requests = (
            StoredRequests(block_size * ID_BYTES, pool.num_blocks) if policy.uses_reuse else None
        )
        self._clock = clock if clock is not None else policy.clock
        self._bytes_per_block = bytes_per_block
        self._pin_budget = int(pin_budget_fraction * pool.num_blocks)
        self._min_prefix = min_prefix_tokens
        self._memory_budget = memory_budget_bytes
        self._on_evict = on_evict
        self._vocab = vocab_size
        # The native walks when built (``native=False`` forces the Python ones; tests run both).
        use_native = native and native_walk is not None
        self._descend: Descend = native_walk.descend if use_native else descend
        self._walk_batch: WalkBatch = native_walk.walk_batch if use_native else walk_batch
        self._insert_walk: InsertWalk = native_walk.insert_walk if use_native else insert_walk

        self._roots: dict[str, RadixNode] = {}
        self._nodes = 0  # non-root nodes in every tree
        self._next_node_id = 1
        # Per block: references held by tree nodes, and pinned nodes covering it.
        self._tree_refs = np.zeros(pool.num_blocks, dtype=np.int32)
        self._pin_refs = np.zeros(pool.num_blocks, dtype=np.int32)
        self._scratch = np.empty(pool.num_blocks, dtype=np.int64)  # for _distinct
        self._blocks_used = 0
        self._pinned_blocks = 0
        self._leases: dict[int, Lease] = {}
        self._next_lease_id = 1
        self._pins: dict[tuple[str, bytes], PinRecord] = {}
        self._next_pin_seq = 0

        self._hits = 0
        self._misses = 0
        self._drops = 0  # nodes ever dropped: a match found since then is still cached
        self._hit_tokens = 0
        self._lookup_tokens = 0
        self._inserts = 0
        self._inserted_tokens = 0
        self._evicted_blocks: dict[str, int] = dict.fromkeys(EVICTION_REASONS, 0)
        self._evicted_nodes: dict[str, int] = dict.fromkeys(EVICTION_REASONS, 0)

    # --- properties ----------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    @property
    def pool(self) -> BlockPool:
        return self._pool

    @property
    def pin_budget_blocks(self) -> int:
        return self._pin_budget

    def __len__(self) -> int:
        """Nodes in every tree (roots excluded)."""
        return self._nodes

    def namespaces(self) -> list[str]:
        return list(self._roots)

    # --- lookups -------------------------------------------------------------------------------

    def lookup(self, tokens: TokenInput, namespace: str = "default") -> PrefixMatch:
        """The longest cached prefix of ``tokens`` in ``namespace``; counts a hit or a miss and
        marks the matched prefix used. :class:`InvalidTokens` for empty, non-integer or
        out-of-range tokens, :class:`InvalidArgument` for a namespace that is not a string."""
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        array = as_token_array(tokens)
        query = array.tobytes()
        root = self._roots.get(namespace)
        if root is None:
            node, pos = None, 0
        else:
            node, pos = self._descend(root, query, 0, len(query))
        matched = pos >> 3
        if matched < self._min_prefix:
            matched = pos = 0
        if matched < array.size:
            check_token_range(array, matched, self._vocab)
        if self._stored_requests is not None:
            self._credit_continued(query)
        self._lookup_tokens += array.size
        if not matched or node is None:
            self._misses += 1
            return PrefixMatch(namespace, 0, array.size, self._bs, b"", query)
        self._policy.touch_match(node, self._clock())
        self._hits += 1
        self._hit_tokens += matched
        blocks = node.path_blocks[: -(-matched // self._bs) * ID_BYTES]
        return PrefixMatch(namespace, matched, array.size, self._bs, blocks, query, self, self._drops)

    def peek(self, tokens: TokenInput, namespace: str = "default") -> int:
        """How many leading tokens of ``tokens`` are cached, without counting a lookup or
        marking anything used (admission checks, tests)."""
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        array = as_token_array(tokens)
        root = self._roots.get(namespace)
        if root is None:
            return 0
        query = array.tobytes()
        matched = self._descend(root, query, 0, len(query))[1] >> 3
        return matched if matched >= self._min_prefix else 0

    def lookup_many(self, prompts: Iterable[TokenInput], namespace: str = "default") -> MatchBatch:
        """``lookup`` for each prompt, in order, with the per-call overhead paid once.

        Every prompt is validated before any is looked up: one bad prompt raises and changes
        no counter. The matches are built lazily by the returned :class:`MatchBatch`.
        """
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        arrays, sizes = token_arrays(prompts, "prompt")
        bounds = byte_bounds(sizes)
        buffer = join_ids(arrays)
        check_token_range(ids_from_bytes(buffer), 0, self._vocab)
        return self._lookup_buffer(buffer, bounds, namespace)

    def lookup_packed(self, tokens: TokenInput, offsets: Sequence[int] | Int64Array, namespace: str = "default") -> MatchBatch:
        """``lookup_many`` for prompts packed back to back: prompt ``i`` is
        ``tokens[offsets[i]:offsets[i + 1]]`` (``offsets`` starts at 0, ends at ``len(tokens)``
        and strictly increases), the layout of a batched prefill. Validated as a whole first."""
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        array = as_token_array(tokens)
        bounds, _ = packed_bounds(offsets, array.size)
        check_token_range(array, 0, self._vocab)
        return self._lookup_buffer(array.tobytes(), bounds, namespace)

    def _lookup_buffer(self, buffer: bytes, bounds: list[int], namespace: str) -> MatchBatch:
        """Look up validated prompts ``buffer[bounds[i]:bounds[i + 1]]`` (byte offsets)."""
        count = len(bounds) - 1
        root = self._roots.get(namespace)
        if root is None or not count:
            self._misses += count
            self._lookup_tokens += len(buffer) >> 3
            return MatchBatch(namespace, self._bs, buffer, bounds, bounds[:-1], [None] * count)
        shortest = max(self._min_prefix, 1) * ID_BYTES  # a hit matches at least this much
        positions, nodes, hit_nodes, hit_bytes = self._walk_batch(root, buffer, bounds, shortest)
        if self._stored_requests is not None:
            for i in range(count):
                self._credit_continued(buffer[bounds[i] : bounds[i + 1]])
        hits = len(hit_nodes)
        self._policy.touch_matches(hit_nodes, self._clock())  # in order, as one call
        self._hits += hits
        self._misses += count - hits
        self._hit_tokens += hit_bytes >> 3
        self._lookup_tokens += len(buffer) >> 3
        return MatchBatch(namespace, self._bs, buffer, bounds, positions, nodes)

    # --- leases --------------------------------------------------------------------------------

    def acquire(self, match: PrefixMatch) -> Lease:
        """Hold references on ``match``'s blocks until :meth:`release`, so they are not evicted.

        :class:`LeaseError` if the match's prefix was evicted (or removed) since the lookup:
        look up again. A miss gives an empty lease.
        """
        if not isinstance(match, PrefixMatch):
            raise InvalidArgument(f"acquire takes a PrefixMatch, got {type(match).__name__}")
        if match.matched_tokens:
            if not (match.origin is self and match.drops_seen == self._drops) and not self._still_cached(match):
                raise LeaseError(
                    f"the match of {match.matched_tokens} tokens in namespace {match.namespace!r} "
                    "is stale: its prefix left the cache after the lookup; look it up again"
                )
            # The blocks of one path are distinct and held by the tree, so the pool's
            # duplicate and liveness checks are not needed.
            self._pool.incref_distinct(match.block_ids)
        lease = Lease(self._next_lease_id, match.namespace, match.matched_tokens, match.block_bytes)
        self._next_lease_id += 1
        self._leases[lease.lease_id] = lease
        return lease

    def _still_cached(self, match: PrefixMatch) -> bool:
        """Whether this index still holds ``match``'s prefix in the same blocks: the matched
        tokens are walked again (a few ``memcmp``), so a match whose prefix was evicted since
        the lookup, or a match from another index, is refused."""
        root = self._roots.get(match.namespace)
        if root is None:
            return False
        matched = match.matched_tokens * ID_BYTES
        node, pos = self._descend(root, match.prompt_bytes, 0, matched)
        return pos == matched and node.path_blocks.startswith(match.block_bytes)

    def release(self, lease: Lease) -> None:
        """Drop a lease's references. :class:`LeaseError` if it was already released."""
        if not isinstance(lease, Lease):
            raise InvalidArgument(f"release takes a Lease, got {type(lease).__name__}")
        held = self._leases.get(lease.lease_id)
        if held is None or held != lease:
            raise LeaseError(f"lease {lease.lease_id} is not held (already released?)")
        del self._leases[lease.lease_id]
        if lease.block_bytes:
            self._pool.decref(lease.block_ids)

    # --- inserts -------------------------------------------------------------------------------

    def insert(
        self,
        tokens: TokenInput,
        block_ids: Sequence[int] | Int64Array,
        namespace: str = "default",
        *,
        generated_tokens: int | None = None,
    ) -> InsertResult:
        """Cache ``tokens`` whose K/V live in ``block_ids`` (``ceil(len(tokens) / block_size)``
        allocated blocks, e.g. an engine sequence's block table).

        Tokens already cached keep their blocks; the index takes one reference on each of the
        caller's blocks that hold the new tokens (the caller keeps its own). Those blocks must
        not already be cached for other tokens (a sequence that extends a cached prefix copies
        its shared partial block before writing, as the engine does). Sequences shorter than
        ``min_prefix_tokens`` are skipped. All or nothing.

        ``generated_tokens``: how many tokens the request that produced ``tokens`` generated,
        when the caller knows (the ``reuse`` policy learns from it which requests come back;
        the others ignore it). An integer >= 0 or None.
        """
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        generated_tokens = check_generated_tokens(generated_tokens)
        array = as_token_array(tokens)
        table = as_block_table(block_ids, -(-array.size // self._bs), self._pool.num_blocks)
        check_token_range(array, 0, self._vocab)
        self._check_allocated(table)
        done = self._insert_one(array.tobytes(), table.tobytes(), namespace, generated_tokens)
        return InsertResult(done.cached_tokens, done.new_tokens, done.adopted_blocks, done.splits > 0, done.skipped > 0)

    def insert_trusted(self, token_bytes: bytes, block_ids: Int64Array, namespace: str = "default", *,
                       generated_tokens: int | None = None) -> InsertBatchResult:
        """``insert`` without its O(tokens) validation, for a caller that guarantees what it
        checks: ``token_bytes`` are in-vocabulary token ids as native int64 bytes and
        ``block_ids`` an int64 array of exactly ``ceil(tokens / block_size)`` allocated blocks
        (the workload replay, which checked its prompts once and allocates its own blocks).
        The batch-wide checks that depend on the tree still run, all or nothing."""
        generated_tokens = check_generated_tokens(generated_tokens)
        return self._insert_one(token_bytes, block_ids.tobytes(), namespace, generated_tokens)

    def _insert_one(self, token_bytes: bytes, blocks: bytes, namespace: str,
                    generated_tokens: int | None) -> InsertBatchResult:
        """One validated sequence, as one stored request for the policy (see ``insert``)."""
        policy = self._policy
        if not policy.uses_reuse:
            return self._insert_validated([len(token_bytes) >> 3], token_bytes, blocks, namespace)
        # The node the sequence's cached prefix ends in: its last storer is continued by this.
        root = self._roots.get(namespace)
        node, pos = self._descend(root, token_bytes, 0, len(token_bytes)) if root is not None else (None, 0)
        extends = node is not None and pos >> 3 >= max(self._min_prefix, 1)
        previous = node.reuse_owner if extends and node is not None else None
        record = policy.begin_store(generated_tokens, extends)
        stored = False
        try:
            done = self._insert_validated([len(token_bytes) >> 3], token_bytes, blocks, namespace)
            stored = not done.skipped
            return done
        finally:
            policy.end_store(stored, previous)
            if stored and record is not None and self._stored_requests is not None:
                self._credit_continued(token_bytes)  # a store that continues one, unlooked-up
                self._stored_requests.remember(token_bytes, record)

    def _credit_continued(self, query: bytes) -> None:
        """``reuse``: the remembered requests that ``query`` (a prompt's int64 bytes) starts
        with were continued, whether or not their blocks are still cached."""
        assert self._stored_requests is not None
        credit = self._policy.reuse_model.credit
        for record in self._stored_requests.continued_by(query):
            credit(record)

    def insert_many(
        self,
        items: Iterable[tuple[TokenInput, Sequence[int] | Int64Array]],
        namespace: str = "default",
    ) -> InsertBatchResult:
        """``insert`` for each ``(tokens, block_ids)`` in order, all or nothing for the batch.

        Validation and reference counting are vectorised over the whole batch. If any item is
        invalid, or two items claim the same block for different tokens, nothing changes.
        """
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        bs = self._bs
        num_blocks = self._pool.num_blocks
        arrays, tables, sizes = validated_items(items, bs, num_blocks)
        if not arrays:
            return InsertBatchResult(0, 0, 0, 0, 0, 0)
        # Every token and every block id of the batch in one vectorised check each.
        token_bytes = join_ids(arrays)
        block_bytes = join_ids(tables)
        all_tokens = ids_from_bytes(token_bytes)
        all_blocks = ids_from_bytes(block_bytes)
        check_token_range(all_tokens, 0, self._vocab)
        if all_blocks.size and (all_blocks.min() < 0 or all_blocks.max() >= num_blocks):
            bad = all_blocks[(all_blocks < 0) | (all_blocks >= num_blocks)]
            raise InvalidArgument(f"block id {int(bad[0])} is outside the pool [0, {num_blocks})")
        self._check_allocated(all_blocks)
        return self._insert_validated(sizes, token_bytes, block_bytes, namespace)

    def insert_packed(
        self,
        tokens: TokenInput,
        offsets: Sequence[int] | Int64Array,
        block_ids: Sequence[int] | Int64Array,
        namespace: str = "default",
    ) -> InsertBatchResult:
        """``insert_many`` for sequences packed back to back: sequence ``i`` is
        ``tokens[offsets[i]:offsets[i + 1]]`` and its block table the next
        ``ceil(len_i / block_size)`` ids of ``block_ids`` (tables packed in the same order).
        All validation is vectorised; all or nothing."""
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        array = as_token_array(tokens)
        num_blocks = self._pool.num_blocks
        _, sizes = packed_bounds(offsets, array.size)
        table = as_block_table(block_ids, int((-(-sizes // self._bs)).sum()), num_blocks)
        check_token_range(array, 0, self._vocab)
        self._check_allocated(table)
        return self._insert_validated(sizes, array.tobytes(), table.tobytes(), namespace)

    def _distinct(self, ids: Int64Array) -> bool:
        """Whether no block id repeats: scatter positions into a scratch array and read them
        back (two O(n) passes; ``np.unique`` would sort)."""
        if ids.size <= 32:
            return len(set(ids.tolist())) == ids.size
        positions = np.arange(ids.size, dtype=np.int64)
        self._scratch[ids] = positions
        return bool(np.array_equal(self._scratch[ids], positions))

    def _check_allocated(self, block_ids: Int64Array) -> None:
        if block_ids.size:
            free = self._pool.ref_counts_view()[block_ids] <= 0
            if free.any():
                raise InvalidArgument(
                    f"block(s) {block_ids[free][:8].tolist()} are free; only allocated blocks can be cached"
                )

    def _insert_validated(self, sizes: Int64Array | list[int], tokens: bytes, blocks: bytes, namespace: str) -> InsertBatchResult:
        """Insert validated items of ``sizes`` tokens (``tokens``/``blocks``: every item's
        token ids and block table, concatenated, as int64 bytes) and return the totals.

        A large batch runs with the cyclic garbage collector paused: it creates a node per new
        sequence, all of which stay reachable from the root (a failed batch unlinks them as
        garbage for the next collection), so the collections that their allocation would
        trigger (full ones included, traversing the whole tree) find nothing to free. Reference
        counting still frees everything else at once. The collector's previous state is
        restored on return or exception (the pause is process-wide: other threads' cyclic
        garbage waits for the batch too).
        """
        pause = len(sizes) >= GC_PAUSE_ITEMS and gc.isenabled()
        if pause:
            gc.disable()
        try:
            return self._insert_items(sizes, tokens, blocks, namespace)
        finally:
            if pause:
                gc.enable()

    def _insert_items(self, sizes: Int64Array | list[int], tokens: bytes, blocks: bytes, namespace: str) -> InsertBatchResult:
        """``_insert_validated`` itself.

        The tree is changed item by item (later items see earlier ones), but references,
        policy membership and touches are applied once at the end, after the batch-wide
        checks, so a failed check only has the structure to undo.
        """
        bs = self._bs
        now = self._clock()
        root = self._roots.get(namespace)
        created_root = root is None
        if root is None:
            root = RadixNode(b"", 0, None, b"", namespace, 0, now)
            root.terminal = False
            self._roots[namespace] = root
        shortest = self._min_prefix * ID_BYTES
        first_id = next_id = self._next_node_id
        if len(sizes) == 1:
            size = int(sizes[0])
            bounds = [0, size * ID_BYTES]
            block_bounds = [0, -(-size // bs) * ID_BYTES]
        else:
            size_array = np.asarray(sizes, dtype=np.int64)
            bounds = byte_bounds(size_array)
            block_bounds = byte_bounds(-(-size_array // bs))

        def split_at(node: RadixNode, depth: int, node_id: int) -> RadixNode:
            self._next_node_id = node_id
            return self._split(node, depth, now, track=False)

        (leaves, adopted, uppers, straddles, pinned_straddles, present, marked,
         new_bytes, splits, skipped, next_id) = self._insert_walk(
            root, tokens, blocks, bounds, block_bounds, shortest, bs, next_id, now,
            namespace, RadixNode, LEAF_CHILDREN, split_at,
        )
        self._next_node_id = next_id

        new_ids = ids_from_bytes(b"".join(adopted)) if adopted else np.empty(0, dtype=np.int64)
        problem = None
        shared = 0
        if new_ids.size:
            held = self._tree_refs[new_ids] > 0
            if held.any():
                shared, bad = shared_boundary_blocks(new_ids, held, adopted, leaves, uppers, self._tree_refs, bs)
                if bad:
                    problem = (
                        f"block(s) {bad[:8]} already hold cached tokens; a sequence extending a "
                        "cached prefix must copy its shared partial block before writing"
                    )
            if problem is None and new_ids.size > 1 and not self._distinct(new_ids):
                problem = "two items of the batch claim the same block for different tokens"
        if problem is not None:
            for node in marked:
                node.terminal = False
            self._rollback(sorted(leaves + uppers, key=lambda n: n.node_id), tracked=False)
            if created_root:
                del self._roots[namespace]
            raise InvalidArgument(problem)

        if straddles:
            straddled = np.asarray(straddles, dtype=np.int64)
            self._pool.incref(np.concatenate([new_ids, straddled]))
            self._tree_refs[new_ids] += 1  # distinct (checked above)
            np.add.at(self._tree_refs, straddled, 1)  # a block may be straddled twice
            if pinned_straddles:
                np.add.at(self._pin_refs, np.asarray(pinned_straddles, dtype=np.int64), 1)
        elif new_ids.size:
            # Distinct (checked above) and allocated (checked by every caller on entry).
            self._pool.incref_distinct(new_ids)
            self._tree_refs[new_ids] += 1
        self._blocks_used += new_ids.size - shared
        self._nodes += next_id - first_id
        policy = self._policy
        if uppers:  # every new node is touched below, which decides its place
            policy.track_many([n for n in uppers if not n.pin_count])
        if present:  # interleave the touches of cached items with the new leaves', in order
            policy.track_many(leaves)
            touched: list[RadixNode] = []
            done = 0
            for before, node in present:
                touched += leaves[done:before]
                touched.append(node)
                done = before
            touched += leaves[done:]
            policy.touch_many(touched, now)
        else:
            policy.track_and_touch(leaves, now)
        new_tokens = new_bytes >> 3
        if skipped:
            size_array = np.asarray(sizes, dtype=np.int64)
            considered = int(size_array[size_array >= self._min_prefix].sum())
        else:
            considered = len(tokens) >> 3
        self._inserts += len(sizes)
        self._inserted_tokens += new_tokens
        if self._memory_budget is not None:
            self.enforce_memory_budget()
        return InsertBatchResult(len(sizes), considered - new_tokens, new_tokens, new_ids.size, splits, skipped)

    def _split(self, node: RadixNode, at: int, now: float, *, track: bool) -> RadixNode:
        """Split ``node``'s edge at token position ``at`` (``start < at < end``); return the new
        upper node. ``node`` keeps its identity as the lower part (pins ending in it stay valid). Structure only: the caller adds the straddling block's reference, and
        tracks the upper node in the policy unless ``track``."""
        cut = (at - node.start) * ID_BYTES
        node_id = self._next_node_id
        self._next_node_id = node_id + 1
        parent = node.parent
        assert parent is not None, "the root has no edge to split"
        upper = RadixNode(
            node.key[:cut], node.start, parent, node.path_blocks[: -(-at // self._bs) * ID_BYTES], node.namespace, node_id, now
        )
        upper.freq = node.freq
        upper.last_access = node.last_access
        upper.reuse_value = node.reuse_value
        upper.reuse_owner = node.reuse_owner
        upper.pin_count = node.pin_count
        upper.terminal = False
        parent.children[node.key[:ID_BYTES]] = upper
        node.key = node.key[cut:]
        node.start = at
        node.parent = upper
        upper.children = {node.key[:ID_BYTES]: node}
        if track:  # a batch insert counts its new nodes when it completes
            self._nodes += 1
        if track and not upper.pin_count:
            self._policy.track(upper)
        return upper

    def _rollback(self, undo: list[RadixNode], *, tracked: bool) -> None:
        """Undo the structural changes of a failed batch or pin (no reference was taken yet)."""
        for node in reversed(undo):
            parent = node.parent
            assert parent is not None
            if node.children:  # a split-off upper node: merge it back into its only child
                (lower,) = node.children.values()
                lower.key = node.key + lower.key
                lower.start = node.start
                lower.parent = parent
                parent.children[node.key[:ID_BYTES]] = lower
            else:
                del parent.children[node.key[:ID_BYTES]]
            if tracked:
                self._nodes -= 1
                if not node.pin_count:
                    self._policy.untrack(node)

    # --- eviction ------------------------------------------------------------------------------

    def evict(self, num_blocks: int, *, reason: EvictionReason = "capacity") -> int:
        """Free at least ``num_blocks`` blocks by evicting unreferenced leaves in policy order;
        return how many were freed (fewer when nothing else can be evicted).

        A leaf that holds more blocks than are still wanted loses only its last ones (it is
        trimmed in place and stays first in line): a 32K-token prompt is one leaf of 2,048
        blocks, and dropping all of it to make room for a few would throw away, and spill,
        far more than asked. A leaf still in use (a sequence or lease holds one of its
        blocks) is skipped and counts as used now. This is the engine's reclaimer
        (``engine.set_reclaimer(index.evict)``).
        """
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int | np.integer) or num_blocks < 0:
            raise InvalidArgument(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
        if reason not in EVICTION_REASONS:
            raise InvalidArgument(f"unknown eviction reason {reason!r}; valid: {', '.join(EVICTION_REASONS)}")
        policy = self._policy
        now = self._clock()
        freed = 0
        skips_left = len(policy)
        pending: list[Int64Array] = []  # dropped references, released to the pool in one call
        try:  # an ``on_evict`` that raises must not strand the references already dropped
            while freed < num_blocks:
                node = policy.victim(now)
                if node is None:
                    break
                if self._evictable(node, pending):
                    wanted = num_blocks - freed
                    low, high = node.own_block_range(self._bs)
                    if high - low > wanted:
                        freed += self._trim(node, wanted, reason, pending)
                    else:
                        freed += self._drop(node, reason, pending)
                elif skips_left:
                    skips_left -= 1
                    policy.touch_path(node, now)
                else:
                    break
        finally:
            self._release(pending)
        return freed

    def evict_expired(self) -> int:
        """Evict every unreferenced leaf whose TTL has run out; return the blocks freed.

        The evictor calls this periodically: expiry does not wait for a lookup. An expired
        leaf still in use counts as used now (its TTL restarts). 0 without a TTL policy.
        """
        policy = self._policy
        if policy.ttl_s is None:
            return 0
        now = self._clock()
        freed = 0
        skips_left = len(policy)
        pending: list[Int64Array] = []
        try:  # as in ``evict``: release what was dropped even if ``on_evict`` raises
            while True:
                node = policy.oldest()
                if node is None or not policy.is_expired(node, now):
                    break
                if self._evictable(node, pending):
                    freed += self._drop(node, "ttl", pending)
                elif skips_left:
                    skips_left -= 1
                    policy.touch_path(node, now)
                else:
                    break
        finally:
            self._release(pending)
        return freed

    def enforce_memory_budget(self) -> int:
        """Evict until the cached blocks fit ``memory_budget_bytes``; return the blocks freed."""
        if self._memory_budget is None or self._bytes_per_block is None:
            return 0
        over = self._blocks_used * self._bytes_per_block - self._memory_budget
        if over <= 0:
            return 0
        return self.evict(-(-over // self._bytes_per_block), reason="memory_budget")

    def reclaimable_blocks(self) -> int:
        """Blocks that eviction could return to the pool now: referenced by the tree only and
        not pinned. O(pool) in numpy. An upper bound when a node with such blocks sits above a
        leaf in use: sequences built from lookups and leases hold their whole prefix, but a
        conversation that wrote its next turn into a copy of its partial last block leaves the
        tree's old partial block (one per such turn) above its leaf until the leaf goes.
        """
        tree = self._tree_refs
        rc = self._pool.ref_counts_view()
        return int(np.count_nonzero((tree > 0) & (rc == tree) & (self._pin_refs == 0)))

    def remove(self, tokens: TokenInput, namespace: str = "default") -> int:
        """Forget the cached sequence ``tokens`` (as inserted): it no longer ends a sequence, and
        the nodes left empty (a leaf that ends no other inserted sequence, then its parent if
        that leaves it the same way, and so on) are pruned, up to a pinned node. Returns the
        blocks freed: 0 when ``tokens`` was never inserted or is a prefix of other cached
        sequences. Blocks still held by sequences or leases stay with their holders."""
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        array = as_token_array(tokens)
        root = self._roots.get(namespace)
        if root is None:
            return 0
        node, pos = descend(root, array.tobytes())
        if pos >> 3 != array.size or node.end != array.size or not node.terminal:
            return 0
        node.terminal = False
        freed = 0
        current = node
        while current.parent is not None and not current.children and not current.terminal and not current.pin_count:
            parent = current.parent
            freed += self._drop(current, "explicit")
            current = parent
        return freed

    def demote(self, tokens: TokenInput, namespace: str = "default", *, keep_tokens: int = 0) -> int:
        """The cached sequence ``tokens`` will not be continued (its conversation ended): the
        nodes only it goes through, beyond its first ``keep_tokens`` tokens (e.g. a system
        prompt it shared with others when it began), become the first to evict.

        Nothing is freed now: a request may still match them, and a use promotes them again.
        Nothing moves when a longer cached sequence goes through the end of ``tokens``'s match
        (a fork or a retry continued it), and a pinned node stops the walk. Returns the tokens
        demoted. :class:`InvalidTokens` / :class:`InvalidArgument` for bad input, which
        changes nothing.
        """
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        keep_tokens = check_keep_tokens(keep_tokens)
        array = as_token_array(tokens)
        root = self._roots.get(namespace)
        if root is None:
            check_token_range(array, 0, self._vocab)
            return 0
        node, pos = self._descend(root, array.tobytes(), 0, array.size * ID_BYTES)
        if pos >> 3 < array.size:
            check_token_range(array, pos >> 3, self._vocab)
        if node is None or node.parent is None or pos >> 3 != node.end or node.children:
            return 0
        chain: list[RadixNode] = []
        current = node
        while current.parent is not None and current.start >= keep_tokens and not current.pin_count:
            chain.append(current)
            current = current.parent
            if len(current.children) != 1:
                break
        self._policy.demote(chain)
        return node.end - chain[-1].start if chain else 0

    def clear_namespace(self, namespace: str) -> int:
        """Drop every node and pin of ``namespace``; return the blocks freed (0 if unknown).
        Blocks held by sequences or leases stay allocated with their holders."""
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        root = self._roots.get(namespace)
        if root is None:
            return 0
        for key in [k for k in self._pins if k[0] == namespace]:
            self._unpin_record(self._pins.pop(key), touch=False)
        freed = 0
        stack = list(root.children.values())
        order: list[RadixNode] = []
        while stack:  # pre-order, reversed below so children go before their parent
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        for node in reversed(order):
            freed += self._drop(node, "explicit")
        del self._roots[namespace]
        return freed

    def _evictable(self, node: RadixNode, pending: list[Int64Array]) -> bool:
        """Whether ``node`` is an unpinned leaf whose blocks only the tree references.

        References dropped by this eviction round but not yet released (``pending``) make a
        block look used; on a negative answer they are released and the node checked again.
        (A positive answer is never wrong: the pool's count only exceeds the true one.)
        """
        if node.children or node.pin_count:
            return False
        own = node.own_blocks(self._bs)
        if np.array_equal(self._pool.ref_counts_view()[own], self._tree_refs[own]):
            return True
        if not pending:
            return False
        self._release(pending)
        return bool(np.array_equal(self._pool.ref_counts_view()[own], self._tree_refs[own]))

    def _release(self, pending: list[Int64Array]) -> None:
        # Each array is one node's own blocks, all referenced by the tree and distinct; a block
        # in two of them (straddling a parent and its child) is simply released twice.
        decref = self._pool.decref_distinct
        for blocks in pending:
            decref(blocks)
        pending.clear()

    def _drop(self, node: RadixNode, reason: EvictionReason, pending: list[Int64Array] | None = None) -> int:
        """Remove leaf ``node`` from the tree and drop its references; return the blocks this
        frees. With ``pending``, the pool references are appended there for the caller to
        release (only valid right after a positive ``_evictable``), else released at once."""
        assert not node.children, f"{node} still has children"
        self._drops += 1
        low, high = node.own_block_range(self._bs)
        own = ids_from_bytes(node.path_blocks[low * ID_BYTES : high * ID_BYTES])
        freed = self._unreference(node, low, own, reason)
        if node.pin_count:  # only explicit removal (clear_namespace) drops pinned nodes
            self._pin_refs[own] -= 1
            self._pinned_blocks -= int(np.count_nonzero(self._pin_refs[own] == 0))
        else:
            self._policy.untrack(node)
        if pending is None:
            released = self._pool.decref(own).size
            assert released == freed, f"{node}: freed {released} blocks, expected {freed}"
        else:
            pending.append(own)
        parent = node.parent
        assert parent is not None
        del parent.children[node.key[:ID_BYTES]]
        self._nodes -= 1
        self._evicted_nodes[reason] += 1
        return freed

    def _trim(self, leaf: RadixNode, blocks: int, reason: EvictionReason, pending: list[Int64Array]) -> int:
        """Drop the last ``blocks`` blocks of ``leaf``, an evictable leaf that owns more, and
        shorten its edge to the block boundary before them; return the blocks freed.

        In place: the leaf keeps its identity and its place in the policy's order, so the
        next eviction continues with what is left of it; its first block stays, so a block
        it shares with its parent is untouched. No sequence ends where it now ends
        (``terminal`` off). Cheaper than splitting the leaf and dropping the lower part: no
        node is made and no child map changes."""
        low, high = leaf.own_block_range(self._bs)
        keep = high - blocks
        assert low < keep < high, f"{leaf}: cannot trim {blocks} of its {high - low} blocks"
        tail = ids_from_bytes(leaf.path_blocks[keep * ID_BYTES : high * ID_BYTES])
        # Past its first block a leaf's blocks are its own, and an evictable leaf's are held
        # by nothing else.
        freed = self._unreference(leaf, keep, tail, reason, sole_owner=True)
        pending.append(tail)
        end = keep * self._bs
        leaf.key = leaf.key[: (end - leaf.start) * ID_BYTES]
        leaf.end = end
        leaf.path_blocks = leaf.path_blocks[: keep * ID_BYTES]
        leaf.terminal = False
        self._policy.shortened(leaf)
        return freed

    def _unreference(self, node: RadixNode, first: int, blocks: Int64Array, reason: EvictionReason,
                     *, sole_owner: bool = False) -> int:
        """Drop the tree's references on ``blocks``, ``node``'s blocks from index ``first`` of
        its path on; report each one this frees to ``on_evict``; return how many it frees
        (those nothing else holds). ``sole_owner``: the caller knows ``node`` alone holds
        every one of them (the tail of an evictable leaf), so all are freed."""
        tree = self._tree_refs
        if sole_owner:
            sole = None
            freed = used = int(blocks.size)
        else:
            last_ref = tree[blocks] == 1
            sole = last_ref & (self._pool.ref_counts_view()[blocks] == 1)
            freed = int(np.count_nonzero(sole))
            used = int(np.count_nonzero(last_ref))
        if self._on_evict is not None and freed:
            bs = self._bs
            prefix = node.path_tokens()
            for i in range(freed) if sole is None else np.flatnonzero(sole).tolist():
                index = first + i
                self._on_evict(
                    EvictedBlock(
                        node.namespace, int(blocks[i]), index, index * bs, min((index + 1) * bs, node.end), reason, prefix
                    )
                )
        tree[blocks] -= 1
        self._blocks_used -= used
        self._evicted_blocks[reason] += freed
        return freed

    # --- stats and checks ----------------------------------------------------------------------

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            hit_tokens=self._hit_tokens,
            lookup_tokens=self._lookup_tokens,
            inserts=self._inserts,
            inserted_tokens=self._inserted_tokens,
            evictions=dict(self._evicted_blocks),
            evicted_nodes=dict(self._evicted_nodes),
            blocks_used=self._blocks_used,
            bytes_used=self._blocks_used * (self._bytes_per_block or 0),
            pinned_blocks=self._pinned_blocks,
            pins=len(self._pins),
            leases=len(self._leases),
            nodes=self._nodes,
            namespaces=len(self._roots),
        )

    def held_refs(self) -> npt.NDArray[np.int64]:
        """References the index holds per block (tree nodes plus leases), for
        ``PagedKVEngine.check_invariants(external_refs=...)``."""
        refs = self._tree_refs.astype(np.int64)
        for lease in self._leases.values():
            if lease.block_bytes:
                np.add.at(refs, lease.block_ids, 1)
        return refs

    def check_invariants(self) -> None:
        """Assert the tree, the reference counts, the pins and the policy agree (for tests)."""
        check_index_invariants(self)
