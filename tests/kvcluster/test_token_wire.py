"""The client-to-node prompt wire: narrow ids, chunks small enough for Ray to inline."""

from __future__ import annotations

import numpy as np
import pytest

from kvcluster.errors import InvalidArgument, InvalidTokens
from kvcluster.token_wire import WIRE_CHUNK_BYTES, prompt_from_wire, prompt_to_wire, wire_dtype


@pytest.mark.parametrize(
    ("vocab_size", "dtype"),
    [(32_000, "<u2"), (65_536, "<u2"), (65_537, "<u4"), (128_256, "<u4"), (1 << 32, "<u4"), ((1 << 32) + 1, "<i8")],
)
def test_wire_dtype_is_the_narrowest_that_holds_the_vocabulary(vocab_size: int, dtype: str) -> None:
    assert wire_dtype(vocab_size).str == dtype


@pytest.mark.parametrize("length", [1, 7, WIRE_CHUNK_BYTES // 4, WIRE_CHUNK_BYTES // 4 + 1, 32_768, 131_072])
@pytest.mark.parametrize("vocab_size", [32_000, 128_256, 1 << 40])
@pytest.mark.parametrize("namespace", ["default", "tenant-ä"])
def test_round_trip_is_exact_and_every_chunk_is_inlinable(length: int, vocab_size: int, namespace: str) -> None:
    tokens = np.random.default_rng(length).integers(0, vocab_size, length).astype(np.int64)
    tokens[0] = vocab_size - 1  # the largest id survives the narrow type
    dtype = wire_dtype(vocab_size)
    wire = prompt_to_wire(namespace, tokens, dtype)
    assert all(isinstance(chunk, bytes) and 0 < len(chunk) <= WIRE_CHUNK_BYTES for chunk in wire)
    assert sum(map(len, wire)) == 4 + len(namespace.encode()) + length * dtype.itemsize
    got_namespace, decoded = prompt_from_wire(wire)
    assert got_namespace == namespace
    assert decoded.dtype == np.int64 and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, tokens)


def test_a_32k_prompt_of_a_small_vocabulary_is_a_single_argument() -> None:
    wire = prompt_to_wire("default", np.arange(32_768, dtype=np.int64), wire_dtype(32_768))
    assert len(wire) == 1 and len(wire[0]) == 4 + 7 + 65_536


def test_an_overlong_namespace_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="namespace is 65536 bytes"):
        prompt_to_wire("n" * 65_536, np.arange(3), wire_dtype(10))


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ((), "one or more byte strings"),
        (("text",), "one or more byte strings"),
        ((np.arange(3),), "one or more byte strings"),
        ((b"\x01",), "shorter than its header"),
        ((b"\x09\x00\x00\x00",), "unknown token id type 9"),
        ((b"\x01\x08\x00\x00",), "unknown prompt frame flags 0x08"),
        ((b"\x01\x00\x05\x00abc",), "ends inside its namespace"),
        ((b"\x01\x00\x01\x00\xff",), "not UTF-8"),
        ((b"\x02\x00\x00\x00" + b"\0" * 6,), "6 bytes of token ids are not a whole number of uint32"),
        ((b"\x01\x02\x00\x00" + b"\0" * 10,), "ends inside its base reference"),
        ((b"\x01\x01\x00\x00" + b"\0" * 10,), "ends inside its prompt id"),
        ((b"\x01\x02\x00\x00" + b"\0" * 20 + b"\1\0",), "this endpoint keeps none"),
    ],
)
def test_malformed_wire_is_refused_by_name(parts: tuple[object, ...], message: str) -> None:
    with pytest.raises(InvalidTokens, match=message):
        prompt_from_wire(parts)
