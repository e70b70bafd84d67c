"""Prompts on the wire between the client and the node actors.

The client sends token ids as the raw bytes of a native int64 array. Ray serialises a
``bytes`` argument in a fraction of the time a numpy array takes (~50 us against ~220 us for
1K tokens, measured on these machines), and that cost sits on the path of every
``route_and_lookup``. Nodes also accept numpy arrays and lists.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from kvcluster.errors import InvalidTokens


def tokens_to_wire(tokens: npt.NDArray[np.int64]) -> bytes:
    return np.ascontiguousarray(tokens, dtype=np.int64).tobytes()


def tokens_from_wire(tokens: Any) -> Any:
    if isinstance(tokens, bytes | bytearray | memoryview):
        if len(tokens) % 8:
            raise InvalidTokens(f"a token buffer of {len(tokens)} bytes is not a whole number of int64")
        return np.frombuffer(tokens, dtype=np.int64)
    return tokens
