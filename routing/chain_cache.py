"""Recently hashed prompts, so a prompt that repeats or extends one hashes only its new blocks.

Each turn of a chat sends the whole conversation again, and a router hashes all of it again:
for a 32K-token history that is 2,048 sequential digests (~160 us) on every request. A
:class:`ChainCache` keeps, per prefix family (namespace and first block's tokens), the tokens
and block-hash chain of the last prompt hashed; the next prompt of the family is compared
with it token by token (one vectorised comparison), the chain of the common full blocks is
reused and only the rest is hashed (:meth:`BlockHasher.extend_chain`). The result is exactly
``hasher.hash_chain(tokens, namespace)``: tokens are compared, never assumed.

Memory is bounded by ``max_tokens`` over all entries (least recently used first out).
Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvcluster.errors import InvalidArgument
from routing.block_hashing import BLOCK_HASH_DTYPE, BlockHashArray, BlockHasher, as_token_array


@dataclass(frozen=True, slots=True)
class _Entry:
    tokens: npt.NDArray[np.int32]  # the full blocks' tokens only (the hasher's int32 form)
    chain: BlockHashArray


class ChainCache:
    """``hash_chain`` with memory of recent prompts (see the module docstring)."""

    def __init__(self, hasher: BlockHasher, max_tokens: int) -> None:
        if max_tokens <= 0:
            raise InvalidArgument(f"max_tokens must be positive, got {max_tokens}")
        self._hasher = hasher
        self._max_tokens = max_tokens
        self._entries: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self.reused_blocks = 0
        self.hashed_blocks = 0

    def __len__(self) -> int:
        return len(self._entries)

    def hash_chain(self, tokens: npt.NDArray[np.integer] | list[int], namespace: str = "default") -> BlockHashArray:
        """Exactly ``hasher.hash_chain(tokens, namespace)``, reusing a cached common prefix."""
        array = as_token_array(tokens)
        bs = self._hasher.block_size
        full = (array.size // bs) * bs
        if full == 0:
            return np.empty(0, dtype=BLOCK_HASH_DTYPE)
        key = (namespace, array[:bs].tobytes())
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        reused = 0 if entry is None else _common_blocks(entry.tokens, array[:full], bs)
        if entry is not None and reused * bs == full:
            chain = entry.chain[:reused]
        elif reused:
            rest = self._hasher.extend_chain(entry.chain[reused - 1].tobytes(), array[reused * bs : full], namespace)  # type: ignore[union-attr]
            chain = np.concatenate([entry.chain[:reused], rest])  # type: ignore[union-attr]
        else:
            chain = self._hasher.hash_chain(array[:full], namespace)
        with self._lock:
            self.reused_blocks += reused
            self.hashed_blocks += chain.size - reused
            if entry is None or full > entry.tokens.size:
                self._keep(key, _Entry(array[:full].copy(), chain))
        return chain

    def _keep(self, key: tuple[str, bytes], entry: _Entry) -> None:
        """Under the lock: remember ``entry`` (the longest prompt of its family), then drop
        the least recently used entries beyond ``max_tokens``."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._tokens -= old.tokens.size
        if entry.tokens.size > self._max_tokens:
            return
        self._entries[key] = entry
        self._tokens += entry.tokens.size
        while self._tokens > self._max_tokens:
            _, dropped = self._entries.popitem(last=False)
            self._tokens -= dropped.tokens.size


def _common_blocks(cached: npt.NDArray[np.int32], tokens: npt.NDArray[np.int32], bs: int) -> int:
    """How many leading full blocks ``cached`` and ``tokens`` share."""
    n = min(cached.size, tokens.size)
    differ = np.flatnonzero(cached[:n] != tokens[:n])
    same = int(differ[0]) if differ.size else n
    return same // bs
