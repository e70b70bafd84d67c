"""Reading prompt workloads for the pre-flight analysis: JSONL token ids, text, block traces.

Each line of the file is one JSON object, all of one kind:

- ``{"tokens": [ids...]}``: token ids;
- ``{"text": "..."}``: text, turned into ids by a tokenizer the caller supplies;
- ``{"hash_ids": [...], "input_length": N}``: a block trace (Mooncake's format): the prompt as
  a chain of block ids, one per ``block_tokens`` (512) tokens, equal ids at equal positions
  meaning an identical prefix. It is analysed at block granularity (each id stands for 512
  tokens), or expanded into ``block_tokens`` deterministic token ids per block id, seeded by
  the id (:func:`expand_hash_ids`), when token-level detail is wanted.

Any line may also say how many tokens its request generated (``output_length``, as Mooncake's
traces do, or ``generated_tokens``): the ``reuse`` eviction policy learns from it which
requests come back. A non-negative integer; absent means unknown.

A :class:`Workload` keeps what it read in compact form (a trace stays a list of block ids;
expansion happens on each iteration), so memory follows the input, not the expanded tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kvcluster.errors import InvalidWorkload

Int64Array = npt.NDArray[np.int64]
Tokenizer = Callable[[str], Sequence[int]]

#: Tokens per block id in a block trace (Mooncake's traces use 512).
TRACE_BLOCK_TOKENS = 512
#: Vocabulary that expanded token ids are drawn from.
EXPANSION_VOCAB = 32000

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def expand_hash_ids(
    hash_ids: Sequence[int] | Int64Array,
    num_tokens: int,
    *,
    block_tokens: int = TRACE_BLOCK_TOKENS,
    vocab_size: int = EXPANSION_VOCAB,
) -> Int64Array:
    """Deterministic token ids for a trace prompt: ``block_tokens`` ids per block id, a
    splitmix64 hash of ``(block id, row)``, truncated to ``num_tokens``.

    Equal block ids give equal tokens wherever they appear; different ids give different
    tokens (up to chance collisions of individual ids). Vectorised, no Python loop.
    """
    ids = np.asarray(hash_ids, dtype=np.uint64)
    rows = np.arange(block_tokens, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (ids[:, None] * np.uint64(block_tokens) + rows).reshape(-1)[:num_tokens] + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z ^= z >> np.uint64(31)
    return (z % np.uint64(vocab_size)).astype(np.int64)


@dataclass(frozen=True, slots=True)
class Workload:
    """Prompts as read: ``records[i]`` holds prompt ``i``'s token ids (``kind`` "tokens" or
    "text") or block ids ("trace"); ``num_tokens[i]`` is its length in tokens.

    Iterating yields the arrays the analysis walks: token ids, or block ids when
    ``symbol_tokens`` > 1 (each then stands for that many tokens), or, with ``expand``,
    token ids expanded from the block ids on the fly.
    """

    records: tuple[Int64Array, ...]
    num_tokens: tuple[int, ...]
    kind: str
    expand: bool = False
    block_tokens: int = TRACE_BLOCK_TOKENS
    #: ``generated_tokens[i]``: what prompt ``i``'s request generated (None: not known).
    generated_tokens: tuple[int | None, ...] | None = None

    def generated(self) -> tuple[int | None, ...]:
        """Each prompt's generated length, None where the workload did not say."""
        return self.generated_tokens if self.generated_tokens is not None else (None,) * len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Int64Array]:
        if not self.expand:
            return iter(self.records)
        return (
            expand_hash_ids(ids, n, block_tokens=self.block_tokens)
            for ids, n in zip(self.records, self.num_tokens)
        )

    @property
    def symbol_tokens(self) -> int:
        """Tokens each id of an iterated prompt stands for."""
        return self.block_tokens if self.kind == "trace" and not self.expand else 1

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def expanded(self) -> Workload:
        """This trace analysed at token level (each block id expanded into its tokens)."""
        if self.kind != "trace":
            raise InvalidWorkload(f"only a block trace can be expanded into tokens, this is {self.kind!r}")
        return Workload(self.records, self.num_tokens, self.kind, True, self.block_tokens, self.generated_tokens)

    @classmethod
    def from_prompts(cls, prompts: Sequence[Sequence[int] | Int64Array]) -> Workload:
        records = tuple(_token_ids(p, f"prompt {i}") for i, p in enumerate(prompts))
        return cls(records, tuple(r.size for r in records), "tokens")


