"""PageBuffer: token-granular writes and reads through a run of blocks, page copies, checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcluster.core.page_buffer import PageBuffer
from kvcluster.errors import InvalidArgument, InvalidKV

SHAPE = (2, 2, 4, 3, 5)  # layers, components, block_size 4, heads, dim


def kv(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 2, n, 3, 5, generator=torch.Generator().manual_seed(seed))


def test_layout_token_t_lives_in_block_t_div_bs_row_t_mod_bs() -> None:
    buf = PageBuffer(6, SHAPE, torch.float32)
    run = np.array([5, 2, 0], dtype=np.int64)
    data = kv(10)
    buf.write_tokens(run, 0, data)
    for t in range(10):
        page = buf.pages[run[t // 4]]
        assert torch.equal(page[:, :, t % 4], data[:, :, t])
    assert buf.rows_filled[[5, 2, 0]].tolist() == [4, 4, 2]


@pytest.mark.parametrize(("start", "n"), [(0, 8), (0, 3), (3, 1), (3, 9), (4, 4), (1, 2), (1, 12), (2, 6), (0, 13)])
def test_write_then_read_any_range(start: int, n: int) -> None:
    buf = PageBuffer(8, SHAPE, torch.float32)
    run = np.array([7, 1, 4, 3], dtype=np.int64)
    prefix = kv(start, 1)
    data = kv(n, 2)
    buf.write_tokens(run, 0, prefix)
    buf.write_tokens(run, start, data)
    assert torch.equal(buf.read_tokens(run, start, start + n), data)
    assert torch.equal(buf.read_tokens(run, 0, start + n), torch.cat([prefix, data], dim=2))
    layer = buf.read_layer(run, 1, start, start + n)
    assert torch.equal(layer, data[1])


def test_rows_filled_tracks_partial_pages() -> None:
    buf = PageBuffer(4, SHAPE, torch.float32)
    run = np.array([2, 3], dtype=np.int64)
    buf.write_tokens(run, 0, kv(1))
    assert buf.rows_filled[2] == 1
    buf.write_tokens(run, 1, kv(4))  # rows 1..3 of page 2, row 0 of page 3
    assert buf.rows_filled[[2, 3]].tolist() == [4, 1]
    buf.write_tokens(run, 4, kv(1))  # a rewrite from row 0 restarts the page
    assert buf.rows_filled[3] == 1
    buf.copy_block(2, 0, 3)
    assert buf.rows_filled[0] == 3
    buf.copy_block(2, 1)
    assert buf.rows_filled[1] == 4


def test_reads_are_copies() -> None:
    buf = PageBuffer(2, SHAPE, torch.float32)
    run = np.array([0, 1], dtype=np.int64)
    data = kv(6)
    buf.write_tokens(run, 0, data)
    out = buf.read_tokens(run, 0, 6)
    buf.write_tokens(run, 0, torch.zeros(2, 2, 6, 3, 5))
    assert torch.equal(out, data)


def test_copy_block_partial_leaves_the_rest() -> None:
    buf = PageBuffer(2, SHAPE, torch.float32)
    buf.write_tokens(np.array([0]), 0, kv(4, 1))
    buf.write_tokens(np.array([1]), 0, kv(4, 2))
    buf.copy_block(0, 1, 2)
    assert torch.equal(buf.pages[1, :, :, :2], buf.pages[0, :, :, :2])
    assert torch.equal(buf.pages[1, :, :, 2:], kv(4, 2)[:, :, 2:])


def test_empty_reads_and_writes() -> None:
    buf = PageBuffer(2, SHAPE, torch.float32)
    before = buf.pages.clone()
    buf.write_tokens(np.array([0]), 0, kv(0))
    assert torch.equal(buf.pages, before)
    assert buf.read_tokens(np.array([0]), 2, 2).shape == (2, 2, 0, 3, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.int8])
def test_narrow_dtypes_round_trip_bit_exact(dtype: torch.dtype) -> None:
    buf = PageBuffer(3, SHAPE, dtype)
    data = (kv(11) * 8).to(dtype)
    run = np.array([2, 0, 1])
    buf.write_tokens(run, 0, data[:, :, :1])  # a partial page
    buf.write_tokens(run, 1, data[:, :, 1:])  # its rest, a whole page (index copy), a tail
    assert torch.equal(buf.read_tokens(run, 0, 11).view(torch.uint8), data.view(torch.uint8))
    buf.write_tokens(run, 0, data[:, :, :8])  # two whole pages
    assert torch.equal(buf.read_tokens(run, 0, 11).view(torch.uint8), data.view(torch.uint8))


def test_sizes() -> None:
    buf = PageBuffer(3, SHAPE, torch.bfloat16)
    assert buf.page_bytes == 2 * 2 * 4 * 3 * 5 * 2
    assert buf.bytes_per_token == 2 * 2 * 3 * 5 * 2
    assert buf.device == torch.device("cpu")


def test_check_kv_names_the_problem() -> None:
    buf = PageBuffer(2, SHAPE, torch.float32)
    buf.check_kv(kv(3), 3)
    buf.check_kv(kv(3))
    with pytest.raises(InvalidKV, match=r"shape \(2, 2, 3, 3, 5\).*= \(2, 2, 4, 3, 5\)"):
        buf.check_kv(kv(3), 4)
    with pytest.raises(InvalidKV, match="shape"):
        buf.check_kv(torch.zeros(2, 2, 3, 3))
    with pytest.raises(InvalidKV, match=r"dtype torch\.float64"):
        buf.check_kv(kv(3).double())
    with pytest.raises(InvalidKV, match="meta"):
        buf.check_kv(torch.zeros(2, 2, 3, 3, 5, device="meta"))
    with pytest.raises(InvalidKV, match=r"torch\.Tensor"):
        buf.check_kv([1, 2])  # type: ignore[arg-type]


def test_bad_construction() -> None:
    with pytest.raises(InvalidArgument):
        PageBuffer(0, SHAPE, torch.float32)
    with pytest.raises(InvalidArgument):
        PageBuffer(2, (2, 2, 0, 3, 5), torch.float32)


def test_page_views_are_one_zero_copy_view_per_run_of_consecutive_blocks() -> None:
    buf = PageBuffer(12, SHAPE, torch.float32)
    buf.write_tokens(np.arange(12), 0, kv(48))
    ids = np.array([3, 4, 5, 9, 10, 1], dtype=np.int64)
    views = buf.page_views(ids, max_runs=3)
    assert views is not None and [view.shape[0] for view in views] == [3, 2, 1]
    host = buf.pages.numpy()
    assert all(np.shares_memory(view, host) for view in views)
    assert np.array_equal(np.concatenate(views), buf.gather_pages(ids))
    assert buf.page_views(ids, max_runs=2) is None  # too many runs: the caller gathers
    assert buf.page_views(np.empty(0, dtype=np.int64), max_runs=3) is None
