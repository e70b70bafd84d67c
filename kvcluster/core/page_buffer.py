"""Physical KV pages behind the logical blocks of a :class:`BlockPool`.

One page per block, each holding every layer of ``block_size`` tokens contiguously:

    pages[block] : (layers, kv_components, block_size, kv_heads, head_dim)

so moving a block between tiers or nodes is one copy. K/V crossing this API is laid out
``(layers, kv_components, tokens, kv_heads, head_dim)``; token ``t`` of a sequence lives in
page ``block_table[t // block_size]`` at row ``t % block_size``::

    tokens   0 .. 15 | 16 .. 31 | 32 .. 39
    table    [  7    ,    2     ,    9    ]      block_size = 16
    page 9   rows 0..7 used, rows 8..15 free (the writable tail)

The buffer is preallocated once; nothing on the hot path allocates pages.
Concurrency: not thread-safe; the owner serialises writes.
"""

from __future__ import annotations

import torch

from kvcluster.core.block_pool import BlockIds, as_block_ids
from kvcluster.errors import InvalidKV


class PageBuffer:
    def __init__(
        self,
        num_blocks: int,
        page_shape: tuple[int, int, int, int, int],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.page_shape = page_shape
        self.block_size = page_shape[2]
        self.dtype = dtype
        self.device = torch.device(device)
        self.pages = torch.zeros((num_blocks, *page_shape), dtype=dtype, device=self.device)

    @property
    def page_bytes(self) -> int:
        return self.pages[0].numel() * self.pages.element_size()

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
        if kv.device.type != self.device.type:
            raise InvalidKV(f"{what} is on {kv.device}; the cache lives on {self.device}")

    def write_tokens(self, block_ids: BlockIds, start: int, kv: torch.Tensor) -> None:
        """Write ``kv`` (``T`` tokens) at token offset ``start`` of the run of ``block_ids``.

        ``block_ids[0]`` holds tokens ``[0, block_size)`` of the run. ``kv`` must already be
        validated by :meth:`check_kv`.
        """
        num_tokens = kv.shape[2]
        if num_tokens == 0:
            return
        bs = self.block_size
        ids = torch.from_numpy(as_block_ids(block_ids))
        if start % bs == 0 and num_tokens % bs == 0:
            # Whole pages: one strided copy per page run.
            first = start // bs
            n = num_tokens // bs
            layers, comps, _, heads, dim = self.page_shape
            src = kv.reshape(layers, comps, n, bs, heads, dim).permute(2, 0, 1, 3, 4, 5)
            self.pages.index_copy_(0, ids[first : first + n].to(self.device), src.contiguous())
            return
        positions = torch.arange(start, start + num_tokens)
        blocks = ids[positions // bs].to(self.device)
        rows = (positions % bs).to(self.device)
        # Advanced indexing on dims 0 and 3 puts the token dim first: (T, L, C, H, D).
        self.pages[blocks, :, :, rows] = kv.permute(2, 0, 1, 3, 4)

    def read_tokens(self, block_ids: BlockIds, start: int, end: int) -> torch.Tensor:
        """K/V of tokens ``[start, end)`` of the run of ``block_ids``, as ``(L, C, T, H, D)``."""
        bs = self.block_size
        ids = torch.from_numpy(as_block_ids(block_ids)).to(self.device)
        if start % bs == 0 and end % bs == 0:
            sel = self.pages.index_select(0, ids[start // bs : end // bs])
            n, layers, comps, _, heads, dim = sel.shape
            return sel.permute(1, 2, 0, 3, 4, 5).reshape(layers, comps, n * bs, heads, dim)
        positions = torch.arange(start, end, device=self.device)
        out = self.pages[ids[positions // bs], :, :, positions % bs]
        return out.permute(1, 2, 0, 3, 4)

    def copy_block(self, src: int, dst: int, num_tokens: int | None = None) -> None:
        """Copy page ``src`` into page ``dst`` (only its first ``num_tokens`` rows if given)."""
        if num_tokens is None:
            self.pages[dst].copy_(self.pages[src])
        else:
            self.pages[dst, :, :, :num_tokens].copy_(self.pages[src, :, :, :num_tokens])
