"""Salted block-hash chains: the identity of every full KV block across the cluster.

A prompt is cut into full blocks of ``block_size`` tokens (a trailing partial block has no
key). Block ``i``'s key commits to the whole prefix ``tokens[: (i + 1) * block_size]`` and to
everything that changes the bytes of its KV page::

    root(ns)  = H( "kvcluster.block_hash.v2" | algorithm | block_size | "int32le"
                   | model_fingerprint | salt | ns )              (length-prefixed fields)
    key[0]    = H( tokens[0:B] as little-endian int32        || root(ns) )
    key[i]    = H( tokens[iB:(i+1)B] as little-endian int32  || key[i-1] )

``H`` is XXH3-128 (``"xxh3_128"``, fast, not cryptographic) or SHA-256 truncated to its first
128 bits (``"sha256"``, for tenants that may craft collisions; a collision costs at most a
miss because every hit is verified against the stored tokens). Every key is 16 bytes.

Stability: only fixed byte encodings are hashed (never ``hash()``, never pickle), so a key
is the same in every process, machine and Python version; ``tests/routing`` pins vectors.

Speed: the chain is sequential by construction (each key needs its parent). The tokens come
before the parent key (v2; v1 put the parent first) so that with SHA-256 the first 64 bytes of
a block's input, the tokens at block size 16, can be compressed before its parent is known:
only one of its two compressions stays on the sequential path. Three forms compute the same
keys; ``benchmarks/bench_routing.py`` measures them:

- native (used when available): the optional C extension :mod:`routing._chainhash` runs the
  whole chain in one call with the GIL released, calling the XXH3-128 of the ``xxhash``
  package, and for SHA-256 the CPU's SHA extensions where it has them (overlapping each
  block's token compression with the chain), else the SHA-256 of Python's libcrypto. It is
  checked against the Python form on fixed inputs when first bound, and is skipped if it was
  not built (no C compiler) or fails that check;
- Python: all blocks become ``bytes`` objects in one vectorised numpy pass (a ``V{4B}`` view
  and ``tolist``), then a tight loop makes one C call per block over those inputs;
- reference (:func:`hash_chain_reference`): the straightforward per-block loop that slices
  and converts tokens for every block.

Representation: a chain is a numpy array of dtype :data:`BLOCK_HASH_DTYPE` (``V16``, one
16-byte key per element); ``arr.tobytes()`` is the keys back to back and ``arr.tolist()``
gives one :data:`BlockHash` (``bytes``) per block.

Thread-safety: :class:`BlockHasher` is immutable; all methods may be called concurrently.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, NewType, cast

import numpy as np
import numpy.typing as npt
import xxhash

from kvcluster.errors import InvalidArgument, InvalidTokens

BlockHash = NewType("BlockHash", bytes)
"""The 16-byte key of one full block (commits to its whole prefix)."""

BLOCK_HASH_BYTES = 16
BLOCK_HASH_DTYPE = np.dtype("V16")
BlockHashArray = npt.NDArray[np.void]
"""A chain of block keys: a 1-D array of dtype :data:`BLOCK_HASH_DTYPE`."""

HashAlgorithm = Literal["xxh3_128", "sha256"]
HASH_ALGORITHMS: tuple[HashAlgorithm, ...] = ("xxh3_128", "sha256")

#: Tokens are hashed as little-endian int32, so ids must lie in [0, 2**31).
MAX_TOKEN_ID = 2**31 - 1
_SCHEME = b"kvcluster.block_hash.v2"
_TOKEN_ENCODING = b"int32le"


def _xxh3_128(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


def _sha256_128(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:BLOCK_HASH_BYTES]


_DIGESTS: dict[str, Callable[[bytes], bytes]] = {"xxh3_128": _xxh3_128, "sha256": _sha256_128}


NativeChain = Callable[[bytes, Any, int], bytes]
"""``chain(start, blocks, width) -> keys``: ``blocks`` is any contiguous buffer of whole blocks."""


class _NativeChains:
    """The native chain functions, bound once per process on first use (see module docstring).

    ``for_algorithm`` returns ``chain(start, blocks, width) -> keys`` or ``None`` when the
    extension is missing or disagrees with the Python form.
    """

    _IDS = {"xxh3_128": 0, "sha256": 1}

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bound: dict[str, NativeChain | None] | None = None
        #: What computes native SHA-256 chains: "sha-ni", "libcrypto" or "python" (not native).
        self.sha256_engine = "python"

    def for_algorithm(self, algorithm: str) -> NativeChain | None:
        if self._bound is None:
            with self._lock:
                if self._bound is None:
                    self._bound = self._bind()
        return self._bound.get(algorithm)

    def _bind(self) -> dict[str, NativeChain | None]:
        try:
            from routing import _chainhash  # type: ignore[attr-defined]
        except ImportError:
            return {}
        libraries = [(_chainhash.bind_xxh3_128, importlib.import_module("xxhash._xxhash").__file__)]
        try:
            import _hashlib  # the OpenSSL binding behind hashlib.sha256

            libraries.append((_chainhash.bind_sha256, _hashlib.__file__))
        except (ImportError, AttributeError):
            pass  # SHA-256 can still be native on a CPU with SHA extensions
        for bind, path in libraries:
            with contextlib.suppress(OSError):  # that algorithm stays unbound: chain() refuses it below
                bind(path)
        bound: dict[str, NativeChain | None] = {}
        for algorithm, algorithm_id in self._IDS.items():
            native = functools.partial(_chainhash.chain, algorithm_id)
            try:
                agrees = self._agrees(algorithm, native)
            except RuntimeError:  # neither a bound library nor CPU support
                continue
            if agrees:
                bound[algorithm] = native
        self.sha256_engine = _chainhash.sha256_engine() if "sha256" in bound else "python"
        return bound

    @staticmethod
    def _agrees(algorithm: str, native: NativeChain) -> bool:
        digest = _DIGESTS[algorithm]
        start = bytes(range(BLOCK_HASH_BYTES))
        # XXH3's short, medium and long input paths; SHA-256 inputs ending in one or two
        # chunks after the whole chunks of tokens (40 + 16 + 9 bytes of padding > 64).
        for width in (4, 36, 40, 64, 68, 128, 1024):
            blocks = bytes((7 * i + width) % 251 for i in range(3 * width))
            key, expected = start, []
            for i in range(3):
                key = digest(blocks[i * width : (i + 1) * width] + key)
                expected.append(key)
            if native(start, blocks, width) != b"".join(expected):
                return False
        return True


_NATIVE_CHAINS = _NativeChains()


def _length_prefixed(*fields: bytes) -> bytes:
    # A length before every field keeps the encoding unambiguous ("ab"+"c" != "a"+"bc").
    return b"".join(len(f).to_bytes(4, "little") + f for f in fields)


def as_token_array(tokens: npt.NDArray[np.integer] | Sequence[int]) -> npt.NDArray[np.int32]:
    """``tokens`` as a contiguous little-endian int32 array; raises :class:`InvalidTokens`.

    Accepts any 1-D integer array or sequence of ints with every id in ``[0, 2**31)``.
    """
    if isinstance(tokens, np.ndarray):
        array = tokens
    else:
        if len(tokens) == 0:
            return np.empty(0, dtype="<i4")
        try:
            array = np.asarray(tokens)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidTokens(f"tokens must be a sequence of integers: {exc}") from None
    if array.ndim != 1:
        raise InvalidTokens(f"tokens must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise InvalidTokens(f"tokens must be integers, got dtype {array.dtype}")
    if array.size == 0:
        return np.empty(0, dtype="<i4")
    if array.dtype != np.dtype("<i4") or array.dtype.kind == "u":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > MAX_TOKEN_ID:
            bad = low if low < 0 else high
            raise InvalidTokens(f"token id {bad} is outside [0, {MAX_TOKEN_ID}]")
        return np.ascontiguousarray(array, dtype="<i4")
    if int(array.min()) < 0:
        raise InvalidTokens(f"token id {int(array.min())} is negative")
    return np.ascontiguousarray(array)


class BlockHasher:
    """Computes salted block-hash chains (see the module docstring for the exact scheme).

    ``salt`` is the cluster-wide salt (bytes), ``model_fingerprint`` the digest of the model
    fields that change a page's bytes; the per-request ``namespace`` (tenant) is mixed into
    the chain root, so equal prompts in different namespaces never share a key.
    """

    __slots__ = (
        "_algorithm",
        "_block_size",
        "_digest",
        "_header",
        "_model_fingerprint",
        "_native",
        "_salt",
    )

    def __init__(
        self,
        algorithm: HashAlgorithm,
        block_size: int,
        salt: bytes = b"",
        model_fingerprint: str = "",
        *,
        native: bool = True,
    ) -> None:
        if algorithm not in _DIGESTS:
            raise InvalidArgument(
                f"unknown hash algorithm {algorithm!r}; allowed: {', '.join(HASH_ALGORITHMS)}"
            )
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise InvalidArgument(f"block_size must be a positive integer, got {block_size!r}")
        if not isinstance(salt, bytes):
            raise InvalidArgument(f"salt must be bytes, got {type(salt).__name__}")
        self._algorithm: HashAlgorithm = algorithm
        self._block_size = block_size
        self._salt = salt
        self._model_fingerprint = model_fingerprint
        self._digest = _DIGESTS[algorithm]
        # ``native=False`` forces the Python loop (tests compare the two forms).
        self._native = _NATIVE_CHAINS.for_algorithm(algorithm) if native else None
        self._header = _length_prefixed(
            _SCHEME,
            algorithm.encode(),
            block_size.to_bytes(4, "little"),
            _TOKEN_ENCODING,
            model_fingerprint.encode(),
            salt,
        )

    @property
    def algorithm(self) -> HashAlgorithm:
        return self._algorithm

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def is_native(self) -> bool:
        """Whether chains are computed by the native extension (else by the Python loop)."""
        return self._native is not None

    @property
    def engine(self) -> str:
        """What computes this hasher's chains: ``"python"``, or natively ``"xxhash"`` (XXH3),
        ``"sha-ni"`` (the CPU's SHA extensions) or ``"libcrypto"`` (SHA-256)."""
        if self._native is None:
            return "python"
        return "xxhash" if self._algorithm == "xxh3_128" else _NATIVE_CHAINS.sha256_engine

    def __repr__(self) -> str:
        return (
            f"BlockHasher({self._algorithm!r}, block_size={self._block_size}, "
            f"model_fingerprint={self._model_fingerprint!r})"
        )

    def root(self, namespace: str = "default") -> BlockHash:
        """The chain root of ``namespace``: the parent of every chain's first block."""
        if not isinstance(namespace, str):
            raise InvalidArgument(f"namespace must be a str, got {type(namespace).__name__}")
        return BlockHash(self._digest(self._header + _length_prefixed(namespace.encode())))

    def num_full_blocks(self, num_tokens: int) -> int:
        return num_tokens // self._block_size

    def hash_chain(
        self, tokens: npt.NDArray[np.integer] | Sequence[int], namespace: str = "default"
    ) -> BlockHashArray:
        """The keys of every full block of ``tokens`` (a partial last block has none)."""
        return self.extend_chain(None, tokens, namespace)

    def extend_chain(
        self,
        parent: BlockHash | bytes | None,
        tokens: npt.NDArray[np.integer] | Sequence[int],
        namespace: str = "default",
    ) -> BlockHashArray:
        """Keys of the full blocks of ``tokens`` continuing the chain after ``parent``.

        ``parent`` is the key of the block just before ``tokens`` (``None``: ``tokens`` starts
        the prompt). ``extend_chain(chain[k-1], tokens[k*B:])`` equals ``chain[k:]``.
        """
        array = as_token_array(tokens)
        start = self._start(parent, namespace)
        num_blocks = array.size // self._block_size
        if num_blocks == 0:
            return np.empty(0, dtype=BLOCK_HASH_DTYPE)
        width = 4 * self._block_size
        if self._native is not None:
            whole = array[: num_blocks * self._block_size]
            return np.frombuffer(self._native(start, whole, width), dtype=BLOCK_HASH_DTYPE)
        # One vectorised pass turns every block into a bytes object (a V{4B} view), so the
        # sequential loop below is a single C call per block on ready-made inputs.
        blocks = (
            array[: num_blocks * self._block_size].view(np.dtype(f"V{width}")).tolist()
        )
        keys: list[bytes] = []
        append = keys.append
        key = start
        # Two specialised loops: calling the C digest directly avoids a Python frame per block.
        if self._algorithm == "xxh3_128":
            xxh3 = xxhash.xxh3_128_digest
            for block in blocks:
                key = xxh3(block + key)
                append(key)
        else:
            sha256 = hashlib.sha256
            for block in blocks:
                key = sha256(block + key).digest()[:BLOCK_HASH_BYTES]
                append(key)
        return np.frombuffer(b"".join(keys), dtype=BLOCK_HASH_DTYPE)

    def hash_chain_reference(
        self, tokens: npt.NDArray[np.integer] | Sequence[int], namespace: str = "default"
    ) -> BlockHashArray:
        """The same keys as :meth:`hash_chain`, computed the plain way: one Python iteration
        per block that slices, converts and hashes. Kept as the readable specification and
        as the per-block baseline of the benchmark."""
        array = as_token_array(tokens)
        key = self.root(namespace)
        out = np.empty(array.size // self._block_size, dtype=BLOCK_HASH_DTYPE)
        for i in range(out.size):
            block = array[i * self._block_size : (i + 1) * self._block_size]
            key = BlockHash(self._digest(block.astype("<i4").tobytes() + bytes(key)))
            out[i] = np.void(key)
        return out

    def _start(self, parent: BlockHash | bytes | None, namespace: str) -> bytes:
        if parent is None:
            return self.root(namespace)
        if not isinstance(parent, bytes) or len(parent) != BLOCK_HASH_BYTES:
            raise InvalidArgument(
                f"parent must be a {BLOCK_HASH_BYTES}-byte block hash, got {parent!r:.60}"
            )
        return parent


# --- representation helpers -------------------------------------------------------------------


def as_block_hashes(value: BlockHashArray | bytes | Sequence[bytes]) -> BlockHashArray:
    """A chain as a ``V16`` array from an array, keys back to back, or a sequence of keys."""
    if isinstance(value, np.ndarray):
        if value.dtype == BLOCK_HASH_DTYPE and value.ndim == 1:
            return value
        if value.dtype == np.uint8 and value.ndim == 2 and value.shape[1] == BLOCK_HASH_BYTES:
            return np.ascontiguousarray(value).view(BLOCK_HASH_DTYPE).reshape(-1)
        raise InvalidArgument(
            f"block hashes must be a 1-D {BLOCK_HASH_DTYPE} array, got {value.dtype} {value.shape}"
        )
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if len(data) % BLOCK_HASH_BYTES:
            raise InvalidArgument(
                f"packed block hashes must be a multiple of {BLOCK_HASH_BYTES} bytes, got {len(data)}"
            )
        return np.frombuffer(data, dtype=BLOCK_HASH_DTYPE)
    keys = list(value)
    for i, key in enumerate(keys):
        if not isinstance(key, bytes) or len(key) != BLOCK_HASH_BYTES:
            raise InvalidArgument(f"block hash {i} is not {BLOCK_HASH_BYTES} bytes: {key!r:.60}")
    return np.frombuffer(b"".join(keys), dtype=BLOCK_HASH_DTYPE)


def block_hash_list(hashes: BlockHashArray) -> list[BlockHash]:
    """One ``bytes`` key per block (a ``V16`` array's ``tolist`` yields ``bytes``)."""
    return cast(list[BlockHash], hashes.tolist())


def block_hash_hex(key: bytes) -> str:
    return key.hex()


def prefix_family(hashes: BlockHashArray | Sequence[bytes]) -> str:
    """The prefix family of a chain: the hex of its first block's key.

    Every chain that shares its first block belongs to one family; the registry keys of a
    family carry it as their Redis Cluster hash tag so one lookup stays in one slot.
    """
    if len(hashes) == 0:
        raise InvalidArgument("an empty chain has no prefix family")
    first = hashes[0]
    key = first.tobytes() if isinstance(first, np.void) else bytes(first)
    return key.hex()
