"""The per-sequence record of the paged KV engine: its token ids and its block table.

Both live in growable numpy arrays (capacity doubles, capped at the engine's maximum), so a
sequence of 131,072 tokens appends in amortised O(new tokens) vectorised copies and never
loops over tokens or blocks in Python. A record of a short sequence costs a few hundred
bytes, which keeps 10,000 concurrent sequences cheap.

The record knows nothing of the pool or the pages: the engine owns the references its block
table holds. Not thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Int64Array = npt.NDArray[np.int64]


def _grown(buffer: Int64Array, used: int, needed: int, cap: int) -> Int64Array:
    """``buffer`` if it holds ``needed`` items, else a copy with at least that capacity."""
    if needed <= buffer.size:
        return buffer
    capacity = min(max(needed, 2 * buffer.size, 4), max(cap, needed))
    grown = np.empty(capacity, dtype=np.int64)
    grown[:used] = buffer[:used]
    return grown


@dataclass(slots=True, eq=False)
class SequenceState:
    """Token ids ``tokens[:num_tokens]`` whose K/V live in blocks ``table[:num_blocks]``.

    Invariant (checked by the engine): ``num_blocks == ceil(num_tokens / block_size)``.
    """

    seq_id: int
    table: Int64Array
    num_blocks: int
    token_buf: Int64Array
    num_tokens: int

    @classmethod
    def empty(cls, seq_id: int, blocks_hint: int = 0, tokens_hint: int = 0) -> SequenceState:
        return cls(
            seq_id=seq_id,
            table=np.empty(max(blocks_hint, 1), dtype=np.int64),
            num_blocks=0,
            token_buf=np.empty(max(tokens_hint, 1), dtype=np.int64),
            num_tokens=0,
        )

    @property
    def blocks(self) -> Int64Array:
        """A view of the live block table (do not keep it across mutations)."""
        return self.table[: self.num_blocks]

    @property
    def token_ids(self) -> Int64Array:
        """A view of the live token ids (do not keep it across mutations)."""
        return self.token_buf[: self.num_tokens]

    def append_blocks(self, ids: Int64Array, max_blocks: int) -> None:
        end = self.num_blocks + ids.size
        self.table = _grown(self.table, self.num_blocks, end, max_blocks)
        self.table[self.num_blocks : end] = ids
        self.num_blocks = end

    def append_tokens(self, tokens: Int64Array, max_tokens: int) -> None:
        end = self.num_tokens + tokens.size
        self.token_buf = _grown(self.token_buf, self.num_tokens, end, max_tokens)
        self.token_buf[self.num_tokens : end] = tokens
        self.num_tokens = end

    def fork(self, seq_id: int) -> SequenceState:
        """A copy under ``seq_id`` with exact-size buffers (the caller increfs the blocks)."""
        return SequenceState(
            seq_id=seq_id,
            table=self.blocks.copy(),
            num_blocks=self.num_blocks,
            token_buf=self.token_ids.copy(),
            num_tokens=self.num_tokens,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the two arrays' buffers (not counting the Python objects)."""
        return int(self.table.nbytes + self.token_buf.nbytes)
