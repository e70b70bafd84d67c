"""Block-hash chains: fixed vectors, the specification, salting, validation."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvcluster.errors import InvalidArgument, InvalidTokens
from routing.block_hashing import (
    BLOCK_HASH_DTYPE,
    BlockHasher,
    _NativeChains,
    as_block_hashes,
    as_token_array,
    block_hash_list,
    prefix_family,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Pinned outputs for tokens 0..9, block size 4, salt b"cluster-salt", fingerprint "llama-fp",
# namespace "tenant-a". A change here breaks every registry entry and peer in a cluster.
VECTORS = {
    "xxh3_128": (
        "4be3e89cadfe86561fcf70109b00e01a",
        ["691618c121ca851fb4cd12759fd83713", "fb33dfc8a7eaa52ef74d8dfc31c32758"],
    ),
    "sha256": (
        "9d6c20784b4c8f0845d92ef382d195d1",
        ["fd0780c117eeac1c4948d3ee65d6a082", "40ba8ca0a6a17aa74ba15be1258c2b94"],
    ),
}


def _spec_chain(algorithm: str, block_size: int, salt: bytes, fingerprint: str,
                namespace: str, tokens: list[int]) -> list[bytes]:
    """The scheme of the module docstring, written out independently with struct."""

    def digest(data: bytes) -> bytes:
        if algorithm == "xxh3_128":
            return xxhash.xxh3_128(data).digest()
        return hashlib.sha256(data).digest()[:16]

    def fields(*items: bytes) -> bytes:
        return b"".join(struct.pack("<I", len(x)) + x for x in items)

    header = fields(b"kvcluster.block_hash.v2", algorithm.encode(), struct.pack("<I", block_size),
                    b"int32le", fingerprint.encode(), salt)
    key = digest(header + fields(namespace.encode()))
    out = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size:(i + 1) * block_size]
        key = digest(struct.pack(f"<{block_size}i", *block) + key)
        out.append(key)
    return out


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_fixed_vectors(algorithm: str, native: bool) -> None:
    hasher = BlockHasher(algorithm, 4, b"cluster-salt", "llama-fp", native=native)  # type: ignore[arg-type]
    root, keys = VECTORS[algorithm]
    assert hasher.root("tenant-a").hex() == root
    chain = hasher.hash_chain(list(range(10)), "tenant-a")
    assert chain.dtype == BLOCK_HASH_DTYPE
    assert [k.hex() for k in block_hash_list(chain)] == keys


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("block_size", [1, 16, 33, 256])  # XXH3's short, mid and long inputs
@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_matches_written_out_specification(algorithm: str, block_size: int, native: bool) -> None:
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 2**31 - 1, block_size * 37 + 5).tolist()
    hasher = BlockHasher(algorithm, block_size, b"s", "fp", native=native)  # type: ignore[arg-type]
    expected = _spec_chain(algorithm, block_size, b"s", "fp", "ns", tokens)
    assert block_hash_list(hasher.hash_chain(tokens, "ns")) == expected
    assert block_hash_list(hasher.hash_chain_reference(np.asarray(tokens), "ns")) == expected
    parent = expected[9]
    assert block_hash_list(hasher.extend_chain(parent, tokens[10 * block_size :], "ns")) == expected[10:]


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_native_extension_is_used_when_built(algorithm: str) -> None:
    """The extension is built by every install with a C compiler (this test suite's), and
    binds both digests; a hasher falls back to Python only when asked."""
    pytest.importorskip("routing._chainhash")
    assert BlockHasher(algorithm, 16).is_native  # type: ignore[arg-type]
    assert not BlockHasher(algorithm, 16, native=False).is_native  # type: ignore[arg-type]


@pytest.mark.parametrize("width", [4, 8, 36, 40, 44, 60, 64, 68, 100, 104, 128, 132, 1024])
def test_sha256_engines_agree(width: int) -> None:
    """The CPU's SHA extensions (where present) and libcrypto give the keys of the Python
    form, for every way a block's input splits into 64-byte chunks (one or two tail chunks)."""
    chainhash = pytest.importorskip("routing._chainhash")
    BlockHasher("sha256", 16)  # binds the libraries
    rng = np.random.default_rng(width)
    start = rng.bytes(16)
    for count in (0, 1, 2, 9):
        blocks = rng.bytes(count * width)
        key, expected = start, []
        for i in range(count):
            key = hashlib.sha256(blocks[i * width : (i + 1) * width] + key).digest()[:16]
            expected.append(key)
        assert chainhash.chain(1, start, blocks, width) == b"".join(expected)  # fastest engine
        assert chainhash.chain(2, start, blocks, width) == b"".join(expected)  # libcrypto


def test_native_chain_that_disagrees_is_not_used() -> None:
    def python_chain(start: bytes, blocks: bytes, width: int) -> bytes:
        key, out = start, []
        for i in range(len(blocks) // width):
            key = xxhash.xxh3_128_digest(blocks[i * width : (i + 1) * width] + key)
            out.append(key)
        return b"".join(out)

    def shifted_chain(start: bytes, blocks: bytes, width: int) -> bytes:
        return (start + python_chain(start, blocks, width))[: len(blocks) // width * 16]

    assert _NativeChains._agrees("xxh3_128", python_chain)
    assert not _NativeChains._agrees("xxh3_128", shifted_chain)
    assert not _NativeChains._agrees("sha256", python_chain)


def test_stable_across_processes() -> None:
    code = (
        "from routing.block_hashing import BlockHasher;"
        "print(BlockHasher('xxh3_128', 4, b'cluster-salt', 'llama-fp')"
        ".hash_chain(list(range(10)), 'tenant-a').tobytes().hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}, cwd=REPO_ROOT)
    assert out.stdout.strip() == "".join(VECTORS["xxh3_128"][1])


def test_every_extra_key_changes_every_block() -> None:
    tokens = np.arange(64, dtype=np.int32)
    base = BlockHasher("xxh3_128", 16, b"salt", "model-a").hash_chain(tokens, "ns")
    variants = [
        BlockHasher("xxh3_128", 16, b"salt", "model-a").hash_chain(tokens, "other-ns"),
        BlockHasher("xxh3_128", 16, b"pepper", "model-a").hash_chain(tokens, "ns"),
        BlockHasher("xxh3_128", 16, b"salt", "model-b").hash_chain(tokens, "ns"),
        BlockHasher("sha256", 16, b"salt", "model-a").hash_chain(tokens, "ns"),
        BlockHasher("xxh3_128", 8, b"salt", "model-a").hash_chain(tokens, "ns")[1::2],
    ]
    for other in variants:
        assert len(other) == 4
        assert not np.any(other == base)


def test_key_commits_to_whole_prefix() -> None:
    hasher = BlockHasher("xxh3_128", 4)
    a = hasher.hash_chain([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    b = hasher.hash_chain([1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11, 12])
    assert not np.any(a == b)  # one token in block 0 changes every later key
    c = hasher.hash_chain([1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0])
    assert list(a[:2] == c[:2]) == [True, True] and a[2] != c[2]
    # equal blocks at different depths get different keys
    d = hasher.hash_chain([7, 7, 7, 7, 7, 7, 7, 7])
    assert d[0] != d[1]


def test_partial_block_and_empty() -> None:
    hasher = BlockHasher("xxh3_128", 4)
    assert len(hasher.hash_chain([1, 2, 3])) == 0
    assert len(hasher.hash_chain([])) == 0
    assert len(hasher.hash_chain(np.arange(11))) == 2


def test_extend_chain_continues_from_parent() -> None:
    hasher = BlockHasher("sha256", 4)
    tokens = list(range(40))
    chain = hasher.hash_chain(tokens, "t")
    tail = hasher.extend_chain(chain[3].tobytes(), tokens[16:], "t")
    assert np.array_equal(tail, chain[4:])
    with pytest.raises(InvalidArgument, match="16-byte"):
        hasher.extend_chain(b"short", tokens)


def test_dtype_independent() -> None:
    hasher = BlockHasher("xxh3_128", 4)
    tokens = [5, 0, 2**31 - 1, 17, 3, 3, 3, 3]
    ref = hasher.hash_chain(tokens)
    for dtype in (np.int32, np.int64, np.uint32, np.uint64):
        assert np.array_equal(hasher.hash_chain(np.asarray(tokens, dtype=dtype)), ref)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([1, -1], "outside"),
        (np.array([2**31]), "outside"),
        (np.array([1.0, 2.0]), "integers"),
        (np.zeros((2, 2), dtype=np.int32), "1-D"),
        (np.array([-3], dtype=np.int32), "negative"),
        (["a", "b"], "integers"),
        (np.array([True]), "integers"),
    ],
)
def test_bad_tokens_rejected(bad: object, message: str) -> None:
    with pytest.raises(InvalidTokens, match=message):
        as_token_array(bad)  # type: ignore[arg-type]


def test_bad_construction() -> None:
    with pytest.raises(InvalidArgument, match="algorithm"):
        BlockHasher("md5", 16)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="block_size"):
        BlockHasher("xxh3_128", 0)
    with pytest.raises(InvalidArgument, match="salt"):
        BlockHasher("xxh3_128", 16, "text")  # type: ignore[arg-type]


def test_representation_helpers() -> None:
    hasher = BlockHasher("xxh3_128", 2)
    chain = hasher.hash_chain([1, 2, 3, 4, 5, 6])
    keys = block_hash_list(chain)
    assert all(isinstance(k, bytes) and len(k) == 16 for k in keys)
    assert np.array_equal(as_block_hashes(chain.tobytes()), chain)
    assert np.array_equal(as_block_hashes(keys), chain)
    assert np.array_equal(as_block_hashes(np.frombuffer(chain.tobytes(), np.uint8).reshape(-1, 16)), chain)
    assert prefix_family(chain) == keys[0].hex() == prefix_family(keys)
    with pytest.raises(InvalidArgument):
        prefix_family(chain[:0])
    with pytest.raises(InvalidArgument):
        as_block_hashes(b"x" * 17)
    with pytest.raises(InvalidArgument):
        as_block_hashes([b"x" * 15])
