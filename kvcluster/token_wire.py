"""Prompts on the wire between the client and the node actors.

A prompt and its namespace cross as one binary frame, cut into byte strings of at most
:data:`WIRE_CHUNK_BYTES` that are passed as the last, separate arguments of the actor call::

    u8 id type (1: uint16, 2: uint32, 3: int64) | u8 flags | u16 namespace length
    | namespace (UTF-8)
    | [16-byte prompt id]                       flags & REMEMBER: the node keeps the prompt
    | [16-byte base id | u32 base ids]          flags & BASE: the prompt starts with the first
                                                 ``base ids`` ids of a prompt the node kept
    | ids                                        (with BASE: only the ids after the base)

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
  64 KiB chunk instead of 256 KiB;
- even inlined, 64 KiB of arguments cost ~600 us more than 2 KiB per call, a third of a
  lookup. A long prompt usually repeats or extends one the client sent the same node before
  (a chat's next turn, an agent's growing context), so it is sent as a reference to that one
  plus its new ids (REMEMBER / BASE, :mod:`kvcluster.prompt_memory`); a node that no longer
  keeps the base answers :class:`~kvcluster.errors.UnknownPrompt` and the client sends it in
  full.

In-process nodes receive the same arguments and decode them the same way.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from kvcluster.errors import InvalidArgument, InvalidTokens
from kvcluster.prompt_memory import PROMPT_ID_BYTES, PromptMemory

#: Below Ray's default ``max_direct_call_object_size`` (100 KiB), so each chunk is inlined.
WIRE_CHUNK_BYTES = 96 * 1024
_HEADER = struct.Struct("<BBH")
_BASE = struct.Struct(f"<{PROMPT_ID_BYTES}sI")
#: Frame flags: the node keeps the prompt under the id that follows the namespace.
REMEMBER = 1
#: Frame flags: the ids continue a prompt the node keeps (base id and length follow).
BASE = 2
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


def prompt_ids(tokens: npt.NDArray[np.int64], dtype: np.dtype[Any]) -> bytes:
    """``tokens`` (already checked to fit ``dtype``) as the frame's id bytes."""
    return np.ascontiguousarray(tokens).astype(dtype, copy=False).tobytes()


def prompt_to_wire(namespace: str, tokens: npt.NDArray[np.int64], dtype: np.dtype[Any]) -> PromptWire:
    """``namespace`` and ``tokens`` (already checked to fit ``dtype``) as call arguments."""
    return frame_to_wire(namespace, dtype, prompt_ids(tokens, dtype))


def frame_to_wire(
    namespace: str,
    dtype: np.dtype[Any],
    ids: bytes,
    *,
    remember_as: bytes | None = None,
    base: tuple[bytes, int] | None = None,
) -> PromptWire:
    """The frame of a prompt whose ids (in ``dtype``) are ``ids``, as call arguments.

    ``remember_as``: have the node keep the prompt under this id. ``base``: ``(prompt id,
    ids)`` of a kept prompt whose first ``ids`` ids ``ids`` starts with; only the rest is sent.
    """
    if not isinstance(namespace, str):
        raise InvalidArgument(f"namespace must be a str, got {type(namespace).__name__}")
    name = namespace.encode()
    if len(name) > 0xFFFF:
        raise InvalidArgument(f"namespace is {len(name)} bytes long; the limit is 65535")
    flags = 0
    fields = [b"", name]
    if remember_as is not None:
        _check_prompt_id(remember_as)
        flags |= REMEMBER
        fields.append(remember_as)
    if base is not None:
        base_id, base_ids = base
        _check_prompt_id(base_id)
        if not 0 < base_ids * dtype.itemsize <= len(ids):
            raise InvalidArgument(f"a base of {base_ids} ids does not fit a prompt of {len(ids) // dtype.itemsize}")
        flags |= BASE
        fields.append(_BASE.pack(base_id, base_ids))
        ids = ids[base_ids * dtype.itemsize :]
    fields[0] = _HEADER.pack(_ID_TYPE_CODES[dtype], flags, len(name))
    fields.append(ids)
    frame = b"".join(fields)
    if len(frame) <= WIRE_CHUNK_BYTES:
        return (frame,)
    return tuple(frame[i : i + WIRE_CHUNK_BYTES] for i in range(0, len(frame), WIRE_CHUNK_BYTES))


def _check_prompt_id(prompt_id: bytes) -> None:
    if not isinstance(prompt_id, bytes) or len(prompt_id) != PROMPT_ID_BYTES:
        raise InvalidArgument(f"a prompt id is {PROMPT_ID_BYTES} bytes, got {prompt_id!r}")


def prompt_from_wire(
    parts: tuple[Any, ...], memory: PromptMemory | None = None
) -> tuple[str, npt.NDArray[np.int64]]:
    """The namespace and int64 token ids carried by ``parts``; :class:`InvalidTokens` if
    malformed. ``memory`` resolves a frame's base and keeps a prompt it asks to be kept
    (:class:`~kvcluster.errors.UnknownPrompt` for a base it no longer holds); without one, a
    frame with a base is refused and a request to keep the prompt is ignored."""
    if not parts or not all(isinstance(part, bytes | bytearray | memoryview) for part in parts):
        raise InvalidTokens("a prompt must arrive as one or more byte strings")
    frame = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
    if len(frame) < _HEADER.size:
        raise InvalidTokens(f"a prompt frame of {len(frame)} bytes is shorter than its header")
    code, flags, name_len = _HEADER.unpack_from(frame)
    dtype = _ID_TYPES.get(code)
    if dtype is None:
        raise InvalidTokens(f"unknown token id type {code}; expected one of {sorted(_ID_TYPES)}")
    if flags & ~(REMEMBER | BASE):
        raise InvalidTokens(f"unknown prompt frame flags {flags:#04x}")
    start = _HEADER.size + name_len
    if start > len(frame):
        raise InvalidTokens("a prompt frame ends inside its namespace")
    try:
        namespace = frame[_HEADER.size : start].decode()
    except UnicodeDecodeError as exc:
        raise InvalidTokens(f"the namespace in a prompt frame is not UTF-8: {exc}") from None
    remember_as = None
    if flags & REMEMBER:
        remember_as = frame[start : start + PROMPT_ID_BYTES]
        start += PROMPT_ID_BYTES
    base = None
    if flags & BASE:
        if start + _BASE.size > len(frame):
            raise InvalidTokens("a prompt frame ends inside its base reference")
        base = _BASE.unpack_from(frame, start)
        start += _BASE.size
    if start > len(frame):
        raise InvalidTokens("a prompt frame ends inside its prompt id")
    if (len(frame) - start) % dtype.itemsize:
        raise InvalidTokens(
            f"{len(frame) - start} bytes of token ids are not a whole number of {dtype.name}"
        )
    ids = frame[start:]
    if base is not None:
        if memory is None:
            raise InvalidTokens("the prompt continues a kept prompt, but this endpoint keeps none")
        ids = memory.recall(base[0], namespace, code, base[1] * dtype.itemsize) + ids
    if remember_as is not None and memory is not None:
        memory.remember(remember_as, namespace, code, ids, len(ids) // dtype.itemsize)
    return namespace, np.frombuffer(ids, dtype=dtype).astype(np.int64)
