"""Validation of the token ids and block tables handed to the prefix index.

The fast path costs a few attribute checks: a 1-D, C-contiguous ``int64`` numpy array is used
as is (no copy). Anything else is converted once. Range checks are separate
(:func:`check_token_range`) because the index only needs them on the part of a prompt that is
*not* already in the tree: a matched token equals a stored one, which was checked on insert.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from kvcluster.errors import InvalidArgument, InvalidTokens

Int64Array = npt.NDArray[np.int64]
TokenInput = Sequence[int] | npt.NDArray[np.integer[Any]]

_INT64_MAX = np.iinfo(np.int64).max
#: Up to this many tokens a range check iterates in C over a memoryview instead of paying
#: numpy's fixed cost per reduction.
_SMALL = 32


def as_token_array(tokens: TokenInput | Any, what: str = "tokens") -> Int64Array:
    """``tokens`` as a non-empty 1-D C-contiguous int64 array, or :class:`InvalidTokens`.

    Accepts numpy integer arrays (any width, signed or not), sequences of ints and CPU torch
    tensors. Rejects empty input, bools, floats, objects and anything not 1-D.
    """
    array: Int64Array
    if type(tokens) is np.ndarray and tokens.dtype == np.int64 and tokens.ndim == 1:
        array = tokens  # type: ignore[assignment]
    else:
        if isinstance(tokens, str | bytes):
            raise InvalidTokens(f"{what} must be a sequence of integer token ids, got {type(tokens).__name__}")
        try:
            raw = np.asarray(tokens)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidTokens(f"{what} must be a 1-D sequence of integer token ids: {exc}") from None
        if raw.ndim != 1:
            raise InvalidTokens(f"{what} must be 1-D, got shape {raw.shape}")
        if raw.size and (raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.integer)):
            if raw.dtype == object:
                wrong = [t for t in raw.tolist() if isinstance(t, bool) or not isinstance(t, int)]
                if not wrong:
                    raise InvalidTokens(f"{what} holds a token id outside int64: {max(raw.tolist(), key=abs)}")
                raise InvalidTokens(f"{what} must be integers, got {wrong[0]!r}")
            raise InvalidTokens(f"{what} must be integer token ids, got dtype {raw.dtype}")
        if raw.dtype == np.uint64 and raw.size and int(raw.max()) > _INT64_MAX:
            raise InvalidTokens(f"{what} holds token id {int(raw.max())}, outside int64")
        array = raw.astype(np.int64, copy=False)
    if array.size == 0:
        raise InvalidTokens(f"{what} must not be empty")
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array


def check_token_range(array: Int64Array, start: int, vocab_size: int | None) -> None:
    """Raise :class:`InvalidTokens` if ``array[start:]`` holds a negative id or one ``>=
    vocab_size`` (when given). Changes nothing."""
    n = array.size - start
    if n <= 0:
        return
    if n <= _SMALL:
        values = array[start:].data
        low, high = min(values), max(values)
    else:
        tail = array[start:]
        low, high = int(tail.min()), int(tail.max())
    if low < 0:
        raise InvalidTokens(f"token id {low} is negative")
    if vocab_size is not None and high >= vocab_size:
        raise InvalidTokens(f"token id {high} is outside the vocabulary [0, {vocab_size})")


def check_keep_tokens(keep_tokens: object) -> int:
    """``keep_tokens`` (a count of leading tokens an operation leaves alone) as an int;
    :class:`InvalidArgument` unless it is an integer >= 0."""
    if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, int | np.integer) or keep_tokens < 0:
        raise InvalidArgument(f"keep_tokens must be an integer >= 0, got {keep_tokens!r}")
    return int(keep_tokens)


def as_block_table(block_ids: Any, expected: int, num_blocks: int, what: str = "block_ids") -> Int64Array:
    """``block_ids`` as a 1-D int64 array of exactly ``expected`` ids in ``[0, num_blocks)``.

    Raises :class:`InvalidArgument` naming the problem. Whether the blocks are allocated is
    the pool's to check.
    """
    if type(block_ids) is np.ndarray and block_ids.dtype == np.int64 and block_ids.ndim == 1:
        ids = block_ids
    else:
        try:
            ids = np.asarray(block_ids)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidArgument(f"{what} must be a 1-D sequence of block ids: {exc}") from None
        if ids.ndim != 1 or (ids.size and (ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer))):
            raise InvalidArgument(f"{what} must be a 1-D sequence of integer block ids, got {block_ids!r:.80}")
        ids = ids.astype(np.int64, copy=False)
    if ids.size != expected:
        raise InvalidArgument(
            f"{what} has {ids.size} block id(s); the tokens need exactly {expected}"
        )
    if ids.size:
        if ids.size <= _SMALL:
            view = ids.data
            low, high = min(view), max(view)
        else:
            low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_blocks:
            raise InvalidArgument(
                f"{what} holds block id {low if low < 0 else high}, outside the pool [0, {num_blocks})"
            )
    if not ids.flags.c_contiguous:
        ids = np.ascontiguousarray(ids)
    return ids
