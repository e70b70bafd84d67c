"""The paged KV engine: sequences with block tables over a :class:`BlockPool` + :class:`PageBuffer`.

A sequence is a list of token ids and, for every token, its K/V in every layer. Tokens are
grouped into fixed-size *blocks*; the sequence's block table maps its ``i``-th block of tokens
to a logical block id, whose page in the :class:`PageBuffer` holds the K/V::

    sequence 17: tokens t0 .. t39, block_size 16
    block table  [ 7, 2, 9 ]
    page 7 <- t0..t15 (full, immutable)   page 2 <- t16..t31 (full)   page 9 <- t32..t39 (tail)

Sharing and copy-on-write
    :meth:`PagedKVEngine.fork` and ``create_sequence(shared_blocks=...)`` share blocks by
    reference count. Full blocks are immutable, so sharing them is free. Only a sequence's
    last, partially filled block is ever written; when it is shared (ref count > 1) the first
    append copies its used rows into a fresh block first (copy-on-write) and drops one
    reference on the shared one.

Admission and OOM prevention
    Every operation that needs blocks computes the exact count first (:meth:`blocks_needed`)
    and takes them all at once, all or nothing. When the pool is short, an optional
    *reclaimer* (the prefix cache evicting unreferenced blocks) is asked for the missing
    blocks, but only when the *reclaimable* count says that it can cover them, so nothing is
    evicted in vain. If the blocks still cannot be had, :class:`CapacityError` names the
    numbers and the engine is exactly as it was. The pool is never over-committed.

Errors
    Every public method validates all of its input before it changes anything: bad token ids
    raise :class:`InvalidTokens`, bad K/V :class:`InvalidKV`, a sequence past ``max_context``
    :class:`ContextTooLong`, an unknown or freed sequence :class:`UnknownSequence`, other bad
    arguments :class:`InvalidArgument`. After any error the state is unchanged.

Concurrency: not thread-safe; the owner (the node engine) serialises every call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import NewType

import numpy as np
import numpy.typing as npt
import torch

from kvcluster.core.block_pool import BlockIds, BlockPool, as_block_ids
from kvcluster.core.page_buffer import PageBuffer, PageRows
from kvcluster.core.sequence import SequenceState
from kvcluster.errors import (
    CapacityError,
    ContextTooLong,
    InvalidArgument,
    InvalidKV,
    InvalidTokens,
    UnknownSequence,
)
from kvcluster.model_spec import ModelSpec

logger = logging.getLogger(__name__)

SequenceId = NewType("SequenceId", int)

#: The longest context the engine supports (the configuration's upper bound).
MAX_SUPPORTED_CONTEXT = 131072

TokenInput = SequenceOf[int] | npt.NDArray[np.integer]


@dataclass(slots=True, frozen=True)
class EngineStats:
    """A snapshot of the engine's memory.

    ``tokens_stored`` counts every sequence's tokens (a token shared by two forks counts
    twice). ``slots_allocated`` is ``blocks_used * block_size``; ``slots_filled`` is the number
    of those slots holding written K/V (a shared page counts once). ``utilisation`` is
    ``slots_filled / slots_allocated``. ``fragmentation`` is internal fragmentation: the
    allocated slots that hold nothing (the unfilled rows of partially filled blocks) over
    ``slots_allocated``, so ``utilisation + fragmentation == 1``. External fragmentation is
    zero by construction: any free block serves any request. Both ratios are 1.0 and 0.0 when
    nothing is allocated.
    """

    block_size: int
    blocks_total: int
    blocks_free: int
    blocks_used: int
    sequences: int
    tokens_stored: int
    slots_allocated: int
    slots_filled: int
    cow_copies: int
    utilisation: float
    fragmentation: float


class PagedKVEngine:
    """Sequences with block tables over a BlockPool + PageBuffer. Not thread-safe.

    ``pool`` and ``pages`` are public so that the prefix cache can hold references on blocks
    (``pool.incref``/``decref``) and read or write pages; every reference it holds must be
    declared to :meth:`check_invariants` as ``external_refs``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        block_size: int = 16,
        num_blocks: int,
        max_context: int = 32768,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise InvalidArgument(f"block_size must be a positive integer, got {block_size!r}")
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise InvalidArgument(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if not isinstance(max_context, int) or not 0 < max_context <= MAX_SUPPORTED_CONTEXT:
            raise InvalidArgument(
                f"max_context must be an integer in [1, {MAX_SUPPORTED_CONTEXT}], got {max_context!r}"
            )
        self.spec = spec
        self.block_size = block_size
        self.max_context = max_context
        self.max_blocks_per_sequence = -(-max_context // block_size)
        self.pool = BlockPool(num_blocks)
        self.pages = PageBuffer(num_blocks, spec.page_shape(block_size), spec.torch_dtype, device)
        self._sequences: dict[int, SequenceState] = {}
        self._next_id = 0
        self._tokens_stored = 0
        self._cow_copies = 0
        self._reclaim: Callable[[int], int] | None = None
        self._reclaimable: Callable[[], int] | None = None

    # --- hooks -------------------------------------------------------------------------------

    def set_reclaimer(self, reclaim: Callable[[int], int] | None) -> None:
        """``reclaim(missing)`` frees up to ``missing`` blocks (e.g. evicts cache leaves) and
        returns how many it freed. Called only when the pool alone cannot serve a request."""
        self._reclaim = reclaim

    def set_reclaimable(self, count: Callable[[], int] | None) -> None:
        """``count()`` is how many blocks the reclaimer could free right now (admission)."""
        self._reclaimable = count

    # --- admission ---------------------------------------------------------------------------

    def blocks_needed(self, seq_id: SequenceId | None, num_new_tokens: int) -> int:
        """Fresh blocks that appending ``num_new_tokens`` to ``seq_id`` takes (``None``: a new
        sequence), counting the copy-on-write of a shared partial last block."""
        if not isinstance(num_new_tokens, int | np.integer) or num_new_tokens < 0:
            raise InvalidArgument(
                f"num_new_tokens must be a non-negative integer, got {num_new_tokens!r}"
            )
        n = int(num_new_tokens)
        if seq_id is None:
            return -(-n // self.block_size)
        return self._blocks_needed(self._get(seq_id), n)

    def can_allocate(self, num_new_tokens: int, seq_id: SequenceId | None = None) -> bool:
        """Whether the blocks for ``num_new_tokens`` can be had now (free + reclaimable).

        False too when the tokens would take ``seq_id`` past ``max_context``.
        """
        needed = self.blocks_needed(seq_id, num_new_tokens)
        current = 0 if seq_id is None else self._get(seq_id).num_tokens
        if current + num_new_tokens > self.max_context:
            return False
        return needed <= self.pool.num_free + self._reclaimable_now()

    # --- sequences ---------------------------------------------------------------------------

    def create_sequence(
        self,
        tokens: TokenInput = (),
        kv: torch.Tensor | None = None,
        *,
        shared_blocks: SequenceOf[int] | BlockIds = (),
        shared_tokens: int = 0,
        kv_pages: PageRows | None = None,
    ) -> SequenceId:
        """A new sequence holding ``tokens``; ``kv`` is the K/V of ``tokens[shared_tokens:]``.

        ``shared_blocks`` (e.g. a prefix-cache hit) are adopted by reference and hold the K/V
        of ``tokens[:shared_tokens]``; there must be exactly ``ceil(shared_tokens /
        block_size)`` of them, all allocated. When ``shared_tokens`` is not a multiple of the
        block size the last one is a shared partial block: the first append into it copies its
        first ``shared_tokens % block_size`` rows into a fresh block (copy-on-write). ``kv`` may
        be ``None`` only when there are no new tokens. All or nothing: on any error (including
        :class:`CapacityError`) nothing changes.

        ``kv_pages`` replaces ``kv`` with whole pages in this cache's own layout (as
        :meth:`PageBuffer.gather_pages` returns them, or a tuple of segments of those rows,
        e.g. from a peer node): written without any layout change, which needs
        ``shared_tokens`` to be a whole number of blocks.
        """
        token_ids = self._validate_tokens(tokens)
        if isinstance(shared_tokens, bool) or not isinstance(shared_tokens, int | np.integer):
            raise InvalidArgument(f"shared_tokens must be an integer, got {shared_tokens!r}")
        shared_tokens = int(shared_tokens)
        if not 0 <= shared_tokens <= token_ids.size:
            raise InvalidArgument(
                f"shared_tokens ({shared_tokens}) must be in [0, len(tokens) = {token_ids.size}]"
            )
        shared = self._validate_shared_blocks(shared_blocks, shared_tokens)
        if token_ids.size > self.max_context:
            raise ContextTooLong(
                f"a sequence of {token_ids.size} tokens exceeds max_context {self.max_context}"
            )
        new_tokens = token_ids.size - shared_tokens
        if kv_pages is not None:
            if kv is not None:
                raise InvalidArgument("pass kv or kv_pages, not both")
            if shared_tokens % self.block_size:
                raise InvalidArgument(
                    f"kv_pages need a shared prefix of whole blocks; shared_tokens is {shared_tokens}"
                )
            self.pages.check_pages(kv_pages, new_tokens, "kv_pages")
        elif kv is None:
            if new_tokens:
                raise InvalidKV(
                    f"kv is required for the {new_tokens} token(s) after the shared prefix"
                )
        else:
            self.pages.check_kv(kv, new_tokens)

        state = SequenceState.empty(
            self._next_id, -(-token_ids.size // self.block_size), token_ids.size
        )
        # Adopt the shared blocks first: the reference pins them, so the reclaimer below
        # cannot evict the very prefix this sequence is about to use.
        self.pool.incref(shared)
        state.append_blocks(shared, self.max_blocks_per_sequence)
        state.append_tokens(token_ids[:shared_tokens], self.max_context)
        try:
            if new_tokens:
                source = kv if kv is not None else kv_pages
                assert source is not None
                self._extend(state, token_ids[shared_tokens:], source)
        except CapacityError:
            self.pool.decref(shared)
            raise
        self._sequences[state.seq_id] = state
        self._next_id += 1
        self._tokens_stored += state.num_tokens
        return SequenceId(state.seq_id)

    def append(self, seq_id: SequenceId, tokens: TokenInput, kv: torch.Tensor) -> None:
        """Append ``tokens`` with their K/V ``(layers, kv_components, len(tokens), kv_heads,
        head_dim)`` in the cache's dtype and device. All or nothing."""
        state = self._get(seq_id)
        token_ids = self._validate_tokens(tokens)
        self.pages.check_kv(kv, token_ids.size)
        if state.num_tokens + token_ids.size > self.max_context:
            raise ContextTooLong(
                f"appending {token_ids.size} token(s) to sequence {seq_id} "
                f"({state.num_tokens} tokens) exceeds max_context {self.max_context}"
            )
        if token_ids.size == 0:
            return
        self._extend(state, token_ids, kv)
        self._tokens_stored += token_ids.size

    def fork(self, seq_id: SequenceId) -> SequenceId:
        """A new sequence sharing every block of ``seq_id`` by reference (no copy, no new
        block); the first append to either into a shared partial block copies it."""
        state = self._get(seq_id)
        child = state.fork(self._next_id)
        self.pool.incref(child.blocks)
        self._sequences[child.seq_id] = child
        self._next_id += 1
        self._tokens_stored += child.num_tokens
        return SequenceId(child.seq_id)

    def free(self, seq_id: SequenceId) -> None:
        """Drop the sequence and its references; blocks no one else holds return to the pool."""
        state = self._get(seq_id)
        self.pool.decref(state.blocks)
        del self._sequences[state.seq_id]
        self._tokens_stored -= state.num_tokens

    # --- reads -------------------------------------------------------------------------------

    def tokens(self, seq_id: SequenceId) -> npt.NDArray[np.int64]:
        return self._get(seq_id).token_ids.copy()

    def num_tokens(self, seq_id: SequenceId) -> int:
        return self._get(seq_id).num_tokens

    def block_table(self, seq_id: SequenceId) -> npt.NDArray[np.int64]:
        return self._get(seq_id).blocks.copy()

    def read_kv(self, seq_id: SequenceId, start: int = 0, end: int | None = None) -> torch.Tensor:
        """K/V of tokens ``[start, end)`` as ``(layers, kv_components, T, kv_heads, head_dim)``,
        a new tensor (later writes never change it)."""
        state = self._get(seq_id)
        stop = state.num_tokens if end is None else end
        if not (
            isinstance(start, int | np.integer)
            and isinstance(stop, int | np.integer)
            and 0 <= start <= stop <= state.num_tokens
        ):
            raise InvalidArgument(
                f"token range [{start}, {end}) outside sequence {seq_id} of {state.num_tokens} tokens"
            )
        return self.pages.read_tokens(state.blocks, int(start), int(stop))

    def read_kv_layer(self, seq_id: SequenceId, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as ``(T, kv_heads, head_dim)`` each. Under MLA the single
        cached component (the latent plus RoPE key) is returned as both."""
        state = self._get(seq_id)
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or not (
            0 <= layer < self.spec.num_layers
        ):
            raise InvalidArgument(f"layer {layer!r} outside [0, {self.spec.num_layers})")
        kv = self.pages.read_layer(state.blocks, int(layer), 0, state.num_tokens)
        return kv[0], kv[-1]

    def num_sequences(self) -> int:
        return len(self._sequences)

    def sequence_ids(self) -> list[SequenceId]:
        return [SequenceId(s) for s in self._sequences]

    def stats(self) -> EngineStats:
        used = self.pool.num_used
        slots = used * self.block_size
        in_use = self.pool.ref_counts_view() > 0
        filled = int(self.pages.rows_filled[in_use].sum(dtype=np.int64))
        return EngineStats(
            block_size=self.block_size,
            blocks_total=self.pool.num_blocks,
            blocks_free=self.pool.num_free,
            blocks_used=used,
            sequences=len(self._sequences),
            tokens_stored=self._tokens_stored,
            slots_allocated=slots,
            slots_filled=filled,
            cow_copies=self._cow_copies,
            utilisation=filled / slots if slots else 1.0,
            fragmentation=(slots - filled) / slots if slots else 0.0,
        )

    def check_invariants(self, external_refs: Mapping[int, int] | npt.NDArray[np.integer] | None = None) -> None:
        """Assert that every block's ref count equals the references held by sequences plus
        ``external_refs`` (a mapping block -> count, or an array of counts per block, held by
        others such as the prefix cache); that the free stack is exact; that each block table
        covers its tokens; that only last blocks are partial and the pages hold their rows."""
        self.pool.check_invariants()
        bs = self.block_size
        n = self.pool.num_blocks
        expected = np.zeros(n, dtype=np.int64)
        tables = [s.blocks for s in self._sequences.values()]
        if tables:
            expected += np.bincount(np.concatenate(tables), minlength=n)
        if external_refs is not None:
            if isinstance(external_refs, Mapping):
                for block, count in external_refs.items():
                    expected[int(block)] += int(count)
            else:
                extra = np.asarray(external_refs, dtype=np.int64)
                assert extra.shape == (n,), f"external_refs has shape {extra.shape}, expected ({n},)"
                expected += extra
        actual = self.pool.ref_counts_view()
        bad = np.flatnonzero(actual != expected)
        assert bad.size == 0, (
            f"ref counts of block(s) {bad[:8].tolist()} are {actual[bad[:8]].tolist()}, but "
            f"holders account for {expected[bad[:8]].tolist()}"
        )
        total = 0
        fill = self.pages.rows_filled
        for state in self._sequences.values():
            total += state.num_tokens
            assert state.num_tokens <= self.max_context, f"sequence {state.seq_id} too long"
            assert state.num_blocks == -(-state.num_tokens // bs), (
                f"sequence {state.seq_id}: {state.num_blocks} blocks for {state.num_tokens} tokens"
            )
            if state.num_blocks:
                blocks = state.blocks
                assert np.all(fill[blocks[:-1]] == bs), (
                    f"sequence {state.seq_id} has a partial block before its last"
                )
                tail_rows = state.num_tokens - (state.num_blocks - 1) * bs
                assert fill[blocks[-1]] >= tail_rows, (
                    f"sequence {state.seq_id}: last block {blocks[-1]} holds {fill[blocks[-1]]} "
                    f"rows, the sequence uses {tail_rows}"
                )
        assert total == self._tokens_stored, f"tokens_stored {self._tokens_stored} != {total}"

    # --- internals ---------------------------------------------------------------------------

    def _get(self, seq_id: SequenceId | int) -> SequenceState:
        if isinstance(seq_id, np.integer):
            seq_id = int(seq_id)
        valid = isinstance(seq_id, int) and not isinstance(seq_id, bool)
        state = self._sequences.get(seq_id) if valid else None
        if state is None:
            if valid and 0 <= seq_id < self._next_id:
                raise UnknownSequence(f"sequence {seq_id} was already freed")
            raise UnknownSequence(f"unknown sequence {seq_id!r}")
        return state

    def _tail_is_shared(self, state: SequenceState) -> bool:
        """Whether the last block is partial and someone else holds it (append must copy)."""
        if state.num_tokens % self.block_size == 0:
            return False
        return bool(self.pool.ref_counts_view()[state.table[state.num_blocks - 1]] > 1)

    def _blocks_needed(self, state: SequenceState, n: int) -> int:
        if n == 0:
            return 0
        bs = self.block_size
        grow = -(-(state.num_tokens + n) // bs) - state.num_blocks
        return grow + int(self._tail_is_shared(state))

    def _reclaimable_now(self) -> int:
        return max(0, int(self._reclaimable())) if self._reclaimable is not None else 0

    def _take_blocks(self, n: int, what: str) -> BlockIds:
        """``n`` fresh blocks, reclaiming if needed; :class:`CapacityError` changes nothing in
        the engine (a reclaimer may have evicted cache blocks by then)."""
        pool = self.pool
        if n > pool.num_free:
            free = pool.num_free
            reclaimable = self._reclaimable_now()
            known = self._reclaimable is not None
            if self._reclaim is not None and (not known or free + reclaimable >= n):
                freed = self._reclaim(n - free)
                logger.debug("reclaimer freed %s of %s missing blocks", freed, n - free)
            if n > pool.num_free:
                raise CapacityError(
                    f"{what} needs {n} blocks ({n * self.block_size} token slots) but only "
                    f"{pool.num_free} are free and {reclaimable} reclaimable "
                    f"(pool of {pool.num_blocks}); free sequences or add capacity"
                )
        ids = pool.allocate(n)
        assert ids is not None, "allocation failed after the free count said it fits"
        return ids

    def _extend(self, state: SequenceState, token_ids: npt.NDArray[np.int64],
                kv: torch.Tensor | PageRows) -> None:
        """Append validated tokens and K/V (a tensor, or whole pages when the sequence ends on
        a block boundary): take the blocks (raises before any change), copy a shared partial
        tail, write the pages, then extend the record."""
        n = token_ids.size
        bs = self.block_size
        cow = self._tail_is_shared(state)
        grow = -(-(state.num_tokens + n) // bs) - state.num_blocks
        fresh = self._take_blocks(grow + int(cow), f"appending {n} token(s)")
        if cow:
            shared_tail = int(state.table[state.num_blocks - 1])
            copy = int(fresh[0])
            self.pages.copy_block(shared_tail, copy, state.num_tokens % bs)
            state.table[state.num_blocks - 1] = copy
            freed = self.pool.decref(np.array([shared_tail], dtype=np.int64))
            assert freed.size == 0, f"shared tail block {shared_tail} was not shared"
            self._cow_copies += 1
            fresh = fresh[1:]
        first = state.num_tokens // bs
        state.append_blocks(fresh, self.max_blocks_per_sequence)
        run = state.table[first : state.num_blocks]
        if isinstance(kv, torch.Tensor):
            self.pages.write_tokens(run, state.num_tokens % bs, kv)
        else:
            self.pages.write_pages(run, kv, n)
        state.append_tokens(token_ids, self.max_context)

    def _validate_tokens(self, tokens: TokenInput) -> npt.NDArray[np.int64]:
        """Token ids as a fresh 1-D int64 array, or :class:`InvalidTokens`."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        try:
            array = np.asarray(tokens)
        except (ValueError, TypeError) as exc:
            raise InvalidTokens(f"token ids must be a 1-D sequence of integers: {exc}") from None
        if array.ndim != 1:
            raise InvalidTokens(
                f"token ids must be a 1-D sequence of integers, got an array of shape {array.shape}"
            )
        if array.size == 0:
            return np.empty(0, dtype=np.int64)
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            if array.dtype == object:
                values = array.tolist()
                wrong = [t for t in values if isinstance(t, bool) or not isinstance(t, int)]
                if not wrong:  # Python ints too large for int64
                    big = max(values, key=abs)
                    raise InvalidTokens(
                        f"token id {big} is outside the vocabulary [0, {self.spec.vocab_size})"
                    )
                raise InvalidTokens(f"token ids must be integers, got {wrong[0]!r}")
            raise InvalidTokens(f"token ids must be integers, got dtype {array.dtype}")
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= self.spec.vocab_size:
            culprit = low if low < 0 else high
            raise InvalidTokens(
                f"token id {culprit} is outside the vocabulary [0, {self.spec.vocab_size})"
            )
        return array.astype(np.int64, copy=True)

    def _validate_shared_blocks(
        self, shared_blocks: SequenceOf[int] | BlockIds, shared_tokens: int
    ) -> BlockIds:
        try:
            array = np.asarray(shared_blocks)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"shared_blocks must be a 1-D sequence of block ids: {exc}") from None
        if array.size and (array.ndim != 1 or not np.issubdtype(array.dtype, np.integer)
                           or array.dtype == np.bool_):
            raise InvalidArgument(
                f"shared_blocks must be a 1-D sequence of integer block ids, got {array!r}"
            )
        ids = as_block_ids(array.astype(np.int64)) if array.size else np.empty(0, dtype=np.int64)
        expected = -(-shared_tokens // self.block_size)
        if ids.size != expected:
            raise InvalidArgument(
                f"{ids.size} shared block(s) for {shared_tokens} shared tokens; expected "
                f"{expected} at block_size {self.block_size}"
            )
        if ids.size:
            if ids.min() < 0 or ids.max() >= self.pool.num_blocks:
                raise InvalidArgument(
                    f"shared block id(s) outside the pool [0, {self.pool.num_blocks}): {ids.tolist()[:8]}"
                )
            counts = self.pool.ref_counts_view()[ids]
            if np.any(counts <= 0):
                raise InvalidArgument(
                    f"shared block(s) {ids[counts <= 0].tolist()[:8]} are free; only allocated "
                    "blocks can be shared"
                )
            if np.unique(ids).size != ids.size:
                raise InvalidArgument(f"shared_blocks repeat a block id: {ids.tolist()[:8]}")
            # Each block must hold the rows it is said to hold: whole blocks but the last,
            # which holds at least the shared tokens' rows (else the K/V read back are garbage).
            needed = np.minimum(self.block_size, shared_tokens - np.arange(ids.size) * self.block_size)
            short = ids[self.pages.rows_filled[ids] < needed]
            if short.size:
                raise InvalidArgument(
                    f"shared block(s) {short.tolist()[:8]} hold fewer written rows than the "
                    f"{shared_tokens} shared tokens need at block_size {self.block_size}"
                )
        return ids
