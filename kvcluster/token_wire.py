"""Prompts on the wire between the client and the node actors.

A prompt and its namespace cross as one binary frame, cut into byte strings of at most
:data:`WIRE_CHUNK_BYTES` that are passed as the last, separate arguments of the actor call::

    u8 id type (1: uint16, 2: uint32, 3: int64) | u16 namespace length | namespace (UTF-8) | ids

The ids use the narrowest unsigned type that holds the model's vocabulary (``uint16`` up to
65,536 ids, ``uint32`` beyond). Why this shape, measured on these machines between simulated
Ray nodes:

- every argument of a Ray call costs ~40-100 us to serialise and hand over, and ``bytes`` are
  the cheapest kind (a numpy array of 1K ids cost ~220 us against ~50 us as bytes), so a
  prompt up to 96 KiB is a single argument, namespace included;
- Ray inlines an argument of up to 100 KiB (``max_direct_call_object_size``) in the call
  itself; a larger one is put in the object store and pulled by the callee's node, which cost
  ~5 ms for 128 KiB against ~1 ms for the same bytes as two inlined chunks (Ray inlines up to
  10 MiB of arguments per call, so every prompt up to ``max_context`` stays inline);
- narrow ids halve or quarter the bytes: a 32K-token prompt of a 32K-vocabulary model is one
  64 KiB chunk instead of 256 KiB.

In-process nodes receive the same arguments and decode them the same way.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from kvcluster.errors import InvalidArgument, InvalidTokens

#: Below Ray's default ``max_direct_call_object_size`` (100 KiB), so each chunk is inlined.
WIRE_CHUNK_BYTES = 96 * 1024
_HEADER = struct.Struct("<BH")
_ID_TYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<u2"), 2: np.dtype("<u4"), 3: np.dtype("<i8")}
_ID_TYPE_CODES = {dtype: code for code, dtype in _ID_TYPES.items()}

PromptWire = tuple[bytes, ...]


def wire_dtype(vocab_size: int) -> np.dtype[Any]:
    """The narrowest id type that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size <= 1 << 16:
        return _ID_TYPES[1]
    if vocab_size <= 1 << 32:
        return _ID_TYPES[2]
    return _ID_TYPES[3]


def prompt_to_wire(namespace: str, tokens: npt.NDArray[np.int64], dtype: np.dtype[Any]) -> PromptWire:
    """``namespace`` and ``tokens`` (already checked to fit ``dtype``) as call arguments."""
    name = namespace.encode()
    if len(name) > 0xFFFF:
        raise InvalidArgument(f"namespace is {len(name)} bytes long; the limit is 65535")
    ids = np.ascontiguousarray(tokens).astype(dtype, copy=False)
    frame = b"".join((_HEADER.pack(_ID_TYPE_CODES[dtype], len(name)), name, ids.data))
    if len(frame) <= WIRE_CHUNK_BYTES:
        return (frame,)
    return tuple(frame[i : i + WIRE_CHUNK_BYTES] for i in range(0, len(frame), WIRE_CHUNK_BYTES))


def prompt_from_wire(parts: tuple[Any, ...]) -> tuple[str, npt.NDArray[np.int64]]:
    """The namespace and int64 token ids carried by ``parts``; :class:`InvalidTokens` if malformed."""
    if not parts or not all(isinstance(part, bytes | bytearray | memoryview) for part in parts):
        raise InvalidTokens("a prompt must arrive as one or more byte strings")
    frame = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
    if len(frame) < _HEADER.size:
        raise InvalidTokens(f"a prompt frame of {len(frame)} bytes is shorter than its header")
    code, name_len = _HEADER.unpack_from(frame)
    dtype = _ID_TYPES.get(code)
    if dtype is None:
        raise InvalidTokens(f"unknown token id type {code}; expected one of {sorted(_ID_TYPES)}")
    start = _HEADER.size + name_len
    if start > len(frame):
        raise InvalidTokens("a prompt frame ends inside its namespace")
    try:
        namespace = frame[_HEADER.size : start].decode()
    except UnicodeDecodeError as exc:
        raise InvalidTokens(f"the namespace in a prompt frame is not UTF-8: {exc}") from None
    if (len(frame) - start) % dtype.itemsize:
        raise InvalidTokens(
            f"{len(frame) - start} bytes of token ids are not a whole number of {dtype.name}"
        )
    return namespace, np.frombuffer(frame, dtype=dtype, offset=start).astype(np.int64)
