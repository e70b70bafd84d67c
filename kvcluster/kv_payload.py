"""K/V tensors on the wire between the client and node actors.

Ray moves numpy arrays through its object store without pickling their bytes (and a same-node
``ray.get`` is zero-copy), but bf16 and fp8 tensors have no numpy form. A :class:`KVPayload`
carries the raw bytes as a ``uint8`` array with the dtype name and shape beside them, so any
KV dtype crosses a process boundary as one contiguous buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcluster.errors import InvalidKV

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class KVPayload:
    """K/V bytes: ``data`` is ``uint8`` of ``prod(shape) * itemsize`` bytes, C-contiguous."""

    data: np.ndarray
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> KVPayload:
        if dtype_name(tensor.dtype) not in _DTYPES:
            raise InvalidKV(f"K/V dtype {tensor.dtype} is not supported; use one of {sorted(_DTYPES)}")
        flat = tensor.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1)
        return cls(data=flat.numpy(), dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape))

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor these bytes hold. Shares memory with ``data`` on CPU (no copy)."""
        if self.dtype not in _DTYPES:
            raise InvalidKV(f"payload dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        dtype = _DTYPES[self.dtype]
        itemsize = torch.empty((), dtype=dtype).element_size()
        expected = int(np.prod(self.shape, dtype=np.int64)) * itemsize
        if self.data.dtype != np.uint8 or self.data.size != expected:
            raise InvalidKV(
                f"payload holds {self.data.size} bytes of {self.data.dtype}; shape {self.shape} "
                f"of {self.dtype} needs {expected} bytes of uint8"
            )
        if expected == 0:  # torch cannot view an empty byte buffer as a wider dtype
            return torch.empty(self.shape, dtype=dtype, device=device)
        # Arrays that came through Ray's object store are read-only; torch wants writable memory.
        data = self.data if self.data.flags.writeable else self.data.copy()
        tensor = torch.from_numpy(data).view(dtype).reshape(self.shape)
        return tensor if torch.device(device).type == "cpu" else tensor.to(device)

    @property
    def nbytes(self) -> int:
        return int(self.data.size)


@dataclass(frozen=True, slots=True)
class KVPages:
    """Whole KV pages in the cache's own page layout: what one node sends another.

    The rows of ``segments`` (``(n_i, page_bytes)`` uint8 arrays), in order, are the pages:
    page ``i`` holds tokens ``[i * block_size, (i + 1) * block_size)`` of the prefix, laid out
    ``page_shape`` = ``(layers, kv_components, block_size, kv_heads, head_dim)`` in
    ``dtype``, and only the first ``num_tokens`` tokens are meaningful (the last page may be
    partial). Node-to-node pulls use this form rather than :class:`KVPayload`: whole pages
    move as memcpys, while the token-major layout costs a strided transpose at each end. A
    node exports its device pages as views of its pool, one segment per run of consecutive
    blocks, so they reach the object store in one copy, with no gather first.
    """

    segments: tuple[np.ndarray, ...]
    dtype: str
    page_shape: tuple[int, ...]
    num_tokens: int

    def checked_segments(self) -> tuple[np.ndarray, ...]:
        """``segments``, checked: :class:`InvalidKV` unless they are a non-empty tuple of 2-D
        uint8 arrays of one width (a receiver writes them where they go, never joined)."""
        segments = self.segments
        if not isinstance(segments, tuple) or not segments or not all(
            isinstance(segment, np.ndarray) and segment.dtype == np.uint8 and segment.ndim == 2
            for segment in segments
        ):
            raise InvalidKV("pages must be a non-empty tuple of 2-D uint8 arrays")
        if len({segment.shape[1] for segment in segments}) != 1:
            raise InvalidKV(f"page segments of different widths: {[s.shape for s in segments]}")
        return segments

    def rows(self) -> np.ndarray:
        """Every page as one ``(pages, page_bytes)`` array: the only segment itself, or the
        segments joined (a copy). :class:`InvalidKV` as :meth:`checked_segments`."""
        segments = self.checked_segments()
        return segments[0] if len(segments) == 1 else np.concatenate(segments)

    def copied(self) -> KVPages:
        """The same pages in memory of their own (one segment), safe to keep."""
        rows = self.rows()
        return KVPages((rows.copy() if len(self.segments) == 1 else rows,), self.dtype,
                       self.page_shape, self.num_tokens)

    def check_compatible(self, dtype: torch.dtype, page_shape: tuple[int, ...]) -> None:
        """:class:`InvalidKV` unless these pages have the receiving cache's dtype and shape."""
        if self.dtype != dtype_name(dtype) or tuple(self.page_shape) != tuple(page_shape):
            raise InvalidKV(
                f"pages of {self.dtype} {tuple(self.page_shape)} do not fit a cache of "
                f"{dtype_name(dtype)} {tuple(page_shape)}"
            )

    @property
    def nbytes(self) -> int:
        return sum(int(segment.nbytes) for segment in self.segments)
