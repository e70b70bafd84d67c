"""Physical KV pages behind the logical blocks of a :class:`BlockPool`.

One page per block, each holding every layer of ``block_size`` tokens contiguously:

    pages[block] : (layers, kv_components, block_size, kv_heads, head_dim)

so moving a block between tiers or nodes is one copy. K/V crossing this API is laid out
``(layers, kv_components, tokens, kv_heads, head_dim)``; token ``t`` of a run of blocks lives
in page ``block_ids[t // block_size]`` at row ``t % block_size``::

    tokens   0 .. 15 | 16 .. 31 | 32 .. 39
    table    [  7    ,    2     ,    9    ]      block_size = 16
    page 9   rows 0..7 used, rows 8..15 free (the writable tail)

The buffer is preallocated once; nothing on the hot path allocates pages.

``rows_filled[block]`` is the number of leading rows of a page that hold written K/V. A write
that starts at row 0 of a page resets it (a page is always filled from row 0 after it is
handed out), a write further in raises it, and :meth:`copy_block` sets it. Only pages whose
block is allocated carry a meaningful value; the engine uses it for utilisation statistics
and invariant checks.

Concurrency: not thread-safe; the owner serialises writes.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from kvcluster.core.block_pool import BlockIds, as_block_ids
from kvcluster.errors import InvalidArgument, InvalidKV

#: Whole pages as ``(pages, page_bytes)`` uint8 rows: one array, or segments of it in order.
PageRows = npt.NDArray[np.uint8] | tuple[npt.NDArray[np.uint8], ...]

_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class PageBuffer:
    """``num_blocks`` preallocated pages of shape ``page_shape`` on one device."""

    def __init__(
        self,
        num_blocks: int,
        page_shape: tuple[int, int, int, int, int],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks <= 0:
            raise InvalidArgument(f"num_blocks must be positive, got {num_blocks}")
        if len(page_shape) != 5 or any(int(d) <= 0 for d in page_shape):
            raise InvalidArgument(
                f"page_shape must be 5 positive dims (layers, kv_components, block_size, "
                f"kv_heads, head_dim), got {page_shape}"
            )
        self.page_shape = tuple(int(d) for d in page_shape)
        self.block_size = self.page_shape[2]
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.pages = torch.zeros((num_blocks, *self.page_shape), dtype=dtype, device=device)
        # The tensor's own device: "cuda" resolves to "cuda:0", so comparisons are exact.
        self.device = self.pages.device
        self.rows_filled: npt.NDArray[np.int32] = np.zeros(num_blocks, dtype=np.int32)
        # Every page as one row of raw bytes (a view): whole-page copies between nodes and
        # tiers are row gathers and scatters on it, in any dtype, with no layout change.
        self._page_rows = self.pages.view(torch.uint8).reshape(num_blocks, -1)

    @property
    def page_bytes(self) -> int:
        return self.pages[0].numel() * self.pages.element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.page_bytes // self.block_size

    def check_kv(self, kv: torch.Tensor, num_tokens: int | None = None, what: str = "kv") -> None:
        """Raise :class:`InvalidKV` unless ``kv`` is ``(L, C, T, H, D)`` of our dtype/device."""
        layers, comps, _, heads, dim = self.page_shape
        if not isinstance(kv, torch.Tensor):
            raise InvalidKV(f"{what} must be a torch.Tensor, got {type(kv).__name__}")
        expected = (layers, comps, num_tokens if num_tokens is not None else "T", heads, dim)
        if kv.dim() != 5 or (
            tuple(kv.shape[:2]) != (layers, comps)
            or tuple(kv.shape[3:]) != (heads, dim)
            or (num_tokens is not None and kv.shape[2] != num_tokens)
        ):
            raise InvalidKV(
                f"{what} has shape {tuple(kv.shape)}; expected (layers, kv_components, tokens, "
                f"kv_heads, head_dim) = {expected}"
            )
        if kv.dtype != self.dtype:
            raise InvalidKV(f"{what} has dtype {kv.dtype}; the cache stores {self.dtype}")
        if kv.device != self.device:
            raise InvalidKV(f"{what} is on {kv.device}; the cache lives on {self.device}")

    def write_tokens(self, block_ids: BlockIds, start: int, kv: torch.Tensor) -> None:
        """Write ``kv`` (``T`` tokens) at token offset ``start`` of the run of ``block_ids``.

        ``block_ids[0]`` holds tokens ``[0, block_size)`` of the run. ``kv`` must already be
        validated by :meth:`check_kv`, and the run must cover ``[start, start + T)``.
        """
        num_tokens = int(kv.shape[2])
        if num_tokens == 0:
            return
        bs = self.block_size
        end = start + num_tokens
        ids_np = as_block_ids(block_ids)
        first, last = start // bs, (end - 1) // bs
        assert last < ids_np.size, f"write of tokens [{start}, {end}) past the run's {ids_np.size} blocks"
        # At most three copies: the rest of a partial first page, a run of whole pages, the
        # head of a last page. Slice copies beat advanced indexing (no index tensors).
        pages = self.pages
        done = 0
        row = start % bs
        if row:
            count = min(bs - row, num_tokens)
            pages[int(ids_np[first]), :, :, row : row + count].copy_(kv[:, :, :count])
            done = count
        whole = (num_tokens - done) // bs
        if whole:
            page = (start + done) // bs
            src = kv[:, :, done : done + whole * bs]
            layers, comps, _, heads, dim = self.page_shape
            src = src.reshape(layers, comps, whole, bs, heads, dim).permute(2, 0, 1, 3, 4, 5)
            run = ids_np[page : page + whole]
            lo = int(run[0])
            if whole == 1 or (int(run[-1]) - lo == whole - 1 and bool(np.all(np.diff(run) == 1))):
                # Consecutive ids (a fresh pool, or a run freed together): one slice copy.
                pages[lo : lo + whole].copy_(src)
            else:
                # index_put_ takes the strided source as is (index_copy_ needs it contiguous,
                # ~4x slower on large pages) and, through a same-width integer view, works
                # bit-exact for every dtype (fp8 included).
                bits = _SAME_WIDTH_INT[pages.element_size()]
                index = _index_tensor(run, self.device)
                pages.view(bits).index_put_((index,), src.view(bits))
            done += whole * bs
        if done < num_tokens:
            count = num_tokens - done
            pages[int(ids_np[last]), :, :, :count].copy_(kv[:, :, done:])
        self._mark_filled(ids_np, start, end)

    def _mark_filled(self, ids: BlockIds, start: int, end: int) -> None:
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        fill = self.rows_filled
        head_row, tail_row = start % bs, (end - 1) % bs + 1
        if first == last:
            block = ids[first]
            fill[block] = tail_row if head_row == 0 else max(int(fill[block]), tail_row)
            return
        fill[ids[first]] = bs  # runs to the end of its page
        fill[ids[first + 1 : last]] = bs
        fill[ids[last]] = tail_row  # a write from row 0 of a page

    def read_tokens(self, block_ids: BlockIds, start: int, end: int) -> torch.Tensor:
        """K/V of tokens ``[start, end)`` of the run of ``block_ids``, as ``(L, C, T, H, D)``.

        Always a new tensor (never a view of the pages), so later writes cannot change it.
        """
        bs = self.block_size
        layers, comps, _, heads, dim = self.page_shape
        if end <= start:
            return torch.empty((layers, comps, 0, heads, dim), dtype=self.dtype, device=self.device)
        ids = _index_tensor(as_block_ids(block_ids), self.device)
        first, last = start // bs, (end - 1) // bs + 1
        sel = self.pages.index_select(0, ids[first:last])  # (n, L, C, bs, H, D), a copy
        n = last - first
        flat = sel.permute(1, 2, 0, 3, 4, 5).reshape(layers, comps, n * bs, heads, dim)
        offset = first * bs
        return flat[:, :, start - offset : end - offset]

    def read_layer(
        self, block_ids: BlockIds, layer: int, start: int, end: int
    ) -> torch.Tensor:
        """One layer of tokens ``[start, end)`` as ``(C, T, H, D)`` (a new tensor)."""
        bs = self.block_size
        _, comps, _, heads, dim = self.page_shape
        if end <= start:
            return torch.empty((comps, 0, heads, dim), dtype=self.dtype, device=self.device)
        ids = _index_tensor(as_block_ids(block_ids), self.device)
        first, last = start // bs, (end - 1) // bs + 1
        sel = self.pages[:, layer].index_select(0, ids[first:last])  # (n, C, bs, H, D)
        n = last - first
        flat = sel.permute(1, 0, 2, 3, 4).reshape(comps, n * bs, heads, dim)
        offset = first * bs
        return flat[:, start - offset : end - offset]

    def gather_pages(self, block_ids: BlockIds) -> npt.NDArray[np.uint8]:
        """The pages of ``block_ids`` as a new ``(len(block_ids), page_bytes)`` uint8 array
        in host memory, in this buffer's own page layout."""
        ids = as_block_ids(block_ids)
        if self.device.type == "cpu":
            # numpy's row gather is a plain memcpy per page, several times faster than
            # index_select over the 6-D page tensor.
            rows: npt.NDArray[np.uint8] = self._page_rows.numpy()[ids]
            return rows
        index = _index_tensor(ids, self.device)
        return self._page_rows.index_select(0, index).cpu().numpy()

    def page_views(self, block_ids: BlockIds, max_runs: int) -> list[npt.NDArray[np.uint8]] | None:
        """The pages of ``block_ids`` as zero-copy views of this (host) buffer, one
        ``(run length, page_bytes)`` view per run of consecutive ids, in order; ``None`` on a
        device, or when the ids fall into more than ``max_runs`` runs (then a gather is
        cheaper than many small buffers). The views alias the pool: the caller keeps the
        blocks pinned, and copies the views out, for as long as it reads them."""
        ids = as_block_ids(block_ids)
        if self.device.type != "cpu" or not ids.size:
            return None
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        if breaks.size + 1 > max_runs:
            return None
        host = self._page_rows.numpy()
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [ids.size])).tolist()
        return [host[int(ids[a]) : int(ids[a]) + (b - a)] for a, b in zip(starts, ends, strict=True)]

    def check_pages(self, rows: PageRows, num_tokens: int, what: str = "pages") -> None:
        """Raise :class:`InvalidKV` unless ``rows`` is ``(ceil(num_tokens / block_size),
        page_bytes)`` uint8, as :meth:`gather_pages` returns, or a tuple of such arrays
        (segments, e.g. :meth:`page_views` of a peer) whose rows add up to that."""
        expected = (-(-num_tokens // self.block_size), self.page_bytes)
        segments = rows if isinstance(rows, tuple) else (rows,)
        if not segments or not all(
            isinstance(s, np.ndarray) and s.dtype == np.uint8 and s.ndim == 2 and s.shape[1] == self.page_bytes
            for s in segments
        ) or sum(s.shape[0] for s in segments) != expected[0]:
            got = ", ".join(f"{s.dtype} {s.shape}" if isinstance(s, np.ndarray) else type(s).__name__
                            for s in segments) or "no segments"
            raise InvalidKV(f"{what} are {got}; {num_tokens} tokens need uint8 {expected}")

    def write_pages(self, block_ids: BlockIds, rows: PageRows, num_tokens: int) -> None:
        """Write whole pages (:meth:`check_pages`-valid ``rows``) holding the first
        ``num_tokens`` tokens of the run of ``block_ids``; the last page may be partial.
        Segments are written where their rows go, never joined first."""
        ids = as_block_ids(block_ids)
        offset = 0
        for segment in rows if isinstance(rows, tuple) else (rows,):
            self._write_rows(ids[offset : offset + segment.shape[0]], segment)
            offset += segment.shape[0]
        ids = ids[:offset]
        if ids.size:
            self._mark_filled(ids, 0, num_tokens)

    def _write_rows(self, ids: npt.NDArray[np.int64], rows: npt.NDArray[np.uint8]) -> None:
        if not ids.size:
            return
        if self.device.type == "cpu":  # works from read-only (object store) memory
            host = self._page_rows.numpy()
            if _consecutive(ids):  # a fresh pool hands out runs: one memcpy
                host[int(ids[0]) : int(ids[0]) + ids.size] = rows
            else:
                host[ids] = rows
        else:
            source = torch.from_numpy(rows if rows.flags.writeable else rows.copy())
            self._page_rows.index_copy_(0, _index_tensor(ids, self.device), source.to(self.device))

    def copy_block(self, src: int, dst: int, num_tokens: int | None = None) -> None:
        """Copy page ``src`` into page ``dst`` (only its first ``num_tokens`` rows if given)."""
        if num_tokens is None:
            self.pages[dst].copy_(self.pages[src])
            self.rows_filled[dst] = self.rows_filled[src]
        else:
            self.pages[dst, :, :, :num_tokens].copy_(self.pages[src, :, :, :num_tokens])
            self.rows_filled[dst] = num_tokens


def _consecutive(ids: BlockIds) -> bool:
    """Whether ``ids`` is a run ``k, k + 1, ...`` (one slice instead of a fancy index)."""
    n = ids.size
    return n > 0 and int(ids[-1]) - int(ids[0]) == n - 1 and (n < 3 or bool(np.all(np.diff(ids) == 1)))


def _index_tensor(ids: BlockIds, device: torch.device) -> torch.Tensor:
    """Block ids as an index tensor; read-only arrays (e.g. a prefix match's ids, which are
    views of immutable bytes) are copied, since torch cannot wrap them safely."""
    if not ids.flags.writeable:
        ids = ids.copy()
    return torch.from_numpy(ids).to(device)