def read_workload(
    path: str | os.PathLike[str],
    *,
    tokenizer: Tokenizer | None = None,
    limit: int | None = None,
    block_tokens: int = TRACE_BLOCK_TOKENS,
) -> Workload:
    """Read a JSONL workload (see the module docstring). ``tokenizer`` turns text into ids
    (required for text lines). ``limit`` keeps the first prompts only.

    Raises :class:`InvalidWorkload` naming the file and line for anything unreadable.
    """
    file = Path(path)
    try:
        handle = file.open("r", encoding="utf-8")
    except OSError as exc:
        raise InvalidWorkload(f"{file}: cannot read the workload: {exc.strerror or exc}") from None
    records: list[Int64Array] = []
    lengths: list[int] = []
    generated: list[int | None] = []
    kind = None
    with handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidWorkload(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise InvalidWorkload(f"{where}: each line must be a JSON object")
            line_kind = _kind_of(record, where)
            generated.append(_generated_length(record, where))
            if kind is None:
                kind = line_kind
            elif line_kind != kind:
                raise InvalidWorkload(f"{where}: a {line_kind!r} line in a file of {kind!r} lines")
            if line_kind == "tokens":
                ids = _token_ids(record["tokens"], where)
                records.append(ids)
                lengths.append(ids.size)
            elif line_kind == "text":
                if tokenizer is None:
                    raise InvalidWorkload(f"{where}: the workload holds text; name a tokenizer to turn it into token ids")
                text = record["text"]
                if not isinstance(text, str) or not text:
                    raise InvalidWorkload(f"{where}: 'text' must be a non-empty string")
                ids = _token_ids(tokenizer(text), where)
                records.append(ids)
                lengths.append(ids.size)
            else:
                ids = _token_ids(record["hash_ids"], where, what="hash_ids")
                length = record.get("input_length")
                if isinstance(length, bool) or not isinstance(length, int):
                    raise InvalidWorkload(f"{where}: 'input_length' must be an integer, got {length!r}")
                if not (ids.size - 1) * block_tokens < length <= ids.size * block_tokens:
                    raise InvalidWorkload(
                        f"{where}: input_length {length} does not fit {ids.size} block(s) of {block_tokens} tokens"
                    )
                records.append(ids)
                lengths.append(length)
    if not records:
        raise InvalidWorkload(f"{file}: no prompts in the workload")
    assert kind is not None
    known = any(g is not None for g in generated)
    return Workload(tuple(records), tuple(lengths), kind, False, block_tokens, tuple(generated) if known else None)


def _generated_length(record: dict[str, object], where: str) -> int | None:
    for field in ("output_length", "generated_tokens"):
        if field in record:
            value = record[field]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidWorkload(f"{where}: '{field}' must be an integer >= 0, got {value!r}")
            return value
    return None


def _kind_of(record: dict[str, object], where: str) -> str:
    if "hash_ids" in record:
        return "trace"
    if "tokens" in record:
        return "tokens"
    if "text" in record:
        return "text"
    raise InvalidWorkload(
        f"{where}: expected a 'tokens', 'text' or 'hash_ids' field, got {sorted(record)[:5]}"
    )


def _token_ids(values: object, where: str, what: str = "tokens") -> Int64Array:
    if not isinstance(values, np.ndarray | list | tuple):
        raise InvalidWorkload(f"{where}: '{what}' must be a list of integers, got {type(values).__name__}")
    try:
        array = np.asarray(values)
    except (ValueError, OverflowError):
        raise InvalidWorkload(f"{where}: '{what}' must be a flat list of integers") from None
    if array.ndim != 1 or array.size == 0 or array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise InvalidWorkload(f"{where}: '{what}' must be a non-empty list of integers")
    if array.dtype == np.uint64 and int(array.max()) > np.iinfo(np.int64).max:
        raise InvalidWorkload(f"{where}: '{what}' holds an id outside int64")
    if int(array.min()) < 0:
        raise InvalidWorkload(f"{where}: '{what}' holds a negative id")
    return array.astype(np.int64, copy=False)
